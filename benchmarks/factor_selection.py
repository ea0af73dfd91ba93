"""Factor selection: which statistics to let decide the bit-widths, with a guarantee.

Setting. We have candidate statistics ("factors") ``f_1..f_n`` measured on
samples (chunks of real moments), and *measured quantization damage* of the
same samples in several contexts ``t`` (moment m or v, at several bit-widths).
A factor *explains* context ``t`` to the degree ``w[i, t] = |rho_s(f_i, D_t)|``
(Spearman rank correlation: scale-free, robust, and what a threshold decision
needs, an ordering). A set ``S`` of factors is worth

.. math::  F(S) = \\sum_t \\max_{i \\in S} w[i, t],

each context credited with its best selected factor (a facility-location
objective). ``F`` is monotone and submodular (a sum of maxima of non-negative
weights), so the greedy algorithm that adds the factor of largest marginal gain
``k`` times achieves ``F(S_greedy) >= (1 - 1/e) F(S*)`` among sets of size
``k`` (Nemhauser, Wolsey & Fisher 1978), and at least ``1/2`` of the optimum
under a partition-matroid constraint such as "at most one magnitude and one
structure factor" (Fisher, Nemhauser & Wolsey 1978). :func:`exhaustive_select`
gives the exact optimum for small candidate sets, to check the greedy answer.

:func:`chunk_samples` builds the samples from real (m, v) pairs: the score
engine's statistics per chunk, and the damage of quantizing m (or v) alone at
``b`` bits, measured as the Fisher-weighted update error
``sum_i v_i (u_q,i - u_i)^2`` with ``u = m / (sqrt(v) + eps)`` (the second-order
loss increase of the update error when the Fisher ``diag(v)`` stands in for the
curvature).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.quantized import dequantize, quantize
from stquant_jax._src.policy.scores import FACTORS, factor_values, leaf_sums


def _ranks(x):
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  r = np.empty(len(x))
  r[order] = np.arange(len(x))
  # average ties
  _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
  sums = np.bincount(inv, weights=r)
  return sums[inv] / counts[inv]


def spearman(x, y) -> float:
  """Spearman rank correlation (0 when either input is constant)."""
  rx, ry = _ranks(x), _ranks(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  den = math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))
  return float((rx * ry).sum() / den) if den > 0 else 0.0


def score_matrix(features, damage) -> np.ndarray:
  """``w[i, t] = |spearman(features[:, i], damage[:, t])|``: float64 ``[n_factors, n_targets]``."""
  features, damage = np.asarray(features), np.asarray(damage)
  if features.ndim != 2 or damage.ndim != 2 or features.shape[0] != damage.shape[0]:
    raise ValueError(f"features {features.shape} and damage {damage.shape} must be "
                     "[samples, factors] and [samples, targets]")
  return np.array([[abs(spearman(features[:, i], damage[:, t]))
                    for t in range(damage.shape[1])] for i in range(features.shape[1])])


def coverage(scores, subset) -> float:
  """The facility-location objective ``F(S) = sum_t max_{i in S} scores[i, t]``."""
  subset = list(subset)
  if not subset:
    return 0.0
  return float(np.asarray(scores)[subset].max(axis=0).sum())


def _feasible(subset, groups, per_group):
  if groups is None:
    return True
  counts = {}
  for i in subset:
    counts[groups[i]] = counts.get(groups[i], 0) + 1
  return all(c <= per_group for c in counts.values())


def _check(scores, k, groups, per_group):
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or (scores < 0).any():
    raise ValueError("scores must be a non-negative [n_factors, n_targets] matrix")
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k={k} must be a positive int")
  if groups is not None and len(groups) != scores.shape[0]:
    raise ValueError(f"groups has {len(groups)} entries for {scores.shape[0]} factors")
  if per_group is not None and (groups is None or per_group < 1):
    raise ValueError("per_group needs groups and must be >= 1")
  return scores


def greedy_select(scores, k: int, groups=None, per_group: int | None = None):
  """Greedy maximisation of :func:`coverage`: returns (selected indices, marginal gains).

  Args:
    scores: non-negative ``[n_factors, n_targets]`` (:func:`score_matrix`).
    k: number of factors to select.
    groups: optional group label per factor (e.g. "magnitude", "structure").
    per_group: at most this many factors per group (a partition matroid).

  Ties are broken by the lower index, so the result is deterministic.
  """
  scores = _check(scores, k, groups, per_group)
  chosen, gains = [], []
  for _ in range(min(k, scores.shape[0])):
    base = coverage(scores, chosen)
    best, best_gain = None, -1.0
    for i in range(scores.shape[0]):
      if i in chosen or (per_group and not _feasible(chosen + [i], groups, per_group)):
        continue
      gain = coverage(scores, chosen + [i]) - base
      if gain > best_gain + 1e-12:
        best, best_gain = i, gain
    if best is None:
      break
    chosen.append(best)
    gains.append(best_gain)
  return chosen, gains


def exhaustive_select(scores, k: int, groups=None, per_group: int | None = None):
  """The exact optimum of :func:`coverage` over feasible sets of size <= k (small inputs)."""
  scores = _check(scores, k, groups, per_group)
  best, best_val = [], 0.0
  n = scores.shape[0]
  for r in range(1, min(k, n) + 1):
    for sub in itertools.combinations(range(n), r):
      if per_group and not _feasible(sub, groups, per_group):
        continue
      val = coverage(scores, sub)
      if val > best_val + 1e-12:
        best, best_val = list(sub), val
  return best, best_val


@dataclasses.dataclass
class Selection:
  """Result of :func:`select_factors`."""
  names: list[str]
  gains: list[float]
  value: float
  optimum: float
  scores: dict[str, dict[str, float]]


def select_factors(features: dict, damage: dict, k: int = 2, *, groups: dict | None = None,
                   per_group: int | None = None) -> Selection:
  """Selects ``k`` factors by greedy coverage; also reports the exact optimum.

  Args:
    features: ``{factor name: [samples] values}``.
    damage: ``{context name: [samples] measured damage}``.
    k: number of factors.
    groups: optional ``{factor name: group}``; with ``per_group``, a partition matroid.
    per_group: at most this many factors per group.
  """
  fnames, tnames = list(features), list(damage)
  f = np.stack([np.asarray(features[n], np.float64) for n in fnames], axis=1)
  d = np.stack([np.asarray(damage[n], np.float64) for n in tnames], axis=1)
  w = score_matrix(f, d)
  g = None if groups is None else [groups[n] for n in fnames]
  chosen, gains = greedy_select(w, k, g, per_group)
  _, opt = exhaustive_select(w, k, g, per_group) if len(fnames) <= 12 else (None, float("nan"))
  return Selection([fnames[i] for i in chosen], gains, coverage(w, chosen), opt,
                   {fn: {tn: float(w[i, t]) for t, tn in enumerate(tnames)}
                    for i, fn in enumerate(fnames)})


def chunk_samples(g, m, v, *, chunk: int = 4096, bits=(2, 3, 4, 6), block_size: int = 128,
                  eps: float = 1e-8, probe_bits: int = 4):
  """Factor values and measured damage for each ``chunk``-value piece of one leaf.

  Args:
    g, m, v: float32 arrays of one leaf (gradient, first and second moment).
    chunk: values per sample (a multiple of ``block_size``); the tail is dropped.
    bits: bit-widths at which damage is measured.

  Returns:
    ``(features, damage)``: ``{"m:<factor>" / "v:<factor>": [chunks]}`` and
    ``{"m@<b>" / "v@<b>": [chunks]}`` (Fisher-weighted update error).
  """
  g, m, v = (np.asarray(x, np.float32).reshape(-1) for x in (g, m, v))
  n = (g.size // chunk) * chunk
  if n == 0:
    return {}, {}
  G, M, V = (jnp.asarray(x[:n].reshape(-1, chunk)) for x in (g, m, v))

  def one(gc, mc, vc):
    sums = leaf_sums(gc, mc, vc, block_size=block_size, probe_bits=probe_bits)[None]
    feats = {}
    for k, mom in enumerate("mv"):
      for name in FACTORS:
        feats[f"{mom}:{name}"] = factor_values(sums, name, k)[0]
    u = mc / (jnp.sqrt(vc) + eps)
    dmg = {}
    for b in bits:
      mq = dequantize(quantize(mc, b, signed=True, block_size=block_size))
      vq = dequantize(quantize(vc, b, signed=False, block_size=block_size))
      dmg[f"m@{b}"] = jnp.sum(vc * jnp.square(mq / (jnp.sqrt(vc) + eps) - u))
      dmg[f"v@{b}"] = jnp.sum(vc * jnp.square(mc / (jnp.sqrt(vq) + eps) - u))
    return feats, dmg

  feats, dmg = jax.jit(jax.vmap(one))(G, M, V)
  return ({k: np.asarray(x) for k, x in feats.items()},
          {k: np.asarray(x) for k, x in dmg.items()})
