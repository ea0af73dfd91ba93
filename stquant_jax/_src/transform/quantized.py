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

With ``elementwise=True`` (the aliases of :mod:`quantized_alias`) a parameter with
quantized leaves is not dequantized whole: ``inner.update`` runs on one chunk of its
blocks at a time inside the streaming loop of
:func:`~stquant_jax._src.update.stream.stream_moments`, on *restricted* trees that
hold the chunk at the parameter's position and None elsewhere (:func:`_streamed_update`),
so the step's temporaries are a few chunk-sized buffers, as in :func:`~stquant_jax.adamw`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from stquant_jax._src.codec.blocks import (
    DEFAULT_BLOCK_SIZE, dequantize_blocks, encode_blocks, finite_absmax, group_view)
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
from stquant_jax._src.update.stream import stream_moments

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


def _mirrors(params, state) -> list[tuple[tuple, int, tuple, int] | None]:
  """For each leaf of ``state`` (``jax.tree.leaves`` order): ``(path, parameter index,
  prefix, prefix number)`` where it is a floating leaf that mirrors a parameter
  (:func:`_match`; ``prefix`` is its path down to the parameter tree, numbered in
  order of first appearance), else None."""
  pindex = _param_index(params)
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
    out.append((path, i, prefix, prefixes.setdefault(prefix, len(prefixes))))
  return out


def plan_leaves(params, state, policy: FixedBits, signed) -> list[LeafPlan | None]:
  """The storage of each leaf of ``state`` (``jax.tree.leaves`` order): a
  :class:`LeafPlan`, or None to keep it as it is.

  A leaf is quantized when it is a floating array that mirrors a parameter
  (:func:`_match`) and the policy gives its kind a width (signed leaves take
  ``mu_bits``, unsigned ones ``nu_bits``; ``min_size`` applies to the leaf's
  shape). ``params`` may be the updates (same tree, same shapes).
  """
  n = max(len(_param_index(params)), 1)
  out = []
  for x, m in zip(jax.tree.leaves(state), _mirrors(params, state)):
    if m is None:
      out.append(None)
      continue
    path, i, prefix, j = m
    shape, dtype = leaf_shape_dtype(x)
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


def _encode(x_KxB, plan: LeafPlan, step, rounding: str, first=0, size=None):
  """Codes and block scales of the blocks ``x_KxB`` (the leaf's blocks from flat element
  ``first``; values at or past ``size`` are padding, stored as zero) as ``plan`` says."""
  x = x_KxB.astype(jnp.float32)
  if size is not None and size % x.shape[1]:
    index = (jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) * x.shape[1]
             + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) + first)
    x = jnp.where(index < size, x, 0.0)
  view = group_view(x, plan.bits)
  (scale,) = finite_absmax(view)
  noise = None if rounding == "nearest" else moment_noise(view.shape, step, plan.leaf,
                                                          plan.moment, first)
  return encode_blocks(view, scale, default_map(plan.bits, plan.signed), noise), scale


def requantize(x, plan: LeafPlan, block_size: int, step, rounding: str) -> QuantizedArray:
  """``x`` quantized as ``plan`` says (default map, plain layout), with new block scales,
  rounded to nearest or stochastically with the counter ``(step, plan.leaf, plan.moment)``,
  as :func:`~stquant_jax._src.update.adam.adam_blocks` writes Adam's moments."""
  codes, scale = _encode(to_blocks(x, None, block_size), plan, step, rounding)
  return QuantizedArray(codes, scale, default_map(plan.bits, plan.signed), block_size,
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


def _abstract(x):
  """A state leaf (a :class:`QuantizedArray` included) as its shape and dtype."""
  return jax.ShapeDtypeStruct(*leaf_shape_dtype(x))


def _chunk_shape(shape_KxB, ndim: int) -> tuple[int, ...]:
  """The shape a chunk of blocks takes in ``inner``: the parameter's rank kept (a
  transform may read ``x.ndim``, as weight-decay masks do)."""
  k, bs = shape_KxB
  if ndim <= 1:
    return (k * bs,)
  return (1,) * (ndim - 2) + (k, bs)


def _barrier(*xs):
  return jax.lax.optimization_barrier(xs)


def _computed_once(*xs):
  """A chunk's fresh values computed once into buffers (CPU, GPU), so XLA does not
  recompute the decode and ``inner``'s math in each consumer; a TPU recomputes in
  registers instead (as :func:`~stquant_jax._src.update.adam.adam_blocks`)."""
  return jax.lax.platform_dependent(*xs, tpu=lambda *x: x, default=_barrier)


class _Slots(NamedTuple):
  """Where an inner state holds each parameter's leaves.

  The state is seen as a *skeleton* (``skeleton``: its treedef with each
  parameter-structured subtree, a *prefix*, as one leaf; ``is_prefix`` per
  skeleton leaf) whose other leaves (counts, hyperparameters) are ``others``, and
  each prefix subtree as the list of its parts per parameter position
  (``parts[k][j]``: the leaf that mirrors parameter ``j``, or an array-free
  placeholder such as ``optax.MaskedNode``), at key paths ``prefixes``. ``params`` is
  the parameters' treedef.
  """

  skeleton: Any
  is_prefix: tuple[bool, ...]
  params: Any
  others: list
  parts: list
  prefixes: list  # the prefixes' key paths, as ``parts``

  def build(self, others, parts):
    """The state tree from its other leaves and its prefixes' parts."""
    others, parts = iter(others), iter(parts)
    return self.skeleton.unflatten([self.params.unflatten(next(parts)) if p else next(others)
                                    for p in self.is_prefix])

  def split(self, state):
    """``(others, parts)`` of a state of this skeleton (its prefixes may hold None)."""
    vals = self.skeleton.flatten_up_to(state)
    return ([v for v, p in zip(vals, self.is_prefix) if not p],
            [self.params.flatten_up_to(v) for v, p in zip(vals, self.is_prefix) if p])


def _holds_arrays(x) -> bool:
  """Whether a part of a state holds arrays (not a placeholder such as ``MaskedNode``)."""
  return bool(jax.tree.leaves(x, is_leaf=_is_stored))


def _slots(updates, tree, mirrors) -> _Slots:
  """The :class:`_Slots` of the state ``tree`` (quantized leaves whole); raises where a
  parameter-structured subtree holds a leaf that does not mirror its parameter."""
  flat, params_def = jax.tree_util.tree_flatten_with_path(updates)
  ppaths = [tuple(p) for p, _ in flat]
  mirror_of = {m[0]: (m[1], m[2]) for m in mirrors if m is not None}
  prefixes = {m[2] for m in mirrors if m is not None}
  sk, skeleton = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda p, x: _is_stored(x) or tuple(p) in prefixes, is_leaf_takes_path=True)
  others, parts, is_prefix, paths = [], [], [], []
  for path, v in sk:
    path = tuple(path)
    is_prefix.append(path in prefixes)
    if not is_prefix[-1]:
      others.append(v)
      continue
    ps = params_def.flatten_up_to(v)
    for j, x in enumerate(ps):
      if _holds_arrays(x) and mirror_of.get(path + ppaths[j]) != (j, path):
        raise ValueError(
            f"sq.quantized(elementwise=True): the state leaf at "
            f"{jax.tree_util.keystr(path + ppaths[j])} does not mirror its parameter (shape "
            f"{leaf_shape_dtype(flat[j][1])[0]}), so the "
            "transform is not elementwise (Adafactor's factored statistics, say); leave "
            "elementwise=False")
    parts.append(ps)
    paths.append(path)
  return _Slots(skeleton, tuple(is_prefix), params_def, others, parts, paths)


def _streamed_update(inner, updates, tree, params, extra_args, *, count, policy, signed,
                     rounding):
  """``inner.update`` with every parameter that has a quantized leaf streamed a chunk of
  blocks at a time (:func:`~stquant_jax._src.update.stream.stream_moments`).

  Parameter ``j``'s chunk runs ``inner.update`` on *restricted* trees: the
  gradient, parameter and every prefix subtree hold the chunk's values at
  position ``j`` and None elsewhere (optax maps skip None), the counts and
  hyperparameters the step's inputs. One more call, with None at every streamed
  position, gives the other parameters' updates and state and the counts, once.
  """
  abstract = jax.tree.map(_abstract, tree, is_leaf=_is_stored)
  mirrors = _mirrors(updates, abstract)
  plans = plan_leaves(updates, abstract, policy, signed)
  stored = jax.tree.leaves(tree, is_leaf=_is_stored)
  if any((p is not None) != is_quantized(x) for p, x in zip(plans, stored)):
    raise ValueError(f"sq.quantized: the state holds {sum(map(is_quantized, stored))} "
                     f"quantized leaves, this transform quantizes "
                     f"{sum(p is not None for p in plans)} leaves of its inner state for "
                     "updates of this tree; use the transform and parameters that built the state")
  plan_of = {m[0]: p for m, p in zip(mirrors, plans) if m is not None}
  slots = _slots(updates, tree, mirrors)
  ppaths = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
  grads = slots.params.flatten_up_to(updates)
  ps = None if params is None else slots.params.flatten_up_to(params)
  n = len(grads)
  streamed = [j for j in range(n) if any(is_quantized(part[j]) for part in slots.parts)]

  def only(j, x):
    """A tree of the parameters' structure holding ``x`` at position ``j``, None elsewhere."""
    return slots.params.unflatten([x if i == j else None for i in range(n)])

  # Everything but the streamed parameters, and the counts: one call. Placeholders
  # (``optax.MaskedNode``) stay where they are: ``inner`` builds them again.
  s = set(streamed)
  keep = lambda xs: [None if j in s and _holds_arrays(x) else x for j, x in enumerate(xs)]
  rest_u, rest_state = inner.update(
      slots.params.unflatten(keep(grads)), slots.build(slots.others, map(keep, slots.parts)),
      None if ps is None else slots.params.unflatten(keep(ps)), **extra_args)
  new_u = slots.params.flatten_up_to(rest_u)
  new_others, new_parts = slots.split(rest_state)

  for j in streamed:
    g = grads[j]
    mine = [k for k, part in enumerate(slots.parts) if _holds_arrays(part[j])]
    moments = [slots.parts[k][j] for k in mine]
    mplans = [plan_of[slots.prefixes[k] + ppaths[j]] for k in mine]
    p_j = None if ps is None else ps[j]
    has_p = p_j is not None and getattr(p_j, "shape", None) == g.shape

    def restricted(grad, vals, p, others, extra, j=j, mine=mine, p_j=p_j, has_p=has_p):
      """``inner.update`` of parameter ``j`` alone: its update and new moments."""
      vals = dict(zip(mine, vals))
      parts = [[vals.get(k, x) if i == j else None if _holds_arrays(x) else x
                for i, x in enumerate(part)] for k, part in enumerate(slots.parts)]
      u, new = inner.update(only(j, grad), slots.build(others, parts),
                            only(j, p if has_p else p_j) if ps is not None else None, **extra)
      new = slots.split(new)[1]
      return slots.params.flatten_up_to(u)[j], [new[k][j] for k in mine]

    # Traced once more, abstractly: the update's dtype, and whether ``inner`` closes over
    # traced values (inject_hyperparams outside the wrapper), which a per-device call
    # under GSPMD cannot take.
    traced = jax.make_jaxpr(restricted)(g, [_abstract(q) for q in moments],
                                        p_j if has_p else None, slots.others, extra_args)
    u_dtype = traced.out_avals[0].dtype
    separate = u_dtype != g.dtype   # the update cannot be written over the gradient

    def chunk(g_KxB, ms, ins, *, first, step, others, extra, mplans=mplans, has_p=has_p,
              separate=separate, size=g.size, ndim=g.ndim, restricted=restricted):
      """One chunk of parameter ``j``: decode, ``inner.update``, encode (stream's ``fn``)."""
      shape = _chunk_shape(g_KxB.shape, ndim)
      grad = (ins[-1] if separate else g_KxB).reshape(shape)
      p = ins[0].reshape(shape) if has_p else None
      vals = [(dequantize_blocks(q.codes, q.scales, q.code_map).astype(q.dtype)
               if is_quantized(q) else q).reshape(shape) for q in ms]
      u, new = restricted(grad, vals, p, others, extra)
      u, *new = _computed_once(u, *new)
      out = []
      for q, x, plan in zip(ms, new, mplans):
        x = x.reshape(g_KxB.shape)
        if is_quantized(q):
          codes, scale = _encode(x, plan, step, rounding[0 if plan.signed else 1], first, size)
          x = dataclasses.replace(q, codes=codes, scales=scale)
        out.append(x)
      return u.reshape(g_KxB.shape), out

    target = jnp.zeros(g.shape, u_dtype) if separate else g
    inputs = ([p_j] if has_p else []) + ([g] if separate else [])
    new_u[j], new_ms = stream_moments(chunk, target, moments, inputs=inputs, step=count,
                                      others=slots.others, extra=dict(extra_args),
                                      closes_over_tracers=bool(traced.consts))
    for k, part in enumerate(slots.parts):
      new_parts[k][j] = part[j]   # placeholders stay
    for k, q in zip(mine, new_ms):
      new_parts[k][j] = q
  return slots.params.unflatten(new_u), slots.build(new_others, new_parts)


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
    elementwise: bool = False,
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

  Temporaries: by default the step dequantizes each quantized leaf whole, so it
  holds leaf-sized float temporaries (2.3x the parameter bytes for Lion's one
  moment, 4.5x for AdEMAMix's three, on one 4096 x 4096 leaf). With
  ``elementwise=True`` each parameter that has a quantized leaf is streamed a
  chunk of whole blocks at a time: ``inner.update`` runs on the chunk's gradient,
  parameter and moments (the parameter's rank kept; None at every other
  parameter's position, which optax's tree maps skip; counts and hyperparameters
  as the step got them), and the chunk is requantized with the stochastic
  rounding numbers of its place in the leaf, so the codes are the whole-leaf
  step's (up to where XLA contracts a multiply-add); one more call, with None at
  the streamed positions, updates the counts and the other parameters once. The
  temporaries are then a few chunk buffers (~1% of the parameter bytes, as
  :func:`~stquant_jax.adamw`'s). This is right only for a transform that is
  elementwise in the parameters: each leaf's update and state depend on the same
  elements of that leaf's gradient, parameter and state and on scalars, not on the
  leaf's shape beyond its rank nor on other leaves (Lion, SGD momentum, RMSprop,
  Adam/AdamW, AdEMAMix, their masks and chains; not Muon, Adafactor,
  ``clip_by_global_norm``). A state that visibly is not (a parameter-structured
  subtree holding a leaf of another shape) raises a ``ValueError``.

  Not yet supported (raise or fall back as stated): an adaptive policy
  (:class:`~stquant_jax.STQuantPolicy` raises a ``TypeError``: only
  :class:`~stquant_jax.FixedBits`); :func:`~stquant_jax.relayout`,
  :func:`~stquant_jax.adaptive_jit`, :func:`~stquant_jax.summary` and
  :func:`~stquant_jax.average_bits` and :func:`~stquant_jax.save_state` (they read
  ``scale_by_stquant`` states only; :func:`~stquant_jax.state_nbytes` works);
  sharded (FSDP) layouts (moments are stored in the plain layout). A
  ``flax.nnx.Optimizer`` works: the ``{codes, scales}`` mappings it hands back are
  rebuilt from the plan of ``inner``'s abstract initial state.

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
    elementwise: ``inner`` is elementwise in the parameters (see Temporaries
      above): stream each parameter's quantized leaves a chunk at a time
      (bounded temporaries). Default False: dequantize each leaf whole.

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
    >>> tx = sq.quantized(optax.lion(1e-3), policy=sq.FixedBits(8, 8), elementwise=True)
    >>> streamed, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    >>> bool((streamed["w"] == updates["w"]).all())
    True
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
    if elementwise and any(is_quantized(x) for x in stored):
      new_updates, new_state = _streamed_update(
          inner, updates, qdef.unflatten(stored), params, extra_args, count=count,
          policy=policy, signed=signed, rounding=rounding)
      return new_updates, QuantizedState(count=count, inner_state=new_state)
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
