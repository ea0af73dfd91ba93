"""Memory-budget bit allocation in linear time (Lagrangian relaxation).

The joint choice of a bit-width for every (leaf, moment) is a search over
``levels ** (2 L)`` layouts. With an additive damage model,
``D = sum_j w_j * bytes32_j * e_s(b_j)**2`` (``w_j`` the moment's priority from
the score engine's factors, ``e_s(b)`` the measured relative error of the
default map for moment kind ``s`` at ``b`` bits) and additive bytes, the
budgeted problem separates under a Lagrange multiplier ``lam``: each moment
independently minimises ``D_j(b) + lam * bytes_j(b)`` over its few levels
(Shoham & Gersho 1988; for ``e(b) ~ 2**-b`` this is reverse water-filling,
``b_j = log2(w_j / theta) / 2``). Bytes are non-increasing in ``lam``, so a fixed
number of bisection steps on ``log lam``, each O(moments x levels), finds the
smallest multiplier whose allocation fits: linear time, pure jnp on small
``[M, levels]`` arrays, run under ``jit`` at decision steps only. The result
lies on the lower convex hull of the exact (exponential) search's trade-off
curve, the standard guarantee of Lagrangian bit allocation.

Float32 moments are the ladder step above ``max_bits`` (bits code 32, error 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.maps import default_map
from stquant_jax._src.state.opt_state import FLOAT32, NO_MOMENT
_BISECT_STEPS = 40


def moment_nbytes(size: int, bits: int, block_size: int) -> int:
  """Bytes stored for a moment of ``size`` values at ``bits`` (32: float32; 0: none)."""
  if bits == NO_MOMENT:
    return 0
  if bits == FLOAT32:
    return 4 * size
  nb = -(-size // block_size)
  return nb * (block_size * bits // 32) * 4 + 4 * nb


def cost_coefficients(sizes, block_sizes):
  """(bytes per bit, fixed bytes, float32 bytes) of each quantizable moment (numpy)."""
  sizes = np.asarray(sizes, np.int64)
  bs = np.asarray(block_sizes, np.int64)
  nb = -(-sizes // bs)
  return (nb * bs / 8.0), (4.0 * nb), (4.0 * sizes)


def _np_roundtrip(x_NxB, cmap) -> np.ndarray:
  """Block-absmax quantize/dequantize in numpy with the map's levels and rounding rule:
  nearest level in the value domain, except unsigned power maps, which round in
  the root domain (as :func:`stquant_jax._src.codec.maps.encode` does)."""
  scale = np.abs(x_NxB).max(axis=1, keepdims=True)
  a = x_NxB / np.where(scale > 0, scale, 1.0)
  lv = np.sort(cmap.levels().astype(np.float64))
  dom = (lambda t: np.abs(t) ** (1.0 / cmap.param)) if (
      cmap.kind == "power" and not cmap.signed) else (lambda t: t)
  ld = dom(lv)
  i = np.clip(np.searchsorted(ld, dom(a)), 1, len(lv) - 1)
  lo, hi = ld[i - 1], ld[i]
  pick = np.where(np.abs(dom(a) - lo) <= np.abs(hi - dom(a)), i - 1, i)
  return lv[pick] * scale


@functools.lru_cache(maxsize=None)
def relative_error_table(min_bits: int, max_bits: int) -> np.ndarray:
  """float64 ``[2, max_bits - min_bits + 1]``: relative RMS error of the default
  maps, m (signed) and v (unsigned, error of sqrt(v)), per bit-width.

  Measured once per process on a fixed sample (128 blocks of 128 Gaussian
  values for m; their squares for v) with the maps' own levels and rounding
  rule (:func:`_np_roundtrip`, numpy: no compilation), so the allocation's
  damage model follows the maps actually used (e.g. the 3-level 2-bit signed map).
  """
  x = np.random.default_rng(0).standard_normal((128, 128))
  v = x * x
  out = np.zeros((2, max_bits - min_bits + 1))
  with jax.ensure_compile_time_eval():  # levels() decodes; keep it concrete under jit
    for i, b in enumerate(range(min_bits, max_bits + 1)):
      mq = _np_roundtrip(x, default_map(b, True))
      vq = _np_roundtrip(v, default_map(b, False))
      out[0, i] = np.sqrt(np.mean((mq - x) ** 2) / np.mean(x ** 2))
      out[1, i] = np.sqrt(np.mean((np.sqrt(vq) - np.sqrt(v)) ** 2) / np.mean(v))
  return out


def allocate(priority_log2, cap_bits, free, current_bits, *, err2, per_bit, fixed, fp32_bytes,
             budget_bytes, min_bits: int, max_bits: int, floor_bits=None):
  """Bits per moment meeting ``budget_bytes`` (jnp; linear time plus one sort of
  the ``M`` moments).

  Minimises ``sum_j 2**priority_log2[j] * size_j * err2[j, b_j]`` subject to
  ``sum_j bytes_j(b_j) <= budget_bytes`` by Lagrangian relaxation (Shoham &
  Gersho 1988): for a multiplier ``lam`` each moment independently takes the
  ladder level minimising ``damage + lam * bytes`` (O(levels) per moment);
  bytes fall as ``lam`` grows, so bisection on ``log lam`` (a fixed number of
  steps) finds the smallest multiplier whose allocation fits. That allocation
  lies on the lower convex hull of the trade-off and can leave much of the
  budget unused (moments with the same priority all change level at the same
  multiplier: all of them at 2 bits fits, all at 3 does not). The slack is then
  filled greedily: moments move up one level, most damage saved per extra byte
  first, while the running total fits.

  Args:
    priority_log2: float32 ``[M]``, ``log2 p_j`` (damage weight per value).
    cap_bits: int32 ``[M]``, the bits each moment would get without a budget
      (its zone's choice); the allocation never exceeds it.
    free: bool ``[M]``, moments allowed to change now. Frozen moments keep
      ``current_bits`` and their bytes come off the budget first.
    current_bits: int32 ``[M]``.
    err2: float ``[M, levels]``, squared relative error of each moment at
      ``min_bits..max_bits`` (float32, the level above, has error 0).
    per_bit, fixed, fp32_bytes: float ``[M]`` cost model (:func:`cost_coefficients`).
    budget_bytes: float scalar: bytes available to these ``M`` moments.
    min_bits, max_bits: the allowed quantized range (of ``err2``'s columns).
    floor_bits: optional int ``[M]``, each moment's lowest allowed bits
      (``>= min_bits``; default ``min_bits`` everywhere), e.g. m at 3 and v at 2.

  Returns:
    int32 ``[M]``: ``cap_bits`` when it fits, else the Lagrangian allocation.
    When even the floors everywhere do not fit, every free moment gets its
    floor (callers check feasibility up front).
  """
  per_bit = jnp.asarray(per_bit, jnp.float32)[:, None]
  fixed = jnp.asarray(fixed, jnp.float32)[:, None]
  fp32_bytes = jnp.asarray(fp32_bytes, jnp.float32)[:, None]
  bits = jnp.arange(min_bits, max_bits + 2, dtype=jnp.int32)  # last: float32
  bits_code = jnp.where(bits > max_bits, FLOAT32, bits)[None, :]
  cost_l = jnp.concatenate([fixed + per_bit * jnp.arange(min_bits, max_bits + 1,
                                                          dtype=jnp.float32)[None, :],
                            fp32_bytes], axis=1)                      # [M, levels + 1]
  err2 = jnp.concatenate([jnp.asarray(err2, jnp.float32),
                          jnp.zeros((cost_l.shape[0], 1), jnp.float32)], axis=1)
  # Damage per level relative to the moment's float32 bytes keeps magnitudes sane.
  w = jnp.exp2(jnp.clip(priority_log2.astype(jnp.float32), -60.0, 60.0))[:, None]
  dmg_l = w * fp32_bytes * err2
  allowed = bits_code <= jnp.where(cap_bits == FLOAT32, FLOAT32, cap_bits)[:, None]
  allowed = allowed & ((bits[None, :] <= max_bits) | (cap_bits == FLOAT32)[:, None])
  floor = (jnp.full(cap_bits.shape, min_bits, jnp.int32) if floor_bits is None
           else jnp.asarray(floor_bits, jnp.int32))
  allowed = allowed & (bits[None, :] >= floor[:, None])

  def cost(b):
    q = jnp.where(b == FLOAT32, fp32_bytes[:, 0],
                  fixed[:, 0] + per_bit[:, 0] * b.astype(jnp.float32))
    return jnp.where(b == NO_MOMENT, 0.0, q)

  frozen_cost = jnp.sum(jnp.where(free, 0.0, cost(current_bits)))
  # Byte counts are float32 (int64 needs x64). Summing M nonnegative float32 terms
  # errs by at most ~M * 2**-24 of the total (any summation order), and the
  # budget's own cast by 2**-24: keep that far inside the whole budget (frozen
  # bytes included, whose sum errs as much), so the exact integer bytes of the
  # result never exceed it (1e-6 at least: a few moments).
  margin = max(1e-6, (cap_bits.shape[0] + 4) * 2.0 ** -24)
  avail = budget_bytes * (1 - margin) - frozen_cost

  def bits_at(log_lam):
    obj = dmg_l + jnp.exp(log_lam) * cost_l
    obj = jnp.where(allowed, obj, jnp.inf)
    return jnp.take_along_axis(bits_code.repeat(obj.shape[0], 0),
                               jnp.argmin(obj, axis=1)[:, None], axis=1)[:, 0]

  def body(_, carry):
    lo, hi, best = carry
    mid = 0.5 * (lo + hi)
    b = bits_at(mid)
    ok = jnp.sum(jnp.where(free, cost(b), 0.0)) <= avail
    # Keep the allocation checked in this very evaluation: near the optimum
    # levels tie, and re-evaluating could round the other way.
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi), jnp.where(ok, b, best)

  _, _, alloc = jax.lax.fori_loop(0, _BISECT_STEPS, body,
                                  (jnp.float32(-80.0), jnp.float32(60.0), floor))
  alloc = _fill_slack(alloc, free, allowed, dmg_l, cost_l, bits_code[0], min_bits,
                      avail - jnp.sum(jnp.where(free, cost(alloc), 0.0)))
  cap_fits = jnp.sum(jnp.where(free, cost(cap_bits), 0.0)) <= avail
  out = jnp.where(cap_fits, cap_bits, alloc)
  return jnp.where(free, out, current_bits).astype(jnp.int32)


def _fill_slack(alloc, free, allowed, dmg_l, cost_l, bits_code, min_bits: int, slack):
  """``alloc`` with free moments raised one allowed level, most damage saved per
  extra byte first: in that order, each moment whose extra bytes still fit in
  what is left of ``slack`` takes them (one that does not fit is skipped, so a
  large moment cannot block smaller ones after it). O(M log M) for the sort."""
  levels = cost_l.shape[1]
  k = jnp.where(alloc == FLOAT32, levels - 1, alloc - min_bits)       # level index now
  up = jnp.minimum(k + 1, levels - 1)
  at = lambda a, i: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]
  ok = free & (k + 1 < levels) & at(allowed, up)
  extra = jnp.where(ok, at(cost_l, up) - at(cost_l, k), 0.0)
  gain = jnp.where(ok, at(dmg_l, k) - at(dmg_l, up), 0.0)
  order = jnp.argsort(jnp.where(ok, -gain / jnp.maximum(extra, 1e-30), jnp.inf))

  def step(left, j):
    t = ok[j] & (extra[j] <= left)
    return left - jnp.where(t, extra[j], 0.0), t

  _, took = jax.lax.scan(step, jnp.asarray(slack, jnp.float32), order)
  take = jnp.zeros_like(ok).at[order].set(took)
  return jnp.where(take, bits_code[up], alloc).astype(jnp.int32)
