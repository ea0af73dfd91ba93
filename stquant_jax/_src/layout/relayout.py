"""``relayout``: apply the policy's proposed bit-widths to an optimizer state, outside ``jit``.

Bit-widths are static layout (:class:`QuantizedArray` metadata), so a jitted
step can never change them. The policy keeps what it wants in its state under
``jit``; :func:`relayout` asks it (:meth:`~stquant_jax.Policy.proposed_bits`,
one small device-to-host copy per stquant state), re-packs only the moments
whose bits differ, in one jitted program per state
(:mod:`stquant_jax._src.layout.repack`: block by block, so peak memory is old
moments + new moments + a small constant), and hands the new layout back
(:meth:`~stquant_jax.Policy.with_actual`). The code maps
and block size come from the state itself (``state.config``), so they are
always the transform's. The user's jitted step then retraces once per
distinct layout; :func:`~stquant_jax.adaptive_jit` compiles it ahead of time
instead.

:func:`apply_bits` is the core: a state (concrete or abstract) re-laid out to
given bits, used by :func:`relayout`, :func:`~stquant_jax.abstract_state` and
the ahead-of-time compile.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.blocks import DEFAULT_BLOCK_SIZE
from stquant_jax._src.codec.maps import default_map
from stquant_jax._src.codec.quantized import QuantizedArray, is_quantized
from stquant_jax._src.codec.shards import num_layout_blocks
from stquant_jax._src.core.trees import field, unwrap_variables
from stquant_jax._src.distributed.mesh import host_value
from stquant_jax._src.distributed.placement import (
    float_moment_sharding, float_sharding_from_blocks, quantized_shardings,
    rewidth_codes_sharding, shards_for)
from stquant_jax._src.layout import repack
from stquant_jax._src.layout.access import replace_states
from stquant_jax._src.policy.base import is_concrete, policy_of
from stquant_jax._src.state.opt_state import (
    FLOAT32, NO_MOMENT, current_bits, find_states)
from stquant_jax._src.state.typed import opt_state_of, typed_state


def proposal(state, policy=None) -> np.ndarray | None:
  """int32 proposed bits of a typed state: ``[L, 2]``, or ``[R, L, 2]`` for a ``pmap``
  state (one row block per replica); None when its policy (``policy``, else the one
  that built the state) proposes nothing, or the state is abstract."""
  policy = policy_of(state) if policy is None else policy
  ps = state.policy_state
  if not is_concrete(ps):
    return None
  prop = policy.proposed_bits(ps)
  if prop is None:
    return None
  return np.asarray(host_value(prop), np.int32)


def settle_proposal(state, prop: np.ndarray) -> tuple[np.ndarray, bool]:
  """``(proposal [L, 2], stacked)``: a ``pmap`` state's replicas must agree."""
  cur = current_bits(state)
  stacked = prop.ndim == 3 and prop.shape[1:] == cur.shape
  if stacked:
    if not (prop == prop[:1]).all():
      raise ValueError("relayout: the pmap replicas propose different bits; give the "
                       "policy the pmap axis_name (STQuantPolicy(axis_name=...)) so that "
                       "its statistics are reduced over the replicas")
    prop = prop[0]
  if prop.shape != cur.shape:
    raise ValueError(f"proposed bits have shape {prop.shape}, the state has {cur.shape} "
                     "moments; was the policy state built for other params?")
  return prop, stacked


def is_stacked(state) -> bool:
  """A ``jax.pmap`` state: every array has a leading replica axis (the count too)."""
  return np.ndim(state.count) == 1


def target_bits(cur: np.ndarray, prop: np.ndarray) -> np.ndarray:
  """The layout a proposal asks for: the proposal wherever both it and the layout have a
  moment (leaves without moments never change)."""
  keep = (prop == NO_MOMENT) | (cur == NO_MOMENT)
  return np.where(keep, cur, prop).astype(np.int32)


def _map(config, bits: int, signed: bool):
  """The transform's map (``state.config``); the default map for a state built by hand."""
  if config is not None:
    return config.code_map(bits, signed)
  return default_map(bits, signed)


def _out_shardings(x, new_bits: int, block_size: int, shards=None):
  """Where a re-packed moment goes when no param shardings are given: the block axis
  stays sharded as before (quantized -> quantized keeps the codes' block-axis sharding;
  float32 <-> quantized maps it to / from the parameter's leading axis, as
  :func:`stquant_jax.state_shardings` does; ``shards``: a new quantized moment's
  layout). None (left to jit) without a NamedSharding."""
  if is_quantized(x):
    cs = getattr(x.codes, "sharding", None)
    if not isinstance(cs, jax.sharding.NamedSharding):
      return None
    if new_bits == FLOAT32:
      return float_sharding_from_blocks(cs, x.shape, x.shards)
    codes = rewidth_codes_sharding(cs)
    ss = getattr(x.scales, "sharding", None)
    scales = ss if isinstance(ss, jax.sharding.NamedSharding) else jax.sharding.NamedSharding(
        cs.mesh, jax.sharding.PartitionSpec(codes.spec[0]), memory_kind=cs.memory_kind)
    return codes, scales
  fs = getattr(x, "sharding", None)
  if not isinstance(fs, jax.sharding.NamedSharding) or new_bits == FLOAT32:
    return None
  return quantized_shardings(fs, tuple(x.shape), num_layout_blocks(x.shape, shards, block_size))


def _param_out_shardings(ps, shape, new_bits: int, block_size: int, shards=None):
  """Placement from the parameter's sharding, by :func:`stquant_jax.state_shardings`' rule."""
  if not isinstance(ps, jax.sharding.NamedSharding):
    return None
  if new_bits == FLOAT32:
    return float_moment_sharding(ps, shape)
  return quantized_shardings(ps, tuple(shape), num_layout_blocks(shape, shards, block_size))


def _param_sharding_leaves(tdef, param_shardings, n):
  """Per moment leaf, the parameter's Sharding (or None)."""
  if param_shardings is None:
    return [None] * n
  try:
    leaves = tdef.flatten_up_to(unwrap_variables(param_shardings))
  except (ValueError, TypeError) as e:
    raise ValueError("relayout: param_shardings does not have the structure of the params "
                     f"the optimizer state was built for: {e}") from e
  out = []
  for x in leaves:
    s = x if isinstance(x, jax.sharding.Sharding) else getattr(x, "sharding", None)
    if x is not None and s is None:
      raise TypeError("relayout: param_shardings leaves must be Shardings or sharded arrays, "
                      f"got {type(x).__name__}")
    out.append(s)
  return out


def _change(x, want: int, signed: bool, block_size: int, cmap, pshard, stacked: bool):
  """The :class:`repack.Change` turning moment ``x`` into ``want`` bits."""
  bs = x.block_size if is_quantized(x) else block_size
  shape = tuple(x.shape) if is_quantized(x) or not stacked else tuple(x.shape[1:])
  if is_quantized(x):
    shards = x.shards
  else:  # float32 -> quantized: the layout the parameter's (or the moment's) sharding needs
    ps = pshard if pshard is not None else getattr(x, "sharding", None)
    shards = None if stacked else shards_for(ps, shape, bs)
  if stacked:
    out = None  # the next pmap call distributes the replicas again
  elif pshard is not None:
    out = _param_out_shardings(pshard, shape, want, bs, shards)
  else:
    out = _out_shardings(x, want, bs, shards)
  src_arr = x.codes if is_quantized(x) else x
  in_sharding = getattr(src_arr, "sharding", None)
  if not isinstance(in_sharding, jax.sharding.NamedSharding) or stacked:
    in_sharding = None
  return repack.Change(x.code_map if is_quantized(x) else None,
                       None if want == FLOAT32 else cmap, bs, shape, in_sharding, out, stacked,
                       shards)


def _abstract_output(x, ch: repack.Change):
  """The ShapeDtypeStruct(s) :func:`repack.convert` would return for input ``x`` (the
  ``(codes, scales)`` of a quantized moment, or the float32 array)."""
  src = x[0] if ch.src is not None else x
  lead = tuple(src.shape[:1]) if ch.stacked else ()
  keep = getattr(src, "sharding", None)
  keep = None if isinstance(keep, jax.sharding.NamedSharding) else keep
  if ch.dst is None:
    s = ch.out_shardings if ch.out_shardings is not None else keep
    return jax.ShapeDtypeStruct(lead + ch.shape, jnp.float32, sharding=s)
  nb = num_layout_blocks(ch.shape, ch.shards, ch.block_size)
  cs, ss = ch.out_shardings if ch.out_shardings is not None else (keep, keep)
  return (jax.ShapeDtypeStruct(lead + (nb, ch.block_size * ch.dst.bits // 32), jnp.uint32,
                               sharding=cs),
          jax.ShapeDtypeStruct(lead + (nb,), jnp.float32, sharding=ss))


def as_moment(out, ch: repack.Change):
  """A re-pack program's output for one change, as a moment (QuantizedArray or array)."""
  if ch.dst is None:
    return out
  codes, scales = out
  return QuantizedArray(codes, scales, ch.dst, ch.block_size, ch.shape, jnp.dtype(jnp.float32),
                        ch.shards)


def plan(state, target: np.ndarray, *, param_shardings=None, stacked: bool = False):
  """The re-pack of a typed state to ``target`` bits: ``(positions, changes, inputs)``,
  one entry per moment that changes; ``positions`` are ``(leaf, 0 for m / 1 for v)``."""
  config = field(state, "config", None)
  cur = current_bits(state)
  mu, tdef = jax.tree.flatten(state.mu, is_leaf=is_quantized)
  nu = jax.tree.leaves(state.nu, is_leaf=is_quantized)
  pshard = _param_sharding_leaves(tdef, param_shardings, len(mu))
  if config is not None:
    bs = config.block_size
  else:
    qs = [x for x in mu + nu if is_quantized(x)]
    bs = qs[0].block_size if qs else DEFAULT_BLOCK_SIZE
  positions, changes, inputs = [], [], []
  for i in range(len(mu)):
    for k, (src, signed) in enumerate(((mu, True), (nu, False))):
      want, have = int(target[i, k]), int(cur[i, k])
      if want == have or NO_MOMENT in (want, have):
        continue
      x = src[i]
      cmap = None if want == FLOAT32 else _map(config, want, signed)
      positions.append((i, k))
      changes.append(_change(x, want, signed, bs, cmap, pshard[i], stacked))
      inputs.append((x.codes, x.scales) if is_quantized(x) else x)
  return positions, changes, inputs


def run_plan(changes, inputs, *, donate: bool = False):
  """The re-packed moments (or their abstract values, for ShapeDtypeStruct inputs)."""
  if not changes:
    return []
  if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(inputs)):
    outs = [_abstract_output(x, ch) for x, ch in zip(inputs, changes)]
  else:
    with warnings.catch_warnings():  # donated codes of another width cannot be reused
      warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
      outs = repack.program(tuple(changes), donate)(list(inputs))
    if donate:
      release(inputs, outs)
  return [as_moment(o, ch) for o, ch in zip(outs, changes)]


def release(inputs, outs) -> None:
  """Deletes the replaced moments' arrays once the re-pack has read them: jit reuses a
  donated buffer only for an output of its shape (the scales), the old codes would
  otherwise live as long as a reference to the old state does."""
  jax.block_until_ready(outs)
  for a in jax.tree.leaves(inputs):
    if isinstance(a, jax.Array) and not a.is_deleted():
      a.delete()


def rebuild(state, target: np.ndarray, positions, new_moments, stacked: bool = False):
  """``state`` with the re-packed moments put in place and, for a concrete state, its
  policy told the new layout (:meth:`~stquant_jax.Policy.with_actual`, which places
  it on every replica row of a ``stacked`` state itself)."""
  del stacked
  cur = current_bits(state)
  mu, tdef_m = jax.tree.flatten(state.mu, is_leaf=is_quantized)
  nu, tdef_v = jax.tree.flatten(state.nu, is_leaf=is_quantized)
  new = [list(mu), list(nu)]
  for (i, k), m in zip(positions, new_moments):
    new[k][i] = m
  new_cur = np.where((target != NO_MOMENT) & (cur != NO_MOMENT), target, cur).astype(np.int32)
  ps = state.policy_state
  if is_concrete(ps):  # an abstract one keeps its shapes, whatever the layout
    ps = policy_of(state).with_actual(ps, new_cur)
  return state._replace(mu=tdef_m.unflatten(new[0]), nu=tdef_v.unflatten(new[1]),
                        policy_state=ps)


def apply_bits(state, target, *, param_shardings=None, stacked: bool = False,
               donate: bool = False):
  """A typed stquant state (concrete or abstract) re-laid out to ``target`` bits
  (int ``[L, 2]``: 2..8, 32 for float32; leaves without moments ignore it). Returns
  ``state`` itself when nothing changes."""
  target = np.asarray(target, np.int32)
  cur = current_bits(state)
  if target.shape != cur.shape:
    raise ValueError(f"bits of shape {target.shape} for a state with {cur.shape[0]} leaves "
                     f"(need [{cur.shape[0]}, 2])")
  positions, changes, inputs = plan(state, target, param_shardings=param_shardings,
                                    stacked=stacked)
  if not positions:
    return state
  return rebuild(state, target, positions, run_plan(changes, inputs, donate=donate), stacked)


def relayout(opt_state, *, policy=None, param_shardings=None, donate: bool = False):
  """Re-packs the moments whose proposed bit-width differs from their layout.

  Finds every :class:`ScaleByStquantState` in ``opt_state`` (a chain,
  ``inject_hyperparams`` or ``MultiSteps`` state, a ``flax.nnx.Optimizer`` or
  its ``opt_state``, ...), reads the bits its policy proposed, and for each
  moment that changes: re-encodes it at the new width (or to / from float32)
  with the code maps and block size of the transform that built the state
  (``state.config``), block by block, in one jitted program per state. When
  nothing changes, returns ``opt_state`` itself (cost: one tiny device-to-host
  copy).

  Call it outside ``jit`` (e.g. every ``policy.every`` steps); the jitted step
  retraces once for each new layout (:func:`~stquant_jax.adaptive_jit` avoids
  the stall by compiling ahead of time).

  flax.nnx: pass the ``nnx.Optimizer`` (or its ``opt_state``); its variables are
  updated in place and the same object comes back.

  Sharded states (docs/sharding.md): each moment is re-packed on the global
  arrays, shard by shard when its block axis is sharded, and the new codes keep
  the old codes' block-axis sharding (float32 <-> quantized changes map it to /
  from the parameter's leading axis). Only the small, replicated proposed bits
  are read on the host, so it works on arrays spanning several processes; call
  it in every process at the same step. A ``jax.pmap`` state (a leading device
  axis on every array) is re-packed replica by replica, after checking that
  the replicas propose the same bits.

  Args:
    opt_state: any optimizer state containing stquant states, or an
      ``nnx.Optimizer``.
    policy: read the proposal with this policy's
      :meth:`~stquant_jax.Policy.proposed_bits` instead of the one that built
      the state (``state.config.policy``); rarely needed.
    param_shardings: optional params-shaped pytree of shardings (or the
      sharded params). When given, re-packed moments are placed exactly as
      :func:`stquant_jax.state_shardings` says for the new layout (so the
      step's ``in_shardings`` from ``state_shardings`` always match); without
      it, the placement is derived from the old moment's sharding, which
      can differ for float32 moments of params not sharded along their
      leading axis.
    donate: donate the replaced moments' buffers (their arrays in the old
      state are deleted; memory is released at once even if the old state is
      still referenced).

  Returns:
    The new optimizer state (the same object when nothing changed, and for
    nnx states, which are updated in place).

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> tx = sq.adamw(1e-3, policy=sq.STQuantPolicy())
    >>> state = tx.init({"w": jnp.zeros((128, 64))})
    >>> sq.relayout(state) is state   # nothing proposed yet
    True
  """
  new = {}
  for st in find_states(opt_state_of(opt_state)):
    typed = typed_state(st)
    prop = proposal(typed, policy)
    if prop is None:
      continue
    prop, stacked = settle_proposal(typed, prop)
    target = target_bits(current_bits(typed), prop)
    out = apply_bits(typed, target, param_shardings=param_shardings, stacked=stacked,
                     donate=donate)
    if out is not typed:
      new[id(st)] = out
  if not new:
    return opt_state
  return replace_states(opt_state, new)

