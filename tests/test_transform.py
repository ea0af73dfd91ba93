"""The optax contract for stquant_jax.adamw / adam / scale_by_stquant."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stquant_jax as sq


def _params(dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
      "w": (jax.random.normal(k1, (64, 96)) * 0.1).astype(dtype),  # 6144: quantized
      "b": jnp.zeros((96,), dtype),                                 # small: float32
      "e": (jax.random.normal(k2, (50, 100)) * 0.1).astype(dtype),  # 5000: padded block
  }


def _loss(params, x):
  f32 = lambda k: params[k].astype(jnp.float32)
  h = jnp.tanh(x @ f32("w") + f32("b"))   # [8, 96]
  y = h[:, :50] @ f32("e")                # [8, 100]
  return jnp.mean((y - 1.0) ** 2)


def _grads(params, seed=0):
  x = jax.random.normal(jax.random.key(seed), (8, 64))
  return jax.grad(_loss)(params, x)


def _run(tx, params, steps=5, jit=True):
  state = tx.init(params)
  upd = jax.jit(tx.update) if jit else tx.update
  for i in range(steps):
    u, state = upd(_grads(params, i), state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_state_layout_follows_policy():
  """Large float leaves get QuantizedArray moments at the policy's bits; small ones float32."""
  state = sq.adamw(1e-3, policy=sq.FixedBits(mu_bits=4, nu_bits=6)).init(_params())
  s = state[0]
  assert isinstance(s, sq.ScaleByStquantState)
  assert s._fields[0] == "count"
  assert isinstance(s.mu["w"], sq.QuantizedArray) and s.mu["w"].bits == 4
  assert isinstance(s.nu["w"], sq.QuantizedArray) and s.nu["w"].bits == 6
  assert s.mu["w"].signed and not s.nu["w"].signed
  assert s.mu["b"].dtype == jnp.float32 and s.mu["b"].shape == (96,)
  assert s.mu["e"].codes.shape == (-(-5000 // 128), 128 * 4 // 32)


def test_jit_matches_eager():
  """Jitted and eager updates agree up to rare one-code rounding flips (fused float math)."""
  tx = sq.adamw(1e-2)
  p1, s1 = _run(tx, _params(), jit=True)
  p2, s2 = _run(tx, _params(), jit=False)
  chex.assert_trees_all_close(p1, p2, atol=2e-3)
  for k in p1:  # typical elements agree to float rounding
    assert float(jnp.median(jnp.abs(p1[k] - p2[k]))) < 1e-6
  chex.assert_trees_all_equal_structs(s1, s2)


def test_full_precision_policy_matches_optax_adamw():
  """With every moment kept in float32, the update equals optax.adamw's to float precision."""
  pol = sq.FixedBits(mu_bits=None, nu_bits=None)
  p1, _ = _run(sq.adamw(1e-2, weight_decay=1e-3, policy=pol), _params(), steps=10)
  p2, _ = _run(optax.adamw(1e-2, weight_decay=1e-3), _params(), steps=10)
  chex.assert_trees_all_close(p1, p2, rtol=1e-4, atol=1e-5)


def test_8bit_first_steps_close_to_optax():
  """At 8 bits, the first updates differ from optax.adamw only by quantization noise."""
  p1, _ = _run(sq.adamw(1e-2), _params(), steps=3)
  p2, _ = _run(optax.adamw(1e-2), _params(), steps=3)
  for k in p1:
    assert float(jnp.max(jnp.abs(p1[k] - p2[k]))) < 3e-3, k


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_param_dtype_is_kept(dtype):
  """f32 and bf16 params keep their dtype; updates have the gradient's dtype."""
  params = _params(dtype)
  tx = sq.adamw(1e-3)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
  u, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, u)
  for k in params:
    assert u[k].dtype == dtype and new[k].dtype == dtype


def test_inject_hyperparams_identical():
  """optax.inject_hyperparams(adamw) gives the same results as adamw."""
  p1, _ = _run(sq.adamw(1e-2, b1=0.8, weight_decay=1e-3), _params())
  tx = optax.inject_hyperparams(sq.adamw)(learning_rate=1e-2, b1=0.8, weight_decay=1e-3)
  p2, s2 = _run(tx, _params())
  chex.assert_trees_all_close(p1, p2, rtol=1e-4, atol=1e-5)  # float rounding only
  assert float(s2.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_inject_hyperparams_with_static_block_size():
  """block_size is static: inject_hyperparams(static_args=...) must be told so."""
  tx = optax.inject_hyperparams(sq.adamw, static_args=("block_size",))(
      learning_rate=1e-2, block_size=64)
  _, s = _run(tx, _params(), steps=2)
  assert s.inner_state[0].mu["w"].block_size == 64


def test_learning_rate_schedule():
  """Schedules work: with a zero-then-positive schedule the first update is zero."""
  sched = lambda c: jnp.where(c < 1, 0.0, 1e-2)
  tx = sq.adamw(sched, weight_decay=0.0)
  params = _params()
  state = tx.init(params)
  u, state = tx.update(_grads(params), state, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
  u, state = tx.update(_grads(params), state, params)
  assert float(jnp.abs(u["w"]).max()) > 0.0


def test_multisteps_first_ministep_is_zero():
  """optax.MultiSteps: the first mini-step returns zero updates; the k-th applies."""
  tx = optax.MultiSteps(sq.adamw(1e-2), every_k_schedule=3)
  params = _params()
  state = tx.init(params)
  upd = jax.jit(tx.update)
  u, state = upd(_grads(params), state, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
  u, state = upd(_grads(params), state, params)
  u, state = upd(_grads(params), state, params)
  assert float(jnp.abs(u["w"]).max()) > 0.0


def test_masked():
  """optax.masked applies the quantized transform to the masked leaves only."""
  mask = {"w": True, "b": False, "e": True}
  tx = optax.masked(sq.adamw(1e-2), mask)
  params = _params()
  state = tx.init(params)
  g = _grads(params)
  u, state = jax.jit(tx.update)(g, state, params)
  chex.assert_trees_all_equal(u["b"], g["b"])  # unmasked leaves pass through
  assert not np.allclose(u["w"], g["w"])


def test_chain_with_clip_and_apply_if_finite():
  """chain(clip_by_global_norm, adamw) inside apply_if_finite trains and skips NaN steps."""
  tx = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), sq.adamw(1e-2)), 3)
  params = _params()
  state = tx.init(params)
  upd = jax.jit(tx.update)
  u, state = upd(_grads(params), state, params)
  params = optax.apply_updates(params, u)
  before = state
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _grads(params))
  u, state = upd(bad, state, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
  # The inner (quantized) state is bit-identical to the state before the bad step.
  chex.assert_trees_all_equal(before.inner_state, state.inner_state)
  assert int(state.notfinite_count) == 1


def test_nan_gradient_touches_only_its_element():
  """A NaN gradient element gives a NaN update there; no other element's state changes."""
  tx = sq.scale_by_stquant()
  params = {"w": jnp.zeros((64, 128))}
  g = jax.random.normal(jax.random.key(3), (64, 128))
  state = tx.init(params)
  _, clean = tx.update({"w": g}, state, params)
  u, dirty = tx.update({"w": g.at[5, 7].set(jnp.nan)}, state, params)
  assert bool(jnp.isnan(u["w"][5, 7]))
  assert int(jnp.isnan(u["w"]).sum()) == 1
  m_clean = sq.dequantize(clean.mu["w"])
  m_dirty = sq.dequantize(dirty.mu["w"])
  assert float(m_dirty[5, 7]) == 0.0  # documented: non-finite moments stored as zero
  mask = jnp.ones((64, 128), bool).at[5, 7].set(False)
  # The block's scale ignores the NaN, so other elements of the block are unchanged.
  chex.assert_trees_all_equal(jnp.where(mask, m_clean, 0), jnp.where(mask, m_dirty, 0))


def test_state_survives_lax_cond():
  """The state keeps shapes and dtypes through lax.cond."""
  tx = sq.adamw(1e-2)
  params = _params()
  state = tx.init(params)
  g = _grads(params)

  @jax.jit
  def step(pred, state):
    return jax.lax.cond(pred, lambda s: tx.update(g, s, params)[1], lambda s: s, state)

  out = step(True, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, state)


def test_none_and_integer_leaves():
  """None leaves stay None; integer leaves get zero updates, no moments, no decay."""
  params = {"w": jnp.ones((64, 128)), "n": None, "i": jnp.arange(5)}
  grads = {"w": jnp.ones((64, 128)), "n": None, "i": jnp.zeros(5, jnp.int32)}
  tx = sq.scale_by_stquant()
  state = tx.init(params)
  assert state.mu["n"] is None and state.mu["i"].shape == (0,)
  u, state = jax.jit(tx.update)(grads, state, params)
  assert u["n"] is None and u["i"].dtype == jnp.int32 and int(jnp.abs(u["i"]).sum()) == 0
  tx = sq.adamw(1e-2, weight_decay=0.1)
  state = tx.init(params)
  for _ in range(3):
    u, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, u)
  np.testing.assert_array_equal(params["i"], np.arange(5))


def test_adam_alias():
  """adam = scale_by_stquant + learning rate (no weight decay)."""
  params = {"w": jnp.ones((64, 128))}
  tx = sq.adam(1e-2)
  state = tx.init(params)
  u, _ = tx.update({"w": jnp.ones((64, 128))}, state, params)
  np.testing.assert_allclose(u["w"], -1e-2, rtol=1e-5)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(policy=sq.FixedBits(8, 8), block_size=100), ValueError, "block_size"),
    (dict(block_size=128.0), TypeError, "block_size"),
    (dict(b1=1.5), ValueError, "b1"),
    (dict(b2=-0.1), ValueError, "b2"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(b1="0.9"), TypeError, "b1"),
    (dict(policy="8bit"), TypeError, "policy"),
])
def test_bad_configuration_fails_at_construction(kwargs, exc, word):
  """Invalid configurations raise at construction with a message naming the argument."""
  with pytest.raises(exc, match=word):
    sq.adamw(1e-3, **kwargs)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(mu_bits=1), ValueError, "mu_bits"),
    (dict(nu_bits=9), ValueError, "nu_bits"),
    (dict(mu_bits=4.0), TypeError, "mu_bits"),
    (dict(min_size=-1), ValueError, "min_size"),
])
def test_bad_policy_fails_at_construction(kwargs, exc, word):
  with pytest.raises(exc, match=word):
    sq.FixedBits(**kwargs)
