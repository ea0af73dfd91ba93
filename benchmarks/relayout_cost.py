"""Recompile cost of adaptive relayouts on the experiments' GPT-2 (tiny, byte-level).

Trains with ``STQuantPolicy`` through ``experiments.train`` (which calls
``stquant_jax.relayout`` every ``every`` steps), and reports, from the run's own
log: the number of relayouts that changed the layout, the time of the first step
after each (retrace + compile), the median ordinary step time, and the total
compile overhead relative to the run. Prints a table and writes JSON.

Usage: ``python -m benchmarks.relayout_cost [--steps 400] [--every 50] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks._io import write_json
from experiments.train import TrainConfig, train


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--every", type=int, default=50)
  ap.add_argument("--min-interval", type=int, default=100)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  cfg = TrainConfig(model="gpt2", preset="tiny", tokenizer="bytes", steps=args.steps,
                    batch_size=8, seq_len=128, max_bytes=2_000_000,
                    optimizer="stquant_adaptive",
                    optimizer_kwargs={"every": args.every, "min_interval": args.min_interval},
                    eval_interval=args.steps, progress=False)
  log = train(cfg)
  times = np.asarray(log["step_time_s"], float)
  changed = log["relayouts"]  # experiments.train logs the relayouts that changed the layout
  retrace = [float(times[e["step"]]) for e in changed if e["step"] < len(times)]
  ordinary = float(log["median_step_time_s"])
  out = {"steps": args.steps, "every": args.every, "layout_changes": len(changed),
         "relayout_s": [round(e["relayout_time_s"], 3) for e in changed],
         "first_step_s": float(times[0]), "retrace_step_s": retrace,
         "median_step_s": ordinary, "total_s": float(times.sum()),
         "compile_overhead_fraction": (sum(retrace) - ordinary * len(retrace)) / float(times.sum()),
         "final_average_bits": log["final_memory"]["average_bits"],
         "param_count": log["param_count"]}
  print(json.dumps(out, indent=1))
  write_json(out, args.json)


if __name__ == "__main__":
  main()
