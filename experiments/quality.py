"""Paired quality statistics with a measured noise floor, and the memory/quality frontier.

The protocol (``docs/quality.md``):

* Every optimizer runs with the same seeds as float32 AdamW (``adamw``): same
  initialisation, same data order. Its quality is the *paired* relative
  difference of the final validation loss, ``delta = L / L_adamw - 1`` (%), per
  seed.
* The control ``adamw_control`` is float32 AdamW whose stored m is multiplied
  by ``1 + 1e-6 u`` after every step (u uniform in [-1, 1]): a change a
  thousand times below bfloat16's rounding. Its deltas are what a negligible
  perturbation does to the final loss (the trajectory's own sensitivity); the
  **noise floor** is the largest of them in absolute value.
* A difference is claimed only above that floor: an optimizer *matches* fp32
  AdamW when the 95% confidence interval of its mean delta lies within ± the
  floor (it is then indistinguishable from the control); it is *worse* when the
  lower end exceeds the floor; otherwise *unresolved*. It is *within 1%* when
  the upper end is at most +1% and the floor is below 1%.

The frontier compares, at equal memory (average bits, metadata included), the
fixed-width optimizers (``stquant<M>``, ``stquant<M>v<V>``: the *uniform*
curve, its lower envelope over the widths tried) with the adaptive ones
(``stquant_t<X>``, ``stquant_adaptive``).

Example:
  >>> mean, half = ci95([1.0, 2.0, 3.0])  # mean 2, t(0.975, 2) * std / sqrt(3)
  >>> mean, round(half, 3)
  (2.0, 2.484)
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

REFERENCE = "adamw"
CONTROL = "adamw_control"
# two-sided 95% Student t quantiles by degrees of freedom (scipy not required)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(dof: int) -> float:
  """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (tabulated)."""
  if dof <= 0:
    return math.inf
  keys = sorted(_T975)
  below = max(k for k in keys if k <= dof) if dof >= keys[0] else keys[0]
  return _T975[below] if dof <= keys[-1] else 1.96


def ci95(xs) -> tuple[float, float]:
  """``(mean, half-width of its 95% confidence interval)``; half-width inf for n < 2."""
  xs = np.asarray([x for x in xs if x is not None], float)
  if len(xs) == 0:
    return math.nan, math.nan
  if len(xs) == 1:
    return float(xs[0]), math.inf
  return float(xs.mean()), t975(len(xs) - 1) * float(xs.std(ddof=1)) / math.sqrt(len(xs))


def final_loss(log: dict) -> float:
  """The run's final validation loss: its final evaluation (the large set) when logged."""
  return (log.get("final_eval") or log["eval"][-1])["loss"]


def name_parts(name: str) -> tuple[str, int | None, bool]:
  """``(base, block size, nearest rounding)`` of an optimizer name: a quantized
  name may end in ``_b<B>`` (blocks of ``B`` values) and then ``_nearest``.

  Example:
    >>> name_parts("stquant3_b32_nearest"), name_parts("stquant_t4")
    (('stquant3', 32, True), ('stquant_t4', None, False))
  """
  nearest = name.endswith("_nearest")
  base = name.removesuffix("_nearest")
  m = re.fullmatch(r"(stquant.*)_b(\d+)", base)
  if m:
    return m.group(1), int(m.group(2)), nearest
  return base, None, nearest


def kind(name: str) -> str:
  """``"reference"``, ``"control"``, ``"baseline"`` (other optax), ``"fixed"``, ``"adaptive"``."""
  if name == REFERENCE:
    return "reference"
  if name == CONTROL:
    return "control"
  if not name.startswith("stquant"):
    return "baseline"
  return "fixed" if re.fullmatch(r"stquant\d(v\d)?", name_parts(name)[0]) else "adaptive"


def paired(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
  """Per optimizer: seeds, final losses and paired deltas (%) against ``adamw``.

  Args:
    runs: ``{optimizer: {seed: log}}`` of one model.
  """
  ref = runs.get(REFERENCE, {})
  out = {}
  for name, by_seed in runs.items():
    seeds = sorted(by_seed)
    loss = {s: final_loss(by_seed[s]) for s in seeds}
    both = [s for s in seeds if s in ref]
    delta = {s: 100.0 * (loss[s] / final_loss(ref[s]) - 1.0) for s in both}
    mean, half = ci95(list(delta.values())) if name != REFERENCE else (0.0, 0.0)
    out[name] = {"kind": kind(name), "seeds": seeds, "final_loss": loss,
                 "delta_pct": delta, "delta_mean": mean, "delta_ci95": half,
                 "delta_std": float(np.std(list(delta.values()), ddof=1))
                 if len(delta) > 1 else None}
  return out


def noise_floor(stats: dict[str, dict[str, Any]]) -> float | None:
  """The largest |delta| (%) of the control over its seeds, or None without a control."""
  ctrl = stats.get(CONTROL)
  if not ctrl or not ctrl["delta_pct"]:
    return None
  return float(max(abs(d) for d in ctrl["delta_pct"].values()))


def verdict(row: dict[str, Any], floor: float | None) -> str:
  """``matches`` / ``worse`` / ``better`` / ``unresolved`` fp32 AdamW, or ``—``."""
  if row["kind"] in ("reference",) or floor is None or not row["delta_pct"]:
    return "—"
  lo = row["delta_mean"] - row["delta_ci95"]
  hi = row["delta_mean"] + row["delta_ci95"]
  if hi <= floor and lo >= -floor:
    return "matches"
  if lo > floor:
    return "worse"
  if hi < -floor:
    return "better"
  return "unresolved"


WITHIN_PCT = 1.0


def within(row: dict[str, Any], pct: float = WITHIN_PCT, floor: float | None = None) -> bool:
  """Whether the optimizer is at most ``pct`` % worse than fp32 AdamW: the upper end of
  the 95% interval of its mean delta is at most ``pct`` (a claim the noise floor
  allows only when it is below ``pct``)."""
  if not row["delta_pct"] or row["kind"] == "reference":
    return False
  if floor is not None and floor > pct:
    return False
  return row["delta_mean"] + row["delta_ci95"] <= pct


def envelope(points: list[tuple[float, float]], bits: float) -> float | None:
  """The uniform curve at ``bits``: the best (lowest) delta among fixed-width points
  using at most ``bits``, or None when every fixed point uses more."""
  ok = [d for b, d in points if b <= bits + 1e-9]
  return min(ok) if ok else None


def head_to_head(a: dict[str, Any], b: dict[str, Any],
                 floor: float | None) -> dict[str, Any]:
  """Optimizer ``a`` against ``b`` directly, paired by seed: ``100 (L_a / L_b - 1)``.

  Both ran with the same seeds (same initialisation and data), so the seed-to-seed
  spread of the final loss cancels, as in :func:`paired` against fp32 AdamW.

  Returns:
    ``{"vs_pct": {seed: %}, "vs_mean", "vs_ci95", "vs_verdict"}``; the verdict is
    ``"lower"`` / ``"higher"`` (``a``'s loss; the 95% interval lies entirely below
    / above ± ``floor``) or ``"indistinguishable"``.

  Example:
    >>> a = {"final_loss": {0: 1.0, 1: 2.0, 2: 3.0}}
    >>> b = {"final_loss": {0: 1.1, 1: 2.2, 2: 3.3}}
    >>> head_to_head(a, b, 0.1)["vs_verdict"]
    'lower'
  """
  seeds = sorted(set(a["final_loss"]) & set(b["final_loss"]))
  vs = {s: 100.0 * (a["final_loss"][s] / b["final_loss"][s] - 1.0) for s in seeds}
  mean, half = ci95(list(vs.values()))
  f = floor or 0.0
  verdict = ("lower" if mean + half < -f else "higher" if mean - half > f
             else "indistinguishable")
  return {"vs_pct": vs, "vs_mean": mean, "vs_ci95": half, "vs_verdict": verdict}


def frontier(stats: dict[str, dict[str, Any]], bits: dict[str, float],
             floor: float | None) -> dict[str, Any]:
  """Adaptive vs uniform at equal memory.

  Args:
    stats: :func:`paired` of one model.
    bits: average bits (metadata included) per optimizer name.
    floor: :func:`noise_floor`.

  Returns:
    ``{"uniform": [(bits, delta, name)], "adaptive": [...], "comparisons": [...],
    "lowest_matching" / "lowest_better" / "lowest_within_1pct": {...} or None}``: each comparison pairs an adaptive run with
    the best fixed-width run at no more memory and says whether the adaptive one's
    mean is at or below it (within the resolution ``floor``) and, paired by seed
    (:func:`head_to_head`, keys ``vs_*``), whether the difference is resolved; it
    also pairs it with the cheapest fixed-width run that uses more memory
    (``above``, keys ``above_vs_*``).
  """
  pts = lambda k: sorted((bits[n], r["delta_mean"], n) for n, r in stats.items()
                         if r["kind"] == k and n in bits and r["delta_pct"]
                         and not n.endswith("_nearest"))
  uniform, adaptive = pts("fixed"), pts("adaptive")
  comparisons = []
  for b, d, n in adaptive:
    best = min(((ud, un, ub) for ub, ud, un in uniform if ub <= b + 1e-9), default=None)
    cmp = {"adaptive": n, "bits": b, "delta": d}
    if best is not None:
      cmp.update(uniform=best[1], uniform_bits=best[2], uniform_delta=best[0],
                 at_or_below=d <= best[0] + (floor or 0.0),
                 **head_to_head(stats[n], stats[best[1]], floor))
    above = min(((ub, un) for ub, ud, un in uniform if ub > b + 1e-9), default=None)
    if above is not None:  # the cheapest fixed run that uses more memory
      h = head_to_head(stats[n], stats[above[1]], floor)
      cmp.update(above=above[1], above_bits=above[0],
                 **{f"above_{k}": v for k, v in h.items()})
    comparisons.append(cmp)
  def lowest(ok):
    found = [(bits[n], n) for n, r in stats.items()
             if r["kind"] in ("fixed", "adaptive") and n in bits and ok(r)]
    return {"optimizer": min(found)[1], "average_bits": min(found)[0]} if found else None

  return {"uniform": uniform, "adaptive": adaptive, "comparisons": comparisons,
          "lowest_matching": lowest(lambda r: verdict(r, floor) == "matches"),
          "lowest_better": lowest(lambda r: verdict(r, floor) == "better"),
          "lowest_within_1pct": lowest(lambda r: within(r, WITHIN_PCT, floor))}
