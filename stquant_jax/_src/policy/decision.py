"""The jitted decision of :class:`~stquant_jax.STQuantPolicy`: its state and one decision.

:class:`STQuantPolicyState` is what the policy carries in the optimizer state;
:func:`decide` is the step from accumulated statistics to proposed bits (score
factors as EMAs, zones with hysteresis, annealing, the budget's allocation,
transition limits), run inside ``jit`` every ``every`` steps. The policy's
configuration, validation and static first layout are in
:mod:`stquant_jax._src.policy.stquant`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.policy import annealing
from stquant_jax._src.policy.allocation import allocate, relative_error_table
from stquant_jax._src.policy.scores import factor_values
from stquant_jax._src.state.opt_state import FLOAT32

NEVER = -(2**30)  # "last change" of a moment that never changed


class STQuantPolicyState(NamedTuple):
  """Policy state of :class:`STQuantPolicy`; rows follow ``jax.tree.leaves(params)``,
  columns are (m, v). Bits codes: 2..8 quantized, 32 float32, 0 no moment."""

  n_ema: jax.Array        # float32 [L, 2]: EMA of log2 magnitude factor N
  r_ema: jax.Array        # float32 [L, 2]: EMA of log2 structure factor R
  zone: jax.Array         # int32 [L, 2]: index into ZONES
  proposed: jax.Array     # int32 [L, 2]: bits the policy wants
  actual: jax.Array       # int32 [L, 2]: bits of the layout the last step ran with
  last_change: jax.Array  # int32 [L, 2]: step at which `proposed` last changed
  changes: jax.Array      # int32 [L, 2]: number of changes of `proposed`
  decisions: jax.Array    # int32 []: decisions taken so far
  anneal: jax.Array       # float32 []: annealing factor tau of the last decision
  acc: jax.Array          # float32 [L, S]: statistics accumulated since the last decision
                          # (the S sums the factors read, in SUMS order; local to the device)



def decide(p, st: STQuantPolicyState, sums, count, adaptive, sizes, blocks, fixed_bytes,
           values) -> STQuantPolicyState:
  """One decision of :class:`~stquant_jax.STQuantPolicy` ``p`` (steps 1-5 of its module
  doc), inside ``jit``: the new policy state from the old one and the statistics
  ``sums`` (``[L, NUM_SUMS]``, already reduced over devices) at step ``count``.

  ``adaptive`` (bool ``[L]``), ``sizes`` and ``blocks`` (values and block size per
  leaf) are static; ``fixed_bytes`` and ``values`` are the budget's bytes outside the
  moments and its number of moment values. Only small operands: no moment is read.
  """
  ad = jnp.asarray(np.repeat(adaptive[:, None], 2, axis=1))
  tiny = jnp.float32(1e-30)
  x_n = jnp.stack([factor_values(sums, p.mu_factors[0], 0),
                   factor_values(sums, p.nu_factors[0], 1)], axis=1)
  x_r = jnp.stack([factor_values(sums, p.mu_factors[1], 0),
                   factor_values(sums, p.nu_factors[1], 1)], axis=1)
  # Degenerate statistics (an all-zero moment: a LoRA factor whose partner is still
  # zero, an unused branch) carry no information: such a moment keeps its zone and
  # bits and stays out of the geometric mean, so it cannot move the others' zones.
  # A zero structure factor is legitimate (a constant block quantizes exactly); it
  # is floored at 2**-24 so that its log stays finite and cannot dominate the mean.
  live = ad & (x_n > tiny)
  x_n = jnp.where(live, jnp.log2(jnp.maximum(x_n, tiny)), 0.0)
  x_r = jnp.where(live, jnp.log2(jnp.maximum(x_r, jnp.float32(2.0**-24))), 0.0)
  # EMAs start at a moment's first live decision (both log2 EMAs exactly 0 means
  # "never live": a live moment has them at log2 of its factors).
  first = (st.decisions == 0) | ((st.n_ema == 0) & (st.r_ema == 0))
  b = jnp.float32(p.ema)
  n_ema = jnp.where(first, x_n, b * st.n_ema + (1 - b) * x_n)
  r_ema = jnp.where(first, x_r, b * st.r_ema + (1 - b) * x_r)

  since = count - st.last_change
  # Drift over the moments the last decision did not re-pack (annealing.py).
  steady = live & ~first & (since > p.every)
  drift = annealing.drift(x_n, x_r, st.n_ema, st.r_ema, steady)
  # log2 of the factors relative to the geometric mean of the live moments
  n_rel, r_rel = annealing.relative(n_ema, live), annealing.relative(r_ema, live)
  z = st.zone
  n_was_hi, r_was_hi = z < 2, (z % 2) == 0
  lg = lambda t: jnp.float32(math.log2(t))
  n_hi = jnp.where(n_was_hi, n_rel >= lg(p.n_thresholds[0]), n_rel > lg(p.n_thresholds[1]))
  r_hi = jnp.where(r_was_hi, r_rel >= lg(p.r_thresholds[0]), r_rel > lg(p.r_thresholds[1]))
  zone = jnp.where(live, 2 * (~n_hi).astype(jnp.int32) + (~r_hi).astype(jnp.int32), z)

  tau = annealing.tau(count, drift, st.anneal, anneal_steps=p.anneal_steps,
                      instability=p.instability, rearm=p.rearm)
  boost = annealing.boost(tau, p._boosts)  # [2]
  table = jnp.asarray(p.zone_table())
  zb = table[zone, jnp.arange(2)[None, :]]
  desired = jnp.where(zb == FLOAT32, FLOAT32, jnp.minimum(zb + boost, p.max_bits))

  free = live & (since >= p.min_interval)
  if p.max_changes is not None:
    free = free & (st.changes < p.max_changes)
  if p.target_bits is not None:
    bsz = np.repeat(np.asarray(blocks, np.int64)[:, None], 2, axis=1).reshape(-1)
    sz = np.repeat(np.asarray(sizes, np.int64)[:, None], 2, axis=1).reshape(-1)
    nb = -(-sz // bsz)
    budget = p.target_bits * values / 8.0 - fixed_bytes
    err = relative_error_table(p._lowest, p.max_bits) ** 2  # [2, levels]
    err2 = np.tile(err[None], (len(sizes), 1, 1)).reshape(-1, err.shape[1])
    floors = np.tile(np.asarray(p._floors, np.int32), len(sizes))
    desired = allocate(
        (2.0 * (n_rel + r_rel)).reshape(-1), desired.reshape(-1), free.reshape(-1),
        st.proposed.reshape(-1), err2=err2, per_bit=nb * bsz / 8.0, fixed=4.0 * nb,
        fp32_bytes=4.0 * sz, budget_bytes=jnp.float32(budget),
        min_bits=p._lowest, max_bits=p.max_bits,
        floor_bits=floors).reshape(desired.shape)
  proposed = jnp.where(free, desired, st.proposed)
  changed = proposed != st.proposed
  return STQuantPolicyState(
      n_ema=jnp.where(live, n_ema, st.n_ema), r_ema=jnp.where(live, r_ema, st.r_ema),
      zone=zone, proposed=proposed.astype(jnp.int32), actual=st.actual,
      last_change=jnp.where(changed, count, st.last_change).astype(jnp.int32),
      changes=(st.changes + changed).astype(jnp.int32),
      decisions=st.decisions + 1, anneal=tau.astype(jnp.float32), acc=st.acc)
