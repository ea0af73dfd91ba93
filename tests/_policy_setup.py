"""Shared setup of the STQuantPolicy tests: a small tree of leaves whose gradients
differ in scale, zones independent of the library defaults, and cached jitted steps."""

import jax
import jax.numpy as jnp
import optax

import stquant_jax as sq


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {"big": jax.random.normal(k[0], (64, 256)) * 0.1,     # 16384 values
          "mid": jax.random.normal(k[1], (32, 256)) * 0.1,     # 8192
          "out": jax.random.normal(k[2], (64, 128)) * 0.1,     # 8192
          "bias": jnp.zeros((128,)),                           # small: float32
          "step": jnp.zeros((), jnp.int32)}                    # integer: no moments


_SCALE = {"big": 0.01, "mid": 1.0, "out": 0.1}


def _grads(params, i):
  """Leaves with gradient scales 100x apart, one with outliers; changes with i."""
  out = {}
  for j, (k, p) in enumerate(sorted(params.items())):
    if not jnp.issubdtype(p.dtype, jnp.floating):
      out[k] = jnp.zeros(p.shape, p.dtype)
      continue
    x = jax.random.normal(jax.random.fold_in(jax.random.key(i), j), p.shape)
    if k == "out":
      x = x * jnp.where(jax.random.uniform(jax.random.key(j), p.shape) < 0.01, 20.0, 1.0)
    out[k] = _SCALE.get(k, 1.0) * (x + 0.5) + 0.01 * p
  return out


# The zones these tests were written for (critical 8/8, so a leaf starts at 8 bits and
# every decision can only lower it), independent of the library's defaults.
ZONES = {"critical": (8, 8), "magnitude": (6, 8), "structure": (6, 6), "redundant": (4, 5)}


def _policy(**kw):
  kw = {"every": 2, "min_interval": 0, "anneal_steps": 0, **ZONES, **kw}
  return sq.STQuantPolicy(**kw)


_STEPS = {}


def _step_fn(tx):
  """One jitted step per transform, cached, so tests sharing a policy share compilations."""
  key = id(tx)
  if key not in _STEPS:
    @jax.jit
    def step(params, state, i):
      u, state = tx.update(_grads(params, i), state, params)
      return optax.apply_updates(params, u), state
    _STEPS[key] = (tx, step)
  return _STEPS[key][1]


_TX = {}


def _adamw(policy):
  """sq.adamw(1e-2, policy=policy), one object per policy (policies are hashable)."""
  if policy not in _TX:
    _TX[policy] = sq.adamw(1e-2, policy=policy)
  return _TX[policy]


def _loss(params):
  return sum(jnp.sum(jnp.square(p - 0.5)) for k, p in params.items() if k != "step")



def _train(tx, params, steps, relayout_every=None, start=0):
  state = tx.init(params)
  step = _step_fn(tx)
  for i in range(start, start + steps):
    params, state = step(params, state, i)
    if relayout_every and (i + 1) % relayout_every == 0:
      state = sq.relayout(state)
  return params, state
