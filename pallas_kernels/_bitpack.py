"""In-kernel bit-packing that lowers to Triton: ``stquant_jax._packing``'s layout.

Layout (see ``stquant_jax._packing``): code ``i`` of a block occupies bits
``[i*b, (i+1)*b)`` of a little-endian stream of uint32 words, so 32 codes fill
exactly ``b`` words.

The library's ``pack`` takes columns of a value (``g[..., i]``), which Triton
cannot lower. Here:

* ``b`` in {2, 4, 8}: no code straddles a word. Reshape the ``[R, B]`` codes to
  ``[R, W, 32/b]``, shift each by its lane's offset and sum the last axis
  (disjoint bit fields, so the sum is the OR). Unpacking broadcasts each word
  against the shifts and reshapes back. Whole-tile loads and stores.
* ``b`` in {3, 5, 6, 7}: view the codes as ``[R, B/32, 32]`` (one group of 32
  codes per row of the last axis). Every lane ``l`` has a static word
  ``(l*b) // 32`` and shift ``(l*b) % 32``, built from an iota. Word ``w`` of
  every group is the masked sum over lanes, and is written with one strided
  ref store ``ref[:, pl.ds(w, B/32, stride=b)]``; unpacking reads the same
  strided slices and selects each lane's word(s) with ``where``. Shift amounts
  of 32 (undefined in PTX) never occur: they are replaced before shifting.

All tensors have power-of-two sizes as long as ``R`` and ``B`` are powers of two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl

_U32 = jnp.uint32


def _lanes(bits: int):
  """Per-lane (word, shift, spills) of a 32-code group, as [1, 1, 32] tensors."""
  lane = jax.lax.broadcasted_iota(_U32, (1, 1, 32), 2)
  start = lane * _U32(bits)
  word = start >> _U32(5)
  shift = start & _U32(31)
  spills = shift > _U32(32 - bits)
  return word, shift, spills


def store_packed(codes_ref, c_RxB, bits: int) -> None:
  """Packs uint32 codes ``[R, B]`` (values < 2**bits) into ``codes_ref`` ``[R, B*bits/32]``."""
  rows, block = c_RxB.shape
  if 32 % bits == 0:
    per_word = 32 // bits
    c_RxWxP = c_RxB.reshape(rows, block // per_word, per_word)
    shifts = jax.lax.broadcasted_iota(_U32, (1, 1, per_word), 2) * _U32(bits)
    codes_ref[...] = jnp.sum(c_RxWxP << shifts, axis=2, dtype=_U32)
    return
  groups = block // 32
  c_RxGx32 = c_RxB.reshape(rows, groups, 32)
  word, shift, spills = _lanes(bits)
  lo = c_RxGx32 << shift
  hi = c_RxGx32 >> jnp.where(spills, _U32(32) - shift, _U32(0))
  zero = _U32(0)
  for w in range(bits):
    part = jnp.where(word == w, lo, zero) + jnp.where(spills & (word + 1 == w), hi, zero)
    codes_ref[:, pl.ds(w, groups, stride=bits)] = jnp.sum(part, axis=2, dtype=_U32)


def load_packed(codes_ref, bits: int, block: int):
  """Inverse of :func:`store_packed`: reads ``codes_ref`` and returns codes ``[R, block]``."""
  mask = _U32((1 << bits) - 1)
  if 32 % bits == 0:
    per_word = 32 // bits
    words_RxW = codes_ref[...]
    rows, n_words = words_RxW.shape
    shifts = jax.lax.broadcasted_iota(_U32, (1, 1, per_word), 2) * _U32(bits)
    c = (words_RxW.reshape(rows, n_words, 1) >> shifts) & mask
    return c.reshape(rows, block)
  groups = block // 32
  word, shift, spills = _lanes(bits)
  lo_word = hi_word = None
  for w in range(bits):
    w_RxGx1 = codes_ref[:, pl.ds(w, groups, stride=bits)]
    w_RxGx1 = w_RxGx1.reshape(w_RxGx1.shape[0], groups, 1)
    lo_word = w_RxGx1 if lo_word is None else jnp.where(word == w, w_RxGx1, lo_word)
    if w:
      hi_word = w_RxGx1 if hi_word is None else jnp.where(word + 1 == w, w_RxGx1, hi_word)
  lo = lo_word >> shift
  hi = jnp.where(spills, hi_word << jnp.where(spills, _U32(32) - shift, _U32(0)), _U32(0))
  c = (lo | hi) & mask
  return c.reshape(c.shape[0], block)
