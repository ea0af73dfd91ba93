"""In-kernel bit-packing that lowers to Triton: ``stquant_jax._packing``'s layout.

Layout (see ``stquant_jax._packing``): per block, the codes are split into bit
planes of power-of-two widths (6 = 4 + 2, 5 = 4 + 1, 3 = 2 + 1, 7 = 4 + 2 + 1);
each plane packs ``32 / w`` codes per word and the planes' words follow each
other, widest first. A block of ``B`` codes takes ``B * b / 32`` words.

Each plane is a reshape of the ``[R, B]`` codes to ``[R, B*w/32, 32/w]``, a
shift by each lane's offset and a sum over the last axis (disjoint bit fields,
so the sum is the OR), stored to (or loaded from) a contiguous, power-of-two
sized ref slice ``ref[:, pl.ds(start, B*w/32)]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl

from stquant_jax._src.codec.packing import planes

_U32 = jnp.uint32


def _shifts(width: int):
  return jax.lax.broadcasted_iota(_U32, (1, 1, 32 // width), 2) * _U32(width)


def store_packed(codes_ref, c_RxB, bits: int) -> None:
  """Packs uint32 codes ``[R, B]`` (values < 2**bits) into ``codes_ref`` ``[R, B*bits/32]``."""
  rows, block = c_RxB.shape
  start = 0
  for width, offset in planes(bits):
    sub = c_RxB >> _U32(offset) if offset else c_RxB
    if width < bits:
      sub = sub & _U32((1 << width) - 1)
    per_word = 32 // width
    n_words = block // per_word
    words = jnp.sum(sub.reshape(rows, n_words, per_word) << _shifts(width), axis=2, dtype=_U32)
    if width == bits:
      codes_ref[...] = words
    else:
      codes_ref[:, pl.ds(start, n_words)] = words
    start += n_words


def load_packed(codes_ref, bits: int, block: int):
  """Inverse of :func:`store_packed`: reads ``codes_ref`` and returns codes ``[R, block]``."""
  codes, start = None, 0
  for width, offset in planes(bits):
    per_word = 32 // width
    n_words = block // per_word
    words = codes_ref[...] if width == bits else codes_ref[:, pl.ds(start, n_words)]
    start += n_words
    rows = words.shape[0]
    sub = (words.reshape(rows, n_words, 1) >> _shifts(width)) & _U32((1 << width) - 1)
    sub = sub.reshape(rows, block)
    sub = sub << _U32(offset) if offset else sub
    codes = sub if codes is None else codes | sub
  return codes
