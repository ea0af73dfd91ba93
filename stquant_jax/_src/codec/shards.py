"""Per-shard block layout: the blocks of an array split into shards, each laid out alone.

A :class:`~stquant_jax.QuantizedArray` normally cuts its array's row-major
flattening into blocks. A parameter sharded over a mesh on any axis but its
leading one (``P(None, "fsdp")``: GPT-2's 50257-row embedding, which cannot be
split 8 ways on its rows) holds no contiguous range of that flattening, and
neither does a leading-axis shard that is not a whole number of blocks. Then
the moment uses the *per-shard layout* ``shards = (c_0, ..., c_{d-1})``, the
number of pieces along each axis: the array is cut into ``prod(c)`` pieces of
shape ``shape[i] / c_i`` (the shards, in row-major order of their grid
position), and each piece is flattened, zero-padded to whole blocks and
quantized on its own. Sharding the block axis over the parameter's mesh axes
(in dimension order) then gives every device exactly the blocks of its own
parameter shard, so the update runs without moving data.

``shards=None`` is the plain layout (one piece). This module maps between an
array and its blocks for either layout; it is pure jnp and works on global
arrays (under FSDP the update works on the local shards instead).
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def check_shards(shape, shards) -> None:
  """``shards`` is None or one positive count per axis of ``shape`` dividing it."""
  if shards is None:
    return
  if (len(shards) != len(shape) or any(not isinstance(c, int) or c < 1 for c in shards)
      or any(s % c for s, c in zip(shape, shards))):
    raise ValueError(f"shards={shards} must give, for each axis of shape {tuple(shape)}, a "
                     "positive number of pieces that divides it")


def local_shape(shape, shards) -> tuple[int, ...]:
  """Shape of one piece."""
  return tuple(shape) if shards is None else tuple(s // c for s, c in zip(shape, shards))


def num_pieces(shards) -> int:
  return 1 if shards is None else math.prod(shards)


def blocks_per_piece(shape, shards, block_size: int) -> int:
  return -(-math.prod(local_shape(shape, shards)) // block_size)


def num_layout_blocks(shape, shards, block_size: int) -> int:
  """Blocks of an array of ``shape`` in this layout (padding included).

  Example:
    >>> num_layout_blocks((50257, 128), None, 128), num_layout_blocks((50257, 128), (1, 8), 128)
    (50257, 50264)
  """
  return num_pieces(shards) * blocks_per_piece(shape, shards, block_size)


def _grid_first(x, shape, shards):
  """``x`` as ``[pieces, *local_shape]`` (piece axes first, row-major over the grid)."""
  d = len(shape)
  inter = [n for s, c in zip(shape, shards) for n in (c, s // c)]
  x = x.reshape(inter).transpose([2 * i for i in range(d)] + [2 * i + 1 for i in range(d)])
  return x.reshape((math.prod(shards),) + local_shape(shape, shards))


def to_blocks(x, shards, block_size: int):
  """``x`` (any float dtype) as float32 ``[n_blocks, block_size]`` in the layout,
  zero-padded (each piece to whole blocks).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(8.0).reshape(2, 4)
    >>> to_blocks(x, (1, 2), 32)[:, :4].tolist()    # pieces x[:, :2] and x[:, 2:]
    [[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]
  """
  shape = tuple(x.shape)
  x = x.astype(jnp.float32)
  pieces = num_pieces(shards)
  flat = (x.reshape(1, -1) if shards is None else _grid_first(x, shape, shards).reshape(pieces, -1))
  k = blocks_per_piece(shape, shards, block_size)
  flat = jnp.pad(flat, ((0, 0), (0, k * block_size - flat.shape[1])))
  return flat.reshape(-1).reshape(pieces * k, block_size)


def from_blocks(blocks, shape, shards):
  """The array of ``shape`` from its blocks ``[n_blocks, block_size]`` (padding dropped)."""
  shape = tuple(shape)
  n_local = math.prod(local_shape(shape, shards))
  # Merge, then split: under Explicit mesh axes a sharded block axis may not regroup
  # with the block values directly.
  flat = blocks.reshape(-1).reshape(num_pieces(shards), -1)[:, :n_local]
  if shards is None:
    return flat.reshape(shape)
  d = len(shape)
  x = flat.reshape(tuple(shards) + local_shape(shape, shards))
  order = [i for a in range(d) for i in (a, d + a)]
  return x.transpose(order).reshape(shape)


def valid_mask(rows, shape, shards, block_size: int):
  """Which values of blocks ``rows`` (int32 ``[r]``) hold array values (not padding):
  bool ``[r, block_size]``; rows past the last block are all False."""
  k = blocks_per_piece(shape, shards, block_size)
  n_local = math.prod(local_shape(shape, shards))
  within = (rows % k)[:, None] * block_size + jnp.arange(block_size, dtype=jnp.int32)[None, :]
  return (within < n_local) & (rows < num_pieces(shards) * k)[:, None]
