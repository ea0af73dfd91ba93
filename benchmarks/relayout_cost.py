"""Stall of adaptive layout changes on the experiments' GPT-2 (tiny, byte-level).

Trains the same run twice through ``experiments.train`` with ``STQuantPolicy``:

* ``relayout``: ``stquant_jax.relayout`` after each decision, then ``nnx.jit``
  retraces and compiles the step for the new layout in the next step (the old way);
* ``adaptive_jit``: ``stquant_jax.adaptive_jit`` compiles each proposed layout in a
  background thread while training goes on and switches when it is ready.

For every layout change it reports the stall: the time of the step that first runs
the new layout minus the run's median step (and their ratio), plus the seconds that
step waited for a compile and spent re-packing; per run, the total compile time
(every compile of the train step and of the re-pack programs, foreground or
background) and the first step's time. Both runs happen in this process, one after
the other, so their medians are measured under the same conditions. Prints a table
and writes JSON.

It also reports the scratch memory of a re-pack (``memory_analysis()`` of the compiled
program) for a 2M-value 8-bit moment re-packed at 4 bits, against decoding the whole
moment first (``--memory-only`` reports just that, in seconds).

Usage: ``python -m benchmarks.relayout_cost [--steps 300] [--every 50] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks._io import write_json
from experiments.train import TrainConfig, train


def repack_memory() -> dict:
  """Scratch bytes of re-packing a 2048 x 1024 8-bit moment at 4 bits: the library's
  block-by-block program vs ``quantize(dequantize(q))`` (the whole moment decoded)."""
  import jax
  import jax.numpy as jnp
  import stquant_jax as sq
  from stquant_jax._src.layout import relayout as rl
  from stquant_jax._src.layout import repack
  q = sq.quantize(jax.random.normal(jax.random.key(0), (2048, 1024)), 8)
  st = sq.adamw(1e-3).init({"w": jnp.zeros((2048, 1024))})[0]._replace(mu={"w": q})
  _, changes, inputs = rl.plan(st, np.array([[4, 8]], np.int32))
  chunked = repack.program(tuple(changes), False).lower(inputs).compile().memory_analysis()
  whole = jax.jit(lambda c, s: tuple(jax.tree.leaves(sq.quantize(sq.dequantize(
      sq.QuantizedArray(c, s, q.code_map, 128, q.shape, q.dtype)), 4))))
  whole = whole.lower(q.codes, q.scales).compile().memory_analysis()
  return {"values": q.size, "moment_bytes": int(q.nbytes),
          "repack_temp_bytes": int(chunked.temp_size_in_bytes),
          "whole_decode_temp_bytes": int(whole.temp_size_in_bytes)}


def run(mode: str, args) -> dict:
  cfg = TrainConfig(model="gpt2", preset="tiny", tokenizer="bytes", steps=args.steps,
                    batch_size=8, seq_len=128, max_bytes=2_000_000,
                    optimizer="stquant_adaptive",
                    optimizer_kwargs={"every": args.every, "min_interval": args.min_interval},
                    eval_interval=args.steps, progress=args.progress, layout_switch=mode,
                    switch_delay=args.delay, compile_cache_dir=args.cache_dir)
  log = train(cfg)
  times = np.asarray(log["step_time_s"], float)
  median = float(log["median_step_time_s"])
  changes = []
  for e in log["relayouts"]:
    if e.get("after_last_step") or e["step"] > len(times):
      continue  # applied after the last step: no step ran at that layout
    # the relayout mode re-packs between steps, outside the timed step: count it too
    t = float(times[e["step"] - 1]) + (e["repack_s"] if mode == "relayout" else 0.0)
    changes.append({"step": e["step"], "proposal_step": e["proposal_step"],
                    "step_s": t, "stall_s": t - median, "stall_x_median": t / median,
                    "waited_s": e.get("waited_s"), "repack_s": e["repack_s"]})
  compiles = log.get("compiles")
  if compiles is not None:  # adaptive_jit records every compile it made
    compile_s = sum(c["seconds"] for c in compiles)
  else:  # relayout: the first step and each step after a change compiled (their excess)
    compile_s = float(times[0] - median) + sum(c["stall_s"] for c in changes)
  return {"mode": mode, "layout_changes": len(changes), "changes": changes,
          "median_step_s": median, "first_step_s": float(times[0]),
          "max_stall_x_median": max((c["stall_x_median"] for c in changes), default=None),
          "total_compile_s": compile_s, "fallback_compiles": log.get("fallback_compiles"),
          "total_s": float(times.sum()),
          "final_average_bits": log["final_memory"]["average_bits"]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--every", type=int, default=50)
  ap.add_argument("--min-interval", type=int, default=100)
  ap.add_argument("--delay", type=int, default=None,
                  help="adaptive_jit's switch delay (default: as soon as compiled)")
  ap.add_argument("--cache-dir", default=None, help="persistent compilation cache")
  ap.add_argument("--modes", default="relayout,adaptive_jit")
  ap.add_argument("--progress", action="store_true")
  ap.add_argument("--memory-only", action="store_true")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  memory = repack_memory()
  if args.memory_only:
    print(json.dumps(memory, indent=1))
    return
  out = {"steps": args.steps, "every": args.every, "min_interval": args.min_interval,
         "delay": args.delay, "repack_memory": memory,
         "runs": [run(m, args) for m in args.modes.split(",")]}
  print(json.dumps(out, indent=1))
  print("\n| mode | layout changes | stall per change (s) | stall / median step | "
        "median step (s) | total compile (s) |")
  print("|---|---|---|---|---|---|")
  for r in out["runs"]:
    stalls = ", ".join(f"{c['stall_s']:.2f}" for c in r["changes"]) or "-"
    ratios = ", ".join(f"{c['stall_x_median']:.1f}x" for c in r["changes"]) or "-"
    print(f"| {r['mode']} | {r['layout_changes']} | {stalls} | {ratios} | "
          f"{r['median_step_s']:.3f} | {r['total_compile_s']:.1f} |")
  write_json(out, args.json)


if __name__ == "__main__":
  main()
