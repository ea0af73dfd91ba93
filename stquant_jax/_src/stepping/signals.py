"""What the jitted step tells the host about proposed layouts, without a host sync.

Inside the step, :func:`layout_signal` compares the bits each stquant state's
policy proposes (:meth:`~stquant_jax.Policy.proposed_bits`, traced) with the
layout the step was compiled for (static) and returns the proposal where it
differs, 0 elsewhere: one small int32 array, a fresh output
of the step (never a buffer of the state, so donating the state next step
does not delete it). The host copies it asynchronously and reads it when it
is ready (:class:`Pending`), so a step is never waited for just to learn that
nothing changed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.distributed.mesh import host_value
from stquant_jax._src.policy.base import policy_of
from stquant_jax._src.state.opt_state import current_bits, find_states
from stquant_jax._src.state.typed import opt_state_of, typed_state


def state_positions(args) -> tuple[int, ...]:
  """Indices of the positional arguments that hold stquant states."""
  return tuple(i for i, a in enumerate(args) if find_states(opt_state_of(a)))


def states_in(args, positions):
  """The stquant states of ``args[positions]``, in order (as found in each argument)."""
  return [st for i in positions for st in find_states(opt_state_of(args[i]))]


def layout_signal(args, positions):
  """int32 ``[sum L, 2]``: each state's proposed bits where they differ from its layout,
  else 0 (traced; rows of all states stacked)."""
  rows = []
  for st in states_in(args, positions):
    typed = typed_state(st)
    cur = current_bits(typed)
    prop = policy_of(typed).proposed_bits(typed.policy_state)
    if prop is None:
      rows.append(jnp.zeros(cur.shape, jnp.int32))
    else:
      prop = jnp.asarray(prop, jnp.int32)
      rows.append(jnp.where(prop != jnp.asarray(cur), prop, 0))
  if not rows:
    return jnp.zeros((0, 2), jnp.int32)
  return jnp.concatenate(rows, axis=-2)


def split_rows(flat: np.ndarray, layouts: list[np.ndarray]) -> list[np.ndarray]:
  """The stacked ``[sum L, 2]`` rows back into one array per state."""
  out, start = [], 0
  for lay in layouts:
    out.append(flat[..., start:start + lay.shape[0], :])
    start += lay.shape[0]
  return out


@dataclasses.dataclass
class Pending:
  """One step's signal on its way to the host."""

  call: int                  # the call whose input state it describes
  array: jax.Array           # the signal, copying to the host
  layouts: list              # the layout (per state) that call ran with

  def ready(self) -> bool:
    try:
      return self.array.is_ready()
    except AttributeError:  # pragma: no cover - non-jax array
      return True

  def proposals(self) -> list[np.ndarray]:
    """Per state, the full proposal ``[L, 2]`` (blocking until the step is done).

    A ``pmap`` step returns one signal per replica; they must agree."""
    sig = host_value(self.array)  # global arrays of several processes included
    if sig.ndim == 3:  # pmap: [replicas, L, 2]
      if not (sig == sig[:1]).all():
        raise ValueError("adaptive_jit: the pmap replicas propose different bits; give the "
                         "policy the pmap axis_name (STQuantPolicy(axis_name=...))")
      sig = sig[0]
    return [np.where(s != 0, s, lay).astype(np.int32)
            for s, lay in zip(split_rows(sig, self.layouts), self.layouts)]
