"""``QuantizedArray`` (the quantized-array pytree) and ``quantize`` / ``dequantize``."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.blocks import (
    DEFAULT_BLOCK_SIZE, check_block_size, dequantize_blocks, quantize_blocks)
from stquant_jax._src.codec.maps import CodeMap, check_map
from stquant_jax._src.codec.packing import check_bits
from stquant_jax._src.codec.shards import check_shards, from_blocks, to_blocks


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["code_map", "block_size", "shape", "dtype", "shards"],
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
    shards: None (blocks of the row-major flattening), or the per-shard
      layout: pieces per axis, each piece blocked on its own
      (:mod:`~stquant_jax._src.codec.shards`; a moment of a parameter sharded
      on a later axis under FSDP).
  """

  codes: jax.Array
  scales: jax.Array
  code_map: CodeMap
  block_size: int
  shape: tuple[int, ...]
  dtype: np.dtype
  shards: tuple[int, ...] | None = None

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


def is_quantized(x) -> bool:
  """Whether ``x`` is a :class:`QuantizedArray`."""
  return isinstance(x, QuantizedArray)


def quantize(x, bits: int, *, signed: bool = True,
             block_size: int = DEFAULT_BLOCK_SIZE,
             code_map: CodeMap | None = None, shards=None) -> QuantizedArray:
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
    shards: the per-shard layout (pieces per axis, each blocked on its own;
      :mod:`~stquant_jax._src.codec.shards`), or None.

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
  check_bits(bits)
  check_block_size(block_size)
  cmap = check_map(code_map, bits, signed, "code_map")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"quantize expects a floating array, got dtype {x.dtype}")
  shards = None if shards is None else tuple(shards)
  check_shards(x.shape, shards)
  codes, scales = quantize_blocks(to_blocks(x, shards, block_size), cmap)
  return QuantizedArray(codes, scales, cmap, block_size, tuple(x.shape), jnp.dtype(x.dtype),
                        shards)


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
  out = from_blocks(dequantize_blocks(q.codes, q.scales, q.code_map), q.shape, q.shards)
  return out.astype(q.dtype if dtype is None else dtype)
