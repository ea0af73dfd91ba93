"""Where a quantized moment's arrays live on a mesh (the FSDP rule).

A quantized moment of a parameter is ``codes`` uint32 ``[n_blocks, words]``
and ``scales`` float32 ``[n_blocks]``, where block ``b`` holds the values
``b * block_size ... (b + 1) * block_size - 1`` of the parameter's row-major
flattening. When the parameter is sharded along its leading axis over mesh
axes ``A`` (``P(A, None, ...)``, the FSDP convention), device ``i`` holds one
contiguous range of the flattening; if that range is a whole number of blocks,
sharding the block axis over the same axes ``A`` gives every device exactly
the blocks of its own parameter shard, and the update (dequantize, Adam,
requantize) runs on each device without moving data.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, Sharding

from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.distributed.local_blocks import leaf_spec
from stquant_jax._src.distributed.mesh import (
    axes_of, explicit_axes_per_dim, fits, named, replicated_like, spec_axes, spec_entry)


def block_axes(param_sharding: Sharding, shape, n_blocks: int) -> tuple[str, ...]:
  """Mesh axes that shard the block axis of a quantized moment; () when replicated.

  All the mesh axes that shard the parameter (in dimension order), when their
  total size divides ``n_blocks``; otherwise none (the moment is replicated).
  """
  if not isinstance(param_sharding, NamedSharding):
    return ()
  axes = tuple(a for d in spec_axes(param_sharding, len(shape)) for a in d)
  n = math.prod(param_sharding.mesh.shape[a] for a in axes)
  if not axes or n_blocks % n:
    return ()
  return axes


def is_aligned(param_sharding: Sharding, shape, block_size: int) -> bool:
  """True when block-axis sharding matches the parameter's shards exactly.

  That is: the parameter is sharded along one axis ``j`` only, every axis
  before ``j`` has size 1 (in practice ``j = 0``: the leading axis), the shards
  are even, and each holds a whole number of blocks. Then each device's codes
  encode exactly its own parameter values and the update needs no
  communication.
  """
  if not isinstance(param_sharding, NamedSharding):
    return False
  per_dim = spec_axes(param_sharding, len(shape))
  sharded = [d for d, a in enumerate(per_dim) if a]
  if len(sharded) != 1:
    return False
  j = sharded[0]
  n = math.prod(param_sharding.mesh.shape[a] for a in per_dim[j])
  size = math.prod(shape)
  return (math.prod(shape[:j]) == 1 and shape[j] % n == 0
          and (size // n) % block_size == 0)


def quantized_shardings(param_sharding: Sharding, shape, n_blocks: int):
  """``(codes_sharding, scales_sharding)`` of a quantized moment of a parameter.

  The block axis is sharded over :func:`block_axes`; the word axis is never
  sharded (its length changes with the bit-width).
  """
  if not isinstance(param_sharding, NamedSharding):
    rep = replicated_like(param_sharding)
    return rep, rep
  b = spec_entry(block_axes(param_sharding, shape, n_blocks))
  return named(param_sharding, b, None), named(param_sharding, b)


def float_sharding_from_blocks(codes_sharding: Sharding, shape, shards=None) -> Sharding | None:
  """Sharding for a float32 moment re-created from a quantized one (relayout to float32).

  In the per-shard layout ``shards``, the parameter's sharding (the block axis'
  mesh axes dealt to the dimensions the layout splits); otherwise the block
  axis' mesh axes go to the leading axis when they divide it. Else the moment
  is replicated. None when ``codes_sharding`` is not a NamedSharding.
  """
  if not isinstance(codes_sharding, NamedSharding):
    return None
  spec = tuple(codes_sharding.spec)
  axes = axes_of(spec[0]) if spec else ()
  if shards is not None:
    per_dim = leaf_spec(axes, shards, codes_sharding.mesh.shape)
    return named(codes_sharding) if per_dim is None else named(codes_sharding, *per_dim)
  n = math.prod(codes_sharding.mesh.shape[a] for a in axes)
  if not axes or not shape or shape[0] % n:
    return named(codes_sharding)
  return named(codes_sharding, spec_entry(axes), *([None] * (len(shape) - 1)))


def explicit_leaf_is_local(g, moments, block_size: int | None) -> bool:
  """Whether the per-leaf update can run on an Explicit-sharded leaf as typed.

  True when no input carries Explicit shardings, or when they line up: for
  moments in the per-shard layout, the gradient's pieces are the layout's and
  the moments' block axis is split over the gradient's axes; otherwise the
  gradient is sharded along its leading axis only (or not at all), each shard
  is a whole number of blocks, and every Explicit-sharded quantized moment's
  block axis (float32 moment) is sharded like the gradient's leading axis
  (like the gradient). Unsharded moments are fine. Anything else (a
  parameter sharded along a later axis, ragged shards, a state sharded
  differently from its parameter) needs :func:`replicated` inputs: under
  Explicit axes the reshapes of the update would be sharding type errors.
  """
  arrays = [(a, is_quantized(m)) for m in moments
            for a in ([m.codes, m.scales] if is_quantized(m) else [m])]
  per_m = [explicit_axes_per_dim(a) for a, _ in arrays]
  g_axes = explicit_axes_per_dim(g)
  if g_axes is None:
    return all(p is None for p in per_m)
  shards = next((m.shards for m in moments if is_quantized(m) and m.shards), None)
  if shards is not None:  # per-shard layout: one piece per device, blocks split alike
    mesh_shape = jax.typeof(g).sharding.mesh.shape
    if tuple(math.prod(mesh_shape[a] for a in d) for d in g_axes) != tuple(shards):
      return False
    flat = tuple(a for d in g_axes for a in d)
    return all(p is None or (p[0] == flat and not any(p[1:])) if is_q else p == g_axes
               for p, (_, is_q) in zip(per_m, arrays))
  if any(g_axes[1:]):
    return False
  lead = g_axes[0]
  n = math.prod(jax.typeof(g).sharding.mesh.shape[a] for a in lead)
  if block_size is not None and (math.prod(g.shape) // n) % block_size:
    return False
  for p in per_m:
    if p is not None and (p[0] != lead or any(p[1:])):
      return False
  return True




def rewidth_codes_sharding(codes_sharding: NamedSharding) -> NamedSharding:
  """The sharding of a moment's codes re-packed at another bit-width: the block axis
  keeps its mesh axes, the word axis (whose length changes with the bits) is never
  sharded (replicated when the block axis was)."""
  spec = tuple(codes_sharding.spec)
  block = spec[0] if spec else None
  return named(codes_sharding) if block is None else named(codes_sharding, block, None)


def float_moment_sharding(param_sharding: Sharding, shape) -> Sharding:
  """A float32 moment's sharding: its parameter's when that shards the moment evenly,
  else replicated on the same devices."""
  if math.prod(shape) > 0 and fits(param_sharding, shape):
    return param_sharding
  return replicated_like(param_sharding)


def shards_for(sharding, shape, block_size: int):
  """The layout a moment of a parameter with ``sharding`` needs: None (plain) when the
  parameter is not sharded (or unevenly), or is sharded on its leading axis only with
  whole blocks per shard (the plain layout's blocks are then each device's own, and
  the update's block view keeps the gradient's sharding); else the pieces per axis.

  Example:
    >>> import jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> print(shards_for(NamedSharding(mesh, P(None, "fsdp")), (50257, 128), 128))
    None
  """
  if not isinstance(sharding, NamedSharding) or not shape:
    return None
  counts = tuple(math.prod(sharding.mesh.shape[a] for a in axes)
                 for axes in spec_axes(sharding, len(shape)))
  if math.prod(counts) == 1 or any(s % c for s, c in zip(shape, counts)):
    return None
  if all(c == 1 for c in counts[1:]) and (math.prod(shape) // counts[0]) % block_size == 0:
    return None
  return counts
