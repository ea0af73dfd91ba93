"""``adam`` / ``adamw`` take optax's arguments the way optax does.

optax 0.2.8: ``adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, *, nesterov)`` and
``adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, *,
nesterov)``. With float32 moments (``FixedBits(None, None)``) stquant's update is
optax's, so each argument is checked by comparing updates with optax's, positionally
and by keyword. Also: Nesterov, ``mu_dtype``, Python scalar leaves, and what
``inject_hyperparams`` needs (the README states it).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import stquant_jax as sq

F32 = sq.FixedBits(None, None)  # float32 moments: the update is optax's


def params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w": jax.random.normal(k[0], (64, 32)), "b": jax.random.normal(k[1], (32,))}


def run(tx, steps=4):
  p = params()
  state = tx.init(p)
  upd = jax.jit(tx.update)
  out = []
  for i in range(steps):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i + 1), x.shape), p)
    u, state = upd(g, state, p)
    p = optax.apply_updates(p, u)
    out.append(u)
  return p, out


def assert_same(a, b, rtol=2e-5):
  # stquant rounds hyperparameters to float32 before ``1 - b2`` (so Python and traced
  # values give the same bits); optax subtracts in Python double: with b2 = 0.999 the
  # updates differ by ~7e-6 relative (a float32 ulp of 1 - b2), nothing more.
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-8)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_signature_starts_with_optaxs(name):
  ours = inspect.signature(getattr(sq, name)).parameters
  theirs = inspect.signature(getattr(optax, name)).parameters
  positional = [n for n, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
  assert list(ours)[:len(positional)] == positional
  for n in positional[1:]:
    assert ours[n].default == theirs[n].default, n
    assert ours[n].kind is ours[n].POSITIONAL_OR_KEYWORD
  for n in ("nesterov", "policy", "block_size", "mu_map", "nu_map", "backend"):
    assert ours[n].kind is ours[n].KEYWORD_ONLY, n


def test_positional_arguments_mean_what_they_mean_in_optax():
  args = (3e-3, 0.8, 0.99, 1e-6, 1e-9, None, 0.05)  # ..., mu_dtype, weight_decay
  _, ours = run(sq.adamw(*args, policy=F32))
  _, theirs = run(optax.adamw(*args))
  assert_same(ours, theirs)
  _, ours = run(sq.adam(*args[:6], policy=F32))
  _, theirs = run(optax.adam(*args[:6]))
  assert_same(ours, theirs)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_a_positional_policy_says_policy_is_keyword_only(name):
  """Was "b1 must be a number, got FixedBits"."""
  with pytest.raises(TypeError, match=r"b1 got a FixedBits: policy is keyword-only, pass "
                                      r"policy=FixedBits\(\.\.\.\)"):
    getattr(sq, name)(1e-3, sq.FixedBits(4, 4))
  with pytest.raises(TypeError, match="mu_dtype got a STQuantPolicy: policy is keyword-only"):
    getattr(sq, name)(1e-3, 0.9, 0.999, 1e-8, 0.0, sq.STQuantPolicy())


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_nesterov_is_optaxs(name):
  """Nesterov momentum on the fresh float32 m: optax's formula."""
  _, ours = run(getattr(sq, name)(1e-2, nesterov=True, policy=F32))
  _, theirs = run(getattr(optax, name)(1e-2, nesterov=True))
  assert_same(ours, theirs)
  _, plain = run(getattr(sq, name)(1e-2, policy=F32))
  assert not np.allclose(np.asarray(ours[-1]["w"]), np.asarray(plain[-1]["w"]))


def test_nesterov_with_quantized_moments_and_the_kernel_backend():
  """Quantized moments: close to optax's Nesterov (8-bit codes); backend="pallas" runs
  the jnp path for it (the fused kernel has no Nesterov form) with the same result."""
  ref, _ = run(optax.adam(1e-2, nesterov=True))
  got, _ = run(sq.adam(1e-2, nesterov=True, policy=sq.FixedBits(8, 8, min_size=0)))
  pal, _ = run(sq.adam(1e-2, nesterov=True, policy=sq.FixedBits(8, 8, min_size=0),
                       backend="pallas"))
  assert_same(got, pal, rtol=0)
  assert float(jnp.max(jnp.abs(got["w"] - ref["w"]))) < 2e-3


def test_mu_dtype():
  for ok in (None, jnp.float32, "float32"):
    sq.adamw(1e-3, mu_dtype=ok)
  with pytest.raises(ValueError, match="mu_dtype=bfloat16 is not supported.*FixedBits"):
    sq.adamw(1e-3, mu_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="mu_dtype=bfloat16"):
    sq.adam(1e-3, 0.9, 0.999, 1e-8, 0.0, jnp.bfloat16)
  with pytest.raises(TypeError, match="nesterov must be a bool"):
    sq.adam(1e-3, nesterov="yes")


def test_python_scalar_leaves_work_as_in_optax():
  """``{"n": 3, "x": 2.0}`` leaves: optax treats them as arrays; so do we: the float
  scalar gets optax's update, the int one zero."""
  p = {"n": 3, "x": 2.0, "w": jnp.ones((8, 8))}
  g = {"n": 0, "x": 0.5, "w": jnp.ones((8, 8))}
  for ours, theirs in ((sq.adamw(1e-2, policy=F32), optax.adamw(1e-2)),
                       (sq.adam(1e-2), optax.adam(1e-2))):
    u, _ = ours.update(g, ours.init(p), p)
    v, _ = theirs.update(g, theirs.init(p), p)
    np.testing.assert_allclose(float(u["x"]), float(v["x"]), rtol=2e-5)  # see assert_same
    assert int(u["n"]) == 0
  assert sq.bit_widths(sq.adamw(1e-3).init(p))["mu_bits"] == {"w": 32, "x": 32}


def test_inject_hyperparams_needs_static_block_size_only_for_traced_init():
  """What the README says: inject_hyperparams passes block_size (even its default) as a
  traced number; the update reads the block size from the state so it needs nothing,
  but an init under jit / eval_shape needs static_args=("block_size",)."""
  p = {"w": jnp.ones((128, 64))}  # quantized (>= 4096 values)
  tx = optax.inject_hyperparams(sq.adamw)(learning_rate=1e-3)
  state = tx.init(p)                                   # eager init: fine
  jax.jit(tx.update)(p, state, p)                      # traced update: fine
  with pytest.raises(TypeError, match=r"static_args=\('block_size',\)"):
    jax.eval_shape(tx.init, p)
  static = optax.inject_hyperparams(sq.adamw, static_args=("block_size",))(learning_rate=1e-3)
  abstract = jax.eval_shape(static.init, p)
  assert abstract.inner_state[0].mu["w"].codes.shape == state.inner_state[0].mu["w"].codes.shape
