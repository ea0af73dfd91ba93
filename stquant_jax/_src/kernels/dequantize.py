"""Block-wise dequantization kernel: packed codes + scales -> float32 ``[N, B]``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl

from stquant_jax._src.kernels import bitpack, maps
from stquant_jax._src.kernels.tiling import DEFAULT_TILING, Tiling, check_block_size, out_like
from stquant_jax._src.codec.maps import CodeMap
from stquant_jax._src.codec.blocks import dequantize_blocks as _dequantize_blocks_jnp


def load_and_decode(codes_ref, scales_ref, cmap: CodeMap, block: int, *, ieee: bool):
  """Reads packed rows and returns their float32 values ``[R, block]``."""
  codes_RxB = bitpack.load_packed(codes_ref, cmap.bits, block)
  return maps.decode(codes_RxB, cmap, ieee=ieee) * scales_ref[...][:, None]


def _dequantize_kernel(codes_ref, scales_ref, x_ref, *, cmap: CodeMap, block: int,
                       ieee: bool):
  x_RxB = load_and_decode(codes_ref, scales_ref, cmap, block, ieee=ieee)
  x_ref[...] = x_RxB.astype(x_ref.dtype)


@functools.partial(jax.jit, static_argnames=("cmap", "block_size", "interpret", "tiling"))
def dequantize_blocks_pallas(codes, scales, cmap: CodeMap, *, block_size: int | None = None,
                             interpret: bool = False, tiling: Tiling | None = None):
  """Pallas twin of ``stquant_jax._src.codec.blocks.dequantize_blocks`` (bit-exact).

  Args:
    codes: uint32 ``[n_blocks, block_size * bits // 32]``.
    scales: float32 ``[n_blocks]``.
    cmap: the static :class:`~stquant_jax.CodeMap`.
    block_size: values per block; default inferred from ``codes.shape[1]``.
    interpret: run in Pallas interpret mode (CPU, tests).
    tiling: launch configuration; default :data:`DEFAULT_TILING`.

  Returns:
    float32 ``[n_blocks, block_size]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from stquant_jax import default_map
    >>> from pallas_kernels import dequantize_blocks_pallas, quantize_blocks_pallas
    >>> cmap = default_map(8, True)
    >>> x = jnp.linspace(-1.0, 1.0, 128).reshape(1, 128)
    >>> y = dequantize_blocks_pallas(*quantize_blocks_pallas(x, cmap, interpret=True),
    ...                              cmap, interpret=True)
    >>> y.shape, bool(jnp.abs(y - x).max() < 0.02)
    ((1, 128), True)
  """
  tiling = tiling or DEFAULT_TILING
  n_blocks, n_words = codes.shape
  block = block_size or n_words * 32 // cmap.bits
  if n_words != block * cmap.bits // 32:
    raise ValueError(f"codes {codes.shape} do not hold {block=} codes of {cmap.bits} bits")
  check_block_size(block)
  out_shape = out_like(codes, scales, shape=(n_blocks, block), dtype=jnp.float32)
  if n_blocks == 0:
    return jnp.zeros(out_shape.shape, out_shape.dtype)
  rows = tiling.rows(n_blocks)
  return pl.pallas_call(
      functools.partial(_dequantize_kernel, cmap=cmap, block=block, ieee=not interpret),
      grid=tiling.grid(n_blocks),
      in_specs=[pl.BlockSpec((rows, n_words), lambda i: (i, 0)),
                pl.BlockSpec((rows,), lambda i: (i,))],
      out_specs=pl.BlockSpec((rows, block), lambda i: (i, 0)),
      out_shape=out_shape,
      compiler_params=tiling.compiler_params(),
      interpret=interpret,
      name=f"stquant_dequantize_{cmap.name}",
  )(codes, scales)


@functools.partial(jax.jit, static_argnames=("cmap",))
def dequantize_blocks_reference(codes, scales, cmap: CodeMap):
  """The jnp reference (jitted): ``stquant_jax._src.codec.blocks.dequantize_blocks``."""
  return _dequantize_blocks_jnp(codes, scales, cmap)
