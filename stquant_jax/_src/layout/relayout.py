"""``relayout``: apply the policy's proposed bit-widths to an optimizer state, outside ``jit``.

Bit-widths are static layout (:class:`QuantizedArray` metadata), so a jitted
step can never change them. The policy writes the bits it wants into its state
under ``jit``; :func:`relayout` reads them (one small device-to-host copy per
stquant state) and re-packs only the moments whose bits differ: dequantize at
the old width, quantize at the new one (float32 <-> quantized transitions
included). The user's jitted step then retraces once per distinct layout.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.blocks import DEFAULT_BLOCK_SIZE
from stquant_jax._src.codec.maps import resolve_map
from stquant_jax._src.codec.quantized import QuantizedArray, dequantize, is_quantized, quantize
from stquant_jax._src.core.trees import field
from stquant_jax._src.distributed.mesh import host_value
from stquant_jax._src.distributed.placement import (
    float_moment_sharding, float_sharding_from_blocks, quantized_shardings,
    rewidth_codes_sharding)
from stquant_jax._src.state.opt_state import (
    FLOAT32, NO_MOMENT, ScaleByStquantState, current_bits, find_states, is_stquant_state)


def _proposed(state: ScaleByStquantState, policy):
  """int32 ``[L, 2]`` proposed bits, or None when the state carries no proposal."""
  ps = state.policy_state
  if policy is not None:
    prop = policy.proposed_bits(ps)
    if prop is None:
      return None
    flat = jax.tree.leaves(prop, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and not
                           isinstance(x[0], tuple))
    return np.array([[FLOAT32 if b is None else b for b in pair] for pair in flat],
                    np.int32).reshape(-1, 2)
  prop = field(ps, "proposed", None)
  if prop is None:
    return None
  return np.asarray(host_value(prop), np.int32)


@functools.lru_cache(maxsize=None)
def _repack_fn(bits: int, signed: bool, block_size: int, code_map, out_shardings,
               stacked: bool = False):
  """Jitted: a moment (QuantizedArray or float32 array) -> float32 values, or the
  ``(codes, scales)`` of their ``bits``-bit quantization, placed on ``out_shardings``.
  ``stacked``: a ``pmap`` state, every array with a leading device axis."""

  def repack(x):
    values = dequantize(x, jnp.float32) if is_quantized(x) else jnp.asarray(x, jnp.float32)
    if bits == FLOAT32:
      return values
    q = quantize(values, bits, signed=signed, block_size=block_size, code_map=code_map)
    return q.codes, q.scales

  return jax.jit(jax.vmap(repack) if stacked else repack, out_shardings=out_shardings)


def _out_shardings(x, new_bits: int, block_size: int):
  """Where the re-packed moment goes: the block axis stays sharded as before.

  A quantized -> quantized change keeps the old codes' block-axis sharding
  (the word axis' length changes with the bits, so it is never sharded) and
  the scales' sharding; float32 -> quantized derives it from the float32
  moment's (the parameter's) sharding, as :func:`stquant_jax.state_shardings`
  does; quantized -> float32 puts the block axis' mesh axes on the leading
  axis. None (left to ``jit``) for arrays without a ``NamedSharding``
  (single device).
  """
  if is_quantized(x):
    cs = getattr(x.codes, "sharding", None)
    if not isinstance(cs, jax.sharding.NamedSharding):
      return None
    if new_bits == FLOAT32:
      return float_sharding_from_blocks(cs, x.shape)
    codes = rewidth_codes_sharding(cs)
    ss = getattr(x.scales, "sharding", None)
    scales = ss if isinstance(ss, jax.sharding.NamedSharding) else jax.sharding.NamedSharding(
        cs.mesh, jax.sharding.PartitionSpec(codes.spec[0]), memory_kind=cs.memory_kind)
    return codes, scales
  fs = getattr(x, "sharding", None)
  if not isinstance(fs, jax.sharding.NamedSharding) or new_bits == FLOAT32:
    return None
  nb = -(-math.prod(x.shape) // block_size)
  return quantized_shardings(fs, tuple(x.shape), nb)


def _param_out_shardings(ps, shape, new_bits: int, block_size: int):
  """Placement from the parameter's sharding, by :func:`stquant_jax.state_shardings`' rule."""
  if not isinstance(ps, jax.sharding.NamedSharding):
    return None
  if new_bits == FLOAT32:
    return float_moment_sharding(ps, shape)
  return quantized_shardings(ps, tuple(shape), -(-math.prod(shape) // block_size))


def _convert(x, new_bits: int, signed: bool, block_size: int, map_fn, param_sharding=None,
             stacked: bool = False):
  """One moment re-packed at ``new_bits`` (32: float32), in one jitted call.

  Runs on global arrays as they are (no host copies), so it also works when
  the moments span several processes; the output keeps the input's sharding,
  or follows ``param_sharding`` when given.
  """
  bs = x.block_size if is_quantized(x) else block_size
  cmap = None if new_bits == FLOAT32 else resolve_map(map_fn, new_bits, signed)
  shape = tuple(x.shape) if is_quantized(x) or not stacked else tuple(x.shape[1:])
  if stacked:
    out_shardings = None  # the next pmap call distributes the replicas again
  elif param_sharding is not None:
    out_shardings = _param_out_shardings(param_sharding, shape, new_bits, bs)
  else:
    out_shardings = _out_shardings(x, new_bits, bs)
  fn = _repack_fn(new_bits, signed, bs, cmap, out_shardings, stacked)
  out = fn(x)
  if new_bits == FLOAT32:
    return out
  codes, scales = out
  return QuantizedArray(codes, scales, cmap, bs, shape, jnp.dtype(jnp.float32))


def _place_like(value: np.ndarray, old):
  """A small host array placed like ``old`` (e.g. replicated over a mesh that may span
  several processes); uncommitted like ``old`` when ``old`` is uncommitted."""
  if isinstance(old, jax.Array) and old.committed:
    return jax.device_put(value, old.sharding)
  return jnp.asarray(value)


def _param_sharding_leaves(tdef, param_shardings, n):
  """Per moment leaf, the parameter's Sharding (or None)."""
  if param_shardings is None:
    return [None] * n
  try:
    leaves = tdef.flatten_up_to(param_shardings)
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


def _relayout_state(state, proposed, *, mu_map, nu_map, block_size, policy,
                    param_shardings=None, stacked=False):
  cur = current_bits(state)
  mu, tdef_m = jax.tree.flatten(state.mu, is_leaf=is_quantized)
  nu, tdef_v = jax.tree.flatten(state.nu, is_leaf=is_quantized)
  pshard = _param_sharding_leaves(tdef_m, param_shardings, len(mu))
  if block_size is None:
    qs = [x for x in mu + nu if is_quantized(x)]
    block_size = qs[0].block_size if qs else getattr(policy, "block_size", DEFAULT_BLOCK_SIZE)
  new_mu, new_nu = list(mu), list(nu)
  for i in range(len(mu)):
    for k, (src, dst, signed, fn) in enumerate(((mu, new_mu, True, mu_map),
                                                 (nu, new_nu, False, nu_map))):
      want, have = int(proposed[i, k]), int(cur[i, k])
      if want == have or NO_MOMENT in (want, have):
        continue
      dst[i] = _convert(src[i], want, signed, block_size, fn, pshard[i], stacked)
  ps = state.policy_state
  if hasattr(ps, "_fields") and "actual" in ps._fields:
    new_cur = np.where((proposed != NO_MOMENT) & (cur != NO_MOMENT), proposed, cur)
    new_cur = new_cur.astype(np.int32)
    if stacked:  # one row per pmap replica
      new_cur = np.broadcast_to(new_cur, tuple(ps.actual.shape[:1]) + new_cur.shape)
    ps = ps._replace(actual=_place_like(np.ascontiguousarray(new_cur), ps.actual))
  return state._replace(mu=tdef_m.unflatten(new_mu), nu=tdef_v.unflatten(new_nu),
                        policy_state=ps)


def relayout(opt_state, *, policy=None, mu_map=None, nu_map=None, block_size=None,
             param_shardings=None):
  """Re-packs the moments whose proposed bit-width differs from their layout.

  Finds every :class:`ScaleByStquantState` in ``opt_state`` (a chain,
  ``inject_hyperparams`` or ``MultiSteps`` state, ...), reads the bits its
  policy proposed, and for each moment that changes: dequantizes at the old
  width and quantizes at the new one (or to/from float32). When nothing
  changes, returns ``opt_state`` itself (cost: one tiny device-to-host copy).

  Call it outside ``jit`` (e.g. every ``policy.every`` steps); the jitted step
  retraces once for each new layout.

  Sharded states (docs/sharding.md): each moment is re-packed by one jitted
  call on the global arrays, and the new codes keep the old codes' block-axis
  sharding (float32 <-> quantized changes map it to / from the parameter's
  leading axis). Only the small, replicated proposed bits are read on the
  host, so it works on arrays spanning several processes; call it in every
  process at the same step. A ``jax.pmap`` state (a leading device axis on
  every array) is re-packed replica by replica, after checking that the
  replicas propose the same bits.

  Args:
    opt_state: any optimizer state containing stquant states.
    policy: only needed for policies other than :class:`STQuantPolicy`, whose
      state carries the proposal; ``policy.proposed_bits(policy_state)`` is used.
    mu_map, nu_map: the ``callable(bits) -> CodeMap`` overrides given to
      :func:`scale_by_stquant`, if any (default: :func:`default_map`).
    block_size: block size for float32 -> quantized moments; default: the
      state's own.
    param_shardings: optional params-shaped pytree of shardings (or the
      sharded params). When given, re-packed moments are placed exactly as
      :func:`stquant_jax.state_shardings` says for the new layout (so the
      step's ``in_shardings`` from ``state_shardings`` always match); without
      it, the placement is derived from the old moment's sharding, which
      can differ for float32 moments of params not sharded along their
      leading axis.

  Returns:
    The new optimizer state (the same object when nothing changed).

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> tx = sq.adamw(1e-3, policy=sq.STQuantPolicy())
    >>> state = tx.init({"w": jnp.zeros((128, 64))})
    >>> sq.relayout(state) is state   # nothing proposed yet
    True
  """
  states = find_states(opt_state)
  plans = {}
  for st in states:
    prop = _proposed(st, policy)
    if prop is None:
      continue
    cur = current_bits(st)
    stacked = prop.ndim == 3 and prop.shape[1:] == cur.shape
    if stacked:  # a pmap state: one proposal per replica, which must agree
      if not (prop == prop[:1]).all():
        raise ValueError("relayout: the pmap replicas propose different bits; give the "
                         "policy the pmap axis_name (STQuantPolicy(axis_name=...)) so that "
                         "its statistics are reduced over the replicas")
      prop = prop[0]
    if prop.shape != cur.shape:
      raise ValueError(f"proposed bits have shape {prop.shape}, the state has {cur.shape} "
                       "moments; was the policy state built for other params?")
    differs = (prop != cur) & (prop != NO_MOMENT) & (cur != NO_MOMENT)
    if differs.any():
      plans[id(st)] = (prop, stacked)
  if not plans:
    return opt_state

  def fix(x):
    if is_stquant_state(x) and id(x) in plans:
      prop, stacked = plans[id(x)]
      return _relayout_state(x, prop, mu_map=mu_map, nu_map=nu_map,
                             block_size=block_size, policy=policy,
                             param_shardings=param_shardings, stacked=stacked)
    return x

  return jax.tree.map(fix, opt_state, is_leaf=is_stquant_state)
