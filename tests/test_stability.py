"""Stability at the lowest bit-widths the policy allows (issue #6).

"The lowest bit-widths the policy allows" is :class:`stquant_jax.STQuantPolicy`
with ``min_bits=2`` (``stquant_jax._src.codec.packing.MIN_BITS``; the policy's default
floor is 3, 2 is an explicit opt-in), every zone at ``(2, 2)`` and no
annealing boost (``anneal_bits=0``): every adaptive moment is stored with 2-bit
codes from step 0 to the end, m with the signed map ``{-1, 0, 1}`` and v with
the zero-free map ``{1/16, 1/4, 9/16, 1}`` (times the block maximum). Leaves
under ``min_size`` (biases, layer norms) keep float32 moments, as always. The
second configuration is the budgeted policy at its lowest budget,
``target_bits = policy.min_average_bits(params)``.

The slow tests train tiny GPT-2 (width 128, byte tokens, batch 16; 4 layers on
128-byte sequences in the full form, 2 layers on 64-byte ones in the short form)
on CPython stdlib text through :func:`experiments.train.train`, next to a
float32 ``optax.adamw`` baseline with the same data, seed and schedule. Full
form (2000 steps) with ``STQUANT_SLOW=1``; CI runs the short form.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stquant_jax as sq
from stquant_jax._src.codec.packing import MIN_BITS
from experiments import train

FULL = os.environ.get("STQUANT_SLOW", "") not in ("", "0")
STEPS = 2000 if FULL else 150

# Every zone at the floor, no annealing: as optimizer_kwargs of the
# "stquant_adaptive" optimizer (JSON-able: stored in the run's log).
LOWEST = {"min_bits": MIN_BITS, "critical": [MIN_BITS] * 2,
          "magnitude": [MIN_BITS] * 2, "structure": [MIN_BITS] * 2,
          "redundant": [MIN_BITS] * 2, "anneal_bits": 0}


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("STQUANT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield


# The short form trains the quality suite's 2-layer GPT-2 on 64-byte sequences
# (experiments.compare.MODEL_RUNS), about 4x cheaper per step than the full form's.
SHORT_MODEL = {"d_model": 128, "num_layers": 2, "num_heads": 4, "context_len": 64}


def _config(optimizer: str, optimizer_kwargs=None) -> train.TrainConfig:
  return train.TrainConfig(
      model="gpt2", preset="tiny", tokenizer="bytes", seq_len=128 if FULL else 64,
      model_overrides={} if FULL else SHORT_MODEL,
      batch_size=16, max_bytes=2_000_000, steps=STEPS, learning_rate=1e-3,
      warmup_steps=20, optimizer=optimizer,
      optimizer_kwargs=optimizer_kwargs or {}, eval_interval=STEPS,
      eval_batches=2, seed=0, progress=False)


def _budget_kwargs() -> dict:
  policy = sq.STQuantPolicy(min_bits=MIN_BITS)
  floor = policy.min_average_bits(train.abstract_params(_config("adamw")))
  return {"min_bits": MIN_BITS, "target_bits": floor}


_RUNS: dict[str, tuple[dict, dict]] = {}


def _run(name: str) -> tuple[dict, dict]:
  """``(log, final)`` of one run, cached per module; ``final`` holds the
  trained params and the typed optax state."""
  if name not in _RUNS:
    cfg = {"adamw": lambda: _config("adamw"),
           "lowest": lambda: _config("stquant_adaptive", LOWEST),
           "budget": lambda: _config("stquant_budget", _budget_kwargs())}[name]()
    final = {}

    def on_end(model, opt_state):
      final["params"] = nnx.state(model, nnx.Param)
      final["opt_state"] = opt_state

    _RUNS[name] = (train.train(cfg, on_end=on_end), final)
  return _RUNS[name]


def _smoothed(losses, window):
  kernel = np.ones(window) / window
  return np.convolve(np.asarray(losses), kernel, mode="valid")


def _is_q(x):
  return isinstance(x, sq.QuantizedArray)


def _moments(opt_state):
  """``[(kind, leaf)]`` for every moment leaf of every stquant state."""
  states = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, sq.ScaleByStquantState))
            if isinstance(s, sq.ScaleByStquantState)]
  assert len(states) == 1
  out = []
  for kind in ("mu", "nu"):
    for x in jax.tree.leaves(getattr(states[0], kind), is_leaf=_is_q):
      if _is_q(x) or (x is not None and np.size(x) > 0):
        out.append((kind, x))
  return out


# ---------------------------------------------------------------- fast


def test_lowest_policy_is_all_two_bit():
  """The policy accepts every zone at MIN_BITS = 2 and starts every adaptive
  leaf there (no annealing boost); 1 bit is rejected, so 2 is the floor."""
  assert MIN_BITS == 2
  policy = sq.STQuantPolicy(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in LOWEST.items()})
  assert policy.initial_bits() == (2, 2)
  assert sq.STQuantPolicy().min_bits == 3  # 2 bits is an explicit opt-in.
  with pytest.raises(ValueError, match="min_bits=1"):
    sq.STQuantPolicy(min_bits=1)
  with pytest.raises(ValueError, match="outside min_bits"):
    sq.STQuantPolicy(redundant=(2, 2))  # Needs min_bits=2 as well.
  params = {"w": jnp.zeros((256, 128)), "b": jnp.zeros((128,))}
  state = sq.adamw(1e-3, policy=policy).init(params)
  widths = sq.bit_widths(state)
  assert widths["mu_bits"] == widths["nu_bits"] == {"b": 32, "w": 2}
  assert sq.average_bits(state) == pytest.approx(
      policy.min_average_bits(params))


# ---------------------------------------------------------------- slow


def _check_state_at_floor_and_finite(log, final):
  """Every quantized moment is at 2 bits, the state's average bits is the
  policy's floor, and all params and dequantized moments are finite with
  |m| <= 1 and 0 <= v <= 1 (gradients are clipped to global norm 1)."""
  params = final["params"]
  for p in jax.tree.leaves(params):
    assert np.isfinite(np.asarray(p)).all()
  moments = _moments(final["opt_state"])
  quantized = [x for _, x in moments if _is_q(x)]
  assert {x.bits for x in quantized} == {MIN_BITS}
  n_params = sum(np.size(p) for p in jax.tree.leaves(params))
  n_quantized = sum(math.prod(x.shape) for x in quantized) / 2
  assert n_quantized > 0.9 * n_params  # Only small leaves stay float32.
  stats = {"mu_absmax": 0.0, "nu_max": 0.0, "nu_min": np.inf}
  for kind, x in moments:
    values = np.asarray(sq.dequantize(x) if _is_q(x) else x)
    if kind == "mu":
      stats["mu_absmax"] = max(stats["mu_absmax"], float(np.abs(values).max()))
    else:
      stats["nu_max"] = max(stats["nu_max"], float(values.max()))
      stats["nu_min"] = min(stats["nu_min"], float(values.min()))
    assert np.isfinite(values).all(), kind
    if _is_q(x):
      assert np.isfinite(np.asarray(x.scales)).all(), kind
    if kind == "mu":
      assert np.abs(values).max() <= 1.0 + 1e-6
    else:
      assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6
  bits = sq.average_bits(final["opt_state"])
  floor = sq.STQuantPolicy(min_bits=MIN_BITS).min_average_bits(params)
  assert bits == pytest.approx(floor)
  assert log["final_memory"]["average_bits"] == pytest.approx(bits)
  history = log["bit_history"]  # Bits at step 0 and after every decision.
  assert history[-1]["step"] == STEPS
  for record in history:
    for moment in ("mu_bits", "nu_bits"):
      assert set(record[moment].values()) <= {MIN_BITS, 32}
  return bits, stats


def _check_no_divergence(losses):
  """Finite losses; the smoothed final loss is well below the first and not
  above the best smoothed loss of the run by more than 5%."""
  assert len(losses) == STEPS and all(map(math.isfinite, losses))
  window = STEPS // 10
  smooth = _smoothed(losses, window)
  final = smooth[-1]
  assert final < losses[0] - (1.5 if FULL else 1.0)
  assert final <= 1.05 * smooth.min()
  assert max(losses[window:]) < losses[0]  # No spike above the start.
  return final


# Final smoothed train loss (mean of the last 10% of steps), seed 0, CPU:
#   full form (2000 steps): float32 adamw 1.375, 2-bit 2.596 (+89%);
#     eval loss 1.812 vs 2.727 (+50%); 2-bit state 2.514 average bits
#     (scales and float32 small leaves included) vs 32.
#   short form (150 steps, the 2-layer model on 64-byte sequences): adamw
#     2.369, 2-bit 3.045 (+29%); eval 2.615 vs 3.273. (The 4-layer model on
#     128-byte sequences gave 2.428 vs 2.778 at 150 steps, 3x the time.)
# The 2-bit run does not diverge but stalls: its loss is flat (2.60-2.65)
# from step ~400 on while adamw keeps improving. The 2-bit *m* is the cause:
# ~88% of its codes are 0 (values under half the block's absmax round to 0),
# so momentum is mostly lost. 400-step FixedBits ablation (final loss):
# m2/v2 2.667, m2/v8 2.741, m8/v2 2.228, m3/v3 2.213; 2-bit v is harmless.
# The bound is the measured ratio with some slack (runs are deterministic on
# one platform).
MAX_RATIO = 2.1 if FULL else 1.45


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "lowest",
    pytest.param("budget", marks=pytest.mark.skipif(
        not FULL, reason="full form only (STQUANT_SLOW=1): same 2-bit layout "
        "as 'lowest', checked there in the short form"))])
def test_gpt2_tiny_does_not_diverge_at_lowest_bits(name):
  """Tiny GPT-2 with every adaptive moment at 2 bits (zones at the floor, or
  the budget at the floor) does not diverge: finite, bounded losses and
  moments, no late blow-up, the state at 2 bits throughout, and a final loss
  within MAX_RATIO of float32 AdamW on the same data, seed and schedule."""
  log, final = _run(name)
  base_log, _ = _run("adamw")
  loss = _check_no_divergence(log["train_loss"])
  base = _check_no_divergence(base_log["train_loss"])
  bits, stats = _check_state_at_floor_and_finite(log, final)
  assert math.isfinite(log["eval"][-1]["loss"])
  print(f"\n{name} {STEPS} steps: loss {log['train_loss'][0]:.4f} -> {loss:.4f}"
        f" (adamw {base_log['train_loss'][0]:.4f} -> {base:.4f}, ratio "
        f"{loss / base:.3f}); eval {log['eval'][-1]['loss']:.4f} (adamw "
        f"{base_log['eval'][-1]['loss']:.4f}); {bits:.4f} average bits; "
        f"{log['total_time_s']:.0f} s (adamw {base_log['total_time_s']:.0f} s); "
        f"{stats}")
  assert loss <= MAX_RATIO * base, (loss, base)
