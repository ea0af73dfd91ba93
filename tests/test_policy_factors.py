"""Factor selection: greedy facility location finds the known drivers; (1 - 1/e) and 1/2 bounds."""

import math

import numpy as np

from benchmarks.factor_selection import (
    coverage, exhaustive_select, greedy_select, score_matrix, select_factors)


def test_recovers_known_drivers_of_damage():
  """Damage in contexts A is driven by f_a, in contexts B by f_b; the others are noise or
  a weak proxy. The two selected factors must be exactly {f_a, f_b}."""
  rng = np.random.default_rng(0)
  n = 400
  a, b = rng.lognormal(size=n), rng.lognormal(size=n)
  feats = {"noise1": rng.normal(size=n), "a": a, "weak_a": a * rng.lognormal(sigma=2.0, size=n),
           "b": b, "noise2": rng.normal(size=n)}
  dmg = {f"A@{k}": a ** 2 * 4.0 ** -k * rng.lognormal(sigma=0.1, size=n) for k in (2, 4)}
  dmg |= {f"B@{k}": b * 2.0 ** -k * rng.lognormal(sigma=0.1, size=n) for k in (2, 4)}
  sel = select_factors(feats, dmg, k=2)
  assert sorted(sel.names) == ["a", "b"]
  assert math.isclose(sel.value, sel.optimum)
  one = select_factors(feats, dmg, k=1)
  assert one.names[0] in ("a", "b") and one.value < sel.value


def test_greedy_within_one_minus_one_over_e_of_optimum_on_random_instances():
  rng = np.random.default_rng(1)
  worst = 1.0
  for _ in range(200):
    w = rng.uniform(size=(7, 6)) ** 3
    k = int(rng.integers(1, 4))
    g, _ = greedy_select(w, k)
    _, opt = exhaustive_select(w, k)
    ratio = coverage(w, g) / opt
    worst = min(worst, ratio)
    assert ratio >= 1 - 1 / math.e - 1e-12
  assert worst < 1.0  # the instances are hard enough that greedy is sometimes suboptimal


def test_partition_constraint_one_per_family():
  """Two magnitude factors explain everything best; with one per family, greedy takes the best
  magnitude factor and the best structure factor, and stays within 1/2 of the optimum."""
  w = np.array([[0.9, 0.1, 0.1, 0.1],   # mag0
                [0.1, 0.9, 0.1, 0.1],   # mag1
                [0.1, 0.1, 0.3, 0.3]])  # str0
  groups = ["m", "m", "s"]
  free, _ = greedy_select(w, 2)
  assert free == [0, 1]
  part, _ = greedy_select(w, 2, groups, per_group=1)
  assert sorted(part) == [0, 2]
  _, opt = exhaustive_select(w, 2, groups, per_group=1)
  assert coverage(w, part) >= 0.5 * opt


def test_score_matrix_is_rank_based():
  x = np.arange(50.0)
  w = score_matrix(np.stack([x, np.exp(x / 5), -x], 1), np.stack([x ** 3], 1))
  np.testing.assert_allclose(w[:, 0], 1.0)
