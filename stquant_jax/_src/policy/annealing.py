"""Temporal annealing of the adaptive policy: extra bits early and while statistics move.

``tau = clip(max(exp(-t / anneal_steps), drift / instability), 0, 1)``, never
above the previous decision's tau unless re-armed, adds ``round(tau * bits)``
bits per moment. ``drift`` is how far the moments' standing relative to each
other moved since the last decision, over the moments whose bits that decision
left alone: a moment re-packed at a new width moves its own statistics (the
4-bit probe error of a 4-bit m is near 0), which is the policy's doing, not
training's (docs/policy.md, "Temporal annealing"). Pure jnp on ``[L, 2]`` arrays.

Example:
  >>> import jax.numpy as jnp
  >>> from stquant_jax._src.policy.annealing import boost, tau
  >>> t = tau(jnp.int32(100), jnp.float32(0.0), jnp.float32(1.0), anneal_steps=100,
  ...         instability=2.0, rearm=False)
  >>> round(float(t), 3), boost(t, (3, 3)).tolist()
  (0.368, [1, 1])
"""

from __future__ import annotations

import jax.numpy as jnp


def relative(x, mask):
  """``x`` (log2 factors, ``[L, 2]``) minus its mean over ``mask`` per moment column."""
  mean = jnp.sum(jnp.where(mask, x, 0.0), axis=0) / jnp.maximum(jnp.sum(mask, axis=0), 1)
  return x - mean


def drift(x_n, x_r, n_prev, r_prev, steady):
  """Mean change of the ``steady`` moments' relative log2 N and R since the last
  decision (``n_prev`` / ``r_prev``: the EMAs then); 0 when none is steady."""
  moved = (jnp.abs(relative(x_n, steady) - relative(n_prev, steady))
           + jnp.abs(relative(x_r, steady) - relative(r_prev, steady)))
  return jnp.sum(jnp.where(steady, moved, 0.0)) / jnp.maximum(jnp.sum(steady), 1)


def tau(count, drift_now, prev_tau, *, anneal_steps: int, instability: float, rearm: bool):
  """The annealing factor at step ``count``: time decay, held up by drift, capped
  at the previous decision's ``prev_tau`` unless ``rearm``."""
  t = count.astype(jnp.float32)
  decay = jnp.exp(-t / anneal_steps) if anneal_steps else jnp.float32(0)
  out = jnp.clip(jnp.maximum(decay, drift_now / instability), 0.0, 1.0)
  return out if rearm else jnp.minimum(out, prev_tau)


def boost(tau_now, bits: tuple[int, int]):
  """int32 ``[2]``: extra (m, v) bits, ``round(tau * bits)``."""
  return jnp.round(tau_now * jnp.asarray(bits, jnp.float32)).astype(jnp.int32)
