"""Test policies: one whose proposals follow a fixed schedule, so layout switches happen
at known steps (the real STQuantPolicy decides from statistics); one with a fixed mixed
per-leaf layout."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import stquant_jax as sq


class ScheduleState(NamedTuple):
  proposed: jax.Array  # int32 [L, 2]: the bits the schedule asks for now
  actual: jax.Array    # int32 [L, 2]: the layout the last step ran with (like STQuantPolicy)


@dataclasses.dataclass(frozen=True)
class Scheduled(sq.Policy):
  """Quantized leaves (>= ``min_size`` values) start at ``start`` bits; from step
  ``at[k]`` on (the update's count), they propose ``bits[k]``. Smaller leaves keep
  float32 moments, integer leaves none."""

  start: tuple = (8, 8)
  at: tuple = ()
  bits: tuple = ()
  min_size: int = 1024

  def leaf_bits(self, shape, dtype):
    if not jnp.issubdtype(dtype, jnp.floating) or np.prod(shape) < self.min_size:
      return None, None
    return self.start

  def _codes(self, params, pair):
    rows = []
    for p in jax.tree.leaves(params):
      b = self.leaf_bits(tuple(p.shape), p.dtype)
      if not jnp.issubdtype(p.dtype, jnp.floating):
        rows.append((0, 0))
      elif b == (None, None):
        rows.append((32, 32))
      else:
        rows.append(pair)
    return np.array(rows, np.int32).reshape(-1, 2)

  def init_state(self, params):
    codes = self._codes(params, self.start)
    return ScheduleState(jnp.asarray(codes), jnp.asarray(codes))

  def update_state(self, state, updates, mu, nu, count):
    prop = state.proposed
    base = jnp.asarray(self._codes(updates, self.start))
    want = base
    for at, pair in zip(self.at, self.bits):
      target = jnp.asarray(self._codes(updates, pair))
      want = jnp.where(count >= at, target, want)
    return ScheduleState(want.astype(jnp.int32), prop)

  def proposed_bits(self, state):
    return state.proposed

  def with_actual(self, state, bits):
    old = state.actual
    bits = np.ascontiguousarray(np.broadcast_to(bits, old.shape))
    return state._replace(actual=jax.device_put(bits, old.sharding) if old.committed
                          else jnp.asarray(bits))


class MixedBits(sq.Policy):
  """A mixed per-leaf layout, as the adaptive policy's layouts are: widths 3..8 for m
  and 2..8 for v cycling over the leaves (no statistics)."""

  def __init__(self):
    self.i = 0

  def leaf_bits(self, shape, dtype):
    self.i += 1
    return 3 + self.i % 6, 2 + (3 * self.i) % 7
