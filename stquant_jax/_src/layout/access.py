"""Reaching the stquant states of whatever a user hands a tool: an optax state, a
``flax.nnx.Optimizer``, or its ``opt_state``.

``flax.nnx.Optimizer`` keeps the optimizer state's containers (our NamedTuples
and the static :class:`~stquant_jax._src.state.config.StquantConfig`
included) but wraps every array in an ``nnx.Variable`` and, after a step,
holds each quantized moment as a ``{codes, scales}`` ``nnx.State``. Tools read
such a state through ``state.typed.typed_states`` (plain arrays, typed
moments) and change it through :func:`replace_states`, which writes new arrays *into* its
Variables (the nnx way: the optimizer sees them at once) in the form nnx
itself leaves after a step, so a jitted step does not retrace for the form.
"""

from __future__ import annotations

import jax

from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.core.trees import has_variables, is_variable
from stquant_jax._src.state.opt_state import find_states, is_stquant_state
from stquant_jax._src.state.typed import opt_state_of, typed_state


def _settled(value):
  """The form ``nnx.Optimizer.update`` leaves a moment in: a ``{codes, scales}`` ``nnx.State``."""
  if not is_quantized(value):
    return value
  from flax import nnx  # pylint: disable=import-outside-toplevel  (only for nnx states)
  return nnx.State({"codes": value.codes, "scales": value.scales})


def write_into(nnx_tree, new_typed) -> None:
  """Writes a typed tree's arrays into the ``nnx.Variable`` s of ``nnx_tree`` (the same
  tree as nnx holds it: a stquant state, or a whole optimizer state), in place,
  quantized moments in nnx's settled form."""
  variables, treedef = jax.tree.flatten(nnx_tree, is_leaf=is_variable)
  try:
    values = treedef.flatten_up_to(new_typed)
  except (ValueError, TypeError) as e:  # pragma: no cover - the containers are kept
    raise ValueError(f"cannot write the new state into the nnx optimizer state: {e}") from e
  for var, value in zip(variables, values):
    if is_variable(var):
      var.set_value(_settled(value))


def settle(x) -> None:
  """Puts the quantized moments of an nnx optimizer (or its state) in the form
  ``nnx.Optimizer.update`` leaves them in, in place, so the state has one pytree
  structure before and after a step (a jitted step's shardings or signature then
  match both). Plain optax states are left alone."""
  opt_state = opt_state_of(x)
  if has_variables(opt_state):
    for st in find_states(opt_state):
      write_into(st, typed_state(st))


def replace_states(x, new: dict):
  """``x`` with the stquant states ``new`` maps (by ``id`` of the state found in ``x``) to
  typed replacements.

  A plain optax state comes back as a new tree; an nnx state (or optimizer) is updated
  in place and comes back as the same object.
  """
  opt_state = opt_state_of(x)
  if has_variables(opt_state):
    for st in find_states(opt_state):
      if id(st) in new:
        write_into(st, new[id(st)])
    return x
  fix = lambda s: new.get(id(s), s) if is_stquant_state(s) else s
  return jax.tree.map(fix, opt_state, is_leaf=is_stquant_state)
