"""Score engine: per-leaf statistics of the gradient and the moments, as additive sums.

Every statistic the adaptive policy can use is a ratio of *sums* over the
elements (or blocks) of one leaf. Sums are what a collective can add up: with
``jax.lax.psum`` over a data-parallel axis, the sums of eight devices equal the
sums of the concatenated arrays, so every replica computes the same factor
values, and they equal the single-device values on the concatenated data.

Candidate factors (per leaf, per moment ``s`` in {m, v}; "x" is the moment the
quantizer sees: m itself for m, v for v):

Magnitude family (how much this moment's errors can weigh):
  * ``grad_rms``: RMS of the incoming gradient.
  * ``moment_rms``: RMS of m (for m); RMS of sqrt(v) (for v).
  * ``snr``: ``sqrt(sum m^2 / sum v)``, the gradient's signal-to-noise ratio
    (near 1 for a consistent gradient, near ``sqrt(1 - b1)`` for pure noise).
  * ``update_rms``: RMS of ``m / sqrt(v)``, the size of Adam's step.

Structure family (how hard this moment is to quantize):
  * ``crest``: mean over blocks of ``absmax / rms`` (outliers in a block).
  * ``log_range``: mean over blocks of ``log2(absmax) - mean(log2 |x|)`` (the
    dynamic range a block must cover; floored at ``2**-24`` of the block max).
  * ``probe_err``: measured error of re-quantizing x at ``probe_bits`` with the
    default map: ``||x - Q(x)|| / ||x||`` for m, RMS of ``(Q(v) - v) / v`` for v.

Everything here is pure jnp, works on the packed state directly (dequantizing
block by block) and costs O(size) time and O(1) output per leaf, or
O(size / stride) on a strided subsample of the blocks. The policy takes a
rotating 1/K of each leaf's blocks every step and accumulates the sums over
the K steps between decisions (every block once per period); only the
candidates the chosen factors read are traced.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.blocks import decode_blocks, dequantize_blocks, quantize_blocks
from stquant_jax._src.codec.maps import default_map
from stquant_jax._src.codec.quantized import QuantizedArray, is_quantized
from stquant_jax._src.codec.shards import to_blocks, valid_mask
from stquant_jax._src.distributed.local_blocks import map_local_blocks, may_be_block_sharded
from stquant_jax._src.distributed.mesh import explicit_axes_per_dim, explicit_shards, replicated

MAGNITUDE_FACTORS = ("grad_rms", "moment_rms", "snr", "update_rms")
STRUCTURE_FACTORS = ("crest", "log_range", "probe_err")
FACTORS = MAGNITUDE_FACTORS + STRUCTURE_FACTORS

# Layout of the per-leaf sum vector (float32 [NUM_SUMS]).
SUMS = (
    "n",          # valid elements
    "blocks",     # blocks with at least one valid element
    "g2",         # sum g^2
    "m2",         # sum m^2
    "v",          # sum v
    "u2",         # sum m^2 / v over v > 0
    "vpos",       # elements with v > 0
    "crest_m", "crest_v",      # sum over blocks of absmax / rms
    "range_m", "range_v",      # sum over blocks of log2 absmax - mean log2 |x|
    "perr_m",     # sum (m - Q(m))^2
    "perr_v",     # sum ((v - Q(v)) / v)^2 over v > 0
)
_IDX = {k: i for i, k in enumerate(SUMS)}
NUM_SUMS = len(SUMS)
_TINY = 1e-30


def _take_rows(a, rows, stride: int, slot, span=None):
  """Rows ``rows = slot + stride * arange(r)`` of ``a`` (``[nb, ...]``); with ``span``
  ``(lo, hi)`` only ``rows[lo:hi]``.

  When ``stride`` divides ``nb`` this is a strided slice of the view
  ``[nb / stride, stride, ...]``: with the block axis sharded (FSDP), each
  device keeps its own rows and no data moves between devices. Otherwise a
  gather (entries ``>= nb`` are clamped; the caller masks them out).
  """
  nb = a.shape[0]
  shards = explicit_shards(a)
  lo, hi = span if span is not None else (0, rows.shape[0])
  if nb % stride == 0 and (nb // stride) % shards == 0:
    view = a.reshape((nb // stride, stride) + a.shape[1:])
    if span is not None:
      view = view[lo:hi]
    return jax.lax.dynamic_index_in_dim(view, jnp.asarray(slot, jnp.int32), axis=1,
                                        keepdims=False)
  if shards > 1:
    a = replicated(a)
  return jnp.take(a, jnp.minimum(rows[lo:hi], nb - 1), axis=0)


def _blocks(x, q_ref: QuantizedArray | None, block_size: int, rows=None, stride: int = 1,
            slot=0, span=None):
  """``x`` (a moment leaf or the gradient) as float32 blocks ``[nb, bs]`` plus a validity mask.

  ``rows`` (optional int32 ``[r]``, from :func:`sample_rows` with ``stride``
  and ``slot``) keeps only those blocks (``[r, bs]``); entries ``>= nb`` are
  invalid rows (mask all False). The subsample is taken directly from the
  packed codes / the flat array, so it costs O(r * bs), not O(size), and it
  is local to each device when the block axis is sharded and ``stride``
  divides the blocks per device. ``span`` ``(lo, hi)`` keeps ``rows[lo:hi]`` only.
  """
  shards = _shards_of(x, q_ref)
  some = rows if rows is None or span is None else rows[span[0]:span[1]]
  if is_quantized(x):
    codes, scales = x.codes, x.scales
    if rows is not None:
      codes = _take_rows(codes, rows, stride, slot, span)
      scales = _take_rows(scales, rows, stride, slot, span)
    d = decode_blocks(codes, scales, x.code_map)
    d = d.reshape(d.shape[0], -1)
    bs = x.block_size
  elif shards is not None:  # per-shard layout: the blocks of a (replicated) copy
    bs = q_ref.block_size
    d = to_blocks(replicated(x) if explicit_axes_per_dim(x) else x, shards, bs)
    if rows is not None:
      d = jnp.take(d, jnp.minimum(some, d.shape[0] - 1), axis=0)
  else:
    flat = jnp.ravel(x).astype(jnp.float32)
    n = flat.size
    bs = q_ref.block_size if q_ref is not None else block_size
    nb = -(-n // bs)
    if nb * bs != n or nb % explicit_shards(flat):
      if explicit_shards(flat) > 1:
        flat = replicated(flat)
      d = (jnp.pad(flat, (0, nb * bs - n)).reshape(nb, bs) if rows is None
           else _gather_blocks(flat, some, bs))
    else:
      d = flat.reshape(nb, bs)
      if rows is not None:
        d = _take_rows(d, rows, stride, slot, span)
  some = jnp.arange(d.shape[0], dtype=jnp.int32) if rows is None else some
  return d, valid_mask(some, x.shape, shards, bs)


def _gather_blocks(flat, rows, bs: int):
  """Blocks ``rows`` (int32 ``[r]``) of the flat array ``flat`` cut into blocks of ``bs``
  (values past its end: zeros), gathered without padding a copy of it."""
  n = flat.size
  idx = rows[:, None] * bs + jnp.arange(bs, dtype=jnp.int32)[None, :]
  return jnp.where(idx < n, jnp.take(flat, jnp.minimum(idx, n - 1)), 0.0)


def _shards_of(x, q_ref):
  """The per-shard layout of a leaf's blocks (its quantized moment's), or None."""
  q = x if is_quantized(x) else q_ref
  return q.shards if q is not None else None


def num_leaf_blocks(x, q_ref: QuantizedArray | None, block_size: int) -> int:
  """Number of blocks of one leaf (static)."""
  q = x if is_quantized(x) else q_ref
  return q.scales.shape[0] if q is not None else -(-x.size // block_size)


def sample_rows(num_blocks: int, stride: int, slot):
  """Blocks ``slot, slot + stride, slot + 2 * stride, ...`` of a leaf (int32 ``[ceil(nb / stride)]``).

  Over ``stride`` consecutive slots (0..stride-1, in any order) every block is
  taken exactly once. Entries ``>= num_blocks`` mark missing rows (masked out).
  """
  r = -(-num_blocks // stride)
  return jnp.asarray(slot, jnp.int32) + stride * jnp.arange(r, dtype=jnp.int32)


def _block_crest(a, valid):
  """Per block (row): absmax / rms of ``a >= 0``; blocks with rms 0 give 0."""
  mx = jnp.max(jnp.where(valid, a, 0.0), axis=1)
  cnt = jnp.maximum(jnp.sum(valid, axis=1), 1)
  rms = jnp.sqrt(jnp.sum(jnp.where(valid, a * a, 0.0), axis=1) / cnt)
  return jnp.where(rms > 0, mx / jnp.where(rms > 0, rms, 1.0), 0.0)


def _block_range(a, valid):
  """Per block (row): ``log2 absmax - mean log2 max(a, absmax * 2**-24)``."""
  mx = jnp.max(jnp.where(valid, a, 0.0), axis=1, keepdims=True)
  floor = jnp.maximum(mx * 2.0**-24, _TINY)
  la = jnp.log2(jnp.maximum(a, floor))
  cnt = jnp.maximum(jnp.sum(valid, axis=1), 1)
  mean = jnp.sum(jnp.where(valid, la, 0.0), axis=1) / cnt
  r = jnp.log2(jnp.maximum(mx[:, 0], _TINY)) - mean
  return jnp.where(mx[:, 0] > 0, r, 0.0)


def _probe(x_NxB, signed: bool, probe_bits: int):
  cmap = default_map(probe_bits, signed)
  codes, scales = quantize_blocks(x_NxB, cmap)
  return dequantize_blocks(codes, scales, cmap)


_NEEDS = {
    ("grad_rms", 0): ("g2", "n"), ("grad_rms", 1): ("g2", "n"),
    ("moment_rms", 0): ("m2", "n"), ("moment_rms", 1): ("v", "n"),
    ("snr", 0): ("m2", "v"), ("snr", 1): ("m2", "v"),
    ("update_rms", 0): ("u2", "vpos"), ("update_rms", 1): ("u2", "vpos"),
    ("crest", 0): ("crest_m", "blocks"), ("crest", 1): ("crest_v", "blocks"),
    ("log_range", 0): ("range_m", "blocks"), ("log_range", 1): ("range_v", "blocks"),
    ("probe_err", 0): ("perr_m", "m2"), ("probe_err", 1): ("perr_v", "vpos"),
}


def needed_sums(mu_factors, nu_factors) -> frozenset:
  """The entries of :data:`SUMS` that the given (m, v) factor names read."""
  keys = set()
  for k, names in enumerate((mu_factors, nu_factors)):
    for name in names:
      keys.update(_NEEDS[(name, k)])
  return frozenset(keys)


def leaf_sums(g, mu, nu, *, block_size: int, probe_bits: int = 4, needed=None,
              stride: int = 1, slot=0):
  """Additive statistics of one leaf: float32 ``[NUM_SUMS]`` (layout :data:`SUMS`).

  Args:
    g: the leaf's gradient (any float dtype, the parameter's shape).
    mu, nu: the refreshed moments: :class:`QuantizedArray` or float32 arrays.
    block_size: block size used for float32 moments (quantized ones use their own).
    probe_bits: bit-width of the re-quantization probe (``probe_err``).
    needed: optional set of :data:`SUMS` names to compute (others are 0); the
      policy passes only what its factors read, which keeps the traced
      program (and its compile time) small.
    stride, slot: subsample: with ``stride > 1`` only the blocks ``b`` with
      ``b % stride == slot`` (``slot`` may be traced) enter the sums, which
      costs O(size / stride). Summing the results over ``stride`` consecutive
      slots gives the sums of every block once.
  """
  needed = frozenset(SUMS) if needed is None else frozenset(needed) | {"n", "blocks"}
  ref = mu if is_quantized(mu) else (nu if is_quantized(nu) else None)
  if stride > 1 and _sample_per_shard(g, mu, nu, ref, block_size):
    return _local_leaf_sums(g, mu, nu, ref, block_size, probe_bits, needed, stride, slot)
  rows = None
  if stride > 1:
    rows = sample_rows(num_leaf_blocks(mu, ref, block_size), stride, slot)
  m, valid = _blocks(mu, ref, block_size, rows, stride, slot)
  v, _ = _blocks(nu, ref, block_size, rows, stride, slot)
  return _sums(m, v, valid, lambda: _blocks(g, ref, block_size, rows, stride, slot)[0],
               needed, probe_bits)


def _sums(m, v, valid, g_blocks, needed, probe_bits: int):
  """The :data:`SUMS` of decoded blocks ``m``, ``v`` ``[r, bs]`` (``g_blocks()``: the
  gradient's, read only when needed) over the elements where ``valid``."""
  return jnp.sum(_row_sums(m, v, valid, g_blocks, needed, probe_bits), axis=0)


def _row_sums(m, v, valid, g_blocks, needed, probe_bits: int):
  """Per block (row) partial :data:`SUMS`: float32 ``[r, NUM_SUMS]``."""
  f = lambda x: jnp.where(valid, x, 0.0)
  rows = lambda x: jnp.sum(x, axis=1, dtype=jnp.float32)
  v = jnp.maximum(v, 0.0)
  pos = valid & (v > 0)
  inv_v = lambda: jnp.where(pos, 1.0 / jnp.where(pos, v, 1.0), 0.0)

  def gsq():
    gb = g_blocks()
    return rows(f(gb * gb))

  def perr_m():
    return rows(f(jnp.square(m - _probe(m, True, probe_bits))))

  def perr_v():
    return rows(jnp.square((_probe(v, False, probe_bits) - v) * inv_v()))

  compute = {
      "n": lambda: rows(valid),
      "blocks": lambda: jnp.any(valid, axis=1).astype(jnp.float32),
      "g2": gsq,
      "m2": lambda: rows(f(m * m)),
      "v": lambda: rows(f(v)),
      "u2": lambda: rows(m * m * inv_v()),
      "vpos": lambda: rows(pos),
      "crest_m": lambda: _block_crest(jnp.abs(m), valid),
      "crest_v": lambda: _block_crest(jnp.sqrt(v), valid),
      "range_m": lambda: _block_range(jnp.abs(m), valid),
      "range_v": lambda: _block_range(v, valid),
      "perr_m": perr_m,
      "perr_v": perr_v,
  }
  zero = jnp.zeros((m.shape[0],), jnp.float32)
  return jnp.stack([compute[k]().astype(jnp.float32) if k in needed else zero for k in SUMS],
                   axis=1)


# Rows (sampled blocks) decoded and reduced together in :func:`leaves_sums`: ~1 MB per
# float32 array at 128 values a block; at most :data:`_MAX_GROUPS` groups (a model
# with more sampled blocks takes larger groups).
_GROUP_ROWS = 2048
_MAX_GROUPS = 16


def leaves_sums(gs, mus, nus, *, block_size: int, probe_bits: int = 4, needed=None,
                stride: int = 1, slot=0):
  """:func:`leaf_sums` of many leaves at once: float32 ``[L, NUM_SUMS]``.

  With ``stride > 1`` the sampled blocks of all leaves (that are not taken shard
  by shard) are decoded, concatenated and reduced together, then summed per
  leaf: the step's program holds a few sets of reductions instead of one per leaf,
  which is most of what the adaptive policy adds to the compile time of a step
  (for GPT-2 small compiled for an H100, ~45 s of ~55 s). The sample is cut into
  groups of about :data:`_GROUP_ROWS` blocks (at most :data:`_MAX_GROUPS`), each
  group's reads made to wait for the previous group's sums: the float32 arrays a
  group's reductions hold are bounded by the group, not by the model (as one pass,
  they were ~7% of the parameter bytes at ``every=100``). With ``stride == 1``
  (whole leaves) each leaf is reduced on its own, so no copy of the state exists.
  """
  needed = frozenset(SUMS) if needed is None else frozenset(needed) | {"n", "blocks"}
  out, groups = [None] * len(gs), {}
  for i, (g, mu, nu) in enumerate(zip(gs, mus, nus)):
    ref = mu if is_quantized(mu) else (nu if is_quantized(nu) else None)
    if stride == 1 or _sample_per_shard(g, mu, nu, ref, block_size):
      out[i] = leaf_sums(g, mu, nu, block_size=block_size, probe_bits=probe_bits,
                         needed=needed, stride=stride, slot=slot)
      continue
    nb = num_leaf_blocks(mu, ref, block_size)
    bs = ref.block_size if ref is not None else block_size
    groups.setdefault(bs, []).append((i, -(-nb // stride)))
  done = None
  for bs, leaves in groups.items():
    total = sum(r for _, r in leaves)
    size = max(_GROUP_ROWS, -(-total // _MAX_GROUPS))
    acc = {i: jnp.zeros((NUM_SUMS,), jnp.float32) for i, _ in leaves}
    for group in _row_groups(leaves, size):
      parts, owner = [], []
      for i, lo, hi in group:
        g, mu, nu = gs[i], mus[i], nus[i]
        ref = mu if is_quantized(mu) else (nu if is_quantized(nu) else None)
        rows = sample_rows(num_leaf_blocks(mu, ref, block_size), stride, slot)
        slot_i = jnp.asarray(slot, jnp.int32)
        if done is not None:  # this group's reads after the previous group's sums
          rows, slot_i = _after(done, (rows, slot_i))
        take = lambda x: _blocks(x, ref, block_size, rows, stride, slot_i, span=(lo, hi))
        m, valid = take(mu)
        v, _ = take(nu)
        gb = take(g)[0] if "g2" in needed else None
        piece = [m, v, valid] + ([gb] if gb is not None else [])
        parts.append([replicated(x) if explicit_shards(x) > 1 else x for x in piece])
        owner.append(i)
      cat = [jnp.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
      # Materialise the decoded sample once: otherwise XLA fuses every leaf's gather and
      # decode into each reduction that reads it (slow to compile, and repeated work).
      cat = jax.lax.optimization_barrier(cat)
      g_cat = cat[3] if len(cat) > 3 else None
      per_row = _row_sums(cat[0], cat[1], cat[2], lambda: g_cat, needed, probe_bits)
      piece_of_row = np.concatenate([np.full(p[0].shape[0], j, np.int32)
                                     for j, p in enumerate(parts)])
      per_piece = jax.ops.segment_sum(per_row, piece_of_row, num_segments=len(parts))
      for j, i in enumerate(owner):
        acc[i] = acc[i] + per_piece[j]
      done = per_piece
    for i in acc:
      out[i] = acc[i]
  if not out:
    return jnp.zeros((0, NUM_SUMS), jnp.float32)
  return jnp.stack(out)


def _row_groups(leaves, size: int):
  """``(leaf, lo, hi)`` row ranges of ``leaves`` (``(leaf, rows)`` pairs, in order) cut
  into consecutive groups of at most ``size`` rows."""
  groups, cur, room = [], [], size
  for i, r in leaves:
    lo = 0
    while lo < r:
      hi = min(r, lo + room)
      cur.append((i, lo, hi))
      room -= hi - lo
      lo = hi
      if room == 0:
        groups.append(cur)
        cur, room = [], size
  if cur:
    groups.append(cur)
  return groups


def _after(done, xs):
  """``xs`` made to wait for ``done``."""
  _, xs = jax.lax.optimization_barrier((done, xs))
  return xs


def _sample_per_shard(g, mu, nu, ref, block_size: int) -> bool:
  """Whether the sampled statistics should run shard by shard: the leaf is a whole
  number of blocks and its block axis may be sharded (Explicit axes, or several
  devices under GSPMD)."""
  bs = ref.block_size if ref is not None else block_size
  if g.size and _shards_of(g, ref) is not None:  # per-shard layout: blocks are whole
    return may_be_block_sharded([a for q in (mu, nu) if is_quantized(q)
                                 for a in (q.codes, q.scales)])
  if g.size == 0 or g.size % bs:
    return False
  return may_be_block_sharded(_block_arrays(g, mu, nu, bs, needed=frozenset()))


def _block_arrays(g, mu, nu, bs: int, needed):
  """The arrays of one leaf with a leading block axis: codes and scales of quantized
  moments, the ``[nb, bs]`` view of float32 moments (and of ``g`` if ``g2`` is needed)."""
  nb = g.size // bs
  view = lambda x: jnp.ravel(x).astype(jnp.float32).reshape(nb, bs)
  out = []
  for x in (mu, nu):
    out += [x.codes, x.scales] if is_quantized(x) else [view(x)]
  return out + ([view(g)] if "g2" in needed else [])


def _local_leaf_sums(g, mu, nu, ref, block_size, probe_bits, needed, stride: int, slot):
  """:func:`leaf_sums`' subsample taken on each device's own blocks.

  The global sample is the blocks ``b`` with ``b % stride == slot``; a device whose
  first block is ``f`` holds those at local rows ``(slot - f) mod stride + k * stride``,
  so it samples exactly its share of the global sample, and the sums (added over the
  devices) equal the global ones. Only the ``[NUM_SUMS]`` sums cross devices.
  """
  bs = ref.block_size if ref is not None else block_size
  shards = _shards_of(g, ref)
  # In the per-shard layout, float32 moments and the gradient go in as they are (each
  # device gets its piece) and the sampled blocks are read from the piece.
  naturals = [] if shards is None else (
      [x for x in (mu, nu) if not is_quantized(x)] + ([g] if "g2" in needed else []))

  def fn(first, rep, blk):
    (slot_,) = rep
    local = blk[0].shape[0]
    r = -(-local // stride)
    rows = jnp.mod(slot_ - first, stride) + stride * jnp.arange(r, dtype=jnp.int32)
    take = lambda a: jnp.take(a, jnp.minimum(rows, local - 1), axis=0)
    it = iter(blk[:len(blk) - len(naturals)])
    nat = iter(blk[len(blk) - len(naturals):])  # (the per-shard layout's natural arrays)

    def piece_rows(x):
      """Blocks ``rows`` of this device's piece(s) of a leaf in the per-shard layout."""
      pieces = tuple(c * l // s for c, s, l in zip(shards, g.shape, x.shape))
      if math.prod(pieces) > 1:  # several pieces here (a mesh that does not fit)
        return take(to_blocks(x, pieces, bs))
      return _gather_blocks(jnp.ravel(x).astype(jnp.float32), rows, bs)

    def read(x):
      if is_quantized(x):
        d = decode_blocks(take(next(it)), take(next(it)), x.code_map)
        return d.reshape(r, -1)
      return take(next(it)) if shards is None else piece_rows(next(nat))

    m, v = read(mu), read(nu)
    gb = None
    if "g2" in needed:
      gb = take(next(it)) if shards is None else piece_rows(next(nat))
    valid = jnp.broadcast_to((rows < local)[:, None], (r, bs))
    if shards is not None:
      valid = valid & valid_mask(rows, g.shape, shards, bs)
    sums = _sums(m, v, valid, lambda: gb, needed, probe_bits)
    return ([[], []] if naturals else []), sums

  if shards is not None:
    blocks = [a for q in (mu, nu) if is_quantized(q) for a in (q.codes, q.scales)]
    _, sums = map_local_blocks(fn, [jnp.asarray(slot, jnp.int32)], blocks, naturals, shards)
    return sums
  blocks = _block_arrays(g, mu, nu, bs, needed)
  _, sums = map_local_blocks(fn, [jnp.asarray(slot, jnp.int32)], blocks)
  return sums


def reduce_sums(sums, axis_name):
  """Sums over the devices of ``axis_name`` (None: statistics are already global)."""
  if axis_name is None:
    return sums
  return jax.lax.psum(sums, axis_name)


def factor_values(sums_LxS, name: str, moment: int):
  """Value of factor ``name`` for moment 0 (m) or 1 (v) of each leaf: float32 ``[L]``.

  Degenerate leaves (all-zero moments) give 0 for magnitude factors and 0 for
  structure factors; callers floor them before taking logs.
  """
  s = lambda k: sums_LxS[:, _IDX[k]]
  div = lambda a, b: a / jnp.maximum(b, _TINY)
  if name == "grad_rms":
    return jnp.sqrt(div(s("g2"), s("n")))
  if name == "moment_rms":
    return jnp.sqrt(div(s("m2") if moment == 0 else s("v"), s("n")))
  if name == "snr":
    return jnp.sqrt(div(s("m2"), s("v")))
  if name == "update_rms":
    return jnp.sqrt(div(s("u2"), s("vpos")))
  if name == "crest":
    return div(s("crest_m") if moment == 0 else s("crest_v"), s("blocks"))
  if name == "log_range":
    return div(s("range_m") if moment == 0 else s("range_v"), s("blocks"))
  if name == "probe_err":
    if moment == 0:
      return jnp.sqrt(div(s("perr_m"), s("m2")))
    return jnp.sqrt(div(s("perr_v"), s("vpos")))
  raise ValueError(f"unknown factor {name!r}; choose from {FACTORS}")
