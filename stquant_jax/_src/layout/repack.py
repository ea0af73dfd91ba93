"""Re-packing moments at new bit-widths: block by block, one jitted program per change.

A relayout re-packs some moments of a state: quantized -> quantized (another
width), quantized -> float32 or float32 -> quantized. Decoding a whole moment
to float32 before encoding it again (``quantize(dequantize(q))``) would need a
float32 scratch copy of it (8 MiB for a 2M-value moment); XLA:CPU cannot fuse
the block maxima with what reads them. Here a ``fori_loop`` walks the blocks
in chunks of about :data:`CHUNK_VALUES` values, decodes one chunk, computes
its new scales, encodes it and writes it in place into the output, so the
scratch is one chunk whatever the moment's size: peak memory is the old
moments plus the new ones plus a small constant (``tests/test_relayout.py``
checks it with the compiled program's ``memory_analysis()``). With
``donate=True`` the replaced moments are donated: the old scales' buffers are
reused in place and the old codes are freed as soon as the program ends.

Moments whose block axis is sharded over a mesh are re-packed shard by shard
(``shard_map``, no communication); float32 <-> quantized changes of sharded
moments, whose two sides are laid out differently, decode the whole moment.

The programs are pure functions of static specs (:class:`Change`), cached,
and can be lowered and compiled ahead of time from abstract inputs
(:func:`program`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from stquant_jax._src.codec.blocks import dequantize_blocks, num_blocks, quantize_blocks
from stquant_jax._src.codec.maps import CodeMap
from stquant_jax._src.codec.quantized import QuantizedArray, dequantize, quantize
from stquant_jax._src.codec.shards import num_layout_blocks, valid_mask
from stquant_jax._src.distributed.mesh import axes_of

CHUNK_VALUES = 1 << 16  # values decoded at a time: the scratch is ~4 bytes each, x a few


class Change(NamedTuple):
  """One moment's re-pack, all static (hashable): what the program is compiled for.

  ``src`` / ``dst``: the CodeMap, or None for float32. ``shards``: the quantized
  side's per-shard layout (:mod:`~stquant_jax._src.codec.shards`). ``in_sharding``: the
  input's (codes') sharding when it is a NamedSharding, for the per-shard path.
  ``out_shardings``: where the output goes (None: left to jit). ``stacked``:
  a ``pmap`` state (a leading replica axis on every array).
  """

  src: CodeMap | None
  dst: CodeMap | None
  block_size: int
  shape: tuple
  in_sharding: object = None
  out_shardings: object = None
  stacked: bool = False
  shards: tuple | None = None


def _chunk(nb: int, bs: int) -> int:
  return max(1, min(nb, CHUNK_VALUES // bs))


def _positions(start, c: int, bs: int):
  """Flat value positions of blocks ``start .. start + c`` as ``[c, bs]``."""
  return (start + jnp.arange(c, dtype=jnp.int32))[:, None] * bs + jnp.arange(bs, dtype=jnp.int32)


def _loop(nb: int, bs: int, body, init):
  """``body(start, c, carry)`` over the blocks in chunks of ``c``; the last chunk is
  moved back to end at ``nb`` (re-doing a few blocks with the same result)."""
  c = _chunk(nb, bs)
  n = -(-nb // c)
  if n == 1:
    return body(jnp.int32(0), c, init)
  return lax.fori_loop(0, n, lambda i, carry: body(jnp.minimum(i * c, nb - c), c, carry), init)


def rewidth(codes, scales, src: CodeMap, dst: CodeMap, bs: int, shape, shards=None, offset=0):
  """Quantized -> quantized: ``(codes, scales)`` of the same values at ``dst``'s width.

  ``shape``, ``shards``: the moment's shape and layout (the padding of each
  piece's last block re-encodes as zero, as :func:`quantize` pads). ``offset``:
  the global index of the first block (per-shard use).
  """
  nb = codes.shape[0]
  exact = num_layout_blocks(shape, shards, bs) * bs == math.prod(shape)

  def body(start, c, carry):
    out_c, out_s = carry
    x = dequantize_blocks(lax.dynamic_slice_in_dim(codes, start, c),
                          lax.dynamic_slice_in_dim(scales, start, c), src)
    if not exact:
      rows = offset + start + jnp.arange(c, dtype=jnp.int32)
      x = jnp.where(valid_mask(rows, shape, shards, bs), x, 0.0)
    new_c, new_s = quantize_blocks(x, dst)
    return (lax.dynamic_update_slice_in_dim(out_c, new_c, start, 0),
            lax.dynamic_update_slice_in_dim(out_s, new_s, start, 0))

  init = (jnp.zeros((nb, bs * dst.bits // 32), jnp.uint32), jnp.zeros((nb,), jnp.float32))
  return _loop(nb, bs, body, init)


def to_float(codes, scales, src: CodeMap, bs: int, shape):
  """Quantized -> float32 array of ``shape``, written chunk by chunk."""
  nb, size = codes.shape[0], math.prod(shape)

  def body(start, c, out):
    x = dequantize_blocks(lax.dynamic_slice_in_dim(codes, start, c),
                          lax.dynamic_slice_in_dim(scales, start, c), src)
    return out.at[_positions(start, c, bs).reshape(-1)].set(x.reshape(-1), mode="drop")

  return _loop(nb, bs, body, jnp.zeros((size,), jnp.float32)).reshape(shape)


def from_float(x, dst: CodeMap, bs: int):
  """float32 array -> ``(codes, scales)`` at ``dst``'s width, chunk by chunk."""
  flat = jnp.ravel(x).astype(jnp.float32)
  nb = num_blocks(flat.size, bs)

  def body(start, c, carry):
    out_c, out_s = carry
    vals = flat.at[_positions(start, c, bs)].get(mode="fill", fill_value=0.0)
    new_c, new_s = quantize_blocks(vals, dst)
    return (lax.dynamic_update_slice_in_dim(out_c, new_c, start, 0),
            lax.dynamic_update_slice_in_dim(out_s, new_s, start, 0))

  init = (jnp.zeros((nb, bs * dst.bits // 32), jnp.uint32), jnp.zeros((nb,), jnp.float32))
  return _loop(nb, bs, body, init)


def _whole(x, ch: Change):
  """The whole-moment conversion (decode everything, encode again)."""
  if ch.src is None:
    values = jnp.asarray(x, jnp.float32)
  else:
    codes, scales = x
    values = dequantize(QuantizedArray(codes, scales, ch.src, ch.block_size, ch.shape,
                                       jnp.dtype(jnp.float32), ch.shards), jnp.float32)
  if ch.dst is None:
    return values
  q = quantize(values, ch.dst.bits, signed=ch.dst.signed, block_size=ch.block_size,
               code_map=ch.dst, shards=ch.shards)
  return q.codes, q.scales


def _block_axes(ch: Change) -> tuple[str, ...]:
  s = ch.in_sharding
  if not isinstance(s, NamedSharding) or not tuple(s.spec):
    return ()
  return axes_of(tuple(s.spec)[0])


def _replicated(s: NamedSharding) -> bool:
  return all(not axes_of(e) for e in tuple(s.spec))


def _local(x, ch: Change):
  """The chunked conversion on unsharded (device-local) arrays."""
  if ch.src is not None and ch.dst is not None:
    return rewidth(*x, ch.src, ch.dst, ch.block_size, ch.shape, ch.shards)
  if ch.shards is not None:  # the chunked walks below follow the plain layout
    return _whole(x, ch)
  if ch.dst is None:
    return to_float(*x, ch.src, ch.block_size, ch.shape)
  return from_float(x, ch.dst, ch.block_size)


def _per_shard(x, ch: Change):
  """The chunked conversion of each shard of a moment on a mesh (``shard_map``: no
  communication): block-sharded codes shard by shard, replicated arrays on every
  device. Inside, arrays are plain local ones, whatever the mesh's axis types."""
  mesh, axes = ch.in_sharding.mesh, _block_axes(ch)
  entry = None if not axes else axes[0] if len(axes) == 1 else axes
  if ch.src is None or ch.dst is None or entry is None:
    ndim = len(ch.shape)
    spec_in = (PartitionSpec(), PartitionSpec()) if ch.src is not None else PartitionSpec()
    spec_out = (PartitionSpec(), PartitionSpec()) if ch.dst is not None else PartitionSpec(
        *([None] * ndim))
    return jax.shard_map(lambda y: _local(y, ch), mesh=mesh, in_specs=(spec_in,),
                         out_specs=spec_out, check_vma=False)(x)
  local_nb = x[0].shape[0] // math.prod(mesh.shape[a] for a in axes)

  def local(c, s):
    offset = lax.axis_index(entry) * local_nb
    return rewidth(c, s, ch.src, ch.dst, ch.block_size, ch.shape, ch.shards, offset)

  spec_c, spec_s = PartitionSpec(entry, None), PartitionSpec(entry)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec_c, spec_s), out_specs=(spec_c, spec_s),
                       check_vma=False)(*x)


def convert(x, ch: Change):
  """One moment's conversion: ``x`` is ``(codes, scales)`` for a quantized source, the
  float32 array otherwise; returns the same kinds for the destination."""
  if ch.stacked:  # pmap: one replica per leading index
    return jax.vmap(lambda y: convert(y, ch._replace(stacked=False)))(x)
  s = ch.in_sharding
  if not isinstance(s, NamedSharding):
    return _local(x, ch)
  if (ch.src is not None and ch.dst is not None) or _replicated(s):
    return _per_shard(x, ch)
  return _whole(x, ch)  # float32 <-> quantized of a sharded moment: two layouts


@functools.lru_cache(maxsize=256)
def program(changes: tuple[Change, ...], donate: bool):
  """The jitted re-pack of a list of moments (inputs as :func:`convert` takes them),
  outputs placed on each change's ``out_shardings``; the inputs donated if ``donate``."""

  def run(moments):
    return [convert(x, ch) for x, ch in zip(moments, changes)]

  shardings = [ch.out_shardings for ch in changes]
  return jax.jit(run, out_shardings=shardings, donate_argnums=(0,) if donate else ())
