"""The quality protocol's statistics: paired deltas, the control's noise floor, verdicts,
the adaptive-vs-uniform frontier (``experiments/quality.py``), on synthetic run logs."""

import json
import math

import jax.numpy as jnp
import pytest

from experiments import naming, optimizers, quality


def _log(loss):
  return {"eval": [{"step": 10, "loss": loss + 1.0}], "final_eval": {"loss": loss}}


def _runs(table):
  """``{optimizer: [final loss per seed]}`` -> ``{optimizer: {seed: log}}``."""
  return {name: {s: _log(x) for s, x in enumerate(losses)} for name, losses in table.items()}


REF = [2.00, 2.10, 1.90, 2.05, 1.95]


def _scaled(pcts):
  return [r * (1 + p / 100) for r, p in zip(REF, pcts)]


def test_paired_deltas_use_the_same_seed_and_the_final_evaluation():
  runs = _runs({"adamw": REF, "stquant4": _scaled([1, 2, 3, 2, 2])})
  st = quality.paired(runs)["stquant4"]
  assert [round(st["delta_pct"][s], 6) for s in range(5)] == [1, 2, 3, 2, 2]
  mean, half = quality.ci95([1, 2, 3, 2, 2])
  assert st["delta_mean"] == pytest.approx(2.0) and st["delta_ci95"] == pytest.approx(half)
  assert quality.final_loss({"eval": [{"loss": 3.0}]}) == 3.0  # no final_eval: last eval


def test_noise_floor_is_the_controls_largest_change():
  runs = _runs({"adamw": REF, "adamw_control": _scaled([0.1, -0.3, 0.2, 0.0, 0.15])})
  assert quality.noise_floor(quality.paired(runs)) == pytest.approx(0.3)
  assert quality.noise_floor(quality.paired(_runs({"adamw": REF}))) is None


@pytest.mark.parametrize("pcts,expected", [
    ([0.05, -0.1, 0.0, 0.1, -0.05], "matches"),     # inside the floor
    ([2.0, 2.2, 1.9, 2.1, 2.0], "worse"),           # consistently beyond it
    ([-2.0, -2.2, -1.9, -2.1, -2.0], "better"),
    ([1.0, -1.0, 2.0, -2.0, 0.0], "unresolved"),    # too spread to say
])
def test_verdict_claims_only_above_the_noise_floor(pcts, expected):
  runs = _runs({"adamw": REF, "adamw_control": _scaled([0.1, -0.3, 0.2, 0.0, 0.15]),
                "x": _scaled(pcts)})
  st = quality.paired(runs)
  assert quality.verdict(st["x"], quality.noise_floor(st)) == expected
  assert quality.verdict(st["x"], None) == "—"  # no control: no claim


def test_frontier_compares_adaptive_with_the_best_fixed_run_at_no_more_bits():
  runs = _runs({"adamw": REF, "adamw_control": _scaled([0.1, -0.1, 0.1, -0.1, 0.0]),
                "stquant8": _scaled([0.0] * 5), "stquant4": _scaled([1.0] * 5),
                "stquant4v3": _scaled([1.5] * 5), "stquant_t4": _scaled([0.5] * 5),
                "stquant_t3.5": _scaled([2.0] * 5), "stquant4_nearest": _scaled([3.0] * 5)})
  st = quality.paired(runs)
  bits = {"stquant8": 8.3, "stquant4": 4.3, "stquant4v3": 3.8, "stquant_t4": 4.2,
          "stquant_t3.5": 3.7, "stquant4_nearest": 4.3}
  fr = quality.frontier(st, bits, quality.noise_floor(st))
  assert [n for _, _, n in fr["uniform"]] == ["stquant4v3", "stquant4", "stquant8"]
  by = {c["adaptive"]: c for c in fr["comparisons"]}
  assert by["stquant_t4"]["uniform"] == "stquant4v3" and by["stquant_t4"]["at_or_below"]
  assert "uniform" not in by["stquant_t3.5"]  # every fixed run uses more bits
  assert fr["lowest_matching"] == {"optimizer": "stquant8", "average_bits": 8.3}


def test_head_to_head_resolves_what_the_two_intervals_against_adamw_cannot():
  """Two optimizers that scatter by ±3% around fp32 AdamW but differ by a steady
  -0.5% on every seed: their intervals against adamw overlap, the paired
  comparison of the two resolves the difference; a random one stays unresolved."""
  scatter = [3.0, -2.0, 1.0, -3.0, 2.5]
  runs = _runs({"adamw": REF, "adamw_control": _scaled([0.1, -0.1, 0.1, -0.1, 0.0]),
                "stquant4": _scaled(scatter),
                "stquant_t4": [x * 0.995 for x in _scaled(scatter)],
                "stquant_t5": _scaled([3.5, -3.0, 1.5, -2.0, 2.0])})
  st = quality.paired(runs)
  floor = quality.noise_floor(st)
  a, b = st["stquant_t4"], st["stquant4"]
  assert a["delta_mean"] + a["delta_ci95"] > b["delta_mean"] - b["delta_ci95"]  # overlap
  h = quality.head_to_head(a, b, floor)
  assert h["vs_mean"] == pytest.approx(-0.5) and h["vs_ci95"] < 1e-9
  assert h["vs_verdict"] == "lower"
  assert quality.head_to_head(b, a, floor)["vs_verdict"] == "higher"
  assert quality.head_to_head(st["stquant_t5"], b, floor)["vs_verdict"] == "indistinguishable"
  fr = quality.frontier(st, {"stquant4": 4.3, "stquant_t4": 4.3, "stquant_t5": 4.6}, floor)
  assert {c["adaptive"]: c["vs_verdict"] for c in fr["comparisons"]} == {
      "stquant_t4": "lower", "stquant_t5": "indistinguishable"}
  by = {c["adaptive"]: c for c in fr["comparisons"]}
  assert "above" not in by["stquant_t5"]  # no fixed run uses more than 4.6 bits
  fr = quality.frontier(st, {"stquant4": 4.5, "stquant_t4": 4.3}, floor)
  (c,) = fr["comparisons"]
  assert "uniform" not in c and c["above"] == "stquant4" and c["above_vs_verdict"] == "lower"


def test_kinds_and_names():
  assert [quality.kind(n) for n in ("adamw", "adamw_control", "adamw_bf16", "stquant4v3",
                                    "stquant8_nearest", "stquant_t4.5", "stquant_adaptive")] == [
      "reference", "control", "baseline", "fixed", "fixed", "adaptive", "adaptive"]
  assert naming.label("stquant4v3") == "stquant m4/v3"
  assert naming.label("stquant8_nearest") == "stquant 8-bit, nearest rounding"
  assert naming.label("adamw_lr0.5") == "optax.adamw (fp32), lr × 0.5"
  assert quality.kind("adamw_lr0.5") == "baseline"
  assert naming.label("stquant_t4.5", {"target_bits": 4.5}) == "STQuant budget ≤ 4.5 bits"
  assert naming.order(["stquant_t4", "stquant4", "adamw_control", "stquant8", "adamw"]) == [
      "adamw", "adamw_control", "stquant8", "stquant4", "stquant_t4"]
  assert optimizers.is_known("stquant5v4_nearest") and not optimizers.is_known("stquant9x")
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
    optimizers.parse_stquant("sgd")
  assert math.isinf(quality.ci95([1.0])[1])


def test_block_size_suffix_builds_that_block_size_and_stays_a_fixed_width_row():
  """``_b<B>`` (the frontier's block-size axis) reaches ``sq.adamw(block_size=B)``,
  keeps the name's kind and bits, and only multiples of 32 are accepted."""
  assert optimizers.parse_stquant("stquant3_b32") == (
      "FixedBits", {"mu_bits": 3, "nu_bits": 3}, {"block_size": 32})
  assert optimizers.parse_stquant("stquant_t4_b64_nearest")[2] == {
      "block_size": 64, "rounding": "nearest"}
  assert [quality.kind(n) for n in ("stquant3_b32", "stquant_t4_b64")] == ["fixed", "adaptive"]
  assert naming.fixed_bits("stquant4v3_b64") == (4, 3)
  assert naming.label("stquant3_b32") == "stquant 3-bit, block 32"
  assert naming.label("stquant_t4_b64") == "STQuant budget ≤ 4 bits, block 64"
  assert naming.order(["stquant3_b32", "stquant3_nearest", "stquant3", "stquant3_b64"]) == [
      "stquant3", "stquant3_b64", "stquant3_b32", "stquant3_nearest"]
  assert not optimizers.is_known("stquant3_b48") and not optimizers.is_known("stquant3_b0")
  sq = pytest.importorskip("stquant_jax")
  state = optimizers.make_optimizer("stquant3_b32", 1e-3).init({"w": jnp.zeros((64, 64))})
  assert sq.average_bits(state) == pytest.approx(3 + 32 / 32, abs=0.01)


def test_within_one_percent_needs_the_whole_interval_and_a_floor_below_it():
  runs = _runs({"adamw": REF, "adamw_control": _scaled([0.01, -0.02, 0.0, 0.01, 0.0]),
                "ok": _scaled([0.3, 0.5, 0.4, 0.6, 0.4]), "far": _scaled([0.9, 1.4, 0.5, 1.2, 0.8])})
  st = quality.paired(runs)
  floor = quality.noise_floor(st)
  assert quality.verdict(st["ok"], floor) == "worse"  # resolved, and small
  assert quality.within(st["ok"], 1.0, floor) and not quality.within(st["far"], 1.0, floor)
  assert not quality.within(st["ok"], 1.0, floor=1.5)  # a floor above 1%: no such claim


@pytest.mark.parametrize("name,size", [("adamw_control", 1e-6), ("adamw_jitter", 2.0 ** -8)])
def test_perturbed_baselines_move_m_by_their_size_only(name, size):
  """The control (and the bf16-sized jitter) are fp32 AdamW except that the stored m
  is scaled by 1 + size * u, |u| <= 1: the relative change of m stays within ``size``
  and is not zero (a perturbation that never happens would measure nothing)."""
  import jax
  import jax.numpy as jnp
  import optax
  from experiments import optimizers
  params = {"w": jnp.linspace(-1.0, 1.0, 4096).reshape(64, 64)}
  grads = jax.tree.map(lambda p: jnp.sin(7 * p) + 0.1, params)
  tx, ref = optimizers.make_optimizer(name, 1e-3, seed=3), optax.adamw(1e-3, weight_decay=1e-4)
  st, st_ref = tx.init(params), ref.init(params)
  for _ in range(3):
    _, st = tx.update(grads, st, params)
    _, st_ref = ref.update(grads, st_ref, params)
  m, m_ref = st[0].mu["w"], st_ref[0].mu["w"]
  rel = jnp.abs(m / m_ref - 1.0)
  assert float(rel.max()) <= 3 * size * 1.01  # three steps, each within size
  assert float(rel.max()) > size / 10


@pytest.mark.parametrize("scale", [0.5, 0.7])
def test_lr_scaled_reference_is_adamw_with_its_updates_scaled(scale):
  """``adamw_lr<F>`` (the check that the reference's learning rate is tuned) is
  fp32 AdamW whose updates, weight decay included, are F times the reference's, for a
  schedule as for a constant; a non-positive factor is an error, not a silent run."""
  import jax.numpy as jnp
  import optax
  params = {"w": jnp.linspace(-1.0, 1.0, 64)}
  grads = {"w": jnp.cos(3 * params["w"])}
  for lr in (1e-3, optax.linear_schedule(1e-3, 1e-4, 10)):
    tx = optimizers.make_optimizer(f"adamw_lr{scale}", lr, weight_decay=0.1)
    ref = optimizers.make_optimizer("adamw", lr, weight_decay=0.1)
    st, st_ref = tx.init(params), ref.init(params)
    for _ in range(3):
      u, st = tx.update(grads, st, params)
      u_ref, st_ref = ref.update(grads, st_ref, params)
    assert jnp.allclose(u["w"], scale * u_ref["w"], rtol=1e-6, atol=0)
  assert optimizers.make_policy("adamw_lr0.5") is None
  with pytest.raises(ValueError, match="must be positive"):
    optimizers.make_optimizer("adamw_lr0", 1e-3)


def test_report_says_whether_the_reference_learning_rate_is_tuned():
  """The lr-check paragraph lists every ``adamw_lr<F>`` row and warns that gains may
  be a step-size effect only when one of them is resolved better than the reference."""
  from experiments import report
  row = lambda mean, verdict: {"delta_pct": {0: mean}, "delta_pct_mean": mean,
                               "delta_pct_ci95": 0.5, "verdict": verdict}
  tuned = report._lr_check({"adamw_lr0.7": row(0.4, "unresolved"),
                            "adamw_lr1.4": row(15.0, "worse"), "stquant4": row(-2, "better")})
  assert "× 0.7: +0.40 ± 0.50% (unresolved)" in tuned[0] and "× 1.4" in tuned[0]
  assert "no evidence" in tuned[0]
  untuned = report._lr_check({"adamw_lr1.4": row(-3.0, "better")})
  assert "not at its best learning rate" in untuned[0] and "× 1.4" in untuned[0]
  assert report._lr_check({"stquant4": row(-2, "better")}) == []


def test_better_is_not_reported_as_matching():
  """A run resolved *better* than fp32 AdamW is listed as such, not as "matching"
  (which needs the interval inside ± the floor)."""
  runs = _runs({"adamw": REF, "adamw_control": _scaled([0.1, -0.1, 0.1, -0.1, 0.0]),
                "stquant8": _scaled([0.01, -0.02, 0.0, 0.02, 0.0]),
                "stquant3": _scaled([-2.0, -2.2, -1.9, -2.1, -2.0])})
  st = quality.paired(runs)
  fr = quality.frontier(st, {"stquant8": 8.3, "stquant3": 3.4}, quality.noise_floor(st))
  assert fr["lowest_matching"] == {"optimizer": "stquant8", "average_bits": 8.3}
  assert fr["lowest_better"] == {"optimizer": "stquant3", "average_bits": 3.4}


def test_large_jitter_moves_m_by_its_size():
  """``adamw_jitter<X>`` (noise of a low-bit m's size on fp32 AdamW) scales m by
  1 ± X u: after one step m differs from fp32 AdamW's by at most X, by more than
  X / 2 somewhere; a size outside (0, 1] is refused."""
  import jax
  import jax.numpy as jnp
  import optax
  params = {"w": jnp.linspace(-1.0, 1.0, 4096)}
  grads = {"w": jnp.sin(7 * params["w"]) + 0.1}
  tx, ref = optimizers.make_optimizer("adamw_jitter0.5", 1e-3), optax.adamw(1e-3, weight_decay=1e-4)
  _, st = tx.update(grads, tx.init(params), params)
  _, st_ref = ref.update(grads, ref.init(params), params)
  rel = jnp.abs(st[0].mu["w"] / st_ref[0].mu["w"] - 1.0)
  assert 0.25 < float(rel.max()) <= 0.5 + 1e-6
  assert naming.label("adamw_jitter0.5") == "fp32, m × (1 ± 0.5)"
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    optimizers.make_optimizer("adamw_jitter2", 1e-3)


def test_report_says_whether_noise_alone_helps():
  """The noise-check paragraph lists the ``adamw_jitter<X>`` rows (not the bf16-sized
  ``adamw_jitter``) and warns only when one is resolved better than the reference."""
  from experiments import report
  row = lambda d, verdict: {"delta_pct": {0: d, 1: d}, "delta_pct_mean": d,
                            "delta_pct_ci95": 0.5, "verdict": verdict}
  helps = report._noise_check({"adamw_jitter0.5": row(-3.0, "better"),
                               "adamw_jitter": row(0.1, "unresolved")})
  assert "± 0.5: -3.00 ± 0.50% (better; per seed -3.00, -3.00)" in helps[0]
  assert "may be the same effect" in helps[0] and "± 0.00390625" not in helps[0]
  neutral = report._noise_check({"adamw_jitter1": row(20.0, "worse")})
  assert "not resolved better" in neutral[0]
  assert report._noise_check({"adamw_jitter": row(0.1, "unresolved")}) == []


def test_early_precision_probe_is_the_suite_run_with_an_8_bit_start(tmp_path):
  """``benchmarks.early_precision`` trains the suite's GPT-2 run of a seed (same
  model, data, schedule and seed) and changes only the policy: every zone at 4
  bits, moments starting at 8 (the annealing boost)."""
  import dataclasses
  from benchmarks import early_precision
  from experiments import compare
  import stquant_jax as sq
  cfg = early_precision.config(3, tmp_path)
  suite = dataclasses.replace(compare.SUITES["full"], seeds=(3,), models=("gpt2",),
                              optimizers=("stquant_adaptive",))
  (base,) = compare.run_configs(suite, tmp_path)
  diff = {f.name for f in dataclasses.fields(cfg)
          if getattr(cfg, f.name) != getattr(base, f.name)}
  assert diff == {"optimizer_kwargs", "log_path"}
  policy = sq.STQuantPolicy(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in cfg.optimizer_kwargs.items()})
  assert policy.initial_bits() == (8, 8) and policy.redundant == (4, 4)


def test_v_precision_probe_reuses_only_a_finished_run_of_the_same_config(tmp_path):
  """``benchmarks.v_precision`` trains the suite's own GPT-2 runs (only the log
  path differs), and a log is reused (here and by ``compare --resume``) only when
  it is a finished run of that config, wherever it was first written."""
  import dataclasses
  from benchmarks import v_precision
  from experiments import compare
  cfg = v_precision.config("stquant8v4", 4, tmp_path)
  suite = dataclasses.replace(compare.SUITES["full"], seeds=(4,), models=("gpt2",),
                              optimizers=("stquant8v4",))
  (base,) = compare.run_configs(suite, tmp_path)
  assert dataclasses.replace(base, log_path=cfg.log_path) == cfg
  path = tmp_path / "run.json"
  elsewhere = json.loads(json.dumps(dataclasses.asdict(cfg)))
  elsewhere["log_path"] = "/somewhere/else.json"
  path.write_text(json.dumps({"config": elsewhere, "final_eval": {"loss": 1.0}}))
  assert compare.same_config(path, cfg)
  path.write_text(json.dumps({"config": elsewhere}))  # unfinished
  assert not compare.same_config(path, cfg)
  other = {**elsewhere, "seed": 3}
  path.write_text(json.dumps({"config": other, "final_eval": {"loss": 1.0}}))
  assert not compare.same_config(path, cfg)
