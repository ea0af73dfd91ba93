"""Temporaries of the optimizer step (update + apply) per platform, compiled on this CPU (not run).

One GPT-2-shaped pytree (``experiments/models.py``'s GPT-2 small by default:
124M float32 parameters, the real 50257-row vocabulary), one jitted step
``params, state <- apply_updates(params, tx.update(grads, state, params))``,
compiled for: this CPU; an H100 (XLA's deviceless AOT, the jnp path and the
fused Pallas kernel); TPU v5e and v6e (libtpu, deviceless). Each platform
compiles in its own subprocess (``benchmarks/_compile_cases.py``). Optimizers:
``optax.adamw``, ``optax.adamw`` with bf16 m, stquant 8-bit, 4-bit, and the
adaptive layout a 4.5-bit budget reached on GPT-2 tiny
(``benchmarks/h100_memory.py``'s transferred layout).

What is reported per (platform, optimizer), from ``compiled.memory_analysis()``:

* ``temp_bytes`` and ``temp / param bytes`` (the goal: at most 5%), at the
  better of two donations (:data:`DONATIONS`): params, state and gradients
  (optax.adamw's best), or state and gradients, where the new parameters take
  the gradient's buffer and the update may be written there first, as it is in
  a train step where the gradient is a temporary of the step (a quantized
  update's best: XLA:CPU and XLA:GPU do not write into a donated input that no
  output aliases, so with the first donation the update needs a buffer of its
  own); both are in the JSON;
* compile seconds (first donation) and their ratio to ``optax.adamw`` on the
  same platform.

Nothing here runs on a GPU or TPU: these are compiler figures. Usage:
``python -m benchmarks.step_memory [--model small] [--platforms cpu h100 ...]
[--json docs/step_memory.json] [--md docs/step_memory.md]``; the H100 columns
need the ``cuda-compile`` extra, the TPU ones the ``tpu-compile`` extra.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp

from benchmarks._compile_cases import run_cases
from benchmarks._io import print_and_write
from benchmarks._targets import compile_for

PLATFORMS = ("cpu", "h100_jnp", "h100_kernel", "tpu_v5e", "tpu_v6e")
OPTIMIZERS = ("adamw", "adamw_bf16", "stquant8", "stquant4", "stquant_budget")
LABELS = {"adamw": "optax.adamw", "adamw_bf16": "optax.adamw, bf16 m",
          "stquant8": "stquant 8-bit", "stquant4": "stquant 4-bit",
          "stquant_budget": "stquant adaptive (4.5-bit budget's layout)"}
GOAL = 0.05
# Which arguments the step donates. "params_state_grads": the usual train-step donation;
# XLA:CPU and XLA:GPU do not write into a donated input no output aliases, so the
# gradient's buffer stays read-only there. "state_grads": the new parameters take the
# gradient's buffer, so the update may be written there first, as in a train step where
# the gradient is a temporary. Each optimizer is reported at the smaller of the two.
DONATIONS = {"params_state_grads": (0, 1, 2), "state_grads": (1, 2)}


def _tx(optimizer: str, backend: str):
  import optax

  import stquant_jax as sq
  if optimizer == "adamw":
    return optax.adamw(1e-3)
  if optimizer == "adamw_bf16":
    return optax.adamw(1e-3, mu_dtype=jnp.bfloat16)
  bits = {"stquant8": 8, "stquant4": 4, "stquant_budget": 8}[optimizer]
  return sq.adamw(1e-3, policy=sq.FixedBits(bits, bits), backend=backend)


def _args(model: str, optimizer: str, backend: str):
  """Abstract (params, state, grads) and the step."""
  import optax

  from benchmarks import _gpt2_step as gs
  from benchmarks import h100_memory as hm
  cfg = gs.gpt2_config(model)
  _, params = gs.abstract_params(cfg)
  tx = _tx(optimizer, backend)
  state = jax.eval_shape(tx.init, params)
  if optimizer == "stquant_budget":
    state = gs.with_layout(state, hm.transferred_layout(hm.LAYOUT, cfg.num_layers))

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step, (params, state, params)


def measure(model: str, target: str, optimizer: str) -> dict:
  """One (platform, optimizer): temporaries in both donation settings, compile time."""
  import stquant_jax as sq
  backend = "pallas" if target == "h100_kernel" else "jnp"
  step, args = _args(model, optimizer, backend)
  params, state, _ = args
  param_bytes = sum(math.prod(p.shape) * 4 for p in jax.tree.leaves(params))
  compiled = {}
  for name, donate in DONATIONS.items():
    t0 = time.perf_counter()
    c = compile_for(target, step, *args, donate_argnums=donate)
    compiled[name] = (c, time.perf_counter() - t0)
  temps = {k: int(c.memory_analysis().temp_size_in_bytes) for k, (c, _) in compiled.items()}
  best = min(temps, key=temps.get)
  hlo = compiled[best][0].as_text()
  return {"model": model, "target": target, "optimizer": optimizer,
          "param_bytes": param_bytes,
          "state_bytes": sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                             for x in jax.tree.leaves(state)),
          "average_bits": (sq.average_bits(state) if optimizer.startswith("stquant")
                           else None),
          "donation": best, "temp_bytes": temps[best],
          "temp_over_params": temps[best] / param_bytes,
          **{f"temp_bytes_{k}": v for k, v in temps.items()},
          "compile_s": compiled["params_state_grads"][1],
          "kernels": hlo.count("__gpu$xla.gpu.triton") + hlo.count("tpu_custom_call")}


CASE_SCRIPT = r"""
import json, os
from benchmarks import step_memory as sm
ARGS = json.loads(os.environ["STEP_MEMORY_ARGS"])
CASES = {f"{t}/{o}": (lambda t=t, o=o: sm.measure(ARGS["model"], t, o))
         for t in ARGS["platforms"] for o in ARGS["optimizers"]}
"""


def add_ratios(rows):
  """Compile time against optax.adamw on the same platform."""
  base = {r["target"]: r for r in rows if r.get("optimizer") == "adamw" and r.get("ok")}
  for r in rows:
    b = base.get(r.get("target"))
    if b is not None and r.get("ok"):
      r["compile_vs_adamw"] = r["compile_s"] / b["compile_s"]
  return rows


def markdown(rows, platforms) -> str:
  """Rows: optimizers; columns: platforms; cells: temp MB (x param bytes), compile ratio."""
  by = {(r["target"], r["optimizer"]): r for r in rows}
  head = "| optimizer | bits | " + " | ".join(platforms) + " |"
  lines = [head, "|---|---|" + "---|" * len(platforms)]
  for o in dict.fromkeys(r["optimizer"] for r in rows):
    some = next(r for r in rows if r["optimizer"] == o)
    bits = (f"{some['average_bits']:.2f}" if some.get("average_bits")
            else {"adamw": "32", "adamw_bf16": "24"}.get(o, "—"))
    cells = []
    for t in platforms:
      r = by.get((t, o))
      if r is None:
        cells.append("—")
      elif not r.get("ok"):
        cells.append("failed: " + r.get("error", "")[:60].replace("|", "/"))
      else:
        cells.append(f"{r['temp_bytes'] / 1e6:,.1f} MB ({100 * r['temp_over_params']:.2f}%); "
                     f"compile {r['compile_s']:.0f} s ({r.get('compile_vs_adamw', 0):.1f}x)")
    lines.append(f"| {LABELS[o]} | {bits} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="small", help="GPT-2 preset (tiny, small, medium)")
  parser.add_argument("--platforms", nargs="+", default=list(PLATFORMS), choices=PLATFORMS)
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
  parser.add_argument("--timeout", type=float, default=1200, help="seconds per compile")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--md", help="write the Markdown table here")
  args = parser.parse_args(argv)
  os.environ["STEP_MEMORY_ARGS"] = json.dumps(
      {"model": args.model, "platforms": args.platforms, "optimizers": args.optimizers})
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  names = [f"{t}/{o}" for t in args.platforms for o in args.optimizers]
  results = run_cases(CASE_SCRIPT, names, case_timeout=args.timeout, fail_on_spill=False)
  rows = []
  for n in names:
    r = dict(results[n])
    r.setdefault("target", n.split("/")[0])
    r.setdefault("optimizer", n.split("/")[1])
    r.pop("spills", None)
    rows.append(r)
  rows = add_ratios(rows)
  out = {"what": "optimizer step (update + apply) compiled on a CPU host, not run",
         "model": args.model, "goal_temp_over_params": GOAL, "jax": jax.__version__,
         "host": platform.machine(), "rows": rows}
  print_and_write(out, markdown(rows, args.platforms), args.json, args.md)


if __name__ == "__main__":
  main()
