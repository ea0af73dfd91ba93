"""Dense bit-packing of b-bit codes (2 <= b <= 8) into uint32 words.

Layout (along the last axis, i.e. per quantization block): the codes are split
into *bit planes* whose widths are the powers of two in ``b`` (8 = 8;
7 = 4 + 2 + 1; 6 = 4 + 2; 5 = 4 + 1; 4 = 4; 3 = 2 + 1; 2 = 2). Plane ``(w, o)``
holds bits ``o .. o + w - 1`` of every code, packed ``32 / w`` codes per word,
code ``i`` at bit ``(i % (32 / w)) * w`` of word ``i // (32 / w)``; the planes'
words follow each other, widest plane first. ``n`` codes (``n % 32 == 0``)
therefore take exactly ``n * b / 32`` words, with no padding and no rounding up
to a byte: 3-, 5-, 6- and 7-bit codes cost exactly 3, 5, 6 and 7 bits.

Every plane is a power-of-two width, so packing is a reshape, a shift and a sum
(disjoint bit fields, so the sum is the OR) whatever ``b`` is: no code straddles
two words. That keeps odd widths as fast as even ones under XLA, compiles
quickly, and maps onto contiguous, power-of-two-sized loads and stores in the
Pallas kernels. For ``b`` in {2, 4, 8} there is a single plane.
"""

from __future__ import annotations

import jax.numpy as jnp

from stquant_jax._src.core.checks import check_int

GROUP = 32  # n must be a multiple of this; 32 codes always pack into `bits` words.
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits, name: str = "bits", *, allow_none: bool = False) -> None:
  """``bits`` is an int code width in ``MIN_BITS..MAX_BITS`` (or None with ``allow_none``:
  a float32 moment)."""
  check_int(name, bits, MIN_BITS, MAX_BITS, allow_none=allow_none,
            note=" (or None for float32)" if allow_none else "")


def planes(bits: int) -> tuple[tuple[int, int], ...]:
  """``(width, bit_offset)`` of each bit plane, widest first: 6 -> ((4, 0), (2, 4))."""
  out, offset = [], 0
  for width in (8, 4, 2, 1):
    if bits & width:
      out.append((width, offset))
      offset += width
  return tuple(out)


def group_shape(bits: int) -> tuple[int, int]:
  """``(codes, words)`` of one word of the widest plane: the packing view's last axis.

  Blocks are viewed as ``[N, B // codes, codes]`` for the fused update; the
  widest plane packs along that last axis with no reshape.
  """
  width = planes(bits)[0][0]
  return 32 // width, 1


def _shifts(width: int):
  return jnp.arange(32 // width, dtype=jnp.uint32) * jnp.uint32(width)


def pack(codes, bits: int):
  """Packs codes ``[..., n]`` (``n % 32 == 0``, values < 2**bits) into words.

  Args:
    codes: unsigned integer array whose last axis is a multiple of 32. Values
      must already be in ``[0, 2**bits)``.
    bits: code width, 2..8.

  Returns:
    uint32 array ``[..., n * bits // 32]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from stquant_jax._src.codec.packing import pack, unpack
    >>> c = jnp.arange(32, dtype=jnp.uint32) % 8
    >>> w = pack(c, 3)
    >>> w.shape
    (3,)
    >>> bool((unpack(w, 3) == c).all())
    True
  """
  check_bits(bits)
  codes = jnp.asarray(codes).astype(jnp.uint32)
  *lead, n = codes.shape
  if n % GROUP:
    raise ValueError(f"last axis ({n}) must be a multiple of {GROUP}")
  out = []
  for width, offset in planes(bits):
    sub = codes >> jnp.uint32(offset) if offset else codes
    if width < bits:
      sub = sub & jnp.uint32((1 << width) - 1)
    per_word = 32 // width
    out.append(jnp.sum(sub.reshape(*lead, n // per_word, per_word) << _shifts(width),
                       axis=-1, dtype=jnp.uint32))
  return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)


def unpack(words, bits: int):
  """Inverse of :func:`pack`: uint32 ``[..., m]`` -> uint32 codes ``[..., m * 32 // bits]``."""
  check_bits(bits)
  words = jnp.asarray(words)
  if words.dtype != jnp.uint32:
    raise TypeError(f"words must be uint32, got {words.dtype}")
  *lead, m = words.shape
  if m % bits:
    raise ValueError(f"last axis ({m}) must be a multiple of {bits=}")
  n = m * 32 // bits
  codes, start = None, 0
  for width, offset in planes(bits):
    k = n * width // 32
    w = words[..., start:start + k]
    start += k
    sub = ((w[..., None] >> _shifts(width)) & jnp.uint32((1 << width) - 1)).reshape(*lead, n)
    sub = sub << jnp.uint32(offset) if offset else sub
    codes = sub if codes is None else codes | sub
  return codes


def pack_view(codes_NxGxC, bits: int):
  """Packs blocks in the packing view ``[N, G, C]`` (``C = group_shape(bits)[0]``) -> ``[N, W]``.

  Same words as :func:`pack` on ``[N, G * C]``, computed without element-level
  reshapes so XLA fuses it with its producers: each plane first packs the ``C``
  codes of a view row into one partial word, then ``32 / (C * width)``
  consecutive partials combine into a word.
  """
  n, g, c = codes_NxGxC.shape
  out = []
  for width, offset in planes(bits):
    sub = codes_NxGxC >> jnp.uint32(offset) if offset else codes_NxGxC
    if width < bits:
      sub = sub & jnp.uint32((1 << width) - 1)
    part = jnp.sum(sub << (jnp.arange(c, dtype=jnp.uint32) * jnp.uint32(width)),
                   axis=-1, dtype=jnp.uint32)                       # [N, G]
    r = 32 // (c * width)
    if r > 1:
      part = jnp.sum(part.reshape(n, g // r, r)
                     << (jnp.arange(r, dtype=jnp.uint32) * jnp.uint32(c * width)),
                     axis=-1, dtype=jnp.uint32)
    out.append(part)
  return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)


def unpack_view(words_NxW, bits: int):
  """Inverse of :func:`pack_view`: ``[N, W]`` -> codes ``[N, G, C]``."""
  n, m = words_NxW.shape
  c, _ = group_shape(bits)
  g = m * 32 // bits // c
  codes, start = None, 0
  for width, offset in planes(bits):
    r = 32 // (c * width)
    k = g // r
    w = words_NxW[:, start:start + k] if len(planes(bits)) > 1 else words_NxW
    start += k
    if r > 1:
      w = ((w[..., None] >> (jnp.arange(r, dtype=jnp.uint32) * jnp.uint32(c * width)))
           & jnp.uint32((1 << (c * width)) - 1)).reshape(n, g)
    sub = ((w[..., None] >> (jnp.arange(c, dtype=jnp.uint32) * jnp.uint32(width)))
           & jnp.uint32((1 << width) - 1))                           # [N, G, C]
    sub = sub << jnp.uint32(offset) if offset else sub
    codes = sub if codes is None else codes | sub
  return codes
