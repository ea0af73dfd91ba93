"""A user's own ``Policy`` changes layouts through the interface alone.

``StepSchedule`` (8 bits for the first ``n`` steps, then 4) keeps a state with no
field the library knows by name (no ``proposed``, no ``actual``): it is reached only
through ``Policy.proposed_bits``, ``with_actual`` and ``describe``. Every test here
fails if ``relayout``, ``adaptive_jit``, the telemetry or the checkpoints read the
policy state's fields instead of asking the policy.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_adaptive_jit import (
    assert_trees_equal, batch, make_params, make_step, run_reference)

import stquant_jax as sq


class StepScheduleState(NamedTuple):
  count: jax.Array   # int32 []: the update's step count
  layout: jax.Array  # int32 [L, 2]: bits codes the moments have (kept by with_actual)


@dataclasses.dataclass(frozen=True)
class StepSchedule(sq.Policy):
  """8-bit moments for the first ``n`` steps, then 4-bit; leaves with fewer than
  ``min_size`` values keep float32 moments, integer leaves none."""

  n: int = 4
  min_size: int = 1024

  def leaf_bits(self, shape, dtype):
    if not jnp.issubdtype(dtype, jnp.floating) or math.prod(shape) < self.min_size:
      return None, None
    return 8, 8

  def init_state(self, params):
    codes = [(0, 0) if not jnp.issubdtype(p.dtype, jnp.floating)
             else (32, 32) if self.leaf_bits(p.shape, p.dtype) == (None, None) else (8, 8)
             for p in jax.tree.leaves(params)]
    return StepScheduleState(jnp.zeros([], jnp.int32),
                             jnp.asarray(np.array(codes, np.int32).reshape(-1, 2)))

  def update_state(self, state, updates, mu, nu, count):
    return state._replace(count=count)

  def proposed_bits(self, state):
    quantized = (state.layout >= 2) & (state.layout <= 8)
    return jnp.where(quantized, jnp.where(state.count < self.n, 8, 4), state.layout)

  def with_actual(self, state, bits):
    return state._replace(layout=jnp.asarray(bits))

  def describe(self, state):
    return {"phase": "8-bit warm-up" if int(state.count) < self.n else "4-bit"}


N = 4


TX = sq.adamw(1e-2, policy=StepSchedule(n=N))


def bits(state):
  st = state[0]
  return {k: (st.mu[k].bits if isinstance(st.mu[k], sq.QuantizedArray) else 32,
              st.nu[k].bits if isinstance(st.nu[k], sq.QuantizedArray) else 32)
          for k in ("b", "w1", "w2")}


def assert_layout_known_to_policy(state):
  """The policy's own record of the layout (written by with_actual) is the moments'."""
  layout = np.asarray(state[0].policy_state.layout).tolist()
  assert layout == [list(bits(state)[k]) for k in ("b", "w1", "w2")]


def run_plain(steps, switch_calls=()):
  """jax.jit step, sq.relayout before each call in ``switch_calls``."""
  return run_reference(TX, steps, set(switch_calls))


def test_relayout_applies_the_custom_proposal_and_tells_the_policy():
  """Before step N the policy proposes the layout it has (relayout returns the same
  state); from step N on, relayout re-packs the large leaves at 4 bits, leaves the
  small one in float32 and hands the new layout to with_actual. The telemetry shows
  the proposal and describe()'s phase."""
  _, state = run_plain(N - 1)
  assert sq.relayout(state) is state
  assert sq.bit_widths(state)["phase"] == "8-bit warm-up"
  _, state = run_plain(N)
  record = sq.bit_widths(state)
  assert record["mu_proposed"] == {"b": 32, "w1": 4, "w2": 4}
  assert record["phase"] == "4-bit"
  assert "proposed" in sq.summary(state)  # a proposal not applied yet
  new = sq.relayout(state)
  assert bits(new) == {"b": (32, 32), "w1": (4, 4), "w2": (4, 4)}
  assert_layout_known_to_policy(new)
  assert sq.relayout(new) is new  # nothing left to apply


def test_adaptive_jit_switches_at_a_fixed_call_like_the_plain_loop():
  """The proposal is in the input of call N (count N); with delay=2 adaptive_jit
  switches before call N + 2, and params and state match the plain loop with
  relayout before that call, bit for bit."""
  step = sq.adaptive_jit(make_step(TX), delay=2)
  params = make_params()
  state = TX.init(params)
  for i in range(N + 5):
    params, state = step(params, state, *batch(i))
  step.close()
  assert [(s["asked"], s["call"]) for s in step.stats["switches"]] == [(N, N + 2)]
  assert bits(state) == {"b": (32, 32), "w1": (4, 4), "w2": (4, 4)}
  assert_layout_known_to_policy(state)
  want_params, want_state = run_plain(N + 5, {N + 2})
  assert_trees_equal(params, want_params)
  assert_trees_equal(state, want_state)


def test_checkpoints_adopt_the_custom_policys_bits(tmp_path):
  """The policy proposes bits, so restore_state (strict=None) treats it as adaptive:
  a 4-bit checkpoint restores into a fresh 8-bit state without strict=False, the
  policy's state comes back with it, and training continues as if uninterrupted."""
  _, state = run_plain(N + 1, {N})
  assert bits(state)["w1"] == (4, 4)
  sq.save_state(tmp_path / "ckpt", state)
  restored = sq.restore_state(tmp_path / "ckpt", TX.init(make_params()))
  assert bits(restored) == bits(state)
  assert_layout_known_to_policy(restored)
  assert_trees_equal(restored, state)
  assert sq.relayout(restored) is restored


def test_a_policy_without_proposals_is_checkpointed_as_fixed(tmp_path):
  """The same schedule without proposed_bits never changes a layout: a checkpoint
  at other bits is refused unless strict=False, as for FixedBits."""

  @dataclasses.dataclass(frozen=True)
  class Fixed8(StepSchedule):
    def proposed_bits(self, state):
      return None

  _, state = run_plain(N + 1, {N})
  sq.save_state(tmp_path / "ckpt", state)
  like = sq.adamw(1e-2, policy=Fixed8(n=N)).init(make_params())
  with pytest.raises(ValueError, match="fixed policy"):
    sq.restore_state(tmp_path / "ckpt", like)
  assert bits(sq.restore_state(tmp_path / "ckpt", like, strict=False))["w1"] == (4, 4)
