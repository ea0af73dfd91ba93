"""Run a function on each device's own blocks, whatever mesh the arrays are on.

A quantized moment's arrays (``codes [n_blocks, words]``, ``scales
[n_blocks]``) and the block view of its gradient (``[n_blocks, block_size]``)
share a leading *block axis*. Under FSDP that axis is sharded, and the per-leaf
work (a Pallas kernel, the policy's sampled statistics) is local to each
block: a device should work on the blocks it holds and move nothing else.
XLA cannot see that for a ``pallas_call`` (no partitioning rule: GSPMD
gathers its operands) nor for a gather of sampled rows. :func:`map_local_blocks`
runs ``fn`` on the local blocks, told the global index of its first block:

* Explicit mesh axes (sharding in types): inside ``jax.shard_map`` over the
  block axis' mesh axes (all axes manual; replicated arrays under a mesh too,
  where Pallas interpret mode would otherwise hit sharding type errors);
* several devices and no Explicit axes (``Auto``, GSPMD): a
  ``custom_partitioning`` rule whose ``partition`` callback keeps the block
  axis sharded as the partitioner proposes and lowers ``fn`` per shard;
* one device, ``pmap`` or inside ``shard_map``: ``fn`` on the whole arrays.

``fn`` may also return *sums* (e.g. statistics): they are added over the
devices (``psum``) and come back replicated, so no collective moves more than
those sums.
"""

from __future__ import annotations

import itertools
import math
import string

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from stquant_jax._src.distributed.mesh import axes_of, has_mesh


def _explicit_mesh(x):
  """The mesh of ``x``'s type when it has Explicit axes, else None."""
  if not has_mesh(x):
    return None
  mesh = jax.typeof(x).sharding.mesh
  explicit = jax.sharding.AxisType.Explicit
  return mesh if any(t == explicit for t in mesh.axis_types) else None


def _lead_axes(x) -> tuple[str, ...]:
  spec = tuple(jax.typeof(x).sharding.spec)
  return axes_of(spec[0]) if spec else ()


def _first_block_index(axes, mesh_shape, local_blocks: int):
  """Global index of this device's first block: its linear position along ``axes``."""
  idx = jnp.int32(0)
  for a in axes:
    idx = idx * mesh_shape[a] + jax.lax.axis_index(a)
  return idx * local_blocks


def _psum(sums, axes):
  return sums if not axes else jax.tree.map(lambda s: jax.lax.psum(s, axes), sums)


def leaf_spec(axes, shards, mesh_shape) -> P | None:
  """The spec of a leaf in the per-shard layout ``shards`` whose blocks are split over
  mesh ``axes``: the axes dealt out to the leaf's dimensions in order, each taking
  exactly its number of pieces (``P(None, "fsdp")`` for ``shards=(1, 8)`` over an
  8-device ``("fsdp",)``), so every device holds one piece; None when they do not."""
  axes, spec = list(axes), []
  for c in shards:
    mine = []
    while axes and math.prod(mesh_shape[a] for a in mine) < c:
      mine.append(axes.pop(0))
    if math.prod(mesh_shape[a] for a in mine) != c:
      return None
    spec.append(None if not mine else mine[0] if len(mine) == 1 else tuple(mine))
  return None if axes else P(*spec)


def _leaves_spec(axes, shards, mesh_shape, leaves) -> P | None:
  """The spec each device's piece of ``leaves`` takes: :func:`leaf_spec` in the per-shard
  layout ``shards``; in the plain layout (``shards`` None) the leading axis split over
  the block axis' mesh ``axes`` (a leaf's rows then hold the device's blocks), or None
  where its rows do not split evenly."""
  if shards is not None:
    return leaf_spec(axes, shards, mesh_shape)
  n = math.prod(mesh_shape[a] for a in axes)
  if not axes or all(x.ndim and x.shape[0] % n == 0 for x in leaves):
    return P(axes if len(axes) > 1 else axes[0]) if axes else P()
  return None


def _block_axes(blocks, mesh_shape) -> tuple[str, ...]:
  axes = next((a for a in map(_lead_axes, blocks) if a), ())
  n = math.prod(mesh_shape[a] for a in axes)
  return () if axes and blocks[0].shape[0] % n else axes


def _shard_map_call(fn, replicated, blocks, leaves, shards, mesh):
  """``fn`` inside ``jax.shard_map`` over the block axis' Explicit mesh axes."""
  axes = _block_axes(blocks, mesh.shape)
  spec = P(axes if axes else None)
  lspec = _leaves_spec(axes, shards, mesh.shape, leaves) if leaves else None
  if leaves and lspec is None:
    axes, spec, lspec = (), P(None), P()
  blocks = [jax.sharding.reshard(b, NamedSharding(mesh, P(spec[0], *([None] * (b.ndim - 1)))))
            for b in blocks]
  leaves = [jax.sharding.reshard(x, NamedSharding(mesh, lspec)) for x in leaves]
  replicated = [jax.sharding.reshard(r, NamedSharding(mesh, P())) for r in replicated]

  def body(rep, blk, lv):
    first = _first_block_index(axes, mesh.shape, blk[0].shape[0])
    outs, sums = fn(first, rep, blk + lv) if leaves else fn(first, rep, blk)
    return outs, _psum(sums, axes)

  # Prefix specs: every block output is split along its leading axis, every leaf output
  # like the leaves, sums replicated (fn cannot be traced here to see its outputs:
  # Pallas needs manual axes).
  out_specs = ([spec, lspec] if leaves else spec, P())
  return jax.shard_map(body, mesh=mesh, in_specs=(P(), spec, lspec if leaves else P()),
                       out_specs=out_specs, check_vma=False)(replicated, blocks, leaves)


def _factor_names():
  for n in itertools.count(1):
    for letters in itertools.product(string.ascii_lowercase, repeat=n):
      name = "".join(letters)
      if name != "i":
        yield name


def _rule(replicated, blocks, out_shape, leaves=()):
  """Shardy rule: the block axis ``i`` is shared; every other dimension stays whole."""
  names = _factor_names()
  keep = []

  def dims(rank, lead):
    fs = [next(names) for _ in range(rank - lead)]
    keep.extend(fs)
    return " ".join((["i"] if lead else []) + fs)

  def free(rank):  # a leaf's dimensions: sharded as the partition callback decides
    return " ".join(next(names) for _ in range(rank))

  ins = ([dims(x.ndim, 0) for x in replicated] + [dims(x.ndim, 1) for x in blocks]
         + [free(x.ndim) for x in leaves])
  block_out, leaf_out = out_shape[0] if leaves else (out_shape[0], [])
  outs = ([dims(len(o.shape), 1) for o in block_out] + [free(len(o.shape)) for o in leaf_out]
          + [dims(len(s.shape), 0) for s in jax.tree.leaves(out_shape[1])])
  return ", ".join(ins) + " -> " + ", ".join(outs), tuple(keep)


def _custom_partitioning_call(fn, replicated, blocks, leaves, shards):
  """``fn`` behind a ``custom_partitioning`` rule: local blocks under GSPMD."""
  n_rep, n_blk = len(replicated), len(blocks)
  out_shape = jax.eval_shape(lambda r, b: fn(jnp.int32(0), r, b), replicated, blocks + leaves)
  sums_tree = jax.tree.structure(out_shape[1])
  n_bout, n_lout = ((len(out_shape[0][0]), len(out_shape[0][1])) if leaves
                    else (len(out_shape[0]), 0))
  n_out = n_bout + n_lout

  def split(args):
    return list(args[:n_rep]), list(args[n_rep:])

  def flat_fn(first, *args):
    outs, sums = fn(first, *split(args))
    if leaves:
      outs = [*outs[0], *outs[1]]
    return (*outs, *jax.tree.leaves(sums))

  def unflat(outs):
    return [outs[:n_bout], outs[n_bout:]] if leaves else outs

  @custom_partitioning
  def call(*args):
    return flat_fn(jnp.int32(0), *args)

  def partition(mesh, arg_shapes, result_shape):
    block_shapes = arg_shapes[n_rep:n_rep + n_blk]
    axes = ()
    for s in block_shapes:
      spec = tuple(s.sharding.spec)
      axes = axes_of(spec[0]) if spec else ()
      if axes:
        break
    n = math.prod(mesh.shape[a] for a in axes)
    if axes and block_shapes[0].shape[0] % n:
      axes = ()
    lspec = _leaves_spec(axes, shards, mesh.shape, leaves) if leaves else None
    if leaves and lspec is None:
      axes, lspec = (), P()
    lead = axes if len(axes) != 1 else axes[0]
    lead = lead if axes else None
    rep = NamedSharding(mesh, P())
    blk = lambda rank: NamedSharding(mesh, P(lead, *([None] * (rank - 1))))
    leaf = NamedSharding(mesh, lspec) if leaves else None
    arg_sh = tuple([rep] * n_rep + [blk(len(s.shape)) for s in block_shapes]
                   + [leaf] * len(leaves))
    res_sh = tuple([blk(len(r.shape)) for r in result_shape[:n_bout]] + [leaf] * n_lout
                   + [rep] * (len(result_shape) - n_out))

    def lower_fn(*args):
      _, blk_args = split(args)
      first = _first_block_index(axes, mesh.shape, blk_args[0].shape[0])
      res = flat_fn(first, *args)
      return (*res[:n_out], *_psum(list(res[n_out:]), axes))

    return mesh, lower_fn, res_sh, arg_sh

  rule, keep = _rule(replicated, blocks, out_shape, leaves)
  call.def_partition(partition=partition, sharding_rule=rule, need_replication_factors=keep)
  res = call(*replicated, *blocks, *leaves)
  return unflat(list(res[:n_out])), jax.tree.unflatten(sums_tree, list(res[n_out:]))


def _auto_multi_device() -> bool:
  """Whether GSPMD may shard the arrays: several devices and no manual context."""
  ctx = jax.sharding.get_abstract_mesh()
  if not ctx.empty and ctx.manual_axes:
    return False  # inside shard_map: already local
  return jax.device_count() > 1 or (not ctx.empty and ctx.size > 1)


def may_be_block_sharded(blocks) -> bool:
  """Whether arrays with a leading block axis may be split over devices here: some have
  it on Explicit mesh axes, or (no Explicit axes) several devices run under GSPMD."""
  if any(_explicit_mesh(b) is not None for b in blocks):
    return any(_lead_axes(b) for b in blocks if _explicit_mesh(b) is not None)
  return _auto_multi_device()


def replicated_call(fn, *args):
  """``fn(*args)`` on whole arrays; under Explicit mesh axes inside ``jax.shard_map``
  with every input replicated (each device computes the same result), where the
  arrays' types then carry no sharding (Pallas interpret mode needs that)."""
  leaves = jax.tree.leaves(args)
  mesh = next((m for m in map(_explicit_mesh, leaves) if m is not None), None)
  if mesh is None:
    return fn(*args)
  rep = NamedSharding(mesh, P())
  args = jax.tree.map(lambda x: jax.sharding.reshard(x, rep), args)
  return jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)(*args)


def map_local_blocks(fn, replicated, blocks, leaves=(), shards=None):
  """Runs ``fn`` on each device's blocks; returns ``(block_outputs, sums)``.

  Args:
    fn: ``fn(first_block, replicated, blocks) -> (outputs, sums)``: ``first_block``
      is the int32 global index of the first block it is given, ``replicated`` and
      ``blocks`` are lists of arrays (``blocks``' leading axis is the block axis,
      of equal length), ``outputs`` a list of arrays with that leading block axis,
      ``sums`` a pytree of arrays that add up over blocks (partial sums).
    replicated: list of arrays every device needs whole (small: scalars, counters).
    blocks: list of arrays with a common leading block axis.
    leaves: arrays of one parameter's shape whose blocks are ``blocks``: each
      device gets its own piece(s) of them, appended to ``blocks`` in ``fn``'s
      third argument, and ``fn``'s outputs are then ``[block_outputs,
      leaf_outputs]`` (leaf outputs placed like the leaves). In the per-shard
      layout ``shards`` (:mod:`~stquant_jax._src.codec.shards`) a device's pieces
      are its shards; in the plain layout (``shards`` None) its rows, split like
      the block axis. Passing a leaf whole (not as ``[n_blocks, block_size]``)
      lets ``fn`` write its output in the leaf's own buffer: XLA shares a buffer
      between arrays of one shape only.
    shards: the leaves' pieces per axis in the per-shard layout, or None.

  Returns:
    ``(outputs, sums)``: ``outputs`` sharded along the block axis like the first
    sharded block input (under Explicit axes: reshard them where another sharding
    is wanted), ``sums`` added over all blocks (replicated).

  Example:
    >>> import jax.numpy as jnp
    >>> def fn(first, rep, blk):
    ...   (x,) = blk
    ...   return [x * rep[0]], jnp.sum(x)
    >>> outs, total = map_local_blocks(fn, [jnp.float32(2)], [jnp.ones((4, 8))])
    >>> outs[0].shape, float(total)
    ((4, 8), 32.0)
  """
  replicated, blocks, leaves = list(replicated), list(blocks), list(leaves)
  everything = blocks + leaves + replicated
  mesh = next((m for m in map(_explicit_mesh, everything) if m is not None), None)
  if mesh is not None:
    return _shard_map_call(fn, replicated, blocks, leaves, shards, mesh)
  if _auto_multi_device():
    return _custom_partitioning_call(fn, replicated, blocks, leaves, shards)
  return fn(jnp.int32(0), replicated, blocks + leaves)

