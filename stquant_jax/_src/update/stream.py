"""Streaming a leaf through a per-block update: bounded temporaries on every backend.

A per-block update (``fn``: dequantize, a step in float32, requantize) applied
to a whole leaf at once leaves the compiler free to materialize float32 arrays
of the leaf's size, several per moment: XLA:TPU keeps the bit-plane unpack and
pack as ``f32[n_blocks, words, planes]`` intermediates (97x the parameter bytes
of a 4096 x 4096 leaf at 8 bits), XLA:CPU a few leaf-sized buffers. Here the
leaf is cut into chunks of whole blocks and a loop runs ``fn`` on one chunk at
a time, reading its gradient, codes and scales with dynamic slices and writing
the update, codes and scales back with dynamic update slices into the loop's
carried buffers, which XLA updates in place. The temporaries are a few
chunk-sized arrays whatever the leaf's size; the update is written over the
gradient (in the gradient's buffer when the caller donates it, or when the
gradient is a temporary of the train step).

The gradient is sliced in its own 2-D view ``[rows, last dim]`` (whole rows
per chunk) where that keeps chunks whole blocks, so no relayout of the leaf
is needed on backends with tiled layouts (TPU); other leaves go through their
flat view. The element indices each chunk passes on (``first``) make the
stochastic rounding numbers those of the whole leaf, so the result is ``fn``'s
on the whole leaf, up to where XLA contracts a multiply-add into an FMA (which
it decides per compiled loop: the last float32 bit of a moment may differ).
Under FSDP each device streams its own blocks
(:func:`~stquant_jax._src.distributed.local_blocks.map_local_blocks`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.codec.shards import from_blocks, to_blocks
from stquant_jax._src.distributed.local_blocks import map_local_blocks, may_be_block_sharded
from stquant_jax._src.distributed.mesh import has_mesh, reshard_like

# Values per chunk: 2**16 float32 values is 256 KiB per chunk-sized temporary.
CHUNK_VALUES = 2**16


def chunking(shape, block_size: int, chunk_values: int = CHUNK_VALUES):
  """How a leaf of ``shape`` is streamed: ``(view, lead)``.

  ``view`` is the shape the leaf is sliced in (``(rows, last_dim)``, or
  ``(size,)``), ``lead`` the length along ``view[0]`` of one chunk, so a chunk
  holds ``lead * prod(view[1:])`` values, always whole blocks. Where it can, a
  chunk divides the leaf (no tail piece), and a leaf under two chunks is cut in
  at least two: every chunk then runs in the loop, whose temporaries live only
  while it runs (pieces outside it may be scheduled beside other leaves' and add up).

  Example:
    >>> chunking((4096, 768), 128)     # 64 rows: 512 blocks of 128, 64 chunks
    ((4096, 768), 64)
    >>> chunking((50257, 100), 128)    # rows hold 100 values: 32 rows make 25 blocks
    ((50257, 100), 640)
    >>> chunking((96, 768), 128)       # under two chunks: cut in two
    ((96, 768), 48)
    >>> chunking((1_000_000,), 128)
    ((1000000,), 65536)
  """
  n = math.prod(shape)
  k = max(1, chunk_values // block_size)
  if len(shape) >= 2 and shape[-1] > 0:
    cols = shape[-1]
    view = (n // cols, cols)
    unit = _unit(view, block_size)
    lead = max(unit, (k * block_size // cols) // unit * unit)
    if lead * cols <= 4 * k * block_size:
      return view, _even(view[0], lead, unit)
  return (n,), _even(n, k * block_size, block_size)


def _unit(view, block_size: int) -> int:
  """The smallest run along ``view[0]`` a chunk may take: rows that make whole blocks
  and a multiple of 8 (TPU tiles are 8 rows of 128), or one block of a flat view."""
  if len(view) == 1:
    return block_size
  return math.lcm(block_size // math.gcd(view[1], block_size), 8)


def _even(length: int, lead: int, unit: int) -> int:
  """A chunk length (a multiple of ``unit``) for ``length``: the largest of at least an
  eighth of ``lead`` that divides it in two or more chunks (no tail: a tail piece runs
  outside the loop, and XLA:TPU held a leaf-sized buffer for one beside other leaves);
  else ``lead``, or for a length under two chunks its half; ``lead`` when nothing fits."""
  for c in range(lead, max(unit, lead // 8) - 1, -unit):
    if length % c == 0 and length // c >= 2:
      return c
  if length // lead >= 2:
    return lead
  half = (length // 2) // unit * unit
  return half or lead


def _moment_parts(x):
  """A moment as its arrays: ``[codes, scales]`` or ``[dense]``."""
  return [x.codes, x.scales] if is_quantized(x) else [x]


def _with_parts(x, parts):
  if is_quantized(x):
    return dataclasses.replace(x, codes=parts[0], scales=parts[1])
  return parts[0]


def _reference(moments):
  """The first quantized moment: its blocks set the chunks."""
  return next(q for q in moments if is_quantized(q))


def _vma(x) -> frozenset:
  try:
    return frozenset(getattr(jax.typeof(x), "vma", ()) or ())
  except (TypeError, AttributeError):
    return frozenset()


def _varying_like(tree, everything):
  """``tree``'s arrays cast to vary over every manual mesh axis any array of
  ``everything`` varies over (inside ``shard_map``; a no-op elsewhere)."""
  axes = frozenset().union(*map(_vma, jax.tree.leaves(everything)))
  if not axes:
    return tree

  def cast(a):
    missing = tuple(sorted(axes - _vma(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a
  return jax.tree.map(cast, tree)


def _on_context_mesh(a):
  """``a`` typed replicated on the context's Explicit mesh when it has no mesh of its own:
  values computed under such a mesh are typed on it, and a dynamic update slice needs
  its operand and update typed alike."""
  ctx = jax.sharding.get_abstract_mesh()
  if (ctx.empty or has_mesh(a) or ctx.manual_axes
      or jax.sharding.AxisType.Explicit not in ctx.axis_types):
    return a
  return jax.sharding.reshard(a, P())


def _on_explicit_axes(a) -> bool:
  """Whether ``a``'s type carries a mesh with Explicit axes (the per-device call is then
  a ``shard_map``, which may close over traced values)."""
  return has_mesh(a) and jax.sharding.AxisType.Explicit in jax.typeof(a).sharding.mesh.axis_types


def _put(a, new, start):
  """``new`` written into ``a`` from ``start`` along the leading axis (in place in XLA)."""
  return jax.lax.dynamic_update_slice_in_dim(a, reshard_like(new.astype(a.dtype), a), start, 0)


def _stream(fn, g, moments, inputs, *, first_block, chunk_values: int, reads_once: bool,
            **kwargs):
  """``fn`` over the blocks of one device's leaf, a chunk at a time; see the module doc."""
  ref = _reference(moments)
  nb, bs = ref.scales.shape[0], ref.block_size
  n = g.size
  view, lead = chunking(g.shape, bs, chunk_values)
  per_lead = n // view[0] if view[0] else 1
  k = lead * per_lead // bs                      # blocks per chunk
  chunks = view[0] // lead if n > 0 else 0
  chunks = chunks if chunks >= 2 else 0          # under two whole chunks: no loop
  n_m = len(moments)
  dense = lambda x: x if is_quantized(x) else x.reshape(view)
  x, moments, inputs = jax.tree.map(
      _on_context_mesh, (g.reshape(view), [dense(q) for q in moments],
                         [a.reshape(view) for a in inputs]))
  carry = (x, *moments)                          # written back; ``inputs`` are only read
  # Inside shard_map the chunk's results vary over every manual axis its inputs vary
  # over; the loop's carry must start varying over them too.
  carry = _varying_like(carry, (carry, inputs, kwargs))

  def run(gs, ms, ins, block0):
    u, ms = fn(gs, list(ms), list(ins), first=(first_block + block0) * bs, **kwargs)
    return (u, *ms)

  def write(arrays, new, row, blk, shape_of):
    """The piece's results written into the carried arrays (rows ``row``, blocks ``blk``)."""
    out = []
    for a, b in zip(arrays, new):
      if is_quantized(a):
        out.append(dataclasses.replace(a, codes=_put(a.codes, b.codes, blk),
                                       scales=_put(a.scales, b.scales, blk)))
      else:
        out.append(_put(a, shape_of(b), row))
    return out

  def body(i, carry):
    row, blk = i * lead, i * k
    rows = lambda a: jax.lax.dynamic_slice_in_dim(a, row, lead, 0).reshape(k, bs)
    part = lambda q: (dataclasses.replace(
        q, codes=jax.lax.dynamic_slice_in_dim(q.codes, blk, k, 0),
        scales=jax.lax.dynamic_slice_in_dim(q.scales, blk, k, 0)) if is_quantized(q) else rows(q))
    # Every read of the carried arrays must happen before the chunk's writes: XLA may
    # fuse a read into a consumer scheduled after a write, and then copies the whole
    # carried arrays every iteration to keep the old values. A barrier on the chunk's
    # inputs ensures it, unless ``fn`` reads its inputs once, into buffers, before it
    # produces anything (``reads_once``; 7% faster on XLA:CPU).
    parts = tuple(map(part, carry)) + tuple(map(rows, inputs))
    parts = parts if reads_once else jax.lax.optimization_barrier(parts)
    new = run(parts[0], parts[1:1 + n_m], parts[1 + n_m:], blk)
    return tuple(write(carry, new, row, blk, lambda b: b.reshape((lead,) + view[1:])))

  if chunks:
    try:
      carry = jax.lax.fori_loop(0, chunks, body, carry)
    except TypeError as e:
      # Inside a pmap / shard_map whose replicated moments the update makes varying
      # (the carry's manual axis types change): the leaf goes as one piece instead.
      if "manual axis types" not in str(e):
        raise
      chunks = 0
  # The tail (fewer than a chunk's values, the last block maybe partial), or the whole
  # leaf when it is small: one piece, zero-padded to whole blocks.
  row0, blk0 = chunks * lead, chunks * k
  if row0 < view[0] or (n == 0 and nb):
    tail_n, tail_b = n - row0 * per_lead, nb - blk0
    pad = lambda a: jnp.pad(a[row0:].reshape(-1), (0, tail_b * bs - tail_n)).reshape(tail_b, bs)
    part = lambda q: (dataclasses.replace(q, codes=q.codes[blk0:], scales=q.scales[blk0:])
                      if is_quantized(q) else pad(q))
    parts = tuple(map(part, carry))
    new = run(parts[0], parts[1:], map(pad, inputs), blk0)
    unpad = lambda b: b.reshape(-1)[:tail_n].reshape((view[0] - row0,) + view[1:])
    if chunks:
      carry = write(carry, new, row0, blk0, unpad)
    else:  # the piece is the whole leaf: its results are the new arrays
      carry = [b if is_quantized(b) else unpad(b).astype(a.dtype) for a, b in zip(carry, new)]
  undense = lambda q: q if is_quantized(q) else q.reshape(g.shape)
  return carry[0].reshape(g.shape), [undense(q) for q in carry[1:]]


def _one_piece(q, shape):
  """A moment seen as the plain layout of ``shape`` (a piece, or a flat view)."""
  return dataclasses.replace(q, shape=tuple(shape), shards=None) if is_quantized(q) else q


def _stream_pieces(fn, g, moments, inputs, shards, *, first_block, **kw):
  """:func:`_stream` over a leaf (or one device's part of it) in the per-shard layout
  ``shards`` (None: the plain layout). One piece streams as it is; several (a device
  holding more than one shard: one device, or a mesh that does not fit the layout)
  go through their blocks view (a copy of the gradient)."""
  restore = lambda q, new: (dataclasses.replace(new, shape=q.shape, shards=q.shards)
                            if is_quantized(new) else new)
  if shards is None or math.prod(shards) == 1:
    u, new = _stream(fn, g, [_one_piece(q, g.shape) for q in moments], inputs,
                     first_block=first_block, **kw)
    return u, [restore(q, m) for q, m in zip(moments, new)]
  bs = _reference(moments).block_size
  view = lambda x: to_blocks(x, shards, bs).reshape(-1)
  gb = view(g)
  flat = lambda q: _one_piece(q, gb.shape) if is_quantized(q) else view(q)
  u, new = _stream(fn, gb, [flat(q) for q in moments],
                   [view(a).astype(a.dtype) for a in inputs], first_block=first_block, **kw)
  whole = lambda x: from_blocks(x.reshape(-1, bs), g.shape, shards)
  dense = lambda q, new: restore(q, new) if is_quantized(new) else whole(new)
  return whole(u).astype(g.dtype), [dense(q, m) for q, m in zip(moments, new)]


def stream_moments(fn, g, moments, *, inputs=(), chunk_values: int = CHUNK_VALUES,
                   reads_once: bool = False, closes_over_tracers: bool = False, **kwargs):
  """Runs a per-block update of any number of moments over a leaf in bounded chunks.

  Args:
    fn: ``fn(g_KxB, moments, inputs, *, first, **kwargs) -> (u_KxB, moments)`` on
      ``k`` whole blocks: ``g_KxB`` the gradient's blocks (zero-padded at the
      leaf's end), ``moments`` a list with each moment's part (a
      :class:`~stquant_jax.QuantizedArray` of those blocks, or ``[k, block_size]``
      in the moment's dtype), ``inputs`` the list of the read-only inputs' blocks
      ``[k, block_size]`` (zero-padded), ``first`` the flat index in the leaf of
      the blocks' first value. It returns the update's blocks and each moment's
      new part, of the kind it was given.
    g: the gradient (any float dtype and shape).
    moments: the leaf's moments: quantized (at least one) or dense arrays of
      ``g``'s shape; quantized ones share the block size and layout.
    inputs: read-only arrays of ``g``'s shape (the parameter, say), sliced as the
      gradient is and never written.
    chunk_values: values per chunk (rounded to whole blocks and rows).
    reads_once: ``fn`` reads each input once into a buffer before it computes any
      output (it ends the reads with an ``optimization_barrier``); otherwise the
      stream puts a barrier on each chunk's inputs.
    closes_over_tracers: ``fn`` closes over traced values. Where the blocks may
      be sharded each device streams its own
      (:func:`~stquant_jax._src.distributed.local_blocks.map_local_blocks`); under
      GSPMD (no Explicit mesh axes) that per-device call cannot take such an
      ``fn``, so the stream then runs on the global arrays and XLA partitions it.
    **kwargs: passed to ``fn``; arrays among them (a pytree's leaves included) go
      to each device whole.

  Returns:
    ``(u, moments)``: the update (``g``'s shape and dtype) and the list of new
    moments, as if ``fn`` had run on the whole leaf at once.

  Example:
    >>> import dataclasses
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> from stquant_jax._src.codec.blocks import dequantize_blocks, quantize_blocks
    >>> def momentum(g, ms, ins, *, first):   # trace = 0.9 trace + g, in 8 bits
    ...   (q,) = ms
    ...   t = 0.9 * dequantize_blocks(q.codes, q.scales, q.code_map) + g
    ...   codes, scales = quantize_blocks(t, q.code_map)
    ...   return t, [dataclasses.replace(q, codes=codes, scales=scales)]
    >>> g = jnp.ones((512, 1024))
    >>> u, (t,) = stream_moments(momentum, g, [sq.quantize(g * 0, 8)])
    >>> float(u[511, 1023]), t.codes.shape
    (1.0, (4096, 32))
  """
  ref = _reference(moments)
  nb, bs, shards = ref.scales.shape[0], ref.block_size, ref.shards
  moments, inputs = list(moments), list(inputs)
  kw = dict(chunk_values=chunk_values, reads_once=reads_once, **kwargs)
  parts_in = [x for q in moments for x in _moment_parts(q)]
  ragged = shards is None and g.size != nb * bs  # plain layout, padded: no block view
  global_only = closes_over_tracers and not any(map(_on_explicit_axes, parts_in + [g]))
  if g.size == 0 or ragged or global_only or not may_be_block_sharded(parts_in + [g]):
    return _stream_pieces(fn, g, moments, inputs, shards, first_block=0, **kw)

  # Sharded block axis: every device streams its own blocks (no gathers). The gradient,
  # dense moments and inputs go in whole (``leaves``: each device gets its rows, or its
  # pieces in the per-shard layout), not as ``[n_blocks, block_size]``: the update
  # then comes out in the gradient's shape, which XLA can write over the gradient.
  quantized = [q for q in moments if is_quantized(q)]
  dense = [q for q in moments if not is_quantized(q)]
  q_parts = [x for q in quantized for x in _moment_parts(q)]
  naturals = [g] + dense + inputs

  # Traced arguments (hyperparameters, the step) go in as replicated inputs: shard_map
  # cannot close over values typed with Explicit mesh axes.
  flat, kw_def = jax.tree.flatten(kw)
  traced = [isinstance(v, jax.Array) for v in flat]

  def local(first_block, rep, arrs):
    rep = iter(rep)
    kw_l = kw_def.unflatten([next(rep) if t else v for v, t in zip(flat, traced)])
    it = iter(arrs)
    parts = [[next(it), next(it)] for _ in quantized]
    nat = [next(it) for _ in naturals]
    g_l, dense_l = nat[0], iter(nat[1:1 + len(dense)])
    parts = iter(parts)
    m_l = [_with_parts(q, next(parts)) if is_quantized(q) else next(dense_l) for q in moments]
    pieces = shards and tuple(c * l // s for c, s, l in zip(shards, g.shape, g_l.shape))
    u, new = _stream_pieces(fn, g_l, m_l, nat[1 + len(dense):], pieces,
                            first_block=first_block, **kw_l)
    q_out = [x for q in new if is_quantized(q) for x in _moment_parts(q)]
    n_out = [u] + [q for q in new if not is_quantized(q)]
    return [q_out, n_out], ()

  (q_out, n_out), _ = map_local_blocks(local, [v for v, t in zip(flat, traced) if t], q_parts,
                                       naturals, shards)
  q_out, n_out = iter(q_out), iter(n_out)
  u = reshard_like(next(n_out), g)

  def back(q):
    if is_quantized(q):
      return dataclasses.replace(q, codes=reshard_like(next(q_out), q.codes),
                                 scales=reshard_like(next(q_out), q.scales))
    return reshard_like(next(n_out), q)
  return u, [back(q) for q in moments]


def _two_moments(fn):
  """A per-block ``fn(g, mu, nu, *, first, **kw) -> (u, mu, nu)`` as
  :func:`stream_moments` calls it."""
  def call(g_KxB, moments, inputs, **kw):
    del inputs
    u, mu, nu = fn(g_KxB, *moments, **kw)
    return u, [mu, nu]
  return call


def stream_leaf(fn, g, mu, nu, *, chunk_values: int = CHUNK_VALUES, reads_once: bool = False,
                **kwargs):
  """Runs a per-block update of two moments over a leaf in bounded chunks; returns
  ``(u, mu, nu)``: :func:`stream_moments` with ``moments=[mu, nu]``.

  Args:
    fn: ``fn(g_KxB, mu_part, nu_part, *, first, **kwargs) -> (u_KxB, mu_part, nu_part)``
      on ``k`` whole blocks: ``g_KxB`` the gradient's blocks (zero-padded at the
      leaf's end), each moment part a :class:`~stquant_jax.QuantizedArray` of those
      blocks or float32 ``[k, block_size]``, ``first`` the flat index in the leaf
      of the blocks' first value.
    g: the gradient (any float dtype and shape).
    mu, nu: the leaf's moments: quantized (at least one) or float32 of ``g``'s
      shape; quantized ones share the block size and layout.
    chunk_values: values per chunk (rounded to whole blocks and rows).
    reads_once: ``fn`` reads each input once into a buffer before it computes any
      output (it ends the reads with an ``optimization_barrier``); otherwise the
      stream puts a barrier on each chunk's inputs.
    **kwargs: passed to ``fn``.

  Returns:
    The update (``g``'s shape and dtype) and the new moments, as if ``fn`` had
    run on the whole leaf at once.
  """
  u, (new_mu, new_nu) = stream_moments(_two_moments(fn), g, [mu, nu], chunk_values=chunk_values,
                                       reads_once=reads_once, **kwargs)
  return u, new_mu, new_nu
