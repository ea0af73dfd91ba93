"""A budget's first layout: the bits each leaf starts with, fitted over the whole tree.

Before its first decision a policy with ``target_bits`` has no statistics, so it
starts every adaptive leaf at one ``(m, v)`` pair, lowered together until the
whole state fits the budget (everything counted, as
:func:`stquant_jax.average_bits`: scales, float32 moments of small leaves, the step
count and the policy state), then lets leaves take one bit more, largest first,
where it still fits. Host-side Python on shapes, run once at ``init``; the
decisions after it are :mod:`stquant_jax._src.policy.allocation`'s.

Example:
  >>> from stquant_jax._src.policy.first_layout import fit, split
  >>> to_pair = lambda total: split(total, floors=(3, 3), caps=(8, 8), start="v_first")
  >>> to_pair(8)   # m at 3 bits, v gets the rest
  (3, 5)
  >>> fit([((512, 512), True), ((4000,), False)], target_bits=4.0, start=(3, 5),
  ...     to_pair=to_pair, floors=(3, 3), block_size=128, overhead=100)
  [(3, 3), (None, None)]

  The small leaf's float32 moments cost 0.48 bits of the average, so the matrix
  is lowered from (3, 5) to (3, 3), and (3, 4) does not fit.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from stquant_jax._src.policy.allocation import moment_nbytes
from stquant_jax._src.state.opt_state import bits_code

Pair = tuple  # (mu_bits, nu_bits), None for float32
# (shape, adaptive) per float leaf; leaves without moments are left out by the caller
Leaves = Sequence[tuple[tuple[int, ...], bool]]

_V_FIRST_MU_BITS = 3  # m's bits in a "v_first" start (if its floor allows)


def split(total: int, *, floors: Pair, caps: Pair, start: str) -> tuple[int, int]:
  """The ``(m, v)`` bits of ``total`` bits per value over the two moments.

  ``"v_first"``: m at 3 bits (its floor if higher; 2-bit m stalls training), v as
  high as fits up to its cap, whatever is left back to m. ``"even"``: half each.
  Each moment stays within ``floors`` and ``caps``.
  """
  (lo_m, lo_v), (top_m, top_v) = floors, caps
  if start == "v_first":
    mu = max(lo_m, min(top_m, _V_FIRST_MU_BITS))
    nu = max(lo_v, min(top_v, total - mu))
    mu = max(lo_m, min(top_m, total - nu))
    return mu, nu
  return max(lo_m, min(top_m, total // 2)), max(lo_v, min(top_v, total // 2))


def nbytes(leaves: Leaves, layout: Sequence[Pair], *, block_size: int, overhead: int) -> int:
  """Bytes of a state whose float leaves have ``layout`` (None: float32 moments),
  plus ``overhead`` (the step count and the policy state), as
  :func:`stquant_jax.state_nbytes` counts them."""
  total = overhead
  for (shape, _), pair in zip(leaves, layout):
    total += sum(moment_nbytes(math.prod(shape), bits_code(b), block_size)
                 for b in pair)
  return total


def num_values(leaves: Leaves) -> int:
  """Moment values of a state: two per float parameter."""
  return sum(2 * math.prod(shape) for shape, _ in leaves)


def uniform(leaves: Leaves, pair: Pair) -> list[Pair]:
  """Every adaptive leaf at ``pair``, the others at float32."""
  return [pair if ad else (None, None) for _, ad in leaves]


def average_bits(leaves: Leaves, layout: Sequence[Pair], *, block_size: int,
                 overhead: int) -> float:
  """:func:`stquant_jax.average_bits` of a state with ``layout``."""
  return (8.0 * nbytes(leaves, layout, block_size=block_size, overhead=overhead)
          / max(num_values(leaves), 1))


def fit(leaves: Leaves, *, target_bits: float, start: Pair, to_pair: Callable[[int], Pair],
        floors: Pair, block_size: int, overhead: int) -> list[Pair]:
  """The first layout under ``target_bits``.

  Starts every adaptive leaf at ``start``; while the state is over budget, lowers
  the total bits of m + v one at a time, split by ``to_pair`` (down to
  ``floors``, the pair of last resort; the caller has checked that it fits);
  then gives leaves, largest first, ``to_pair(total + 1)`` where the bytes left
  allow.
  """
  kw = dict(block_size=block_size, overhead=overhead)
  def over(pair):
    return average_bits(leaves, uniform(leaves, pair), **kw) > target_bits

  pair, total = tuple(start), sum(start)
  while (too_big := over(pair)) and total > sum(floors):
    total -= 1
    pair = to_pair(total)
  if too_big:
    pair = floors  # a split above the floors that does not fit
  out = uniform(leaves, pair)
  up = to_pair(total + 1)
  room = target_bits * num_values(leaves) / 8.0 - nbytes(leaves, out, **kw)
  order = sorted((i for i, (_, ad) in enumerate(leaves) if ad),
                 key=lambda i: -math.prod(leaves[i][0]))
  for i in order:
    size = math.prod(leaves[i][0])
    extra = sum(moment_nbytes(size, b, block_size) - moment_nbytes(size, a, block_size)
                for a, b in zip(pair, up))
    if 0 < extra <= room:
      out[i], room = up, room - extra
  return out
