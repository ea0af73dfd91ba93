"""Can the kernels move to Pallas' Mosaic GPU backend? Each building block, compiled for an H100.

The Pallas Triton backend is deprecated in jax 0.12; Mosaic GPU is its
successor. Its entry point is ``plgpu.kernel`` with GMEM refs and an explicit
pipeline (``plgpu.emit_pipeline`` copies tiles into shared memory), not
``pallas_call`` with ``BlockSpec``s. This script writes the operations our
kernels are made of (element-wise math, ``floor`` for rounding, the block
maximum, uint32 bitcasts and shifts, the reshape + sum of bit packing, and the
library's own 4-bit encode + pack) as Mosaic GPU kernels over ``16 x 128``
tiles and compiles each for an H100 with the deviceless compiler (nothing
runs), under both lowering semantics (``Warpgroup``, ``Lane``). The result is
recorded in ``docs/design.md``.

Usage: ``python -m benchmarks.mosaic_gpu_probe [--json out.json]`` (needs the
``cuda-compile`` extra; ``JAX_PLATFORMS=cpu``).
"""

from __future__ import annotations

import argparse

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

import pallas_kernels as pk
import stquant_jax as sq
from benchmarks._io import write_json
from stquant_jax._src.kernels import bitpack, maps
from stquant_jax._src.kernels.quantize import block_scales

R, B, N = 16, 128, 128  # tile rows, block size, array rows


def _compile(body, semantics, out_dtype=jnp.float32, out_cols=B) -> str:
  params = plgpu.CompilerParams(lowering_semantics=semantics)

  def f(x):
    def kern(x_gmem, o_gmem):
      def step(idx, x_smem, o_smem):
        del idx
        body(x_smem, o_smem)
      plgpu.emit_pipeline(step, grid=(N // R,),
                          in_specs=[pl.BlockSpec((R, B), lambda i: (i, 0))],
                          out_specs=[pl.BlockSpec((R, out_cols), lambda i: (i, 0))])(
                              x_gmem, o_gmem)
    return plgpu.kernel(kern, out_type=jax.ShapeDtypeStruct((N, out_cols), out_dtype),
                        grid=(1,), grid_names=("g",), compiler_params=params)(x)
  try:
    c = pk.compile_for_target(f, jax.ShapeDtypeStruct((N, B), jnp.float32))
    return "compiles" if "mosaic_gpu" in c.as_text() else "compiles (no Mosaic GPU call?)"
  except Exception as e:  # noqa: BLE001  (the error is the result)
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {(lines or [''])[0][:200]}"


def _scale(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2.0


def _floor(x_ref, o_ref):
  o_ref[...] = jnp.floor(x_ref[...] + 0.5)


def _row_max(x_ref, o_ref):
  v = x_ref[...]
  o_ref[...] = v / jnp.broadcast_to(jnp.max(jnp.abs(v), axis=1, keepdims=True), v.shape)


def _bits(x_ref, o_ref):
  u = jax.lax.bitcast_convert_type(x_ref[...], jnp.uint32)
  o_ref[...] = jax.lax.bitcast_convert_type((u >> jnp.uint32(3)) | jnp.uint32(1), jnp.float32)


def _pack(x_ref, o_ref):
  o_ref[...] = x_ref[...].astype(jnp.uint32).reshape(R, B // 8, 8).sum(-1)


def _quantize4(x_ref, o_ref):
  x, _, inv = block_scales(x_ref[...], ieee=False)
  codes = maps.encode(x * inv[:, None], sq.default_map(4, True), None, ieee=False)
  bitpack.store_packed(o_ref, codes, 4)


CASES = {
    "x * 2 (element-wise)": (_scale, jnp.float32, B),
    "floor(x + 0.5) (rounding)": (_floor, jnp.float32, B),
    "block maximum (row reduction)": (_row_max, jnp.float32, B),
    "uint32 bitcast, shift, or": (_bits, jnp.float32, B),
    "reshape + sum (bit packing)": (_pack, jnp.uint32, B // 8),
    "the library's 4-bit encode + pack": (_quantize4, jnp.uint32, B * 4 // 32),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write the results here")
  args = parser.parse_args(argv)
  out = {"jax": jax.__version__, "target": "H100 (deviceless compile, not run)", "results": {}}
  for sem in ("Warpgroup", "Lane"):
    res = {name: _compile(body, getattr(plgpu.LoweringSemantics, sem), dt, cols)
           for name, (body, dt, cols) in CASES.items()}
    out["results"][sem] = res
    for name, r in res.items():
      print(f"{sem:9s} | {name:36s} | {r}")
  write_json(out, args.json)


if __name__ == "__main__":
  main()
