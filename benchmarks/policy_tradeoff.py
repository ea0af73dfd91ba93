"""Bits vs loss: fixed 8-bit, fixed 4-bit and the adaptive STQuantPolicy against optax.adamw.

The byte-level MLP LM of benchmarks/_real_moments.py (CPython stdlib sources),
every variant trained from the same initialisation on the same batches; the
loss is measured on a held-out batch of 4096 windows. The adaptive runs call
``stquant_jax.relayout`` every ``every`` steps and log bit-widths with
``stquant_jax.BitHistory``. ``average_bits`` is taken at the end of training
(metadata and policy state included); ``mean_bits`` averages it over the run.

Usage: ``python -m benchmarks.policy_tradeoff [--steps 600] [--seeds 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
import optax

import stquant_jax as sq
from benchmarks._io import write_json
from benchmarks._real_moments import batches, init_mlp, make_step, mlp_loss, stdlib_bytes

HELD_OUT = 200_000


def run(tx, steps: int, seed: int, data, eval_xy, every: int | None = None):
  params = init_mlp(jax.random.key(seed))
  state = tx.init(params)

  step = make_step(tx)

  hist = sq.BitHistory() if every else None
  bits_log = []
  it = batches(data, 64, 16, seed)
  t0 = time.perf_counter()
  for i in range(1, steps + 1):
    params, state, _ = step(params, state, *next(it))
    if every and i % every == 0:
      state = sq.relayout(state)
      hist.record(i, state)
    if i % 50 == 0:
      try:
        bits_log.append(sq.average_bits(state))
      except ValueError:
        pass
  secs = time.perf_counter() - t0
  loss = float(mlp_loss(params, *eval_xy))
  out = {"eval_loss": loss, "seconds": secs}
  try:
    out["average_bits"] = sq.average_bits(state)
    out["mean_bits_over_run"] = float(np.mean(bits_log))
  except ValueError:  # optax.adamw: float32 moments
    out["average_bits"] = out["mean_bits_over_run"] = 32.0
  if hist is not None:
    out["history"] = hist.records
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--seeds", type=int, default=1)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--every", type=int, default=100)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  data = stdlib_bytes()
  train, held = data[:-HELD_OUT], data[-HELD_OUT:]
  eval_xy = next(batches(held, 4096, 16, 12345))
  k = args.every
  adaptive = sq.STQuantPolicy(every=k, min_interval=3 * k, anneal_steps=args.steps // 3)
  budget = sq.STQuantPolicy(every=k, min_interval=3 * k, anneal_steps=args.steps // 3,
                            target_bits=5.0)
  variants = [
      ("optax.adamw (fp32)", optax.adamw(args.lr, weight_decay=1e-4), None),
      ("fixed 8-bit", sq.adamw(args.lr, policy=sq.FixedBits(8, 8)), None),
      ("fixed 4-bit", sq.adamw(args.lr, policy=sq.FixedBits(4, 4)), None),
      ("adaptive", sq.adamw(args.lr, policy=adaptive), k),
      ("adaptive, target_bits=5", sq.adamw(args.lr, policy=budget), k),
  ]
  rows = []
  for name, tx, every in variants:
    runs = [run(tx, args.steps, s, train, eval_xy, every) for s in range(args.seeds)]
    row = {"variant": name, "runs": runs,
           "eval_loss": float(np.mean([r["eval_loss"] for r in runs])),
           "eval_loss_std": float(np.std([r["eval_loss"] for r in runs])),
           "average_bits": float(np.mean([r["average_bits"] for r in runs]))}
    if "mean_bits_over_run" in runs[0]:
      row["mean_bits_over_run"] = float(np.mean([r["mean_bits_over_run"] for r in runs]))
    rows.append(row)
  base = rows[0]["eval_loss"]
  print(f"{'variant':26s} {'avg bits':>8s} {'run mean':>8s} {'eval loss':>10s} {'vs adamw':>9s}")
  for r in rows:
    r["loss_vs_adamw"] = r["eval_loss"] / base - 1
    print(f"{r['variant']:26s} {r['average_bits']:8.3f} {r.get('mean_bits_over_run', 32.0):8.3f} "
          f"{r['eval_loss']:10.4f} {100 * r['loss_vs_adamw']:+8.2f}%")
  out = {"steps": args.steps, "seeds": args.seeds, "lr": args.lr, "every": k,
         "policy": repr(adaptive), "budget_policy": repr(budget),
         "jax": jax.__version__, "machine": platform.machine(), "rows": rows}
  write_json(out, args.json)
  return out


if __name__ == "__main__":
  main()
