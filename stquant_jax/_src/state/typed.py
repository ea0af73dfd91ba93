"""Typed moments and states back from the containers wrappers hand them over in.

``flax.nnx.Optimizer`` wraps every array of the optimizer state in an
``nnx.Variable`` and, after a step, returns each
:class:`~stquant_jax.QuantizedArray` as a bare ``{codes, scales}`` mapping
whose static metadata is gone. Everything is recoverable: the bit-width from
the codes' shape (``words per block * 32 / block_size``), the map, block size
and shape from the state's :class:`~stquant_jax._src.state.config.StquantConfig`
(inside the update, the shape also comes from the gradient).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from stquant_jax._src.codec.quantized import QuantizedArray, is_quantized
from stquant_jax._src.core.trees import is_nnx_optimizer, unwrap_variables
from stquant_jax._src.state.opt_state import ScaleByStquantState, find_states, is_stquant_state


def is_moment_mapping(x) -> bool:
  """A quantized moment stripped to a ``{codes, scales}`` mapping (e.g. ``nnx.State``)."""
  return isinstance(x, Mapping) and set(x.keys()) == {"codes", "scales"}


def typed_moment(moment, shape, signed: bool, block_size, maps, shards=None):
  """Rebuilds a :class:`QuantizedArray` from a bare ``{codes, scales}`` mapping.

  Other moments (quantized arrays, float32 arrays, placeholders, None) come
  back as they are.

  Args:
    moment: one moment leaf of the state.
    shape: the parameter's shape.
    signed: True for m, False for v.
    block_size: the state's static block size (None when unknown).
    maps: ``maps(bits, signed) -> CodeMap``, the transform's map choice.
    shards: the moment's per-shard layout (None: the plain layout).
  """
  if is_quantized(moment) or not isinstance(moment, Mapping):
    return moment
  if not is_moment_mapping(moment):
    raise TypeError(f"unrecognised moment state with keys {sorted(moment.keys())}")
  if block_size is None:
    raise TypeError("rebuilding quantized moments needs a static block_size (with "
                    "optax.inject_hyperparams pass static_args=('block_size',))")
  codes, scales = moment["codes"], moment["scales"]
  bits, rem = divmod(codes.shape[-1] * 32, block_size)
  if rem or codes.ndim != 2:
    raise ValueError(f"codes of shape {codes.shape} do not fit block_size={block_size}")
  return QuantizedArray(codes, scales, maps(bits, signed), block_size, tuple(shape),
                        jnp.dtype(jnp.float32), shards=shards)


def _typed_moments(tree, cfg, signed: bool):
  leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: is_quantized(x) or
                                     is_moment_mapping(x))
  if cfg is None:
    if any(is_moment_mapping(x) for x in leaves):
      raise ValueError("this optimizer state holds quantized moments without their metadata "
                       "(as flax.nnx.Optimizer returns them) and no StquantConfig "
                       "(ScaleByStquantState.config) to rebuild them; build the state with "
                       "tx.init of this version of stquant_jax")
    return tree
  if len(leaves) != len(cfg.shapes):
    raise ValueError(f"the state's {'mu' if signed else 'nu'} has {len(leaves)} moments, its "
                     f"config describes {len(cfg.shapes)} parameters")
  out = [typed_moment(x, shape, signed, cfg.block_size, cfg.code_map, cfg.leaf_shards(i))
         for i, (x, shape) in enumerate(zip(leaves, cfg.shapes))]
  return treedef.unflatten(out)


def typed_state(st: ScaleByStquantState) -> ScaleByStquantState:
  """``st`` with plain arrays and :class:`QuantizedArray` moments: ``nnx.Variable``
  wrappers removed and ``{codes, scales}`` mappings rebuilt from ``st.config``.

  A state already typed comes back as it is (the same object).
  """
  if not is_stquant_state(st):
    raise TypeError(f"expected a ScaleByStquantState, got {type(st).__name__}")
  plain = unwrap_variables(st)
  cfg = plain.config
  if not any(is_moment_mapping(x) for x in jax.tree.leaves(
      (plain.mu, plain.nu), is_leaf=lambda x: is_quantized(x) or is_moment_mapping(x))):
    return st if plain is st else plain
  return plain._replace(mu=_typed_moments(plain.mu, cfg, True),
                        nu=_typed_moments(plain.nu, cfg, False))


def opt_state_of(x):
  """``x.opt_state`` for a ``flax.nnx.Optimizer``, else ``x`` itself."""
  return x.opt_state if is_nnx_optimizer(x) else x


def typed_states(x) -> list:
  """Every stquant state in ``x`` (an optax or nnx optimizer state, or an
  ``nnx.Optimizer``), typed: plain arrays and :class:`QuantizedArray` moments, in tree
  order."""
  return [typed_state(s) for s in find_states(opt_state_of(x))]


def typed_tree(x):
  """``x``'s optimizer state with ``nnx.Variable`` wrappers removed and every stquant
  state typed; the same tree structure a plain ``tx.init`` gives.

  Public as :func:`stquant_jax.plain_state`.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> from flax import nnx
    >>> model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
    >>> opt = nnx.Optimizer(model, sq.adamw(1e-3), wrt=nnx.Param)
    >>> state = sq.plain_state(opt)   # optax's form: QuantizedArray moments, plain arrays
    >>> type(state[0].mu["kernel"]).__name__, state[0].mu["kernel"].bits
    ('QuantizedArray', 8)
  """
  fix = lambda s: typed_state(s) if is_stquant_state(s) else s
  return jax.tree.map(fix, unwrap_variables(opt_state_of(x)), is_leaf=is_stquant_state)
