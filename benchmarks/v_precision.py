"""Which moment's precision sends low-bit GPT-2 runs onto the slow trajectory, m's or v's?

On the quality suite's GPT-2 task, fixed 4-, 5- and 6-bit runs fell onto a slower
trajectory on seeds 3 and 4 (+4 to +14% final validation loss against fp32
AdamW; docs/quality.md). This probe reruns those seeds with one moment at 8
bits and the other at the width that fell: ``stquant8v4`` / ``stquant4v8`` on
seed 4 (``stquant4`` fell there) and ``stquant8v5`` / ``stquant5v8`` on seed 3
(``stquant5`` fell there). Everything else is the suite's run (model, data,
schedule, seed). Each final validation loss is compared, paired, with the
suite's ``adamw`` run of the same seed (read from ``--runs``, written by
``python -m experiments.compare``). A finished run in ``--out`` with the same
config (``experiments.compare.same_config``) is reused.

Usage: ``python -m benchmarks.v_precision --runs results/runs --out /tmp/v_precision
--json docs/v_precision.json``
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

from benchmarks._io import write_json
from experiments import compare, quality, train

# (optimizer, seed): the uniform width that fell on that seed, then m and v swapped at 8 bits.
PROBES = (("stquant4", 4), ("stquant8v4", 4), ("stquant4v8", 4),
          ("stquant5", 3), ("stquant8v5", 3), ("stquant5v8", 3))


def config(name: str, seed: int, out: pathlib.Path) -> train.TrainConfig:
  """The suite's GPT-2 run of ``name`` and ``seed``, logged under ``out``."""
  return compare.suite_config("gpt2", name, seed, out)


def run(probes, runs: pathlib.Path, out: pathlib.Path) -> dict:
  rows = []
  for name, seed in probes:
    cfg = config(name, seed, out)
    path = pathlib.Path(cfg.log_path)
    log = json.loads(path.read_text()) if compare.same_config(path, cfg) else train.train(cfg)
    ref = quality.final_loss(json.loads((runs / f"gpt2__adamw__s{seed}.json").read_text()))
    loss = quality.final_loss(log)
    rows.append({"optimizer": name, "seed": seed, "final_loss": loss,
                 "delta_pct": 100 * (loss / ref - 1)})
  return {"runs": rows}


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.v_precision",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--runs", default="results/runs",
                  help="the suite's run logs (adamw of the same seeds)")
  ap.add_argument("--out", default=None, help="folder for this probe's run logs")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="v_precision_"))
  out.mkdir(parents=True, exist_ok=True)
  res = run(PROBES, pathlib.Path(args.runs), out)
  for r in res["runs"]:
    print(f"{r['optimizer']:>11} seed {r['seed']}: Δ vs fp32 AdamW {r['delta_pct']:+.2f}%")
  write_json(res, args.json)


if __name__ == "__main__":
  main()
