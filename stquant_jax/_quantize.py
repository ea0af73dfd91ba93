"""Block-wise quantization: the pure-jnp reference every kernel is tested against."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._maps import CodeMap, decode, default_map, encode
from stquant_jax._packing import GROUP, _check_bits, group_shape, pack_view, unpack_view

DEFAULT_BLOCK_SIZE = 128


def check_block_size(block_size) -> None:
  if not isinstance(block_size, int) or isinstance(block_size, bool):
    raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
  if block_size <= 0 or block_size % GROUP:
    raise ValueError(f"{block_size=} must be a positive multiple of {GROUP}")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["code_map", "block_size", "shape", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A block-wise quantized, bit-packed array (a pytree).

  Data leaves are ``codes`` and ``scales``; everything else is static metadata,
  so a jitted function retraces only when the layout (bits, map, block size,
  shape, dtype) changes, never when values change.

  Attributes:
    codes: uint32 ``[n_blocks, block_size * bits // 32]``, densely packed codes.
    scales: float32 ``[n_blocks]``, each block's absolute maximum.
    code_map: the :class:`CodeMap` (bits, mode, family).
    block_size: values per block (a multiple of 32).
    shape: shape of the original array.
    dtype: dtype of the original array (what :func:`dequantize` returns).
  """

  codes: jax.Array
  scales: jax.Array
  code_map: CodeMap
  block_size: int
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def bits(self) -> int:
    return self.code_map.bits

  @property
  def signed(self) -> bool:
    return self.code_map.signed

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored: packed codes plus scales."""
    return int(self.codes.size * 4 + self.scales.size * self.scales.dtype.itemsize)


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


def encode_blocks(x_NxGxC, scale_N, cmap: CodeMap):
  """Encodes grouped blocks with given scales and packs them: -> codes ``[N, W]``.

  Non-finite values are stored as zero.
  """
  inv_N = jnp.where(scale_N > 0, 1.0 / jnp.where(scale_N > 0, scale_N, 1.0), 0.0)
  x = jnp.where(jnp.isfinite(x_NxGxC), x_NxGxC, 0.0)
  return pack_view(encode(x * inv_N[:, None, None], cmap), cmap.bits)


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


def _resolve_map(bits, signed, code_map):
  if code_map is None:
    return default_map(bits, signed)
  if not isinstance(code_map, CodeMap):
    raise TypeError(f"code_map must be a CodeMap, got {type(code_map).__name__}")
  if code_map.bits != bits or code_map.signed != bool(signed):
    raise ValueError(
        f"code_map {code_map.name} does not match {bits=}, signed={bool(signed)}")
  return code_map


def quantize(x, bits: int, *, signed: bool = True,
             block_size: int = DEFAULT_BLOCK_SIZE,
             code_map: CodeMap | None = None) -> QuantizedArray:
  """Block-wise quantizes ``x`` to ``bits``-bit codes packed into uint32 words.

  The array is flattened, padded with zeros to a whole number of blocks, and
  each block is divided by its absolute maximum and encoded with ``code_map``
  (default: :func:`default_map` for ``bits`` and ``signed``).

  Args:
    x: array of any shape (scalars and size-0 arrays included), float32,
      bfloat16 or float16.
    bits: code width, 2..8.
    signed: True for signed data (Adam's m); False for non-negative data
      (Adam's v), which uses a zero-free map. Negative inputs to an unsigned
      map are clamped to the smallest level.
    block_size: values per block sharing one float32 scale; a multiple of 32.
    code_map: override the default map.

  Returns:
    A :class:`QuantizedArray`.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> x = jnp.linspace(-1.0, 1.0, 1000).reshape(10, 100)
    >>> q = sq.quantize(x, 4)
    >>> q.codes.dtype, q.bits, q.shape
    (dtype('uint32'), 4, (10, 100))
    >>> y = sq.dequantize(q)
    >>> y.shape, bool(jnp.abs(y - x).max() < 0.15)
    ((10, 100), True)
  """
  _check_bits(bits)
  check_block_size(block_size)
  cmap = _resolve_map(bits, signed, code_map)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize expects a floating array, got dtype {x.dtype}")
  n = x.size
  nb = num_blocks(n, block_size)
  flat = jnp.ravel(x).astype(jnp.float32)
  flat = jnp.pad(flat, (0, nb * block_size - n))
  codes, scales = quantize_blocks(flat.reshape(nb, block_size), cmap)
  return QuantizedArray(codes, scales, cmap, block_size, tuple(x.shape), jnp.dtype(x.dtype))


def dequantize(q: QuantizedArray, dtype=None):
  """Decodes a :class:`QuantizedArray` to an array of its original shape and dtype.

  Args:
    q: the quantized array.
    dtype: optional override of the output dtype (e.g. float32 for math).

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> v = jnp.array([0.0, 1e-6, 0.5, 2.0])
    >>> bool((sq.dequantize(sq.quantize(v, 2, signed=False))[1:] > 0).all())
    True
  """
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"dequantize expects a QuantizedArray, got {type(q).__name__}")
  flat = dequantize_blocks(q.codes, q.scales, q.code_map).reshape(-1)
  out = flat[: q.size].reshape(q.shape)
  return out.astype(q.dtype if dtype is None else dtype)
