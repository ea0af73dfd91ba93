"""Block-wise quantization of ``[n_blocks, block_size]`` matrices: the pure-jnp reference.

Each row is one quantization block with one float32 scale (its largest finite
magnitude). These functions are what the optimizer's jnp path runs and what
every Pallas kernel is tested against, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stquant_jax._src.codec.maps import CodeMap, decode, encode
from stquant_jax._src.codec.packing import GROUP, group_shape, pack_view, unpack_view
from stquant_jax._src.core.checks import check_int

DEFAULT_BLOCK_SIZE = 128


def check_block_size(block_size, name: str = "block_size") -> None:
  """``block_size`` is a positive int multiple of :data:`GROUP` (32)."""
  check_int(name, block_size)
  if block_size <= 0 or block_size % GROUP:
    raise ValueError(f"{name}={block_size} must be a positive multiple of {GROUP}")


def num_blocks(size: int, block_size: int) -> int:
  return -(-size // block_size)


def finite_absmax(*xs):
  """Largest finite ``|x|`` of each block (row) of every input, in one pass.

  NaN and Inf are ignored. All inputs share their shape ``[N, ...]``; the
  reduction is over every axis but the first. Several inputs go through one
  variadic reduction, so XLA computes their maxima in a single fused loop
  instead of materialising each input.

  Returns:
    A tuple of float32 ``[N]`` arrays, one per input.
  """
  def fin(x):
    a = jnp.abs(x.astype(jnp.float32))
    return jnp.where(a < jnp.inf, a, 0.0)  # NaN < inf is False
  zeros = tuple(jnp.float32(0) for _ in xs)
  return tuple(jax.lax.reduce(
      tuple(fin(x) for x in xs), zeros,
      lambda a, b: tuple(jnp.maximum(x, y) for x, y in zip(a, b)),
      tuple(range(1, xs[0].ndim))))


def group_view(x_NxB, bits: int):
  """Reshapes blocks ``[N, B]`` to the packing-group view ``[N, B // gc, gc]``."""
  gc, _ = group_shape(bits)
  n, b = x_NxB.shape
  return x_NxB.reshape(n, b // gc, gc)


def encode_blocks(x_NxGxC, scale_N, cmap: CodeMap, noise=None):
  """Encodes grouped blocks with given scales and packs them: -> codes ``[N, W]``.

  Non-finite values are stored as zero. ``noise`` (uniform ``[0, 1)`` of
  ``x``'s shape, or None for round-to-nearest) selects stochastic rounding
  (:func:`stquant_jax._src.codec.maps.encode`).
  """
  inv_N = jnp.where(scale_N > 0, 1.0 / jnp.where(scale_N > 0, scale_N, 1.0), 0.0)
  x = jnp.where(jnp.isfinite(x_NxGxC), x_NxGxC, 0.0)
  return pack_view(encode(x * inv_N[:, None, None], cmap, noise), cmap.bits)


def decode_blocks(codes_NxW, scale_N, cmap: CodeMap):
  """Unpacks and decodes codes into the grouped view ``[N, B // gc, gc]`` (float32)."""
  return decode(unpack_view(codes_NxW, cmap.bits), cmap) * scale_N[:, None, None]


def quantize_blocks(x_NxB, cmap: CodeMap):
  """Quantizes float32 blocks ``[N, B]`` -> (codes ``[N, B*bits/32]``, scales ``[N]``).

  The scale of a block is the largest finite magnitude in it; non-finite values
  are ignored for the scale and encoded as zero (which the zero-free v maps
  store as their smallest level), so a NaN or Inf touches only its own element.
  Limits: float32 subnormals are flushed, so a block whose maximum is below
  ~1.2e-38 gets scale 0 and decodes to zeros, and ``smallest level * scale``
  can underflow to 0 for v values more than ~2**-126 below their block maximum.
  """
  x_NxB = x_NxB.astype(jnp.float32)
  (scale_N,) = finite_absmax(x_NxB)
  return encode_blocks(group_view(x_NxB, cmap.bits), scale_N, cmap), scale_N


def dequantize_blocks(codes, scale_N, cmap: CodeMap):
  """Inverse of :func:`quantize_blocks`: float32 ``[N, B]``."""
  x = decode_blocks(codes, scale_N, cmap)
  n, groups, gc = x.shape
  return x.reshape(n, groups * gc)
