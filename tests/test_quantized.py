"""``sq.quantized`` and its aliases: any optax transform with its parameter-shaped state quantized.

Properties checked, for optax.lion, optax.sgd(momentum=0.9), optax.rmsprop (plain
and centered with momentum), optax.adafactor, optax.contrib.muon and
optax.contrib.ademamix:

* at 8 bits, eight steps on an MLP-shaped tree (two weights of 8192 and 4096
  values, quantized; two biases, kept float32) give updates within 5% (relative
  L2 norm, per leaf and step) of the float32 transform's; measured 0.8-2.0%.
  Lion's update is a sign: at most 1% of the weights' update elements differ
  (measured 0.3%), all others are equal;
* the state holds a ``QuantizedArray`` exactly where a leaf mirrors a large
  parameter, with the signed map for momenta and the unsigned one for second
  moments, and float leaves everywhere else (Adafactor's factored rows and
  columns included);
* it runs under ``jax.jit`` and the state is smaller (8 bits: < 0.3x the
  float32 state's bytes, measured 0.27x; Adafactor, whose factored statistics stay
  float32, < 0.35x, measured 0.32x);
* with float32 "bits" (``FixedBits(None, None)``) any chain of elementwise optax
  transforms gives optax's updates bit for bit, and at 8 bits a chain of smooth ones
  (no sign or clipping) stays within the same 5% (measured at most 1.6%;
  hypothesis draws the chains);
* wrapping ``optax.scale_by_adam`` stores the codes ``sq.scale_by_stquant`` stores
  (same stochastic rounding, same counter), whole-leaf or streamed;
* the contract of optax's wrappers: bf16 params keep their dtype, the state keeps its
  type through ``lax.cond``, ``inject_hyperparams`` and ``MultiSteps`` work, and a
  ``flax.nnx.Optimizer`` (which hands quantized leaves back without their metadata)
  trains exactly as the plain optax state does, whole-leaf or streamed;
* ``elementwise=True`` (the aliases' setting) streams each leaf a chunk of blocks at a
  time and changes nothing but where XLA contracts a multiply-add: from the same state,
  a step stores the whole-leaf step's codes (>= 99.9% of code words equal, measured
  all), block scales within 1e-6 and updates within 1e-5 relative (measured at most 31
  float32 ulps, AdEMAMix, where its two momenta cancel), for Lion, SGD (Nesterov),
  RMSprop (plain, centered with momentum), AdamW with a weight-decay mask, AdEMAMix,
  a masked trace and ``inject_hyperparams``, on leaves that run the loop, a tail and a
  partial block, and on 8 devices (GSPMD, Explicit axes, a transform closing over
  traced hyperparameters); and its compiled temporaries stay under 25% of the
  parameter bytes (measured ~1%) where the whole-leaf step's exceed it (~225%);
* bad input raises errors that name it.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import stquant_jax as sq
from stquant_jax._src.transform import quantized as quantized_module

from _hlo import step_temp_bytes
from _subprocess import run_json
from test_nnx import MLP

STEPS = 8
TOL_8BIT = 0.05      # relative L2 error of each leaf's update, each step
LION_FLIPS = 0.01    # fraction of Lion's update elements that may differ


def params(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 2)
  return {"w1": (0.1 * jax.random.normal(k[0], (64, 128))).astype(dtype),
          "b1": jnp.zeros((128,), dtype),
          "w2": (0.1 * jax.random.normal(k[1], (128, 32))).astype(dtype),
          "b2": jnp.zeros((32,), dtype)}


def grads(p, t):
  return jax.tree.map(
      lambda x: jax.random.normal(jax.random.fold_in(jax.random.key(1), 10 * t + x.size % 7),
                                  x.shape, x.dtype), p)


def is_q(x):
  return isinstance(x, sq.QuantizedArray)


def quantized_leaves(state):
  """``{path: QuantizedArray}`` of a wrapper state's quantized leaves."""
  flat = jax.tree_util.tree_flatten_with_path(state.inner_state, is_leaf=is_q)[0]
  return {jax.tree_util.keystr(p): x for p, x in flat if is_q(x)}


# name -> (factory, {path of each quantized leaf: signed})
TRANSFORMS = {
    "lion": (lambda: optax.lion(1e-3),
             {"[0].mu['w1']": True, "[0].mu['w2']": True}),
    "sgd_momentum": (lambda: optax.sgd(1e-2, momentum=0.9),
                     {"[0].trace['w1']": True, "[0].trace['w2']": True}),
    "rmsprop": (lambda: optax.rmsprop(1e-3),
                {"[0].nu['w1']": False, "[0].nu['w2']": False}),
    "rmsprop_centered": (lambda: optax.rmsprop(1e-3, centered=True, momentum=0.9),
                         {"[0].mu['w1']": True, "[0].mu['w2']": True,
                          "[0].nu['w1']": False, "[0].nu['w2']": False,
                          "[2].trace['w1']": True, "[2].trace['w2']": True}),
    # w1 (64 x 128) is factored (v_row, v_col stay float32); w2 (128 x 32) is not
    # (its smaller side is under 64), so its v mirrors it and is quantized.
    "adafactor": (lambda: optax.adafactor(1e-2, min_dim_size_to_factor=64),
                  {"[0].v['w2']": False}),
    "muon": (lambda: optax.contrib.muon(1e-3),
             {".inner_states['muon'].inner_state[0].mu['w1']": True,
              ".inner_states['muon'].inner_state[0].mu['w2']": True}),
    "ademamix": (lambda: optax.contrib.ademamix(1e-3),
                 {f"[0].{m}['{w}']": m != "nu" for m in ("m1", "m2", "nu")
                  for w in ("w1", "w2")}),
}


def run_both(make, policy, steps=STEPS):
  """The float32 transform and its wrapped twin on the same gradients and params
  (the float32 run's); returns both updates of every step and both final states."""
  tf, tq = make(), sq.quantized(make(), policy=policy)
  p = params()
  sf, sqs = tf.init(p), tq.init(p)
  uf, uq = jax.jit(tf.update), jax.jit(tq.update)
  pairs = []
  for t in range(steps):
    g = grads(p, t)
    a, sf = uf(g, sf, p)
    b, sqs = uq(g, sqs, p)
    pairs.append((a, b))
    p = optax.apply_updates(p, a)
  return pairs, sf, sqs


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_8bit_tracks_the_float32_transform(name):
  make, _ = TRANSFORMS[name]
  pairs, _, _ = run_both(make, sq.FixedBits(8, 8))
  for t, (a, b) in enumerate(pairs):
    for k in a:
      assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape
      if name == "lion":
        differ = float(jnp.mean(a[k] != b[k]))
        assert differ <= LION_FLIPS, (t, k, differ)
      else:
        rel = float(jnp.linalg.norm(a[k] - b[k]) / jnp.linalg.norm(a[k]))
        assert rel <= TOL_8BIT, (t, k, rel)
    # The biases' state stays float32 and every step sees the same params: their
    # updates depend on nothing quantized.
    for k in ("b1", "b2"):
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_state_holds_codes_exactly_where_a_leaf_mirrors_a_large_param(name):
  make, expected = TRANSFORMS[name]
  p = params()
  state = sq.quantized(make(), policy=sq.FixedBits(8, 4)).init(p)
  found = quantized_leaves(state)
  assert {k: q.signed for k, q in found.items()} == expected
  for q in found.values():   # signed leaves take mu_bits, unsigned ones nu_bits
    assert q.bits == (8 if q.signed else 4)
  # Everything else is the float transform's own leaf, unchanged.
  ref = jax.tree_util.tree_flatten_with_path(make().init(p))[0]
  ours = jax.tree_util.tree_flatten_with_path(state.inner_state, is_leaf=is_q)[0]
  assert len(ref) == len(ours)
  for (path, r), (_, o) in zip(ref, ours):
    if jax.tree_util.keystr(path) in expected:
      assert o.shape == r.shape and o.dtype == r.dtype
    else:
      assert not is_q(o) and o.shape == r.shape and o.dtype == r.dtype
      np.testing.assert_array_equal(np.asarray(o), np.asarray(r))


def test_adafactor_factored_statistics_stay_float():
  p = params()
  state = sq.quantized(optax.adafactor(1e-2, min_dim_size_to_factor=64)).init(p)
  fs = state.inner_state[0]
  assert fs.v_row["w1"].shape == (64,) and fs.v_col["w1"].shape == (128,)
  assert not is_q(fs.v_row["w1"]) and not is_q(fs.v_col["w1"]) and not is_q(fs.v["w1"])
  assert is_q(fs.v["w2"]) and not fs.v["w2"].signed


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_jit_and_state_bytes(name):
  make, _ = TRANSFORMS[name]
  _, sf, sqs = run_both(make, sq.FixedBits(8, 8), steps=2)
  # The structure, shapes and dtypes survive the steps (the wrapper's count included).
  p = params()
  init = sq.quantized(make(), policy=sq.FixedBits(8, 8)).init(p)
  assert jax.tree.structure(init) == jax.tree.structure(sqs)
  for x, y in zip(jax.tree.leaves(init), jax.tree.leaves(sqs)):
    assert x.shape == y.shape and x.dtype == y.dtype
  assert int(sqs.count) == 2
  # Each quantized leaf: 1 byte per value plus a float32 scale per 128 (0.258x its
  # float32 bytes); the whole state: < 0.3x (Adafactor < 0.35x: its factored
  # statistics stay float32), measured 0.27x (Adafactor 0.32x).
  for q in quantized_leaves(sqs).values():
    assert q.nbytes <= 0.26 * 4 * q.size
  ratio = sq.state_nbytes(sqs) / sq.state_nbytes(sf)
  assert ratio < (0.35 if name == "adafactor" else 0.3), ratio


ELEMENTWISE = [
    lambda: optax.scale_by_adam(),
    lambda: optax.scale_by_rms(decay=0.95),
    lambda: optax.trace(decay=0.9, nesterov=True),
    lambda: optax.scale_by_belief(),
    lambda: optax.scale_by_rss(),
    lambda: optax.scale_by_amsgrad(),
    lambda: optax.scale_by_adan(),
    lambda: optax.add_decayed_weights(1e-2),
    lambda: optax.scale_by_learning_rate(optax.linear_schedule(1e-2, 1e-3, 5)),
    lambda: optax.scale_by_lion(),   # sign updates: exact at float32 only
    lambda: optax.clip(0.5),         # ditto
]
SMOOTH = len(ELEMENTWISE) - 2


@settings(max_examples=12, deadline=None)
@given(st.lists(st.sampled_from(range(len(ELEMENTWISE))), min_size=1, max_size=4))
def test_float32_bits_give_optaxs_updates_exactly(picks):
  make = lambda: optax.chain(*(ELEMENTWISE[i]() for i in picks))
  pairs, _, sqs = run_both(make, sq.FixedBits(None, None), steps=3)
  assert not quantized_leaves(sqs)
  for a, b in pairs:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@settings(max_examples=6, deadline=None)
@given(st.lists(st.sampled_from(range(SMOOTH)), min_size=1, max_size=3))
def test_8bit_chains_track_optax(picks):
  # Measured on 14 random chains over 4 steps: at most 1.6% (relative L2 per leaf).
  make = lambda: optax.chain(*(ELEMENTWISE[i]() for i in picks))
  pairs, _, sqs = run_both(make, sq.FixedBits(8, 8), steps=4)
  assert quantized_leaves(sqs) or all(i in (7, 8) for i in picks)   # stateless chains
  for a, b in pairs:
    for k in a:
      rel = float(jnp.linalg.norm(a[k] - b[k]) / jnp.linalg.norm(a[k]))
      assert rel <= TOL_8BIT, (picks, k, rel)


@pytest.mark.parametrize("elementwise", [False, True])
def test_adam_wrapped_stores_scale_by_stquants_codes(elementwise):
  # dequantize -> optax's Adam moments -> requantize with the same counter hash, whole
  # or streamed: the codes are those of the fused-update transform (measured: all). The block
  # scales differ by ~1e-5 relative: stquant rounds b1, b2 to float32 before 1 - b,
  # optax subtracts in Python double (see test_optax_api.assert_same).
  p = params()
  policy = sq.FixedBits(8, 4)
  ta = sq.scale_by_stquant(policy=policy, backend="jnp")
  tq = sq.quantized(optax.scale_by_adam(), policy=policy, elementwise=elementwise)
  sa, sw = ta.init(p), tq.init(p)
  for t in range(4):
    g = grads(p, t)
    _, sa = jax.jit(ta.update)(g, sa, p)
    _, sw = jax.jit(tq.update)(g, sw, p)
  for moment in ("mu", "nu"):
    for k in ("w1", "w2"):
      a, b = getattr(sa, moment)[k], getattr(sw.inner_state, moment)[k]
      assert a.code_map == b.code_map
      assert float(jnp.mean(a.codes == b.codes)) >= 0.999, (moment, k)
      np.testing.assert_allclose(np.asarray(a.scales), np.asarray(b.scales), rtol=5e-5)


def test_signed_override():
  p = params()
  rule = sq.quantized(optax.scale_by_rss()).init(p)
  assert quantized_leaves(rule)[".sum_of_squares['w1']"].signed is False
  forced = sq.quantized(optax.scale_by_rss(), signed=True).init(p)
  assert quantized_leaves(forced)[".sum_of_squares['w1']"].signed is True
  by_path = sq.quantized(optax.scale_by_adam(),
                         signed=lambda path, leaf: True if "w2" in path else None).init(p)
  got = {k: q.signed for k, q in quantized_leaves(by_path).items()}
  assert got == {".mu['w1']": True, ".mu['w2']": True, ".nu['w1']": False,
                 ".nu['w2']": True}


def test_params_of_any_tree():
  # A bare array, and a list of dicts: the state leaves that mirror them are found by
  # their key path and shape.
  w = jnp.ones((64, 128))
  state = sq.quantized(optax.adam(1e-3)).init(w)
  assert {k: q.signed for k, q in quantized_leaves(state).items()} == {
      "[0].mu": True, "[0].nu": False}
  tree = [{"w": w, "b": jnp.ones((128,))}, {"w": jnp.ones((128, 64))}]
  state = sq.quantized(optax.sgd(1e-2, momentum=0.9)).init(tree)
  assert set(quantized_leaves(state)) == {"[0].trace[0]['w']", "[0].trace[1]['w']"}
  u, _ = jax.jit(sq.quantized(optax.sgd(1e-2, momentum=0.9)).update)(tree, state, tree)
  assert jax.tree.structure(u) == jax.tree.structure(tree)


def test_bf16_params_keep_their_dtype():
  p = params(jnp.bfloat16)
  tx = sq.lion(1e-3)
  state = tx.init(p)
  u, new = jax.jit(tx.update)(grads(p, 0), state, p)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert state.inner_state[0].mu["w1"].dtype == jnp.bfloat16
  assert jax.tree.structure(new) == jax.tree.structure(state)


def test_state_passes_through_lax_cond():
  # init and update build the same static metadata (map, block size, shape, dtype),
  # so both branches of a cond agree on the state's type.
  p = params()
  tx = sq.ademamix(1e-3)
  state = tx.init(p)
  step = lambda s: tx.update(grads(p, 0), s, p)[1]
  for pred in (True, False):
    out = jax.jit(lambda s: jax.lax.cond(pred, step, lambda s: s, s))(state)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    assert int(out.count) == int(pred)


@pytest.mark.parametrize("elementwise", [False, True])
def test_nnx_optimizer_matches_the_plain_optax_run(monkeypatch, elementwise):
  # nnx.Optimizer hands quantized leaves back as {codes, scales} without their
  # metadata; update rebuilds them from the plan of the abstract initial state.
  loss = lambda model, x: jnp.mean((model(x) - 1.0) ** 2)
  make = lambda: sq.quantized(optax.contrib.ademamix(1e-3), elementwise=elementwise)
  model = MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, make(), wrt=nnx.Param)
  graphdef, p = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
  tx = make()
  state = tx.init(p)
  rebuilt = []
  orig = quantized_module.typed_leaves
  monkeypatch.setattr(quantized_module, "typed_leaves",
                      lambda *a: rebuilt.append(1) or orig(*a))

  @nnx.jit
  def nnx_step(model, opt, x):
    opt.update(model, nnx.grad(loss)(model, x))

  @jax.jit
  def plain_step(p, state, x):
    u, state = tx.update(jax.grad(lambda q: loss(nnx.merge(graphdef, q), x))(p), state, p)
    return optax.apply_updates(p, u), state

  for i in range(3):
    x = jax.random.normal(jax.random.key(i), (8, 64))
    nnx_step(model, opt, x)
    p, state = plain_step(p, state, x)
  assert rebuilt   # the {codes, scales} path ran
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(p)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrappers_inject_hyperparams_and_multisteps():
  # inject_hyperparams outside the wrapper or inside it: the same codes (the same
  # plan and counter), whatever the nesting.
  p = params()
  outside = optax.inject_hyperparams(sq.lion)(learning_rate=1e-3, b1=0.8)
  inside = sq.quantized(optax.inject_hyperparams(optax.lion)(learning_rate=1e-3, b1=0.8))
  so, si = outside.init(p), inside.init(p)
  for t in range(3):
    uo, so = jax.jit(outside.update)(grads(p, t), so, p)
    ui, si = jax.jit(inside.update)(grads(p, t), si, p)
    for x, y in zip(jax.tree.leaves(uo), jax.tree.leaves(ui)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert float(so.hyperparams["b1"]) == pytest.approx(0.8)
  np.testing.assert_array_equal(np.asarray(so.inner_state.inner_state[0].mu["w1"].codes),
                                np.asarray(si.inner_state.inner_state[0].mu["w1"].codes))
  ms = optax.MultiSteps(sq.sgd(1e-2, momentum=0.9), every_k_schedule=2)
  state = ms.init(p)
  u, state = jax.jit(ms.update)(grads(p, 0), state, p)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  u, state = jax.jit(ms.update)(grads(p, 1), state, p)
  assert float(jnp.abs(u["w1"]).max()) > 0


def test_schedules_and_masked():
  p = params()
  tx = sq.lion(lambda c: jnp.where(c < 1, 0.0, 1e-3))   # zero, then 1e-3
  state = tx.init(p)
  u, state = tx.update(grads(p, 0), state, p)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
  u, state = tx.update(grads(p, 1), state, p)
  assert float(jnp.abs(u["w1"]).max()) > 0.0
  # optax.masked hands the wrapper a tree with MaskedNode leaves: only the unmasked
  # weight gets a (quantized) moment.
  mask = {"w1": True, "b1": True, "w2": False, "b2": False}
  tx = optax.masked(sq.sgd(1e-2, momentum=0.9), mask)
  state = tx.init(p)
  assert set(quantized_leaves(state.inner_state)) == {"[0].trace['w1']"}
  u, state = jax.jit(tx.update)(grads(p, 0), state, p)
  np.testing.assert_array_equal(np.asarray(u["w2"]), np.asarray(grads(p, 0)["w2"]))


@pytest.mark.parametrize("name, theirs", [("lion", optax.lion), ("sgd", optax.sgd),
                                          ("rmsprop", optax.rmsprop),
                                          ("ademamix", optax.contrib.ademamix)])
def test_alias_signatures_start_with_optaxs(name, theirs):
  ours = inspect.signature(getattr(sq, name)).parameters
  theirs = inspect.signature(theirs).parameters
  assert list(ours)[:len(theirs)] == list(theirs)
  for n in theirs:
    assert ours[n].default == theirs[n].default, n
  for n in ("policy", "block_size", "rounding"):
    assert ours[n].kind is ours[n].KEYWORD_ONLY, n


@pytest.mark.parametrize("name, make", [
    ("lion", lambda: optax.lion(1e-3)), ("sgd", lambda: optax.sgd(1e-2, 0.9)),
    ("rmsprop", lambda: optax.rmsprop(1e-3)),
    ("ademamix", lambda: optax.contrib.ademamix(1e-3))])
def test_alias_is_the_wrapped_optax_transform(name, make):
  alias = {"lion": lambda: sq.lion(1e-3), "sgd": lambda: sq.sgd(1e-2, 0.9),
           "rmsprop": lambda: sq.rmsprop(1e-3),
           "ademamix": lambda: sq.ademamix(1e-3)}[name]()
  wrapped = sq.quantized(make(), elementwise=True)
  p = params()
  sa, sw = alias.init(p), wrapped.init(p)
  for t in range(2):
    a, sa = alias.update(grads(p, t), sa, p)
    b, sw = wrapped.update(grads(p, t), sw, p)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("make", [lambda: optax.sgd(1e-2, momentum=0.9),
                                  lambda: optax.adam(1e-3)])
def test_a_nan_gradient_restarts_its_element_only(make):
  # optax's state keeps the NaN forever; the quantized state stores it as zero (block
  # scales ignore it), so the next step is finite everywhere.
  p = params()
  tx, ref = sq.quantized(make()), make()
  s, r = tx.init(p), ref.init(p)
  g = grads(p, 0)
  g["w1"] = g["w1"].at[0, 0].set(jnp.nan)
  u, s = tx.update(g, s, p)
  v, r = ref.update(g, r, p)
  assert bool(jnp.isnan(u["w1"][0, 0])) and int(jnp.isnan(u["w1"]).sum()) == 1
  u, s = tx.update(grads(p, 1), s, p)
  v, r = ref.update(grads(p, 1), r, p)
  assert bool(jnp.isnan(v["w1"][0, 0])) and bool(jnp.isfinite(u["w1"]).all())
  rel = jnp.linalg.norm(u["w1"][1:] - v["w1"][1:]) / jnp.linalg.norm(v["w1"][1:])
  assert float(rel) <= TOL_8BIT


def big_params():
  """Leaves that stream through the loop: 150,000 values (the loop and a tail), 70,000
  (a partial last block), and two kept float32 or whole (a bias, a small weight)."""
  k = jax.random.split(jax.random.key(2), 3)
  return {"w": 0.1 * jax.random.normal(k[0], (300, 500)), "b": jnp.zeros((100,)),
          "v": jax.random.normal(k[1], (70000,)),
          "w2": 0.1 * jax.random.normal(k[2], (128, 32))}


STREAMED = {
    "lion": lambda: optax.lion(1e-3),
    "sgd_nesterov": lambda: optax.sgd(1e-2, 0.9, nesterov=True),
    "rmsprop": lambda: optax.rmsprop(1e-3),
    "rmsprop_centered": lambda: optax.rmsprop(1e-3, centered=True, momentum=0.9),
    "adamw_masked": lambda: optax.adamw(
        1e-3, mask=lambda t: jax.tree.map(lambda x: x.ndim > 1, t)),
    "ademamix": lambda: optax.contrib.ademamix(1e-3),
    "masked_trace": lambda: optax.masked(optax.trace(0.9),
                                         {"w": True, "b": True, "v": False, "w2": True}),
    "inject_lion": lambda: optax.inject_hyperparams(optax.lion)(1e-3, b1=0.8),
}


@pytest.mark.parametrize("name", list(STREAMED))
def test_streamed_step_stores_the_whole_leaf_steps_codes(name):
  p = big_params()
  policy = sq.FixedBits(8, 4)
  whole = sq.quantized(STREAMED[name](), policy=policy)
  streamed = sq.quantized(STREAMED[name](), policy=policy, elementwise=True)
  state = whole.init(p)
  fw, fs = jax.jit(whole.update), jax.jit(streamed.update)
  for t in range(3):   # each step from the same state: the whole-leaf step's
    uw, sw = fw(grads(p, t), state, p)
    us, ss = fs(grads(p, t), state, p)
    assert jax.tree.structure(sw) == jax.tree.structure(ss)
    for a, b in zip(jax.tree.leaves(uw), jax.tree.leaves(us)):
      assert a.dtype == b.dtype
      a, b = np.asarray(a), np.asarray(b)
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7 * np.abs(a).max())
    for a, b in zip(jax.tree.leaves(sw), jax.tree.leaves(ss)):
      assert a.dtype == b.dtype and a.shape == b.shape
      if a.dtype == jnp.uint32:   # code words
        assert float(jnp.mean(a == b)) >= 0.999, name
      else:
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
    state = sw


def test_streamed_update_takes_inners_dtype():
  # bf16 gradients, float32 momentum: Lion's update is float32, so it is streamed into
  # its own buffer (not over the gradient's), as the whole-leaf step returns it.
  p = {"w": (0.1 * jax.random.normal(jax.random.key(3), (300, 500))).astype(jnp.bfloat16)}
  make = lambda ew: sq.quantized(optax.lion(1e-3, mu_dtype=jnp.float32), elementwise=ew)
  state = make(False).init(p)
  uw, sw = jax.jit(make(False).update)(grads(p, 0), state, p)
  us, ss = jax.jit(make(True).update)(grads(p, 0), state, p)
  assert uw["w"].dtype == us["w"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(uw["w"]), np.asarray(us["w"]))
  assert float(jnp.mean(sw.inner_state[0].mu["w"].codes == ss.inner_state[0].mu["w"].codes)) >= 0.999


def _step_temp_bytes(tx, shape):
  return step_temp_bytes(tx, {"w": jax.ShapeDtypeStruct(shape, jnp.float32)})


@pytest.mark.parametrize("make", [lambda: optax.lion(1e-3),
                                  lambda: optax.contrib.ademamix(1e-3)])
def test_streamed_step_temporaries_are_not_leaf_sized(make):
  # Compiled only. One 2048 x 1024 leaf (8 MB): streamed, a few chunk buffers (measured
  # ~1% of the parameter bytes); dequantized whole, each moment's float copies (~225%
  # Lion, ~450% AdEMAMix).
  shape = (2048, 1024)
  param_bytes = 4 * shape[0] * shape[1]
  streamed = _step_temp_bytes(sq.quantized(make(), elementwise=True), shape)
  whole = _step_temp_bytes(sq.quantized(make()), shape)
  assert streamed < 0.25 * param_bytes, (streamed, param_bytes)
  assert whole > 0.25 * param_bytes, (whole, param_bytes)


_EIGHT_DEVICES = r"""
import json
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import stquant_jax as sq
p = {"w": 0.1 * jax.random.normal(jax.random.key(0), (512, 256)), "b": jnp.zeros((256,))}
g = jax.tree.map(lambda x: jnp.cos(3 * x + 1), p)
inject = lambda ew: optax.inject_hyperparams(
    lambda learning_rate: sq.quantized(optax.lion(learning_rate), elementwise=ew))(
        learning_rate=1e-3)
out = {}
for mesh in ("none", "Auto", "Explicit"):
  pp = p
  if mesh != "none":
    m = jax.make_mesh((8,), ("d",), axis_types=(getattr(AxisType, mesh),))
    pp = jax.device_put(p, {"w": NamedSharding(m, P("d")), "b": NamedSharding(m, P())})
  for name, make in (("lion", lambda ew: sq.quantized(optax.lion(1e-3), elementwise=ew)),
                     ("inject_outside", inject)):
    res = []
    for ew in (False, True):
      tx = make(ew)
      u, s = jax.jit(tx.update)(g, tx.init(pp), pp)
      res.append((np.asarray(u["w"]), np.asarray(s.inner_state.inner_state[0].mu["w"].codes
                  if name != "lion" else s.inner_state[0].mu["w"].codes)))
    out[f"{mesh}/{name}"] = [float(np.abs(res[0][0] - res[1][0]).max()),
                             float(np.mean(res[0][1] == res[1][1]))]
print("RESULT" + json.dumps(out))
"""


def test_streamed_step_on_eight_devices():
  # Under GSPMD each device streams its own blocks (custom_partitioning), under Explicit
  # axes inside shard_map; a transform that closes over traced values (inject_hyperparams
  # outside the wrapper) streams the global arrays under GSPMD, which a per-device call
  # cannot take. Every way: the whole-leaf step's update and codes.
  out = run_json(_EIGHT_DEVICES)
  assert len(out) == 6
  for case, (du, codes) in out.items():
    assert du <= 1e-9 and codes >= 0.999, (case, du, codes)


def test_elementwise_refuses_a_state_that_is_not():
  # Adafactor keeps a (1,) placeholder in v['w1'] (w1 is factored) beside w2's
  # quantized v: the state is not elementwise in the parameters.
  tx = sq.quantized(optax.adafactor(1e-2, min_dim_size_to_factor=64), elementwise=True)
  p = params()
  with pytest.raises(ValueError, match=r"\.v\['w1'\] does not mirror its parameter"):
    tx.update(grads(p, 0), tx.init(p), p)


def test_bad_input_raises_clear_errors():
  with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
    sq.quantized(lambda g: g)
  with pytest.raises(TypeError, match="FixedBits policies only"):
    sq.quantized(optax.lion(1e-3), policy=sq.STQuantPolicy())
  with pytest.raises(ValueError, match="block_size=100"):
    sq.quantized(optax.lion(1e-3), block_size=100)
  with pytest.raises(TypeError, match="signed must be"):
    sq.quantized(optax.lion(1e-3), signed="yes")
  with pytest.raises(ValueError, match="rounding"):
    sq.quantized(optax.lion(1e-3), rounding="up")
  with pytest.raises(TypeError, match="returned 'no'"):
    sq.quantized(optax.lion(1e-3), signed=lambda path, leaf: "no").init(params())
  with pytest.raises(TypeError, match="expects the QuantizedState"):
    sq.quantized(optax.lion(1e-3)).update(grads(params(), 0), optax.lion(1e-3).init(params()))
  with pytest.raises(TypeError, match="policy is keyword-only"):
    sq.lion(1e-3, sq.FixedBits(4, 4))
