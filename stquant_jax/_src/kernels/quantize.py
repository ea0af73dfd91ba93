"""Block-wise quantization kernel: float32 ``[N, B]`` -> packed codes + scales."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl

from stquant_jax._src.kernels import bitpack, exact_math, maps
from stquant_jax._src.kernels.tiling import DEFAULT_TILING, Tiling, check_block_size, out_like
from stquant_jax._src.codec.maps import CodeMap
from stquant_jax._src.codec.blocks import quantize_blocks as _quantize_blocks_jnp


def block_scales(x_RxB, *, ieee: bool):
  """Zeroes non-finite values; returns (x, scale ``[R]``, 1/scale or 0 ``[R]``).

  Same rule as ``stquant_jax._src.codec.blocks.quantize_blocks``: the scale is the
  largest finite magnitude of the row, and non-finite values are stored as 0.
  """
  x_RxB = jnp.where(jnp.isfinite(x_RxB), x_RxB, 0.0)
  scale_R = jnp.max(jnp.abs(x_RxB), axis=1)
  pos = scale_R > 0
  inv_R = jnp.where(pos, exact_math.div(1.0, jnp.where(pos, scale_R, 1.0), ieee=ieee), 0.0)
  return x_RxB, scale_R, inv_R


def encode_and_store(x_RxB, codes_ref, scales_ref, cmap: CodeMap, noise_RxB=None, *,
                     ieee: bool):
  """Quantizes float32 rows ``[R, B]`` and writes their codes and scales
  (``noise_RxB``: stochastic rounding numbers, or None for round-to-nearest)."""
  x_RxB, scale_R, inv_R = block_scales(x_RxB, ieee=ieee)
  codes_RxB = maps.encode(x_RxB * inv_R[:, None], cmap, noise_RxB, ieee=ieee)
  bitpack.store_packed(codes_ref, codes_RxB, cmap.bits)
  scales_ref[...] = scale_R


def _quantize_kernel(x_ref, codes_ref, scales_ref, *, cmap: CodeMap, ieee: bool):
  x_RxB = x_ref[...].astype(jnp.float32)
  encode_and_store(x_RxB, codes_ref, scales_ref, cmap, ieee=ieee)


@functools.partial(jax.jit, static_argnames=("cmap", "interpret", "tiling"))
def quantize_blocks_pallas(x_NxB, cmap: CodeMap, *, interpret: bool = False,
                           tiling: Tiling | None = None):
  """Pallas twin of ``stquant_jax._src.codec.blocks.quantize_blocks`` (bit-exact).

  Args:
    x_NxB: float array ``[n_blocks, block_size]``; ``block_size`` a power of
      two >= 32. Computed in float32.
    cmap: the static :class:`~stquant_jax.CodeMap` (closed form, so it is a
      static argument rather than a table input).
    interpret: run the kernel in Pallas interpret mode (CPU, tests).
    tiling: launch configuration; default :data:`DEFAULT_TILING`.

  Returns:
    ``(codes, scales)``: uint32 ``[n_blocks, block_size * bits // 32]`` and
    float32 ``[n_blocks]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from stquant_jax import default_map
    >>> from pallas_kernels import quantize_blocks_pallas
    >>> x = jnp.linspace(-1.0, 1.0, 256).reshape(2, 128)
    >>> codes, scales = quantize_blocks_pallas(x, default_map(4, True), interpret=True)
    >>> codes.shape, scales.tolist()
    ((2, 16), [1.0, 1.0])
  """
  tiling = tiling or DEFAULT_TILING
  n_blocks, block = x_NxB.shape
  check_block_size(block)
  n_words = block * cmap.bits // 32
  out_shape = (out_like(x_NxB, shape=(n_blocks, n_words), dtype=jnp.uint32),
               out_like(x_NxB, shape=(n_blocks,), dtype=jnp.float32))
  if n_blocks == 0:
    return tuple(jnp.zeros(s.shape, s.dtype) for s in out_shape)
  rows = tiling.rows(n_blocks)
  return tuple(pl.pallas_call(
      functools.partial(_quantize_kernel, cmap=cmap, ieee=not interpret),
      grid=tiling.grid(n_blocks),
      in_specs=[pl.BlockSpec((rows, block), lambda i: (i, 0))],
      out_specs=[pl.BlockSpec((rows, n_words), lambda i: (i, 0)),
                 pl.BlockSpec((rows,), lambda i: (i,))],
      out_shape=out_shape,
      compiler_params=tiling.compiler_params(),
      interpret=interpret,
      name=f"stquant_quantize_{cmap.name}",
  )(x_NxB))


@functools.partial(jax.jit, static_argnames=("cmap",))
def quantize_blocks_reference(x_NxB, cmap: CodeMap):
  """The jnp reference (jitted): ``stquant_jax._src.codec.blocks.quantize_blocks``."""
  return _quantize_blocks_jnp(x_NxB, cmap)
