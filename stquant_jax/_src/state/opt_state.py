"""The optimizer state of ``scale_by_stquant``, and finding it inside any optax state.

``ScaleByStquantState`` holds, per parameter leaf, one moment for m and one
for v. A moment is a :class:`~stquant_jax.QuantizedArray` (quantized), a
float32 array of the parameter's shape (kept in full precision), or a float32
``[0]`` placeholder (integer leaves, which have no moments). Its *bits code*
says which: 2..8 for quantized, :data:`FLOAT32` (32) or :data:`NO_MOMENT` (0).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from stquant_jax._src.codec.quantized import is_quantized

FLOAT32 = 32   # bits code of a float32 moment
NO_MOMENT = 0  # bits code of a leaf without moments (integer leaves, placeholders)


def bits_code(bits: int | None) -> int:
  """Bits code of a moment's width: ``bits``, or :data:`FLOAT32` for None (float32)."""
  return FLOAT32 if bits is None else bits


class ScaleByStquantState(NamedTuple):
  """State of :func:`~stquant_jax.scale_by_stquant`.

  ``mu`` and ``nu`` mirror the params tree. Each leaf is a
  :class:`~stquant_jax.QuantizedArray` (quantized moment), a float32 array of
  the parameter's shape (a moment the policy keeps in full precision), or a
  float32 ``[0]`` placeholder (integer leaves, which get no moments).
  ``config`` (a :class:`~stquant_jax._src.state.config.StquantConfig`, static:
  no arrays) records the block size, code maps and parameter shapes the state
  was built with, so tools that act on the state from outside ``jit``
  (``relayout``, ``bit_widths``, checkpoints) need no settings.
  """

  count: jax.Array  # int32 []
  mu: optax.Updates
  nu: optax.Updates
  policy_state: Any
  config: Any = None  # StquantConfig (static); None in states built by hand


def is_stquant_state(x) -> bool:
  """Whether ``x`` is a :class:`ScaleByStquantState`."""
  return isinstance(x, ScaleByStquantState)


def find_states(opt_state) -> list[ScaleByStquantState]:
  """Every :class:`ScaleByStquantState` inside ``opt_state`` (chain, inject_hyperparams,
  MultiSteps, masked... states), in tree order."""
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_stquant_state)
          if is_stquant_state(x)]


def moment_bits(x) -> int:
  """Bits code of one moment leaf: its bits if quantized, :data:`FLOAT32` for a
  non-empty array, :data:`NO_MOMENT` otherwise (placeholders, size-0 leaves)."""
  if is_quantized(x):
    return x.bits
  if hasattr(x, "shape") and np.prod(x.shape) > 0:
    return FLOAT32
  return NO_MOMENT


def layout_bits(mu_leaves, nu_leaves) -> np.ndarray:
  """int32 ``[L, 2]``: bits codes of (m, v) per leaf, from the static layout."""
  return np.array([[moment_bits(m), moment_bits(v)] for m, v in zip(mu_leaves, nu_leaves)],
                  np.int32).reshape(len(mu_leaves), 2)


def current_bits(state: ScaleByStquantState) -> np.ndarray:
  """:func:`layout_bits` of a state's moments (no device access)."""
  return layout_bits(jax.tree.leaves(state.mu, is_leaf=is_quantized),
                     jax.tree.leaves(state.nu, is_leaf=is_quantized))
