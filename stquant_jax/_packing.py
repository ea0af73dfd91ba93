"""Dense bit-packing of b-bit codes (2 <= b <= 8) into uint32 words.

Layout: the codes form one little-endian bit stream. Code ``i`` occupies bits
``[i * b, (i + 1) * b)`` of the stream, and bit ``k`` of the stream is bit
``k % 32`` of word ``k // 32``. A group of 32 codes therefore fills exactly
``b`` words, whatever ``b`` is, so a block of ``block_size`` codes (a multiple of
32) packs into ``block_size * b // 32`` words with no padding and no rounding up
to a byte: 3-, 5-, 6- and 7-bit codes cost exactly 3, 5, 6 and 7 bits.

For ``b`` in {2, 4, 8} no code straddles two words and packing is a reshape and
a shift. For the other widths the 32-code group is unrolled statically; every
shift amount is a Python constant, so XLA (and Triton) see plain shifts and ORs.
"""

from __future__ import annotations

import jax.numpy as jnp

GROUP = 32  # codes per group; a group packs into exactly `bits` words.
MIN_BITS, MAX_BITS = 2, 8


def _check_bits(bits: int) -> None:
  if not isinstance(bits, int) or isinstance(bits, bool):
    raise TypeError(f"bits must be an int, got {type(bits).__name__}")
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{bits=} must be in {MIN_BITS}..{MAX_BITS}")


def _layout(bits: int):
  """Static (word, shift, spills) for each of the 32 codes of a group."""
  out = []
  for i in range(GROUP):
    start = i * bits
    word, shift = divmod(start, 32)
    out.append((word, shift, shift + bits > 32))
  return out


def group_shape(bits: int) -> tuple[int, int]:
  """(codes, words) of the smallest whole packing group for ``bits``.

  ``(32 // bits, 1)`` when ``bits`` divides 32, else ``(32, bits)``.
  """
  return (32 // bits, 1) if 32 % bits == 0 else (GROUP, bits)


def pack_groups(codes, bits: int):
  """Packs the last axis of ``codes`` (one group, see :func:`group_shape`) into words.

  ``[..., group_codes] -> [..., group_words]``. This is the fusion-friendly core
  of :func:`pack`: no reshape, so XLA keeps it in one loop with its producers.
  """
  if 32 % bits == 0:
    per_word = 32 // bits
    shifts = jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(bits)
    # Bit fields are disjoint, so the sum is the bitwise OR.
    return jnp.sum(codes << shifts, axis=-1, dtype=jnp.uint32, keepdims=True)
  words = [None] * bits
  for i, (w, s, spills) in enumerate(_layout(bits)):
    c = codes[..., i]
    lo = c << jnp.uint32(s) if s else c
    words[w] = lo if words[w] is None else words[w] | lo
    if spills:
      hi = c >> jnp.uint32(32 - s)
      words[w + 1] = hi if words[w + 1] is None else words[w + 1] | hi
  return jnp.stack(words, axis=-1)


def unpack_groups(words, bits: int):
  """Inverse of :func:`pack_groups`: ``[..., group_words] -> [..., group_codes]``."""
  mask = jnp.uint32((1 << bits) - 1)
  if 32 % bits == 0:
    shifts = jnp.arange(32 // bits, dtype=jnp.uint32) * jnp.uint32(bits)
    return (words >> shifts) & mask  # words[..., 1] broadcasts against shifts
  codes = []
  for w, s, spills in _layout(bits):
    c = words[..., w] >> jnp.uint32(s) if s else words[..., w]
    if spills:
      c = c | (words[..., w + 1] << jnp.uint32(32 - s))
    codes.append(c & mask)
  return jnp.stack(codes, axis=-1)


def pack(codes, bits: int):
  """Packs codes ``[..., n]`` (``n % 32 == 0``, values < 2**bits) into words.

  Args:
    codes: unsigned integer array whose last axis is a multiple of 32. Values
      must already be in ``[0, 2**bits)``; higher bits are not masked.
    bits: code width, 2..8.

  Returns:
    uint32 array ``[..., n * bits // 32]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from stquant_jax._packing import pack, unpack
    >>> c = jnp.arange(32, dtype=jnp.uint32) % 8
    >>> w = pack(c, 3)
    >>> w.shape
    (3,)
    >>> bool((unpack(w, 3) == c).all())
    True
  """
  _check_bits(bits)
  codes = jnp.asarray(codes).astype(jnp.uint32)
  *lead, n = codes.shape
  if n % GROUP:
    raise ValueError(f"last axis ({n}) must be a multiple of {GROUP}")
  gc, gw = group_shape(bits)
  words = pack_groups(codes.reshape(*lead, n // gc, gc), bits)
  return words.reshape(*lead, n // gc * gw)


def unpack(words, bits: int):
  """Inverse of :func:`pack`: uint32 ``[..., m]`` -> uint32 codes ``[..., m * 32 // bits]``."""
  _check_bits(bits)
  words = jnp.asarray(words)
  if words.dtype != jnp.uint32:
    raise TypeError(f"words must be uint32, got {words.dtype}")
  *lead, m = words.shape
  if m % bits:
    raise ValueError(f"last axis ({m}) must be a multiple of {bits=}")
  gc, gw = group_shape(bits)
  codes = unpack_groups(words.reshape(*lead, m // gw, gw), bits)
  return codes.reshape(*lead, m // gw * gc)
