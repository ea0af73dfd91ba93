"""Cost of the adaptive policy: statistics + decision vs the plain FixedBits update, and relayout.

One run, one machine, ratios taken in the same process (the machine is shared
and noisy): the jitted ``update + apply`` step of ``stquant_jax.adamw`` with
``FixedBits(8, 8)`` is the baseline; ``STQuantPolicy(every=K)`` is timed on the
same params and gradients over whole K-step periods (so the decision step is
included once per period), plus the decision step alone, and also as the
median of single, individually synchronised steps (less sensitive to other
processes' bursts). ``copies_*`` counts the copy ops on arrays of >= 1024
values in each compiled step: the statistics must not add copies of the
packed moments. ``relayout`` is timed when nothing changes (the common case)
and when every adaptive moment changes.

Usage: ``python -m benchmarks.policy_overhead [--params 4e6] [--every 100] [--periods 5] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import stquant_jax as sq
from benchmarks._io import write_json
from benchmarks.update_speed import make_params


def _stepper(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step, donate_argnums=(0, 1))


def _large_copies(step, params, state, grads) -> int:
  hlo = step.lower(params, state, grads).compile().as_text()
  dims = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} copy\(", hlo)
  return sum(1 for d in dims if int(np.prod([int(x) for x in d.split(",") if x])) >= 1024)


def _single_steps(step, params, state, grads, n):
  out = []
  for _ in range(n):
    jax.block_until_ready((params, state))
    t0 = time.perf_counter()
    params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    out.append(time.perf_counter() - t0)
  return out, params, state


def _time_steps(step, params, state, grads, n):
  jax.block_until_ready((params, state))
  t0 = time.perf_counter()
  for _ in range(n):
    params, state = step(params, state, grads)
  jax.block_until_ready((params, state))
  return time.perf_counter() - t0, params, state


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--params", type=float, default=4e6)
  ap.add_argument("--every", type=int, default=100)
  ap.add_argument("--periods", type=int, default=5)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  k = args.every
  base_params = make_params(args.params)
  n = sum(x.size for x in jax.tree.leaves(base_params))
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 1e-3, base_params)
  policy = sq.STQuantPolicy(every=k, min_interval=0)
  variants = {"fixed": sq.adamw(1e-3, policy=sq.FixedBits(8, 8)),
              "adaptive": sq.adamw(1e-3, policy=policy)}
  run, copies = {}, {}
  for name, tx in variants.items():
    step = _stepper(tx)
    params = jax.tree.map(jnp.copy, base_params)
    state = tx.init(params)
    copies[name] = _large_copies(step, params, state, grads)
    # warm up: compile, and bring the count to a multiple of K (the decision runs at count % K == 0)
    _, params, state = _time_steps(step, params, state, grads, k)
    run[name] = (step, params, state)
  # Interleave the two so drifting machine load hits both alike; take the median period.
  times = {"fixed": [], "adaptive": []}
  steps = {"fixed": [], "adaptive": []}
  for _ in range(args.periods):
    for name in ("fixed", "adaptive"):
      step, params, state = run[name]
      t, params, state = _time_steps(step, params, state, grads, k)
      times[name].append(t / k)
      ts, params, state = _single_steps(step, params, state, grads, k)
      steps[name].extend(ts)
      run[name] = (step, params, state)
  fixed_ms = 1e3 * float(np.median(times["fixed"]))
  adapt_ms = 1e3 * float(np.median(times["adaptive"]))
  fixed_step_ms = 1e3 * float(np.median(steps["fixed"]))
  adapt_step_ms = 1e3 * float(np.median(steps["adaptive"]))
  # The decision step alone vs an ordinary adaptive step: time single steps around a boundary.
  step, params, state = run["adaptive"]
  singles = {"decision": [], "ordinary": []}
  for _ in range(args.periods):
    _, params, state = _time_steps(step, params, state, grads, k - 1)
    t_ord, params, state = _time_steps(step, params, state, grads, 1)  # count % K == K - 1
    singles["ordinary"].append(t_ord)
    t_dec, params, state = _time_steps(step, params, state, grads, 1)  # count % K == 0: decision
    singles["decision"].append(t_dec)
  state = sq.relayout(state)
  # relayout when nothing changed
  t0 = time.perf_counter()
  reps = 20
  for _ in range(reps):
    same = sq.relayout(state)
  t_noop = (time.perf_counter() - t0) / reps
  assert same is state
  # relayout when every adaptive moment changes: force a proposal of 4 bits everywhere.
  ps = state[0].policy_state
  forced = ps._replace(proposed=jnp.where(ps.proposed == 32, 32, jnp.where(ps.proposed == 4, 6, 4)))
  st_forced = (state[0]._replace(policy_state=forced),) + tuple(state[1:])
  changed = int(np.sum(np.asarray(forced.proposed) != np.asarray(ps.actual)))
  t0 = time.perf_counter()
  new = sq.relayout(st_forced)
  jax.block_until_ready(new)
  t_first = time.perf_counter() - t0
  st_forced2 = (new[0]._replace(policy_state=ps._replace(actual=forced.proposed)),) + tuple(new[1:])
  t0 = time.perf_counter()
  jax.block_until_ready(sq.relayout(st_forced2))
  t_second = time.perf_counter() - t0
  out = {
      "params": n, "every": k, "periods": args.periods,
      "fixed_ms_per_step": fixed_ms, "adaptive_ms_per_step": adapt_ms,
      "overhead_ratio": adapt_ms / fixed_ms - 1,
      "fixed_median_step_ms": fixed_step_ms, "adaptive_median_step_ms": adapt_step_ms,
      "overhead_ratio_median_step": adapt_step_ms / fixed_step_ms - 1,
      "copies_fixed": copies["fixed"], "copies_adaptive": copies["adaptive"],
      "decision_step_ms": 1e3 * float(np.median(singles["decision"])),
      "ordinary_step_ms": 1e3 * float(np.median(singles["ordinary"])),
      "relayout_noop_ms": 1e3 * t_noop,
      "relayout_all_changed_first_ms": 1e3 * t_first,
      "relayout_all_changed_cached_ms": 1e3 * t_second,
      "moments_changed": changed,
      "jax": jax.__version__, "machine": platform.machine(), "device": str(jax.devices()[0]),
  }
  print(f"params {n:,}  K={k}")
  print(f"{'FixedBits(8,8) step':36s} {fixed_ms:9.2f} ms")
  print(f"{'STQuantPolicy step (mean over K)':36s} {adapt_ms:9.2f} ms  overhead {100 * out['overhead_ratio']:+.2f}%")
  print(f"{'median single step: fixed, adaptive':36s} {fixed_step_ms:9.2f} ms {adapt_step_ms:9.2f} ms  "
        f"overhead {100 * out['overhead_ratio_median_step']:+.2f}%")
  print(f"{'large copies in the step: fixed, adaptive':36s} {copies['fixed']:9d} {copies['adaptive']:12d}")
  print(f"{'  decision step alone':36s} {out['decision_step_ms']:9.2f} ms  (ordinary {out['ordinary_step_ms']:.2f} ms)")
  print(f"{'relayout, nothing changed':36s} {out['relayout_noop_ms']:9.3f} ms")
  print(f"{'relayout, %d moments changed' % changed:36s} {out['relayout_all_changed_first_ms']:9.1f} ms first (compiles), "
        f"{out['relayout_all_changed_cached_ms']:.1f} ms again")
  print(json.dumps(out))
  write_json(out, args.json)


if __name__ == "__main__":
  main()
