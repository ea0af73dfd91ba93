"""Peak memory and compile time of GPT-2 train steps, compiled for an H100 on this CPU (not run).

The experiments' GPT-2 (``experiments/models.py``; small 124M and medium 355M,
bf16 compute, float32 params) and optimizer chain (``experiments.train.make_tx``:
global-norm clipping, weight-decay mask, schedule), one whole train step
(forward, backward, optimizer update, apply) with params and optimizer state
donated, compiled for an H100 with XLA's deviceless ahead-of-time compiler
(``pallas_kernels.compile_for_target``), each compile in its own subprocess.
Optimizers: ``optax.adamw`` (float32 m and v), ``optax.adamw`` with bf16 m,
stquant 8-bit and 4-bit, and STQuant adaptive at a budget (``target_bits=4.5``)
with the per-leaf layout it reached on GPT-2 tiny (``--layout``, a run log of
``experiments.compare``) transferred by layer position.

Reported per run (JSON, and a Markdown table with ``--md``):

* peak bytes = arguments + outputs - aliased + temporaries
  (``compiled.memory_analysis()``), and the drop against ``optax.adamw``
  next to the state bytes saved: the goal is a drop of at least 95% of them;
* compile seconds and their ratio to ``optax.adamw`` (goal: at most 2x);
* the largest buffers of the program (XLA's memory-usage report);
* per-device optimizer-state bytes with FSDP over 8 devices
  (``experiments.fsdp``'s rule; GPT-2's 50257-row embedding cannot be split by
  rows, so its moments stay whole; the padded-vocabulary column uses 50304);
* a *modeled* optimizer time: the HBM bytes the update and apply move, over
  the H100's 3.35 TB/s. A model, not a measurement;
* register spills ``ptxas`` reported: in our kernels (none allowed) and in XLA's
  own fusions (listed).

Usage: ``python -m benchmarks.h100_memory [--models small medium] [--json docs/h100_memory.json]
[--md docs/h100_memory.md]``. Needs the ``cuda-compile`` extra. Nothing here runs on a GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType

import pallas_kernels as pk
import stquant_jax as sq
from benchmarks import _gpt2_step as gs
from benchmarks._compile_cases import OUR_KERNELS, run_cases
from benchmarks._io import print_and_write
from benchmarks._targets import HBM_BYTES_PER_S, compile_for
from experiments import fsdp, optimizers, train

OPTIMIZERS = ("adamw", "adamw_bf16", "stquant8", "stquant4", "stquant_budget")
LABELS = {"adamw": "optax.adamw", "adamw_bf16": "optax.adamw, bf16 m",
          "stquant8": "stquant 8-bit", "stquant4": "stquant 4-bit",
          "stquant_budget": "STQuant adaptive (budget run's layout)"}
LAYOUT = "benchmarks/data/gpt2_budget_layout.json"  # GPT-2 tiny budget run: final layout
FSDP_DEVICES = 8


def transferred_layout(path: str, num_layers: int):
  """``bits_of(name, signed)`` from a run log's final layout (GPT-2 tiny), block ``i`` of
  the target model taking the bits of block ``i * tiny_layers // num_layers``."""
  with open(path) as f:
    final = json.load(f)["bit_history"][-1]
  tiny = {k.removesuffix("/value"): v for k, v in final["mu_bits"].items()}
  tiny_nu = {k.removesuffix("/value"): v for k, v in final["nu_bits"].items()}
  tiny_layers = 1 + max(int(m.group(1)) for k in tiny if (m := re.match(r"blocks/(\d+)/", k)))

  def bits_of(name: str, signed: bool):
    name = name.removesuffix("/value")
    m = re.match(r"blocks/(\d+)/(.*)", name)
    if m:
      name = f"blocks/{int(m.group(1)) * tiny_layers // num_layers}/{m.group(2)}"
    bits = (tiny if signed else tiny_nu).get(name)
    return None if bits is None or bits > 8 else bits
  return bits_of


def optimizer_bytes(params, opt_state) -> int:
  """HBM bytes the optimizer update + apply move (a model).

  Float32 / bf16 moments, one fused XLA pass: read g, p, m, v; write p, m, v.
  Quantized moments (the fused kernel, then ``apply_updates``): the kernel reads
  g, codes and scales, writes the update (into g's buffer), codes and scales; the
  apply reads p and the update and writes p. Gradient clipping is left out (the
  same for every optimizer).
  """
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, (sq.ScaleByStquantState,))) if isinstance(s, sq.ScaleByStquantState)]
  size = lambda x: math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  p_leaves = jax.tree.leaves(params)
  if not states:  # optax: the moments are the state's param-shaped float leaves
    moments = [x for x in jax.tree.leaves(opt_state) if math.prod(x.shape) > 1]
    return sum(3 * size(p) for p in p_leaves) + sum(2 * size(m) for m in moments)
  st = states[0]
  is_q = lambda x: isinstance(x, sq.QuantizedArray)
  total = 0
  for p, m, v in zip(p_leaves, jax.tree.leaves(st.mu, is_leaf=is_q),
                     jax.tree.leaves(st.nu, is_leaf=is_q)):
    qbytes = lambda q: size(q.codes) + size(q.scales) if is_q(q) else size(q)
    if is_q(m) and is_q(v):
      total += size(p) * 5 + 2 * (qbytes(m) + qbytes(v))  # g, u w+r, p r+w
    else:
      total += size(p) * 3 + 2 * (qbytes(m) + qbytes(v))
  return total


def fsdp_state_bytes(params, opt_state, n: int) -> int:
  """Per-device bytes of the optimizer state with FSDP over ``n`` devices (abstract mesh)."""
  mesh = AbstractMesh((n,), ("data",), (AxisType.Auto,))
  pshard = fsdp.param_shardings(params, mesh)
  return fsdp.per_device_bytes(opt_state, fsdp.state_shardings(opt_state, pshard))


def largest_buffers(dump_dir: str, k: int = 5):
  """The ``k`` largest allocations of the last compiled program (XLA's memory report)."""
  reports = sorted(glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt")),
                   key=os.path.getmtime)
  if not reports:
    return []
  rows = []
  with open(reports[-1]) as f:
    for line in f:
      m = re.match(r"\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*\d+;\s*\d+;\s*(.*)", line)
      if m:
        unit = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[m.group(2)]
        rows.append({"bytes": int(float(m.group(1)) * unit), "values": m.group(3).strip()[:160]})
      elif rows and not line.strip():
        break
  return sorted(rows, key=lambda r: -r["bytes"])[:k]


def measure(preset: str, optimizer: str, batch: int, seq: int, layout: str | None,
            dump_dir: str | None = None, vocab: int | None = None, target: str = "h100") -> dict:
  """Compiles one train step for ``target`` (an H100 by default, or a TPU chip:
  ``benchmarks/_targets.py``) and returns its numbers (see the module doc)."""
  extra = {} if vocab is None else {"vocab_size": vocab}
  cfg = gs.gpt2_config(preset, dtype="bfloat16", **extra)
  tx = train.make_tx(train.TrainConfig(optimizer=optimizer, steps=1000))
  step, (params, opt_state, tokens) = gs.abstract_args(cfg, tx, batch, seq)
  if optimizer == "stquant_budget":
    opt_state = gs.with_layout(opt_state, transferred_layout(layout, cfg.num_layers))
  t0 = time.perf_counter()
  compiled = compile_for(target, step, params, opt_state, tokens, donate_argnums=(0, 1))
  seconds = time.perf_counter() - t0
  hlo = compiled.as_text()
  out = {"model": preset, "optimizer": optimizer, "target": target, "batch": batch,
         "seq_len": seq,
         "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
         "param_bytes": sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(params)),
         "state_bytes": optimizers.state_bytes(opt_state),
         "average_bits": (optimizers.average_bits(opt_state)
                          if optimizer.startswith("stquant") else None),
         "compile_s": seconds, "kernels": (hlo.count('custom_call_target="' + pk.TRITON_CALL)
                     + hlo.count("tpu_custom_call")),
         "optimizer_hbm_bytes": optimizer_bytes(params, opt_state),
         "fsdp_state_bytes_per_device": fsdp_state_bytes(params, opt_state, FSDP_DEVICES),
         **pk.memory_summary(compiled)}
  if vocab is None:  # FSDP with the embedding padded to 50304 rows (divisible by 8)
    _, (pp, ps, _) = gs.abstract_args(gs.gpt2_config(preset, vocab_size=50304), tx, 1, 8)
    if optimizer == "stquant_budget":
      ps = gs.with_layout(ps, transferred_layout(layout, cfg.num_layers))
    out["fsdp_state_bytes_per_device_vocab50304"] = fsdp_state_bytes(pp, ps, FSDP_DEVICES)
  if dump_dir:
    out["largest_buffers"] = largest_buffers(dump_dir)
    for f in glob.glob(os.path.join(dump_dir, "*")):  # the dumps are large
      shutil.rmtree(f) if os.path.isdir(f) else os.remove(f)
  return out


CASE_SCRIPT = r"""
import json, os
from benchmarks import h100_memory as hm
ARGS = json.loads(os.environ["H100_MEMORY_ARGS"])
CASES = {f"{m}/{o}": (lambda m=m, o=o: hm.measure(m, o, ARGS["batch"], ARGS["seq"],
                                                    ARGS["layout"], ARGS["dump"],
                                                    target=ARGS["target"]))
         for m in ARGS["models"] for o in ARGS["optimizers"]}
"""


def add_ratios(rows):
  """Drop of the peak and compile-time ratio against optax.adamw of the same model."""
  base = {r["model"]: r for r in rows if r.get("optimizer") == "adamw" and r.get("ok", True)}
  for r in rows:
    b = base.get(r["model"])
    if b is None or "peak_bytes" not in r:
      continue
    r["state_saved_bytes"] = b["state_bytes"] - r["state_bytes"]
    r["peak_drop_bytes"] = b["peak_bytes"] - r["peak_bytes"]
    r["drop_over_saved"] = (r["peak_drop_bytes"] / r["state_saved_bytes"]
                            if r["state_saved_bytes"] > 0 else None)
    r["compile_vs_adamw"] = r["compile_s"] / b["compile_s"]
    bandwidth = HBM_BYTES_PER_S[r.get("target", "h100").split("_jnp")[0]]
    r["modeled_optimizer_ms"] = r["optimizer_hbm_bytes"] / bandwidth * 1e3
  return rows


def markdown(rows) -> str:
  mb = lambda x: f"{x / 1e6:,.0f}"
  lines = ["| model | optimizer | bits | state MB | peak MB | temp MB | peak drop / state "
           "saved | compile s (vs adamw) | FSDP x8 state MB / device (vocab 50257 / 50304) | "
           "modeled optimizer ms |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "peak_bytes" not in r:
      lines.append(f"| gpt2-{r['model']} | {LABELS[r['optimizer']]} | failed: "
                   f"{r.get('error', '')[:80]} ||||||||")
      continue
    ratio = "reference" if r["optimizer"] == "adamw" else (
        f"{r['drop_over_saved']:.3f}" if r["drop_over_saved"] is not None else "—")
    bits = (f"{r['average_bits']:.2f}" if r["average_bits"] else
             {"adamw": "32", "adamw_bf16": "24"}[r["optimizer"]])
    lines.append(
        f"| gpt2-{r['model']} | {LABELS[r['optimizer']]} | {bits} | {mb(r['state_bytes'])} | "
        f"{mb(r['peak_bytes'])} | {mb(r['temp_bytes'])} | {ratio} | {r['compile_s']:.0f} "
        f"({r['compile_vs_adamw']:.2f}x) | {mb(r['fsdp_state_bytes_per_device'])} / "
        f"{mb(r['fsdp_state_bytes_per_device_vocab50304'])} | "
        f"{r['modeled_optimizer_ms']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["small", "medium"])
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=OPTIMIZERS)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--layout", default=LAYOUT, help="run log with the adaptive layout")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
  parser.add_argument("--target", default="h100", help="h100, tpu_v5e, tpu_v6e or tpu_v5p")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--md", help="write the Markdown table here")
  args = parser.parse_args(argv)
  dump = tempfile.mkdtemp(prefix="h100_memory_")
  os.environ["H100_MEMORY_ARGS"] = json.dumps(
      {"models": args.models, "optimizers": args.optimizers, "batch": args.batch,
       "seq": args.seq, "layout": args.layout, "dump": dump, "target": args.target})
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  names = [f"{m}/{o}" for m in args.models for o in args.optimizers]
  try:
    results = run_cases(CASE_SCRIPT, names, case_timeout=args.timeout, fail_on_spill=False,
                        xla_flags=(f"--xla_dump_to={dump}", "--xla_dump_hlo_pass_re=NONE"))
  finally:
    shutil.rmtree(dump, ignore_errors=True)
  rows = []
  for n in names:
    r = results[n]
    if not r["ok"]:
      r = dict(r, model=n.split("/")[0], optimizer=n.split("/")[1])
    r["kernel_spills"] = [s for s in r["spills"] if s[0].startswith(OUR_KERNELS)]
    r["xla_fusion_spills"] = [s for s in r.pop("spills") if not s[0].startswith(OUR_KERNELS)]
    rows.append(r)
  rows = add_ratios(rows)
  out = {"what": f"compiled for {args.target} (deviceless AOT on a CPU), not run",
         "jax": jax.__version__, "host": platform.machine(), "rows": rows}
  print_and_write(out, markdown(rows), args.json, args.md)


if __name__ == "__main__":
  main()
