"""Backend dispatch: the Pallas kernel path (interpret mode on CPU) matches the jnp path."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import stquant_jax as sq


def _steps(backend, bits, steps=3):
  params = {"w": jax.random.normal(jax.random.key(0), (40, 130)) * 0.1,  # 5200: padded
            "b": jnp.zeros((7,))}
  tx = sq.adamw(1e-2, policy=sq.FixedBits(bits[0], bits[1], min_size=1024), backend=backend)
  state = tx.init(params)
  upd = jax.jit(tx.update)
  for i in range(steps):
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i + 1), p.shape), params)
    u, state = upd(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


@pytest.mark.parametrize("bits", [(8, 8), (4, 5), (3, 2)])
def test_pallas_backend_matches_jnp(bits):
  """backend='pallas' (interpret on CPU) gives the jnp path's codes, scales and params."""
  p_j, s_j = _steps("jnp", bits)
  p_p, s_p = _steps("pallas", bits)
  chex.assert_trees_all_close(p_p, p_j, atol=1e-6)
  q_j, q_p = s_j[0].mu["w"], s_p[0].mu["w"]
  assert q_p.bits == bits[0]
  # Codes may differ by a one-ulp rounding flip in rare elements; scales match closely.
  assert float(jnp.mean(q_p.codes != q_j.codes)) < 1e-3
  chex.assert_trees_all_close(q_p.scales, q_j.scales, rtol=1e-5)


def test_auto_backend_is_jnp_on_cpu():
  """On CPU 'auto' takes the jnp path: results are identical to backend='jnp'."""
  p_a, _ = _steps("auto", (8, 8), steps=2)
  p_j, _ = _steps("jnp", (8, 8), steps=2)
  chex.assert_trees_all_equal(p_a, p_j)


def test_unknown_backend_is_rejected():
  with pytest.raises(ValueError, match="backend"):
    sq.adamw(1e-3, backend="cuda")
