"""STQuantPolicy: construction checks, decisions, relayout, wrappers, telemetry, per-step
cost (the memory budget: tests/test_policy_budget.py)."""

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stquant_jax as sq
from _policy_setup import _STEPS, _adamw, _grads, _loss, _params, _policy, _step_fn, _train
from stquant_jax._src.policy.allocation import FLOAT32
from stquant_jax._src.policy.decision import decide
from stquant_jax._src.policy.scores import NUM_SUMS, SUMS


# --- construction ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, words", [
    ({"every": -1}, ValueError, "every=-1"),
    ({"every": 0}, ValueError, "every=0"),
    ({"every": 2.5}, TypeError, "every"),
    ({"n_thresholds": (1.5, 1.0)}, ValueError, "out of order"),
    ({"r_thresholds": (0.0, 1.0)}, ValueError, "r_thresholds"),
    ({"min_bits": 6, "max_bits": 4}, ValueError, "min_bits=6 > max_bits=4"),
    ({"min_bits": 1}, ValueError, "min_bits=1"),
    ({"critical": (4, 4), "redundant": (8, 8)}, ValueError, "out of order"),
    ({"critical": (9, 8)}, ValueError, "outside min_bits..max_bits"),
    ({"redundant": (2, 2), "min_bits": 3}, ValueError, "outside"),
    ({"critical": 8}, TypeError, "pair"),
    ({"target_bits": 2.1}, ValueError, "raise target_bits"),
    ({"target_bits": -1.0}, ValueError, "target_bits"),
    ({"ema": 1.0}, ValueError, "ema=1.0"),
    ({"anneal_steps": -5}, ValueError, "anneal_steps=-5"),
    ({"instability": 0.0}, ValueError, "instability"),
    ({"rearm": 1}, TypeError, "rearm"),
    ({"min_interval": -1}, ValueError, "min_interval=-1"),
    ({"max_changes": -1}, ValueError, "max_changes=-1"),
    ({"mu_factors": ("crest", "snr")}, ValueError, "must be one of"),
    ({"nu_factors": ("snr",)}, TypeError, "pair"),
    ({"probe_bits": 9}, ValueError, "probe_bits=9"),
    ({"block_size": 100}, ValueError, "multiple of 32"),
    ({"axis_name": 3}, TypeError, "axis_name"),
])
def test_bad_configuration_fails_at_construction(kwargs, exc, words):
  with pytest.raises(exc, match=words):
    sq.STQuantPolicy(**kwargs)



def test_policy_takes_the_transforms_block_size():
  """One source of truth: the transform binds its block size into the policy (stated
  once); a policy that sets another one is an error naming both values."""
  tx = sq.scale_by_stquant(policy=_policy(), block_size=256)
  params = _params()
  state = tx.init(params)
  assert {x.block_size for x in jax.tree.leaves(state.mu, is_leaf=lambda x: isinstance(
      x, sq.QuantizedArray)) if isinstance(x, sq.QuantizedArray)} == {256}
  jax.eval_shape(tx.update, _grads(params, 0), state)  # the policy samples 256-value blocks
  with pytest.raises(ValueError, match="block_size=128.*block_size=256"):
    sq.scale_by_stquant(policy=_policy(block_size=128), block_size=256)
  sq.scale_by_stquant(policy=_policy(block_size=256), block_size=256)  # agreeing is fine


# --- decisions ---------------------------------------------------------------



def test_decisions_separate_leaves_and_moments_and_are_deterministic():
  params = _params()
  tx = _adamw(_policy())
  _, s1 = _train(tx, params, 4)
  _, s2 = _train(tx, params, 4)
  p1, p2 = s1[0].policy_state, s2[0].policy_state
  chex.assert_trees_all_equal(p1, p2)
  prop = np.asarray(p1.proposed)
  names = sorted(params)  # leaf order of the dict
  rows = {n: prop[i].tolist() for i, n in enumerate(names)}
  assert rows["bias"] == [FLOAT32, FLOAT32] and rows["step"] == [0, 0]
  adaptive = [rows[n] for n in ("big", "mid", "out")]
  assert len({tuple(r) for r in adaptive}) >= 2, rows       # leaves differ
  assert int(p1.decisions) == 2
  # the small-gradient leaf gets no more bits than the large-gradient one, for m and v
  assert rows["big"][0] <= rows["mid"][0] and rows["big"][1] <= rows["mid"][1]
  # actual still the initial layout until relayout
  assert np.asarray(p1.actual)[names.index("big")].tolist() == [8, 8]


def _decide(pol, st, n_m, r_m, count=10):
  """Runs the zone decision on hand-made statistics: 3 leaves, factor values given (m only)."""
  L = 3
  sums = np.zeros((L, NUM_SUMS), np.float32)
  idx = {k: i for i, k in enumerate(SUMS)}
  sums[:, idx["n"]] = sums[:, idx["blocks"]] = sums[:, idx["vpos"]] = 1.0
  sums[:, idx["m2"]] = np.square(n_m)          # moment_rms of m = n_m
  sums[:, idx["perr_m"]] = np.square(r_m) * sums[:, idx["m2"]]  # probe_err of m = r_m
  sums[:, idx["v"]] = 1.0
  sums[:, idx["crest_v"]] = 1.0
  return decide(pol, st, jnp.asarray(sums), jnp.int32(count), np.ones(L, bool), [4096] * L,
                [128] * L, 0, 0)


def test_hysteresis_band_keeps_zone_inside_and_moves_outside():
  pol = _policy(ema=0.0, n_thresholds=(0.8, 1.25), r_thresholds=(0.8, 1.25))
  st = pol.init_state({f"l{i}": jnp.zeros((64, 64)) for i in range(3)})
  # Leaf 0 starts critical (both high). N_rel = 1.1 (inside the band): stays high.
  st = _decide(pol, st, n_m=[1.1, 1.0, 1 / 1.1], r_m=[1.0, 1.0, 1.0])
  z = np.asarray(st.zone)[:, 0]
  assert z[0] == 0  # critical: N stayed high (1.1 >= exit 0.8), R stayed high
  # Leaf 2 N_rel = 1/1.1 >= 0.8: also stays high.
  assert z[2] == 0
  # Now leaf 2 drops well below the exit threshold: N low -> structure zone.
  st = _decide(pol, st, n_m=[2.0, 1.0, 0.5], r_m=[1.0, 1.0, 1.0])
  z = np.asarray(st.zone)[:, 0]
  assert z[2] == 2, z
  # Back to N_rel = 1.1 (inside the band): it stays low; only above 1.25 does it re-enter.
  n = np.array([1.0, 1.0, 1.1]); n = n / np.exp(np.mean(np.log(n)))
  st = _decide(pol, st, n_m=n, r_m=[1.0, 1.0, 1.0])
  assert np.asarray(st.zone)[2, 0] == 2
  st = _decide(pol, st, n_m=[0.8, 0.8, 1.6], r_m=[1.0, 1.0, 1.0])
  assert np.asarray(st.zone)[2, 0] == 0


def test_transitions_are_bounded():
  """Statistics that swap every decision: changes respect min_interval and max_changes."""
  pol = _policy(ema=0.0, min_interval=20, max_changes=2)
  st = pol.init_state({f"l{i}": jnp.zeros((64, 64)) for i in range(3)})
  history = []
  for t in range(1, 101):
    n = [4.0, 1.0, 0.25] if t % 2 else [0.25, 1.0, 4.0]
    st = _decide(pol, st, n_m=n, r_m=[1.0, 1.0, 1.0], count=t)
    history.append(np.asarray(st.proposed)[:, 0].copy())
  h = np.array(history)
  changes = (np.diff(h, axis=0) != 0).sum(axis=0)
  assert changes.max() <= 2 and changes.max() >= 1
  assert (np.asarray(st.changes) <= 2).all()
  for j in range(3):
    when = np.nonzero(np.diff(h[:, j]))[0]
    assert (np.diff(when) >= 20).all(), when


@pytest.mark.parametrize("boost", [2, (0, 2)])
def test_annealing_gives_more_bits_early(boost):
  """Early decisions add the boost (per moment when it is a pair: (0, 2) raises v
  only, m's early bits equal its late ones); late decisions add none."""
  pol = _policy(ema=0.0, anneal_steps=100, anneal_bits=boost,
                critical=(6, 6), magnitude=(5, 5), structure=(5, 4), redundant=(4, 4))
  st = pol.init_state({f"l{i}": jnp.zeros((64, 64)) for i in range(3)})
  early = _decide(pol, st, n_m=[2.0, 1.0, 0.5], r_m=[1.0, 1.0, 1.0], count=1)
  late = _decide(pol, early, n_m=[2.0, 1.0, 0.5], r_m=[1.0, 1.0, 1.0], count=2000)
  assert float(early.anneal) > 0.9 and float(late.anneal) < 0.1
  e, l = np.asarray(early.proposed), np.asarray(late.proposed)
  assert (e >= l).all() and (e > l).any()
  if boost == (0, 2):
    assert (e[:3, 0] == l[:3, 0]).all() and (e[:3, 1] > l[:3, 1]).all()


def test_drift_leaves_out_moments_the_last_decision_re_packed():
  """A moment whose bits the previous decision changed has statistics moved by that
  change (its own re-packing), so it does not count as drift: the same collapse of
  one leaf's structure factor holds the boost when that leaf's bits were left alone,
  and does not when the last decision had just changed them."""
  # (factors of 2, not 1: log2 EMAs both exactly 0 mean "never live")
  pol = _policy(ema=0.0, anneal_steps=100, anneal_bits=(0, 3), instability=1.0, every=10,
                critical=(5, 5), magnitude=(5, 5), structure=(5, 5), redundant=(5, 5))
  st = pol.init_state({f"l{i}": jnp.zeros((64, 64)) for i in range(3)})
  st = _decide(pol, st, n_m=[2.0] * 3, r_m=[1.0] * 3, count=10)
  st = _decide(pol, st, n_m=[2.0] * 3, r_m=[1.0] * 3, count=20)
  assert float(st.anneal) == pytest.approx(math.exp(-0.2))

  def after(last_change_of_leaf0):
    lc = np.asarray(st.last_change).copy()
    lc[0, :] = last_change_of_leaf0
    s = st._replace(last_change=jnp.asarray(lc, jnp.int32))
    return float(_decide(pol, s, n_m=[2.0] * 3, r_m=[2.0**-6, 1, 1], count=30).anneal)

  assert after(-(2**30)) == pytest.approx(math.exp(-0.2))   # steady leaf: drift 2 holds tau
  assert after(20) == pytest.approx(math.exp(-0.3))         # re-packed at 20: decay only


def test_no_annealing_means_no_boost_whatever_the_drift():
  """``anneal_steps=0`` starts at the critical zone's bits and never adds a boost,
  even re-armed when the leaves swap ranks (a drift far above ``instability``)."""
  pol = _policy(ema=0.0, anneal_steps=0, anneal_bits=3, instability=0.5, every=10, rearm=True,
                critical=(6, 6), magnitude=(5, 5), structure=(5, 4), redundant=(4, 4))
  assert pol.initial_bits() == (6, 6)
  st = pol.init_state({f"l{i}": jnp.zeros((64, 64)) for i in range(3)})
  table = np.asarray(pol.zone_table())
  for count, n in ((10, [4.0, 1.0, 0.25]), (30, [0.25, 1.0, 4.0])):
    st = _decide(pol, st, n_m=n, r_m=[2.0] * 3, count=count)
    zone = np.asarray(st.zone)
    want = table[zone, np.arange(2)[None, :]]
    assert (np.asarray(st.proposed) == want).all()


@pytest.mark.parametrize("rearm", [False, True])
def test_drift_holds_the_boost_but_re_arms_it_only_when_asked(rearm):
  """Annealing is monotone by default: drift (leaves trading ranks) holds tau while
  it lasts early on, but once tau has decayed, a late drift of the same size does
  not bring the boost back (ViT's late re-arm, docs/policy.md); ``rearm=True``
  restores it."""
  pol = _policy(ema=0.0, anneal_steps=100, anneal_bits=1, instability=0.5, rearm=rearm,
                critical=(6, 6), magnitude=(5, 5), structure=(5, 4), redundant=(4, 4))
  st = pol.init_state({f"l{i}": jnp.zeros((64, 64)) for i in range(3)})
  table = np.asarray(pol.zone_table())[:, 0]
  boost = lambda st: np.asarray(st.proposed)[:, 0] - table[np.asarray(st.zone)[:, 0]]
  a, b = [4.0, 1.0, 0.25], [0.25, 1.0, 4.0]  # the ranks swap: drift 8/3 > instability
  st = _decide(pol, st, n_m=a, r_m=[1.0] * 3, count=10)
  st = _decide(pol, st, n_m=b, r_m=[1.0] * 3, count=100)
  held = 1.0 if rearm else math.exp(-0.1)
  assert float(st.anneal) == pytest.approx(held)  # decay alone would be exp(-1)
  assert (boost(st) == 1).all()
  for count in (300, 400):  # quiet: decays to exp(-3), exp(-4)
    st = _decide(pol, st, n_m=b, r_m=[1.0] * 3, count=count)
  assert float(st.anneal) < 0.02 and (boost(st) == 0).all()
  st = _decide(pol, st, n_m=a, r_m=[1.0] * 3, count=500)  # a late shift
  if rearm:
    assert float(st.anneal) == 1.0 and (boost(st) == 1).any()
  else:
    assert float(st.anneal) < 0.02 and (boost(st) == 0).all()



# --- relayout ----------------------------------------------------------------

def _max_error(q: sq.QuantizedArray):
  """Largest |dequantize(quantize(x)) - x| the map allows, per block: half the widest level
  gap for m (nearest level); for v, whose maps round in the root domain, a whole gap (or
  the smallest level, below which values are clamped up)."""
  lv = np.sort(q.code_map.levels())
  gap = np.max(np.diff(lv))
  bound = gap / 2 if q.signed else max(gap, lv[0])
  return np.asarray(q.scales) * bound * (1 + 1e-5) + 1e-12


def test_relayout_repacks_within_the_new_error_bound_and_training_continues():
  params = _params()
  tx = _adamw(_policy())
  p, state = _train(tx, params, 2)
  before = state[0]
  after_state = sq.relayout(state)
  after = after_state[0]
  changed = 0
  for k in ("big", "mid", "out"):
    for old, new in ((before.mu[k], after.mu[k]), (before.nu[k], after.nu[k])):
      if old.bits == new.bits:
        assert new is old
        continue
      changed += 1
      x_old = np.asarray(sq.dequantize(old)).reshape(-1)
      x_new = np.asarray(sq.dequantize(new)).reshape(-1)
      n = x_old.size
      pad = new.scales.shape[0] * new.block_size - n
      err = np.abs(np.pad(x_new - x_old, (0, pad))).reshape(-1, new.block_size).max(axis=1)
      assert (err <= _max_error(new)).all(), (k, new.bits)
  assert changed >= 2
  np.testing.assert_array_equal(np.asarray(after.policy_state.actual),
                                np.asarray(after.policy_state.proposed))
  assert sq.relayout(after_state) is after_state  # nothing left to change: same object
  step = _step_fn(tx)
  l0 = float(_loss(p))
  for i in range(2, 8):
    p, after_state = step(p, after_state, i)
  assert np.isfinite(float(_loss(p)))
  assert np.asarray(after_state[0].policy_state.actual).tolist() == \
      np.asarray(after.policy_state.proposed).tolist()  # the step ran with the new layout
  assert l0 > 0


def test_relayout_float32_transitions():
  """Critical zone in float32: moments go float32 -> quantized and back."""
  params = _params()
  pol = _policy(critical=(None, None), magnitude=(None, 8), structure=(8, 8), redundant=(4, 4))
  tx = sq.adamw(1e-2, policy=pol)
  state = tx.init(params)
  assert state[0].mu["big"].dtype == jnp.float32 and state[0].mu["big"].shape == (64, 256)
  step = _step_fn(tx)
  p = params
  for i in range(2):
    p, state = step(p, state, i)
  m_before = np.asarray(state[0].mu["big"])
  state = sq.relayout(state)
  q = state[0].mu["big"]
  assert isinstance(q, sq.QuantizedArray)
  err = np.abs(np.asarray(sq.dequantize(q)) - m_before).reshape(-1, 128).max(axis=1)
  assert (err <= _max_error(q)).all()
  bw = sq.bit_widths(state)
  assert bw["mu_bits"]["big"] == q.bits and 32 in bw["mu_bits"].values()  # "mid" stays float32
  for i in range(2, 6):
    p, state = step(p, state, i)
  assert np.isfinite(float(_loss(p)))


def test_relayout_finds_state_in_wrappers():
  params = {k: v for k, v in _params().items() if k != "step"}  # clip_by_global_norm: floats
  pol = _policy()
  wrapped = [
      optax.inject_hyperparams(sq.adamw, static_args=("block_size", "policy"))(
          learning_rate=1e-2, policy=pol),
      optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), sq.adamw(1e-2, policy=pol)),
                       every_k_schedule=2),
  ]
  for tx in wrapped:
    steps = 4 if isinstance(tx, optax.MultiSteps) else 2
    step = _step_fn(tx)
    state = tx.init(params)
    p = params
    for i in range(steps):
      p, state = step(p, state, i)
    new = sq.relayout(state)
    assert new is not state, type(tx)
    bw = sq.bit_widths(new)
    assert bw["mu_bits"] == bw["mu_proposed"] and bw["nu_bits"] == bw["nu_proposed"]
    for i in range(steps, steps + 2):
      p, new = step(p, new, i)
    assert np.isfinite(float(_loss(p)))


# --- telemetry ---------------------------------------------------------------

def test_bit_history_records_evolution_and_step_retraces_once_per_layout():
  params = _params()
  tx = _adamw(_policy(ema=0.25))  # its own step function: its cache counts layouts
  state = tx.init(params)
  step = _step_fn(tx)
  h = sq.BitHistory()
  h.record(0, state, loss=float(_loss(params)))
  p = params
  for i in range(4):
    p, state = step(p, state, i)
    if (i + 1) % 2 == 0:
      state = sq.relayout(state)
      h.record(i + 1, state, loss=float(_loss(p)))
  steps, bits = h.series("big", "mu")
  assert steps == [0, 2, 4] and bits[0] == 8 and bits[-1] < 8
  assert set(h.records[-1]) >= {"mu_bits", "nu_bits", "mu_proposed", "mu_zone", "anneal",
                                 "average_bits", "loss", "step"}
  assert "step" not in h.records[-1]["mu_bits"]  # integer leaf: no moments
  assert h.records[-1]["mu_bits"]["bias"] == 32
  assert '"big"' in h.to_json()
  layouts = {json.dumps([r["mu_bits"], r["nu_bits"]], sort_keys=True) for r in h.records[:-1]}
  assert _STEPS[id(tx)][1]._cache_size() == len(layouts)  # one compilation per layout


# --- per-step cost -----------------------------------------------------------

@pytest.mark.parametrize("quantized", [True, False])
def test_rotating_subsample_sums_cover_every_block_once(quantized):
  """Summed over the K slots of a period, the strided 1/K samples give the full sums
  (all statistics, incl. a partial last block and K not dividing the block count)."""
  from stquant_jax._src.policy.scores import leaf_sums
  shape = (37, 100)  # 3700 values: 29 blocks of 128, the last one partial
  k = jax.random.split(jax.random.key(3), 3)
  g = jax.random.normal(k[0], shape)
  m = jax.random.normal(k[1], shape) * 0.1
  v = jnp.square(jax.random.normal(k[2], shape)) * 0.01
  if quantized:
    m, v = sq.quantize(m, 8, signed=True), sq.quantize(v, 8, signed=False)
  full = np.asarray(leaf_sums(g, m, v, block_size=128))
  for stride in (4, 29, 40):  # one compilation per stride, the slot traced
    part = jax.jit(lambda slot, stride=stride: leaf_sums(g, m, v, block_size=128,
                                                          stride=stride, slot=slot))
    parts = [part(jnp.int32(s)) for s in range(stride)]
    np.testing.assert_allclose(np.sum(np.asarray(parts), axis=0), full, rtol=2e-5, atol=1e-6)


def _big_copies(tx, params):
  step = jax.jit(lambda p, s, g: tx.update(g, s, p), donate_argnums=(0, 1))
  hlo = step.lower(params, tx.init(params), _grads(params, 0)).compile().as_text()
  import re
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} copy\(", hlo)]
  return sum(1 for s in sizes if s >= 1024)


def test_step_copies_no_more_large_buffers_than_fixed_bits():
  """The statistics must not make the step copy the packed moments (the old lax.cond
  over the moments did, on every step)."""
  params = _params()
  fixed = _big_copies(sq.adamw(1e-2, policy=sq.FixedBits(8, 8)), params)
  adaptive = _big_copies(sq.adamw(1e-2, policy=_policy(every=4)), params)
  assert adaptive <= fixed, (adaptive, fixed)


def test_degenerate_leaf_does_not_move_the_others():
  """A leaf whose moments stay all zero (a LoRA factor whose partner is still zero,
  an unused branch) keeps its zone and bits and stays out of the geometric mean: the
  other leaves' statistics, zones and proposals are exactly those of a run without it.
  Before the fix its log2(1e-30) factors pushed every other leaf into the critical zone."""
  pol = _policy(critical=(8, 8), magnitude=(6, 8), structure=(6, 6), redundant=(4, 5))
  base = _params()

  def run(params):
    tx = sq.scale_by_stquant(policy=pol)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(6):
      g = _grads({k: v for k, v in params.items() if k != "z_lora"}, i)
      if "z_lora" in params:
        g["z_lora"] = jnp.zeros_like(params["z_lora"])
      _, state = step(g, state, params)
    return state.policy_state

  # named to sort last, so the other leaves keep their indices (and their stochastic
  # rounding numbers, which depend on the leaf index)
  with_zero = run(dict(base, z_lora=jnp.zeros((64, 128))))
  without = run(base)
  names = sorted(dict(base, z_lora=0))  # leaf order of the params with the zero leaf
  keep = [names.index(k) for k in sorted(base)]
  for field in ("n_ema", "r_ema", "zone", "proposed"):
    np.testing.assert_array_equal(np.asarray(getattr(with_zero, field))[keep],
                                  np.asarray(getattr(without, field)), err_msg=field)
  z = names.index("z_lora")
  assert int(with_zero.zone[z, 0]) == 0  # never left its initial zone
  assert tuple(np.asarray(with_zero.proposed[z]).tolist()) == pol.initial_bits()
  assert len(set(np.asarray(without.zone)[:3, 0].tolist())) > 1  # the others do differ




def test_default_boost_is_gone_at_the_first_decision_and_stays_gone():
  """With the defaults a moment leaves 8 bits for its zone's at the first decision
  (tau = exp(-100 / 50), under the 1/6 one bit of a 3-bit boost needs), and no
  later decision brings a boost bit back, however large the drift (no rearm)."""
  from stquant_jax._src.policy import annealing
  pol = sq.STQuantPolicy()
  kw = dict(anneal_steps=pol.anneal_steps, instability=pol.instability, rearm=pol.rearm)
  first = annealing.tau(jnp.int32(pol.every), jnp.float32(0.0), jnp.float32(1.0), **kw)
  assert annealing.boost(first, pol._boosts).tolist() == [0, 0]
  later = annealing.tau(jnp.int32(2 * pol.every), jnp.float32(100.0), first, **kw)
  assert annealing.boost(later, pol._boosts).tolist() == [0, 0]
  # The former default (100 steps) kept one bit at the first decision.
  old = annealing.tau(jnp.int32(pol.every), jnp.float32(0.0), jnp.float32(1.0),
                      **{**kw, "anneal_steps": 100})
  assert annealing.boost(old, pol._boosts).tolist() == [1, 1]


def test_default_policy_starts_at_8_bits_and_settles_near_5():
  """The default zones average 4.75 quantized bits (5 with the scales) and the
  annealing boost (3 bits, 50-step time constant) starts every adaptive moment at 8; a
  pair boosts each moment by its own bits (lists from JSON become tuples)."""
  policy = sq.STQuantPolicy()
  assert policy.initial_bits() == (8, 8)
  assert sq.STQuantPolicy(anneal_bits=[0, 3]).initial_bits() == (5, 8)
  assert sq.STQuantPolicy(anneal_bits=[1, 2]).anneal_bits == (1, 2)
  assert sq.STQuantPolicy(anneal_steps=0).initial_bits() == (5, 6)
  for bad in ((1, -1), (1, 2, 3), -1):
    with pytest.raises((ValueError, TypeError), match="anneal_bits"):
      sq.STQuantPolicy(anneal_bits=bad)
  table = policy.zone_table()
  assert table.mean() == 4.75 and (table[:, 1] >= table[:, 0]).all()  # v never below m
