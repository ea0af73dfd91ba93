"""Compiled temporaries of the generic wrapper's step, whole-leaf vs streamed (CPU).

One float32 leaf (default 4096 x 4096, 67 MB), ``step(params, state, grads)`` =
update + ``optax.apply_updates``, jitted with state and gradients donated, compiled
for this machine's CPU; ``memory_analysis().temp_size_in_bytes`` for each optimizer:
optax's own (float32 state), ``sq.quantized(optax.<name>)`` with ``elementwise=False``
(each moment dequantized whole: before) and the alias (``elementwise=True``, the
moments streamed a chunk of blocks at a time: after), and ``sq.adamw`` (the fused
streamed Adam). Ratios are to the parameter bytes, all measured in this run. Prints
JSON, then a Markdown table.

Usage: ``python -m benchmarks.generic_temps [--shape 4096 4096] [--bits 8] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import math
import warnings

import jax
import jax.numpy as jnp
import optax
from optax import contrib

import stquant_jax as sq
from benchmarks._io import print_and_write
from tests._hlo import step_temp_bytes


def cases(bits: int):
  """``(name, optax twin, whole-leaf wrapper, streamed)`` for each optimizer."""
  pol = sq.FixedBits(bits, bits)
  wrap = lambda tx, ew: sq.quantized(tx, policy=pol, elementwise=ew)
  return [
      ("lion", optax.lion(1e-4), wrap(optax.lion(1e-4), False), sq.lion(1e-4, policy=pol)),
      ("sgd_momentum", optax.sgd(1e-2, 0.9), wrap(optax.sgd(1e-2, 0.9), False),
       sq.sgd(1e-2, 0.9, policy=pol)),
      ("rmsprop", optax.rmsprop(1e-3), wrap(optax.rmsprop(1e-3), False),
       sq.rmsprop(1e-3, policy=pol)),
      ("rmsprop_centered_momentum", optax.rmsprop(1e-3, centered=True, momentum=0.9),
       wrap(optax.rmsprop(1e-3, centered=True, momentum=0.9), False),
       sq.rmsprop(1e-3, centered=True, momentum=0.9, policy=pol)),
      ("ademamix", contrib.ademamix(1e-3), wrap(contrib.ademamix(1e-3), False),
       sq.ademamix(1e-3, policy=pol)),
      ("adamw", optax.adamw(1e-3), wrap(optax.adamw(1e-3), False),
       wrap(optax.adamw(1e-3), True)),
  ]


def measure(tx, shape) -> dict:
  """Temporaries and state bytes of ``tx``'s compiled step on one leaf of ``shape``."""
  params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
  state = jax.eval_shape(tx.init, params)
  state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
  return {"temp_MB": step_temp_bytes(tx, params) / 1e6, "state_MB": state_bytes / 1e6}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", type=int, nargs="+", default=[4096, 4096])
  ap.add_argument("--bits", type=int, default=8)
  ap.add_argument("--json", default="")
  args = ap.parse_args(argv)
  warnings.simplefilter("ignore")  # jax's note on donated buffers it cannot reuse
  shape = tuple(args.shape)
  param_mb = math.prod(shape) * 4 / 1e6
  rows = []
  for name, twin, whole, streamed in cases(args.bits):
    row = {"optimizer": name}
    for label, tx in (("optax", twin), ("whole_leaf", whole), ("streamed", streamed)):
      m = measure(tx, shape)
      row[f"{label}_temp_MB"], row[f"{label}_state_MB"] = m["temp_MB"], m["state_MB"]
      row[f"{label}_temp_vs_params"] = round(m["temp_MB"] / param_mb, 4)
    rows.append(row)
  fused = measure(sq.adamw(1e-3, policy=sq.FixedBits(args.bits, args.bits)), shape)
  out = {"shape": list(shape), "bits": args.bits, "param_MB": param_mb,
         "backend": jax.default_backend(), "rows": rows,
         "sq.adamw": dict(fused, temp_vs_params=round(fused["temp_MB"] / param_mb, 4))}
  lines = [f"One {shape} float32 leaf ({param_mb:.1f} MB), {args.bits}-bit, "
           f"{jax.default_backend()}: step temporaries MB (x param bytes)", "",
           "| optimizer | optax | whole leaf (elementwise=False) | streamed | state MB "
           "(optax -> quantized) |", "|---|---|---|---|---|"]
  for r in rows:
    cell = lambda k: f"{r[k + '_temp_MB']:.1f} ({r[k + '_temp_vs_params']:.3f}x)"
    lines.append(f"| {r['optimizer']} | {cell('optax')} | {cell('whole_leaf')} | "
                 f"{cell('streamed')} | {r['optax_state_MB']:.1f} -> "
                 f"{r['streamed_state_MB']:.1f} |")
  lines.append(f"| sq.adamw (fused) | | | {fused['temp_MB']:.1f} "
               f"({out['sq.adamw']['temp_vs_params']:.3f}x) | {fused['state_MB']:.1f} |")
  print_and_write(out, "\n".join(lines), args.json)


if __name__ == "__main__":
  main()
