"""Update+apply time of ``stquant_jax.adamw`` vs ``optax.adamw`` on one ~25M-parameter pytree.

Everything is measured in one run on the same machine: the baseline is
``optax.adamw`` (float32 states) with donated buffers; each quantized variant is
timed the same way. Reports the median time per step, its ratio to the baseline,
and state bytes per parameter; prints a table and writes JSON.

Usage: ``python -m benchmarks.update_speed [--params 25e6] [--steps 20] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import stquant_jax as sq
from benchmarks._io import write_json


def make_params(n_target: float, d: int = 768, seed: int = 0):
  """GPT-2-like layer shapes (attention + MLP + norms) until ~n_target values."""
  shapes = {}
  layer = 0
  while sum(np.prod(s) for s in shapes.values()) < n_target:
    shapes[f"h{layer}.attn.qkv"] = (d, 3 * d)
    shapes[f"h{layer}.attn.proj"] = (d, d)
    shapes[f"h{layer}.mlp.fc"] = (d, 4 * d)
    shapes[f"h{layer}.mlp.proj"] = (4 * d, d)
    shapes[f"h{layer}.ln1.scale"] = (d,)
    shapes[f"h{layer}.ln2.scale"] = (d,)
    shapes[f"h{layer}.mlp.bias"] = (4 * d,)
    layer += 1
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {k: jax.random.normal(kk, s, jnp.float32) * 0.02 for kk, (k, s) in zip(keys, shapes.items())}


def flashoptim_peer():
  """flashoptim-jax's 8-bit AdamW (float32 parameters kept: ``master_weight_bits=None``)
  as ``(init, step)``, or None when the package is not installed (it is not a dependency)."""
  try:
    import flashoptim_jax
  except ImportError:
    return None
  # fused=True is a Pallas GPU kernel; on CPU its jnp path runs.
  fused = jax.default_backend() == "gpu"
  opt = flashoptim_jax.flash_adamw(1e-3, quantize=True, master_weight_bits=None, fused=fused)
  return opt.init, opt.step


def time_optimizer(tx, params, grads, steps: int, warmup: int = 3):
  """Median seconds per jitted update + apply (params and state donated); ``tx`` is an
  optax transform or an ``(init, step)`` pair whose ``step(params, state, grads)``
  returns ``(params, state)``."""
  if isinstance(tx, tuple):
    init, step = tx
    state = init(params)
  else:
    state = tx.init(params)

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params)
  for _ in range(warmup):
    params, state = step(params, state, grads)
  jax.block_until_ready((params, state))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    times.append(time.perf_counter() - t0)
  nbytes = (sq.state_nbytes(state) if not isinstance(tx, tuple)
            else sum(x.nbytes for x in jax.tree.leaves(state)))
  return float(np.median(times)), nbytes, state


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--params", type=float, default=25e6)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--bits", type=int, nargs="*", default=[8, 4])
  ap.add_argument("--rounding", nargs="*", default=["nearest", "stochastic"],
                  choices=["nearest", "stochastic"],
                  help="moment rounding(s) to time (the default is stochastic)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)

  params = make_params(args.params)
  n = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 1e-3, params)
  variants = [("optax.adamw", optax.adamw(1e-3))]
  variants += [(f"stquant_jax.adamw {b}-bit {r}",
                sq.adamw(1e-3, policy=sq.FixedBits(b, b), rounding=r))
               for b in args.bits for r in args.rounding]
  peer = flashoptim_peer()
  if peer is not None:
    variants.append(("flashoptim-jax 8-bit (peer)", peer))
  rows = []
  base = None
  for name, tx in variants:
    t, nbytes, state = time_optimizer(tx, params, grads, args.steps)
    base = base if base is not None else t
    row = {"optimizer": name, "ms": 1e3 * t, "ratio_vs_optax": t / base,
           "state_bytes": nbytes, "state_bytes_per_param": nbytes / n}
    if name.startswith("stquant"):
      row["average_bits"] = sq.average_bits(state)
    rows.append(row)
    print(f"{name:38s} {1e3 * t:8.2f} ms  x{t / base:5.2f}  {nbytes / n:6.3f} B/param", flush=True)
  out = {"params": n, "steps": args.steps, "device": str(jax.devices()[0]),
         "cpu_count": jax.local_device_count(), "machine": platform.machine(),
         "jax": jax.__version__, "rows": rows}
  print(json.dumps(out, indent=1))
  write_json(out, args.json)


if __name__ == "__main__":
  main()
