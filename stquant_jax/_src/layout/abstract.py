"""Abstract states: the ``ShapeDtypeStruct`` s of a state at a given bit layout.

A layout change alters the state's shapes (codes ``[n_blocks, block_size * bits /
32]``), so anything that must be prepared before the arrays exist (an
ahead-of-time compile of the train step, a checkpoint restore target, memory
planning) needs the abstract state of *that* layout, not of ``tx.init``'s.
:func:`abstract_state` gives it without allocating anything.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.core.trees import path_names
from stquant_jax._src.distributed.state_shardings import state_shardings
from stquant_jax._src.layout.access import replace_states
from stquant_jax._src.layout.relayout import apply_bits, is_stacked
from stquant_jax._src.state.opt_state import NO_MOMENT, current_bits, find_states
from stquant_jax._src.state.typed import opt_state_of, typed_state, typed_states


def to_abstract(x):
  """``x`` (arrays, nnx objects...) with every array a ``ShapeDtypeStruct`` carrying its
  sharding (none for uncommitted arrays, which jit may place anywhere); other leaves
  (Python scalars, ShapeDtypeStructs) as they are."""
  def leaf(a):
    if isinstance(a, jax.Array):
      return jax.ShapeDtypeStruct(a.shape, a.dtype,
                                  sharding=a.sharding if a.committed else None)
    return a
  return jax.tree.map(leaf, x)


def layouts_of(x) -> list[np.ndarray]:
  """The bit layout (int32 ``[L, 2]``) of every stquant state in ``x``, in tree order."""
  return [current_bits(st) for st in typed_states(x)]


def _layout_from_dict(record: Mapping, st) -> np.ndarray:
  """A :func:`~stquant_jax.bit_widths`-style ``{"mu_bits": {leaf: bits}, "nu_bits": ...}``
  as ``[L, 2]`` for the typed state ``st`` (leaves it does not name keep their bits)."""
  names = path_names(st.mu, is_leaf=is_quantized)
  out = current_bits(st).copy()
  for k, key in enumerate(("mu_bits", "nu_bits")):
    given = dict(record.get(key, {}))
    unknown = sorted(set(given) - set(names))
    if unknown:
      raise ValueError(f"bits name leaves the state does not have: {unknown[:5]} (leaves: "
                       f"{names[:5]}{'...' if len(names) > 5 else ''})")
    for i, name in enumerate(names):
      if name in given and out[i, k] != NO_MOMENT:
        out[i, k] = 32 if given[name] is None else int(given[name])
  return out


def requested_layouts(bits, states) -> list[np.ndarray]:
  """``bits`` (see :func:`abstract_state`) as one ``[L, 2]`` layout per typed state."""
  if isinstance(bits, Mapping) and ("mu_bits" in bits or "nu_bits" in bits):
    if len(states) != 1:
      raise ValueError(f"a bit_widths dict describes one stquant state; this state has "
                       f"{len(states)}: pass a list of them")
    return [_layout_from_dict(bits, states[0])]
  if find_states(opt_state_of(bits)):
    out = layouts_of(bits)
  elif isinstance(bits, (list, tuple)) and bits and not np.isscalar(bits[0]) and (
      np.ndim(bits[0]) == 2 or isinstance(bits[0], Mapping)):
    out = [_layout_from_dict(b, st) if isinstance(b, Mapping) else np.asarray(b, np.int32)
           for b, st in zip(bits, states)]
    if len(bits) != len(states):
      raise ValueError(f"bits for {len(bits)} stquant states; the state has {len(states)}")
  else:
    out = [np.asarray(bits, np.int32)]
  if len(out) != len(states):
    raise ValueError(f"bits describe {len(out)} stquant state(s); the state has {len(states)}")
  return out


def with_layouts(opt_state, layouts, *, param_shardings=None):
  """``opt_state`` (abstract or concrete, optax or nnx form) re-laid out to one ``[L, 2]``
  layout per stquant state; concrete moments are re-packed (see :func:`relayout`)."""
  new = {}
  for st, target in zip(find_states(opt_state_of(opt_state)), layouts):
    typed = typed_state(st)
    out = apply_bits(typed, target, param_shardings=param_shardings,
                     stacked=is_stacked(typed))
    if out is not typed:
      new[id(st)] = out
  return replace_states(opt_state, new) if new else opt_state


def abstract_state(tx, params, bits=None, *, param_shardings=None):
  """The abstract optimizer state (``ShapeDtypeStruct`` s) of ``tx`` at a bit layout.

  ``jax.eval_shape(tx.init, params)``, re-laid out to ``bits``: what
  :func:`~stquant_jax.relayout` would turn a concrete state into, computed
  without allocating. Uses: the restore target of a checkpoint
  (:func:`~stquant_jax.restore_state` accepts it as ``like``), the arguments of
  an ahead-of-time compile (``jax.jit(step).lower(...)``) for a layout the
  policy proposed, memory planning (:func:`~stquant_jax.state_nbytes` and
  :func:`~stquant_jax.summary` read it).

  Args:
    tx: the optimizer (any chain holding :func:`~stquant_jax.scale_by_stquant`).
    params: the params, concrete or abstract.
    bits: None (``init``'s layout), or the layout to give: a state (optax or
      nnx form, concrete or abstract) whose layout to copy; a
      :func:`~stquant_jax.bit_widths` dict (``{"mu_bits": {leaf: bits},
      "nu_bits": {...}}``; leaves it omits keep ``init``'s bits); or an int
      array ``[L, 2]`` (rows in ``jax.tree.leaves(params)`` order, columns m
      and v; 2..8, 32 for float32). Several stquant states: a list of these.
    param_shardings: optional params-shaped pytree of shardings: every array
      of the result then carries :func:`~stquant_jax.state_shardings`'
      placement.

  Returns:
    The abstract state, with ``tx.init``'s tree structure.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.zeros((256, 64)), "b": jnp.zeros((64,))}
    >>> tx = sq.adamw(1e-3, policy=sq.STQuantPolicy())
    >>> abs8 = sq.abstract_state(tx, params)  # critical zone (5, 6) + 3 annealing bits, at most 8
    >>> abs8[0].mu["w"].codes.shape
    (128, 32)
    >>> abs4 = sq.abstract_state(tx, params, bits={"mu_bits": {"w": 4}, "nu_bits": {"w": 5}})
    >>> abs4[0].mu["w"].codes.shape, abs4[0].nu["w"].bits, sq.state_nbytes(abs4) < sq.state_nbytes(abs8)
    ((128, 16), 5, True)
  """
  abstract = jax.eval_shape(tx.init, params)
  if bits is not None:
    states = [typed_state(s) for s in find_states(abstract)]
    abstract = with_layouts(abstract, requested_layouts(bits, states))
  if param_shardings is not None:
    shardings = state_shardings(abstract, param_shardings)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  return abstract
