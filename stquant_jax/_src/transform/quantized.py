"""``quantized``: any optax transform with its parameter-shaped state leaves quantized.

The wrapper keeps ``inner``'s state as it is, except that every floating leaf
that *mirrors a parameter* (its key path in the state ends with the
parameter's key path, and it has the parameter's shape) and has at least the
policy's ``min_size`` values is stored as a :class:`~stquant_jax.QuantizedArray`.
Each step dequantizes those leaves, runs ``inner.update`` in their own dtype,
and requantizes the new values with the stochastic rounding of
:func:`~stquant_jax.adamw` (the counter hash of
:mod:`~stquant_jax._src.codec.rounding`, drawn by
:func:`~stquant_jax._src.update.adam.moment_noise`).

Which leaves mirror which parameter, and whether a leaf is signed, is decided
from the tree structure only (paths, shapes, dtypes) by :func:`plan_leaves`, once
at ``init`` and again, identically, inside ``update``: nothing but arrays and the
quantized arrays' own static metadata is stored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from stquant_jax._src.codec.blocks import (
    DEFAULT_BLOCK_SIZE, encode_blocks, finite_absmax, group_view)
from stquant_jax._src.codec.maps import default_map
from stquant_jax._src.codec.quantized import QuantizedArray, dequantize, is_quantized, quantize
from stquant_jax._src.codec.rounding import check_rounding
from stquant_jax._src.codec.shards import to_blocks
from stquant_jax._src.core.trees import field
from stquant_jax._src.policy.base import FixedBits, Policy
from stquant_jax._src.state.config import leaf_shape_dtype
from stquant_jax._src.state.typed import is_moment_mapping
from stquant_jax._src.transform.checks import static_block_size
from stquant_jax._src.update.adam import moment_noise

# Fields of optax states that hold non-negative statistics (second moments,
# sums of squares): they take the unsigned, zero-free map and ``nu_bits``.
# Keyed by the state class's name, so optax's and optax.contrib's classes are
# recognised without importing every module that defines one.
NON_NEGATIVE_FIELDS = {
    "ScaleByAdamState": ("nu",),           # adam, adamw, nadam, yogi, ...
    "ScaleByAmsgradState": ("nu", "nu_max"),
    "ScaleByRmsState": ("nu",),            # rmsprop
    "ScaleByRmsWithCountState": ("nu",),   # rmsprop(bias_correction=True)
    "ScaleByRStdDevState": ("nu",),        # rmsprop(centered=True); its mu is signed
    "ScaleByRStdDevWithCountState": ("nu",),
    "ScaleByRssState": ("sum_of_squares",),  # adagrad
    "ScaleByBeliefState": ("nu",),         # adabelief
    "ScaleByNovogradState": ("nu",),
    "ScaleByAdaDeltaState": ("e_g", "e_x"),
    "ScaleByAdanState": ("n",),
    "FactoredState": ("v_row", "v_col", "v"),  # adafactor
    "ScaleByAdemamixState": ("nu",),       # optax.contrib.ademamix
    "ScaleBySimplifiedAdEMAMixState": ("n",),
}


class QuantizedState(NamedTuple):
  """State of :func:`quantized`.

  ``inner_state`` is the wrapped transform's state with its parameter-shaped
  floating leaves replaced by :class:`~stquant_jax.QuantizedArray` (same tree
  structure otherwise).
  """

  count: jax.Array  # int32 []: steps taken, the stochastic rounding counter
  inner_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one state leaf is stored: its code width and map kind, and its rounding salt.

  ``leaf`` and ``moment`` feed :func:`~stquant_jax._src.update.adam.moment_noise`
  (salt ``2 * leaf + moment``); for a two-moment transform (Adam) they are the
  parameter's index and 0 / 1, exactly as in :func:`~stquant_jax.scale_by_stquant`.
  """

  bits: int
  signed: bool
  leaf: int
  moment: int


def _owner(root, prefix) -> tuple[str, str] | None:
  """``(class name, field)`` of the innermost NamedTuple field on ``prefix`` in ``root``."""
  obj, owner = root, None
  for k in prefix:
    try:
      if isinstance(k, GetAttrKey):
        owner, obj = (type(obj).__name__, k.name), getattr(obj, k.name)
      elif isinstance(k, SequenceKey):
        obj = obj[k.idx]
      elif isinstance(k, DictKey):
        obj = obj[k.key]
      else:
        break
    except (AttributeError, KeyError, IndexError, TypeError):
      break
  return owner


def default_signed(root, prefix) -> bool:
  """Whether a state leaf reached by ``prefix`` (its path down to the parameter tree) is
  signed: False for the fields in :data:`NON_NEGATIVE_FIELDS`, True otherwise."""
  owner = _owner(root, prefix)
  return owner is None or owner[1] not in NON_NEGATIVE_FIELDS.get(owner[0], ())


def _param_index(params) -> dict:
  """``{key path: (index, shape)}`` of every parameter leaf (``jax.tree.leaves`` order)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(p): (i, leaf_shape_dtype(x)[0]) for i, (p, x) in enumerate(flat)}


def _match(path, shape, params: dict) -> tuple[int, int] | None:
  """``(parameter index, length of its path)`` of the parameter that a state leaf at
  ``path`` mirrors: the longest parameter path that ends ``path``, same shape."""
  for k in range(len(path) + 1):
    hit = params.get(path[k:])
    if hit is not None and hit[1] == shape:
      return hit[0], len(path) - k
  return None


def plan_leaves(params, state, policy: FixedBits, signed) -> list[LeafPlan | None]:
  """The storage of each leaf of ``state`` (``jax.tree.leaves`` order): a
  :class:`LeafPlan`, or None to keep it as it is.

  A leaf is quantized when it is a floating array that mirrors a parameter
  (:func:`_match`) and the policy gives its kind a width (signed leaves take
  ``mu_bits``, unsigned ones ``nu_bits``; ``min_size`` applies to the leaf's
  shape). ``params`` may be the updates (same tree, same shapes).
  """
  pindex = _param_index(params)
  n = max(len(pindex), 1)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  prefixes: dict[tuple, int] = {}
  out = []
  for path, x in flat:
    path = tuple(path)
    shape, dtype = leaf_shape_dtype(x)
    m = _match(path, shape, pindex) if jnp.issubdtype(dtype, jnp.floating) else None
    if m is None:
      out.append(None)
      continue
    i, depth = m
    prefix = path[:len(path) - depth]
    j = prefixes.setdefault(prefix, len(prefixes))
    is_signed = None if signed is None else signed(jax.tree_util.keystr(path), x)
    if is_signed is None:
      is_signed = default_signed(state, prefix)
    elif not isinstance(is_signed, bool):
      raise TypeError(f"signed({jax.tree_util.keystr(path)!r}, leaf) returned "
                      f"{is_signed!r}; it must return True, False or None")
    bits = policy.leaf_bits(shape, dtype)[0 if is_signed else 1]
    # Moments 0, 1 of parameter i get salts 2i, 2i + 1 (as scale_by_stquant's m, v); a
    # third and fourth moment take the salts of "parameters" n..2n-1, and so on.
    out.append(None if bits is None else LeafPlan(bits, is_signed, i + n * (j // 2), j % 2))
  return out


def requantize(x, plan: LeafPlan, block_size: int, step, rounding: str) -> QuantizedArray:
  """``x`` quantized as ``plan`` says (default map, plain layout), with new block scales,
  rounded to nearest or stochastically with the counter ``(step, plan.leaf, plan.moment)``,
  as :func:`~stquant_jax._src.update.adam.adam_blocks` writes Adam's moments."""
  cmap = default_map(plan.bits, plan.signed)
  view = group_view(to_blocks(x, None, block_size), plan.bits)
  (scale,) = finite_absmax(view)
  noise = None if rounding == "nearest" else moment_noise(view.shape, step, plan.leaf,
                                                          plan.moment)
  return QuantizedArray(encode_blocks(view, scale, cmap, noise), scale, cmap, block_size,
                        tuple(x.shape), jnp.dtype(x.dtype))


def _is_stored(x) -> bool:
  """A quantized leaf: a ``QuantizedArray``, or its ``{codes, scales}`` mapping (nnx)."""
  return is_quantized(x) or is_moment_mapping(x)


def _names(path) -> tuple[str, ...]:
  """A key path as names only, so a NamedTuple field (``.mu``) and the same field
  handed back by ``flax.nnx`` as a mapping (``['mu']``) compare equal."""
  return tuple(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def typed_leaves(inner_init, updates, inner_state, policy, signed) -> list:
  """The leaves of ``inner_state`` (quantized leaves whole), with each ``{codes, scales}``
  mapping (``flax.nnx.Optimizer`` hands quantized arrays back so, without their
  metadata) rebuilt as the :class:`QuantizedArray` that ``init`` stored at its path:
  the plan of the abstract initial state gives its bits, map, shape and dtype."""
  abstract = jax.eval_shape(inner_init, updates)
  plans = plan_leaves(updates, abstract, policy, signed)
  table = {_names(path): (p, leaf) for (path, leaf), p in
           zip(jax.tree_util.tree_flatten_with_path(abstract)[0], plans) if p is not None}
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(inner_state, is_leaf=_is_stored)[0]:
    if is_moment_mapping(x):
      if _names(path) not in table:
        raise ValueError(f"sq.quantized: the state holds codes at {jax.tree_util.keystr(path)}"
                         ", where this transform stores no quantized leaf; use the transform "
                         "that built the state")
      p, leaf = table[_names(path)]
      codes = x["codes"]
      x = QuantizedArray(codes, x["scales"], default_map(p.bits, p.signed),
                         codes.shape[-1] * 32 // p.bits, tuple(leaf.shape), jnp.dtype(leaf.dtype))
    out.append(x)
  return out


def _check_signed(signed):
  """``signed`` as a callable ``(path, leaf) -> bool | None``, or None."""
  if signed is None:
    return None
  if isinstance(signed, bool):
    return lambda path, leaf: signed
  if not callable(signed):
    raise TypeError(f"signed must be None, a bool or a callable (path, leaf) -> bool | None, "
                    f"got {type(signed).__name__}")
  return signed


def quantized(
    inner: optax.GradientTransformation,
    *,
    policy: Policy | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    signed: bool | Callable[[str, Any], bool | None] | None = None,
    rounding="stochastic",
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps any optax transform so that its parameter-shaped state is stored quantized.

  ``init`` builds ``inner``'s state and stores each leaf that mirrors a
  parameter (its key path ends with the parameter's key path and it has the
  parameter's shape: ``mu['w']``, ``nu['w']``, ``trace['w']``...) as block-wise
  quantized codes. Scalars, counters, hyperparameters, factored statistics
  (Adafactor's ``v_row`` / ``v_col``) and leaves below the policy's
  ``min_size`` stay as they are. Each ``update``:

  .. math::
    s = \mathrm{dequantize}(\hat s_{t-1}),\quad
    (u_t, s') = \mathrm{inner.update}(g_t, s, \theta),\quad
    \hat s_t = \mathrm{quantize}(s')

  with new block scales and stochastic rounding whose random numbers are a
  hash of (step, leaf, element), as in :func:`~stquant_jax.adamw` (for a
  two-moment state such as Adam's, the same numbers).

  Signed or unsigned map, per leaf: the fields listed in
  :data:`NON_NEGATIVE_FIELDS` (Adam's, RMSprop's, AdEMAMix's ``nu``, Adagrad's
  ``sum_of_squares``, Adafactor's ``v``...) take the unsigned, zero-free map;
  every other leaf (momenta, unknown transforms) the signed one. ``signed``
  overrides it. Bits come from the policy: signed leaves take ``mu_bits``,
  unsigned leaves ``nu_bits`` (so ``FixedBits(8, 4)`` stores momenta in 8 bits
  and second moments in 4).

  A non-finite value that ``inner`` puts in a quantized leaf (a NaN gradient) is
  stored as zero (the smallest level of an unsigned map) and its block's scale
  ignores it, so that element restarts and no other element changes; the update
  of that step is ``inner``'s (NaN there). Leaves kept as they are keep what
  ``inner`` stores.

  Not yet supported (raise or fall back as stated): an adaptive policy
  (:class:`~stquant_jax.STQuantPolicy` raises a ``TypeError``: only
  :class:`~stquant_jax.FixedBits`); :func:`~stquant_jax.relayout`,
  :func:`~stquant_jax.adaptive_jit`, :func:`~stquant_jax.summary` and
  :func:`~stquant_jax.average_bits` and :func:`~stquant_jax.save_state` (they read
  ``scale_by_stquant`` states only; :func:`~stquant_jax.state_nbytes` works);
  sharded (FSDP) layouts (moments are stored in the plain layout). A
  ``flax.nnx.Optimizer`` works: the ``{codes, scales}`` mappings it hands back are
  rebuilt from the plan of ``inner``'s abstract initial state. The step dequantizes each
  quantized leaf whole, so it holds leaf-sized float temporaries (the fused,
  streamed path of :func:`~stquant_jax.adamw` does not).

  Args:
    inner: any optax transform (a chain, ``inject_hyperparams``, ``masked``,
      ``multi_transform``... included).
    policy: a :class:`~stquant_jax.FixedBits`; default ``FixedBits()`` (8 bits,
      leaves of >= 4096 values). ``FixedBits(None, None)`` stores nothing
      quantized (the wrapper is then exactly ``inner``).
    block_size: values per quantization block (a multiple of 32).
    signed: None (the rule above), a bool for every leaf, or a callable
      ``(path, leaf) -> bool | None`` where ``path`` is the leaf's key path in
      ``inner``'s state as ``jax.tree_util.keystr`` writes it (``"[0].nu['w']"``)
      and None keeps the rule's answer.
    rounding: ``"stochastic"`` (default), ``"nearest"``, or a ``(signed,
      unsigned)`` pair of them.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with a
    :class:`QuantizedState` (extra arguments are passed on to ``inner``).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.ones((64, 128)), "b": jnp.zeros((128,))}
    >>> tx = sq.quantized(optax.lion(1e-3), policy=sq.FixedBits(8, 8))
    >>> state = tx.init(params)
    >>> type(state.inner_state[0].mu["w"]).__name__, state.inner_state[0].mu["b"].dtype
    ('QuantizedArray', dtype('float32'))
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> round(float(updates["w"][0, 0]), 6)
    -0.001001
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation, got "
                    f"{type(inner).__name__}")
  policy = FixedBits() if policy is None else policy
  if not isinstance(policy, FixedBits):
    raise TypeError(f"sq.quantized supports FixedBits policies only for now, got "
                    f"{type(policy).__name__} (adaptive bit-widths need scale_by_stquant / "
                    "sq.adamw)")
  block_size = static_block_size(block_size)
  signed = _check_signed(signed)
  rounding = check_rounding(rounding)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if block_size is None:
      raise TypeError("block_size is traced; it sets the state's shapes and must be "
                      "static (with optax.inject_hyperparams pass static_args=('block_size',))")
    state = inner.init(params)
    leaves, treedef = jax.tree.flatten(state)
    plans = plan_leaves(params, state, policy, signed)
    leaves = [x if p is None else
              quantize(x, p.bits, signed=p.signed, block_size=block_size)
              for x, p in zip(leaves, plans)]
    return QuantizedState(count=jnp.zeros([], jnp.int32),
                          inner_state=treedef.unflatten(leaves))

  def update_fn(updates, state, params=None, **extra_args):
    inner_state = field(state, "inner_state", None)
    if inner_state is None or not hasattr(field(state, "count", None), "dtype"):
      raise TypeError(f"sq.quantized's update expects the QuantizedState its init built, "
                      f"got {type(state).__name__}")
    count = optax.safe_increment(field(state, "count"))
    stored, qdef = jax.tree.flatten(inner_state, is_leaf=_is_stored)
    if any(is_moment_mapping(x) for x in stored):
      stored = typed_leaves(inner.init, updates, inner_state, policy, signed)
    held = [x for x in stored if is_quantized(x)]
    plain = [dequantize(x) if is_quantized(x) else x for x in stored]
    new_updates, new_state = inner.update(updates, qdef.unflatten(plain), params, **extra_args)
    # The same plan as init's (same paths, shapes and dtypes): which leaves to store
    # quantized, how, and with which rounding salt.
    new, new_def = jax.tree.flatten(new_state)
    plans = plan_leaves(updates, new_state, policy, signed)
    planned = sum(p is not None for p in plans)
    if planned != len(held):
      raise ValueError(f"sq.quantized: the state holds {len(held)} quantized leaves, this "
                       f"transform quantizes {planned} leaves of its inner state for updates "
                       "of this tree; use the transform and parameters that built the state")
    bs = held[0].block_size if held else block_size
    out = [x if p is None else requantize(x, p, bs, count, rounding[0 if p.signed else 1])
           for x, p in zip(new, plans)]
    return new_updates, QuantizedState(count=count, inner_state=new_def.unflatten(out))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
