"""Memory accounting of optimizer states: every stored byte counted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.state.typed import opt_state_of, typed_states


def _leaf_nbytes(x) -> int:
  if x is None or not hasattr(x, "shape") or not hasattr(x, "dtype"):
    return 0
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def state_nbytes(opt_state) -> int:
  """Total bytes of every array in an optimizer state (any optax state).

  Codes, scales, full-precision moments, step counters and policy state all
  count; works for plain optax states too, so baselines are measured the same way,
  and for a ``flax.nnx.Optimizer`` (its ``opt_state``) or its ``opt_state``.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.zeros((1024, 1024))}
    >>> sq.state_nbytes(sq.adamw(1e-3).init(params))  # 2 * (1 MiB codes + 32 KiB scales) + count
    2162692
  """
  return sum(_leaf_nbytes(x) for x in jax.tree.leaves(opt_state_of(opt_state)))


def _moment_values(tree) -> int:
  return sum(x.size if is_quantized(x) else int(np.prod(x.shape, dtype=np.int64))
             for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def _float_values(params) -> int:
  return sum(int(np.prod(p.shape, dtype=np.int64)) for p in jax.tree.leaves(params)
             if jnp.issubdtype(p.dtype, jnp.floating))


def average_bits(opt_state, params=None) -> float:
  """Stored bits per Adam moment value, metadata included.

  ``8 * bytes of the stquant state(s) / (number of m values + number of v
  values)``: scales, float32 moments of small leaves, the step counter and the
  policy's state are all in the numerator. A float32 Adam would score 32.

  Args:
    opt_state: any optimizer state containing :class:`ScaleByStquantState`, or
      a ``flax.nnx.Optimizer`` (or its ``opt_state``).
    params: optional params tree to count the values from, once (two moments
      per float value) however many stquant states share it, e.g. the parts
      of an ``optax.multi_transform`` (not needed: the state records its
      parameters' shapes).

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.zeros((1024, 1024))}
    >>> round(sq.average_bits(sq.adamw(1e-3).init(params)), 3)
    8.25
  """
  states = typed_states(opt_state)
  if not states:
    raise ValueError("average_bits found no stquant state in opt_state; "
                     "use state_nbytes for other optimizers")
  nbytes = sum(state_nbytes(s) for s in states)
  if params is not None:
    values = 2 * _float_values(params)
  else:
    values = sum(_moment_values(s.mu) + _moment_values(s.nu) for s in states)
  return 8.0 * nbytes / max(values, 1)
