"""The jitted part of :class:`~stquant_jax.STQuantPolicy`: its state, statistics and decision.

:class:`STQuantPolicyState` is what the policy carries in the optimizer state;
:func:`update_state` runs in every step, :func:`decide` every ``every`` steps.
The policy's configuration, validation and static first layout are in
:mod:`stquant_jax._src.policy.stquant`.

Every step, inside the jitted update, the score engine
(:mod:`stquant_jax._src.policy.scores`) sums statistics over a rotating 1/K of each
adaptive leaf's blocks (those with ``block % K == count % K``, K = ``every``)
into ``acc`` in the policy state: O(size / K) work per step, no control flow
around the moments. Every K steps, from ``acc`` (which then covers each block
once):

1. **Score engine**: the accumulated additive statistics of each adaptive
   leaf, reduced with ``psum`` over ``axis_name`` (when set), give a
   magnitude factor N and a structure factor R for m and for v separately.
   Their log2 values are kept as EMAs in the policy state (O(1) per leaf).
2. **Zones**: each factor is compared, relative to the geometric mean over the
   adaptive leaves, with a hysteresis band ``(exit, enter)``: a factor becomes
   "high" above ``enter`` and stays high until it falls below ``exit``. The
   (N, R) quadrant picks a zone: critical (high, high), magnitude (high, low),
   structure (low, high), redundant (low, low); the zone's table gives the bits.
3. **Temporal annealing** (:mod:`stquant_jax._src.policy.annealing`):
   ``tau = max(exp(-t / anneal_steps), drift / instability)`` (clipped to
   [0, 1]; ``drift`` is the mean change of the relative log2 N and log2 R since
   the last decision, over the moments whose bits that decision left alone),
   never above the previous decision's tau unless ``rearm``, adds
   ``round(tau * anneal_bits)`` bits (per moment when ``anneal_bits`` is a
   pair): more precision early and while the statistics move, less as training
   settles.
4. **Budget** (optional ``target_bits``): linear-time Lagrangian allocation
   (:mod:`stquant_jax._src.policy.allocation`) lowers bits where the damage model
   ``(N_rel * R_rel)**2 * e(bits)**2`` says they matter least, then spends what
   the Lagrangian solution left unused, one level at a time.
5. **Transition limits**: a moment's proposal changes at most once per
   ``min_interval`` steps and at most ``max_changes`` times in all.

A decision only writes the *proposed* bits into the state; bits are static
layout, applied outside ``jit`` (:func:`stquant_jax.relayout`,
:func:`stquant_jax.adaptive_jit`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.core.trees import field
from stquant_jax._src.policy import annealing
from stquant_jax._src.policy.allocation import allocate, relative_error_table
from stquant_jax._src.policy.base import is_float
from stquant_jax._src.policy.scores import (
    NUM_SUMS, SUMS, factor_values, leaves_sums, reduce_sums)
from stquant_jax._src.state.opt_state import FLOAT32, NO_MOMENT, moment_bits

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
  """One decision of :class:`~stquant_jax.STQuantPolicy` ``p`` (steps 1-5 of this
  module's doc), inside ``jit``: the new policy state from the old one and the statistics
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


def update_state(p, state, updates, mu, nu, count) -> STQuantPolicyState:
  """One step of :class:`~stquant_jax.STQuantPolicy` ``p`` inside the jitted update:
  ``actual`` from the moments' static layout, the statistics of a rotating 1/K of each
  adaptive leaf's blocks added to ``acc``, and every K steps a :func:`decide`."""
  leaves, treedef = jax.tree.flatten(updates)
  mu_l = treedef.flatten_up_to(mu)
  nu_l = treedef.flatten_up_to(nu)
  layout, adaptive, sizes, blocks = [], [], [], []
  for g, m, v in zip(leaves, mu_l, nu_l):
    codes = [moment_bits(m), moment_bits(v)]
    layout.append(codes)
    ad = is_float(g.dtype) and p._adaptive(tuple(g.shape), g.dtype) and NO_MOMENT not in codes
    adaptive.append(ad)
    sizes.append(math.prod(g.shape))
    qs = [x for x in (m, v) if is_quantized(x)]
    if qs and qs[0].block_size != p._block:
      raise ValueError(f"STQuantPolicy(block_size={p._block}) but the state uses "
                       f"block_size={qs[0].block_size}; leave the policy's block_size unset")
    blocks.append(p._block)
  actual = jnp.asarray(np.array(layout, np.int32).reshape(len(leaves), 2))
  old = STQuantPolicyState(*(field(state, f) for f in STQuantPolicyState._fields))
  if not any(adaptive):
    return old._replace(actual=actual)
  adaptive_np = np.array(adaptive)
  # The budget's bytes outside the moments: the step count and the policy state. The
  # moments of non-adaptive leaves (float32 small leaves) are not added here: the
  # allocation pays every moment that may not change now, these included, from its
  # current bits (adding them here would pay them twice).
  fixed_bytes = 4 + sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in old)
  values = sum(2 * size for (cm, cv), size in zip(layout, sizes)
               if cm != NO_MOMENT or cv != NO_MOMENT)

  # Statistics: every step, a rotating 1/K of each adaptive leaf's blocks (the blocks
  # b with b % K == count % K), accumulated in the state; over the K steps up to a
  # decision every block enters once. O(size / K) per step, no control flow around
  # the moments, so the step's program keeps the moments' buffers as FixedBits does.
  keys = p.sum_keys()
  cols = np.array([SUMS.index(k) for k in keys])
  stride = p.every
  slot = count % stride
  ad_idx = [i for i, ad in enumerate(adaptive) if ad]
  sums = leaves_sums([leaves[i] for i in ad_idx], [mu_l[i] for i in ad_idx],
                     [nu_l[i] for i in ad_idx], block_size=p._block,
                     probe_bits=p.probe_bits, needed=frozenset(keys), stride=stride,
                     slot=slot)[:, cols]
  rows = jnp.zeros((len(leaves), len(keys)), jnp.float32).at[np.array(ad_idx)].set(sums)
  old = old._replace(acc=old.acc + rows)

  def decide_now(st):  # small operands only: the policy state and count
    full = jnp.zeros((len(leaves), NUM_SUMS), jnp.float32).at[:, cols].set(st.acc)
    sums = reduce_sums(full, p.axis_name)
    new = decide(p, st, sums, count, adaptive_np, sizes, blocks, fixed_bytes, values)
    return new._replace(acc=jnp.zeros_like(st.acc))

  new = jax.lax.cond(slot == 0, decide_now, lambda st: st, old)
  return new._replace(actual=actual)
