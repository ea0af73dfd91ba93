"""STQuantPolicy under a memory budget (``target_bits``): the Lagrangian allocation
and its slack fill, per-moment floors, the first layout over the whole tree, and the
budget met at every decision and relayout."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stquant_jax as sq
from _policy_setup import _adamw, _loss, _params, _policy, _step_fn, _train
from stquant_jax._src.policy.allocation import allocate, relative_error_table


def test_unreachable_budget_fails_at_init_with_the_floor():
  """Many small float32 leaves: 4 bits on average is impossible; init says what is reachable."""
  params = {f"b{i}": jnp.zeros((1000,)) for i in range(20)} | {"w": jnp.zeros((128, 128))}
  pol = sq.STQuantPolicy(target_bits=4.0)
  floor = pol.min_average_bits(params)
  assert floor > 4.0
  with pytest.raises(ValueError, match=f"raise target_bits to >= {floor:.3f}"):
    sq.adamw(1e-3, policy=pol).init(params)
  sq.adamw(1e-3, policy=sq.STQuantPolicy(target_bits=floor + 0.01)).init(params)  # fits


def test_budget_above_what_any_layout_stores_is_refused_or_warned():
  """target_bits=40 was taken silently (no layout stores more than 32 bits per value):
  refused at construction; a budget the layout never reaches warns at init."""
  with pytest.raises(ValueError, match="target_bits=40 must be below 32"):
    sq.STQuantPolicy(target_bits=40)
  params = {"w": jnp.zeros((128, 128))}
  with pytest.warns(UserWarning, match=r"target_bits=20\) never binds .* at most 8\.\d+ bits"):
    sq.adamw(1e-3, policy=sq.STQuantPolicy(target_bits=20)).init(params)


def test_budget_starts_with_v_first_and_fits_the_budget():
  """A budget's first layout gives v the bits and m 3 ("v_first", the default; low-bit
  v early is what sent GPT-2 runs onto a slower trajectory), fits the budget per
  leaf (m + v <= 2 (target - scales)), gives leftovers back to m, never goes below
  min_bits and never above the caps; "even" keeps the old split; other names fail."""
  cases = {3.0: (3, 2), 3.5: (3, 3), 4.0: (3, 4), 4.5: (3, 5), 5.0: (3, 6), 6.0: (3, 8),
           8.5: (8, 8)}
  for target, want in cases.items():
    policy = sq.STQuantPolicy(target_bits=target, min_bits=2)
    got = policy.initial_bits()
    assert got == want, (target, got)
    assert sum(got) <= 2 * (target - 32 / 128) or got == (8, 8)  # the caps
    even = sq.STQuantPolicy(target_bits=target, min_bits=2, budget_start="even").initial_bits()
    half = max(2, math.floor(target - 0.25))
    assert even == (min(8, half), min(8, half))  # caps: critical (5, 6) + boost 3
  assert sq.STQuantPolicy(target_bits=3.3).initial_bits() == (3, 3)  # min_bits=3 floor
  capped = sq.STQuantPolicy(target_bits=8.0, anneal_bits=0)  # critical (5, 6)
  assert capped.initial_bits() == (5, 6)  # caps: critical zone + boost
  # A pair boost caps each moment by its own bits: m's leftovers stop at 5 + 0.
  v_only = lambda t, **kw: sq.STQuantPolicy(target_bits=t, anneal_bits=(0, 3), **kw)
  assert v_only(6.0).initial_bits() == (3, 8)
  assert v_only(8.5).initial_bits() == (5, 8)
  assert v_only(8.5, budget_start="even").initial_bits() == (5, 8)
  with pytest.raises(ValueError, match="budget_start"):
    sq.STQuantPolicy(budget_start="m_first")


def test_allocation_meets_budget_respects_caps_and_priorities():
  rng = np.random.default_rng(0)
  M = 40
  pri = rng.normal(size=M).astype(np.float32) * 3
  cap = rng.integers(4, 9, size=M).astype(np.int32)
  size = np.full(M, 8192.0)
  nb = size / 128
  err2 = np.tile((2.0 ** -np.arange(2, 9))[None] ** 2, (M, 1))
  kw = dict(err2=err2, per_bit=nb * 16, fixed=4 * nb, fp32_bytes=4 * size, min_bits=2, max_bits=8)
  cost = lambda b: float(np.sum(nb * (16 * b + 4)))
  for budget in (cost(np.full(M, 2)), cost(np.full(M, 3.5)), cost(np.full(M, 6))):
    out = np.asarray(allocate(jnp.asarray(pri), jnp.asarray(cap), jnp.ones(M, bool),
                              jnp.asarray(cap), budget_bytes=jnp.float32(budget), **kw))
    assert cost(out) <= budget + 1e-3
    assert (out <= cap).all() and (out >= 2).all()
    # higher priority never gets fewer bits among moments with room under their caps
    free = out < cap
    order = np.argsort(pri[free])
    assert (np.diff(out[free][order]) >= 0).all()
  out = np.asarray(allocate(jnp.asarray(pri), jnp.asarray(cap), jnp.ones(M, bool), jnp.asarray(cap),
                            budget_bytes=jnp.float32(cost(cap) + 1), **kw))
  np.testing.assert_array_equal(out, cap)


def test_allocation_fills_the_slack_the_lagrangian_leaves():
  """Identical moments all change level at the same multiplier, so the Lagrangian
  alone gives all-2 (fits) or all-3 (does not): half the gap unused. The fill
  raises as many moments by one level as the budget allows, never past it."""
  M, size = 20, 8192.0
  nb = size / 128
  err2 = np.tile((2.0 ** -np.arange(2, 9))[None] ** 2, (M, 1))
  kw = dict(err2=err2, per_bit=np.full(M, nb * 16), fixed=np.full(M, 4 * nb),
            fp32_bytes=np.full(M, 4 * size), min_bits=2, max_bits=8)
  one = lambda b: nb * (16 * b + 4)
  budget = M * one(2) + 7.5 * (one(3) - one(2))  # room for 7 of the 20 moments at 3 bits
  out = np.asarray(allocate(jnp.zeros(M), jnp.full(M, 8, jnp.int32), jnp.ones(M, bool),
                            jnp.full(M, 8, jnp.int32), budget_bytes=jnp.float32(budget), **kw))
  assert sorted(out.tolist()) == [2] * 13 + [3] * 7
  # A large moment first in the order (ties keep index order) whose extra bit does not
  # fit must not block the smaller ones after it.
  sizes = np.array([65536.0] + [8192.0] * 10)
  nb2 = sizes / 128
  kw2 = dict(err2=np.tile((2.0 ** -np.arange(2, 9))[None] ** 2, (11, 1)), per_bit=nb2 * 16,
             fixed=4 * nb2, fp32_bytes=4 * sizes, min_bits=2, max_bits=8)
  cost2 = lambda b: float(np.sum(nb2 * (16 * b + 4)))
  budget = cost2(np.full(11, 2)) + 5.5 * 1024  # 1 KiB per small moment's bit, 8 KiB for the big
  out = np.asarray(allocate(jnp.zeros(11), jnp.full(11, 8, jnp.int32), jnp.ones(11, bool),
                            jnp.full(11, 8, jnp.int32), budget_bytes=jnp.float32(budget), **kw2))
  assert out[0] == 2 and sorted(out[1:].tolist()) == [2] * 5 + [3] * 5, out
  assert cost2(out) <= budget


def test_per_moment_floor_keeps_m_at_3_bits_while_v_takes_the_cut():
  """``min_bits=(3, 2)``: a budget below 3 bits everywhere lowers only v (2-bit m
  stalls training, 2-bit v does not); a zone below a moment's floor is an error."""
  pol = _policy(min_bits=(3, 2), target_bits=3.0, critical=(8, 8))
  assert pol.min_bits == (3, 2) and pol.initial_bits() == (3, 2)
  M = 8
  kw = dict(err2=np.tile(relative_error_table(2, 8) ** 2, (M // 2, 1)),
            per_bit=np.full(M, 64 * 16.0), fixed=np.full(M, 256.0),
            fp32_bytes=np.full(M, 4 * 8192.0), min_bits=2, max_bits=8)
  budget = (M // 2) * (64 * 16.0 * 6.6 + 2 * 256)  # m + v = 6.6 bits per leaf
  pri = jnp.asarray(np.tile([-8.0, 8.0], M // 2), jnp.float32)  # v matters far more than m
  run = lambda **k: np.asarray(allocate(pri, jnp.full(M, 8, jnp.int32), jnp.ones(M, bool),
                                        jnp.full(M, 8, jnp.int32),
                                        budget_bytes=jnp.float32(budget), **kw, **k))
  assert (run()[0::2] == 2).all()  # without floors the damage model sends m to 2 bits
  out = run(floor_bits=np.tile([3, 2], M // 2))
  assert out[0::2].tolist() == [3] * (M // 2), out
  assert sorted(out[1::2].tolist()) == [3, 3, 4, 4], out  # v takes the rest: 3.5 on average
  with pytest.raises(ValueError, match="outside min_bits"):
    sq.STQuantPolicy(min_bits=(3, 2), redundant=(2, 2))  # m's zone below m's floor
  sq.STQuantPolicy(min_bits=(3, 2), redundant=(3, 2))
  with pytest.raises(TypeError, match="pair"):
    sq.STQuantPolicy(min_bits=(3,))
  with pytest.raises(ValueError, match="min_bits"):
    sq.STQuantPolicy(min_bits=(3, 1))


def test_first_budget_layout_fits_the_whole_tree_and_uses_it():
  """Many float32 small leaves (biases, norms, a small head): a budget's first layout
  counts them, so the state fits ``target_bits`` from step 0 (the per-leaf rule
  alone would exceed it), and leaves take one bit more where it still fits."""
  params = {f"b{i}": jnp.zeros((1000,)) for i in range(8)}
  params |= {f"w{i}": jnp.zeros((256, 256 * (1 + i % 2))) for i in range(6)}
  for target, start in ((4.0, "v_first"), (4.5, "v_first"), (4.5, "even"), (3.5, "v_first")):
    pol = sq.STQuantPolicy(target_bits=target, budget_start=start,
                           min_bits=(3, 2) if target < 4 else 3)
    per_leaf = pol._average_bits(jax.tree.leaves(params), pol.initial_bits())
    assert per_leaf > target  # the case this guards: the per-leaf split does not fit
    state = sq.adamw(1e-3, policy=pol).init(params)
    got = sq.average_bits(state)
    assert target - 0.25 < got <= target, (target, start, got, sq.bit_widths(state))
    rows = np.asarray(state[0].policy_state.proposed)
    assert (rows[rows[:, 0] != 32] >= np.array(pol._floors)).all()
  # A budget at the floors, where the even split of m + v bits lies above them
  # (6 bits: 3 / 4 with v's floor at 4): the first layout is the floors.
  pol = sq.STQuantPolicy(budget_start="even", min_bits=(2, 4), target_bits=8.0)
  pol = dataclasses.replace(pol, target_bits=pol.min_average_bits(params))
  assert pol._split(6) == (3, 4)
  assert set(pol.layout(params)) == {(None, None), (2, 4)}


def test_first_layout_fit_is_under_budget_lowers_no_further_than_needed_and_leaves_no_bit_unspent():
  """``first_layout.fit`` on random trees, splits, caps, floors and start pairs:
  (1) the layout's exact bytes are within the budget; (2) every adaptive leaf is
  at the first of the start pair, the splits of one bit less each, and the
  floors, that fits (it lowers no further than needed), or at the split one bit
  above it; float32 leaves stay float32; (3) every adaptive leaf left at the
  lower pair would break the budget by taking the upper one (the largest-first
  fill leaves no affordable bit unspent)."""
  from stquant_jax._src.policy import first_layout as fl
  rng = np.random.default_rng(0)
  kw = dict(block_size=128, overhead=400)
  for _ in range(300):
    floors = ((3, 3), (3, 2), (2, 4))[int(rng.integers(3))]
    caps = tuple(int(c) for c in rng.integers(5, 9, size=2))
    mode = ("v_first", "even")[int(rng.integers(2))]
    to_pair = lambda t: fl.split(t, floors=floors, caps=caps, start=mode)
    start = to_pair(int(rng.integers(sum(floors), 17)))
    leaves = [((int(rng.integers(1, 3000)), int(rng.integers(1, 600))), True)
              for _ in range(int(rng.integers(1, 8)))]
    leaves += [((int(rng.integers(1, 4096)),), False) for _ in range(int(rng.integers(0, 5)))]
    nbytes = lambda layout: fl.nbytes(leaves, layout, **kw)
    floor = fl.average_bits(leaves, fl.uniform(leaves, floors), **kw)
    target = floor + float(rng.uniform(0.0, 4.0))
    budget = target * fl.num_values(leaves) / 8.0
    out = fl.fit(leaves, target_bits=target, start=start, to_pair=to_pair, floors=floors, **kw)
    case = (floors, caps, mode, start, leaves, target, out)
    assert nbytes(out) <= budget, case                                        # (1)
    # The spec of the lowering: the first of start, the splits of one bit less
    # each down to the floors' total, then the floors themselves, that fits.
    totals = [None] + list(range(sum(start) - 1, sum(floors) - 1, -1))
    candidates = [(start, sum(start))] + [(to_pair(t), t) for t in totals[1:]]
    fits = lambda p: nbytes(fl.uniform(leaves, p)) <= budget
    base, total = next(((p, t) for p, t in candidates if fits(p)), (floors, sum(floors)))
    up = to_pair(total + 1)
    for i, (_, ad) in enumerate(leaves):                                      # (2)
      assert out[i] in ((base, up) if ad else ((None, None),)), (i, base, up, case)
    for i, (_, ad) in enumerate(leaves):                                      # (3)
      trial = list(out)
      trial[i] = up
      if ad and out[i] == base and nbytes(trial) > nbytes(out):
        assert nbytes(trial) > budget, (i, case)


def test_first_layout_starts_from_the_policy_s_own_first_pair():
  """A budget that fits the start pair keeps it, even where re-splitting its total
  would give another pair (\"even\" with v's cap above m's: (5, 8) is 13 bits,
  which \"even\" splits as (5, 6))."""
  params = {"w": jnp.zeros((512, 512))}
  pol = sq.STQuantPolicy(target_bits=9.0, budget_start="even", anneal_bits=(0, 3))
  assert pol.initial_bits() == (5, 8) and pol._split(13) == (5, 6)
  assert pol.layout(params) == [(5, 8)]


def test_decisions_spend_the_budget_when_small_leaves_keep_float32():
  """Float32 moments of small leaves are paid once: a decision's layout uses the budget
  up to less than one level of one moment (paid twice, the budget here would settle
  1 bit under target)."""
  params = _params() | {f"b{i}": jnp.zeros((200,)) for i in range(6)}
  target = 6.0
  _, state = _train(_adamw(_policy(target_bits=target)), params, 2, relayout_every=2)
  values = 2 * sum(p.size for p in jax.tree.leaves(params) if p.dtype == jnp.float32)
  one_level = 16384 / values  # one more bit on the largest adaptive moment
  got = sq.average_bits(state)
  assert target - one_level < got <= target, (got, sq.bit_widths(state))


def test_budget_is_met_after_relayout_and_training_continues():
  params = _params()
  free = _adamw(_policy())
  _, st_free = _train(free, params, 2, relayout_every=2)
  assert sq.average_bits(st_free) > 5.0  # the budget below is binding
  tx = _adamw(_policy(target_bits=5.0))
  p, state = _train(tx, params, 2, relayout_every=2)
  assert sq.average_bits(state) <= 5.0, sq.bit_widths(state)
  step = _step_fn(tx)
  for i in range(2, 6):
    p, state = step(p, state, i)
  assert np.isfinite(float(_loss(p)))
  assert sq.average_bits(sq.relayout(state)) <= 5.0


def test_allocation_never_exceeds_the_budget_in_exact_bytes_on_large_models():
  """Byte counts are float32 inside the allocator; on a model with thousands of
  moments and terabyte budgets (budget one byte under, at and one byte over the
  caps' exact bytes, and 1e-7 under) the exact integer bytes of every allocation
  still fit, and the margin that ensures it wastes under 1e-3 of the budget;
  also when all but one moment are frozen. (Without a margin the float32 cast
  of the budget alone lets 1e-7 through.)"""
  from stquant_jax._src.policy.allocation import allocate, moment_nbytes, relative_error_table
  rng = np.random.default_rng(1)
  m, bs = 3000, 128
  err2 = np.tile(relative_error_table(3, 8)[[0, 1]] ** 2, (m // 2, 1))
  alloc = jax.jit(lambda pr, cap, free, cur, per_bit, fixed, fp32, budget: allocate(
      pr, cap, free, cur, err2=err2, per_bit=per_bit, fixed=fixed, fp32_bytes=fp32,
      budget_bytes=budget, min_bits=3, max_bits=8))

  def run(sizes, cap, budget, pr, free, cur):
    nb = sizes // bs  # the cost model as the policy builds it, in numpy float64
    return np.asarray(alloc(pr, cap, free, cur, nb * bs / 8.0, 4.0 * nb, 4.0 * sizes,
                            jnp.float32(budget)))

  draw = lambda rng: (rng.integers(1, 10**5, m)
                      * rng.choice([1, 10, 100, 1000], m)).astype(np.int64) * bs
  exact = lambda sizes, bits: sum(moment_nbytes(int(s), int(b), bs) for s, b in zip(sizes, bits))
  for _ in range(4):
    sizes = draw(rng)
    cap = rng.integers(3, 9, m).astype(np.int32)
    pr = rng.normal(size=m).astype(np.float32)
    full = exact(sizes, cap)
    for budget in (full - 1, full, full + 1, int(full * (1 - 1e-7))):
      used = exact(sizes, run(sizes, cap, budget, pr, np.ones(m, bool), cap))
      assert used <= budget, (budget, used - budget)
      assert used >= budget * (1 - 1e-3), (budget, budget - used)
  # Every moment frozen but a small one (transition limits): the frozen bytes'
  # float32 sum errs by far more than the free moment's levels differ, so the
  # free moment may only take what fits for certain (here, its floor). With the
  # margin on the free bytes only, the first draw went over by up to 2369 bytes.
  free = np.zeros(m, bool)
  free[0] = True
  for seed in range(3):
    rng = np.random.default_rng(seed)
    sizes = draw(rng)
    cur = rng.integers(3, 9, m).astype(np.int32)
    sizes[0], cur[0] = bs * 37, 3
    frozen = exact(sizes[1:], cur[1:])
    for bits in (4, 6, 8):  # budget one byte under the free moment at `bits`
      budget = frozen + moment_nbytes(int(sizes[0]), bits, bs) - 1
      got = run(sizes, np.full(m, 8, np.int32), budget, np.zeros(m, np.float32), free, cur)
      assert (got[1:] == cur[1:]).all()
      assert exact(sizes, got) <= budget, (seed, bits, exact(sizes, got) - budget)


def test_model_size_bits_splits_the_average_into_small_leaves_codes_and_scales():
  """``benchmarks.model_size_bits`` (where a budget's bits go as models grow): its
  parts (float32 small leaves, the first layout's code bits, one float32 scale per
  128 values) add up to :func:`stquant_jax.average_bits` of the state the policy
  builds, which stays within the target."""
  from benchmarks.model_size_bits import TARGETS, UNIFORM, measure
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  params = {"w": sds(512, 1024), "u": sds(300, 128), "b": sds(1000), "g": sds(64)}
  row = measure(params)
  total = 512 * 1024 + 300 * 128 + 1000 + 64
  quantized = (512 * 1024 + 300 * 128) / total
  assert row["small_bits"] == pytest.approx(32 * 1064 / total)
  for b in UNIFORM:  # the same split for fixed widths
    assert row["uniform"][str(b)] == pytest.approx(
        row["small_bits"] + (b + 32 / 128) * quantized, abs=0.01)
  for t in TARGETS:
    budget = row["budgets"][str(t)]
    code = (budget["mu_code_bits"] + budget["nu_code_bits"]) / 2
    assert budget["average_bits"] == pytest.approx(
        row["small_bits"] + (code + 32 / 128) * quantized, abs=0.01)
    assert budget["average_bits"] <= t
