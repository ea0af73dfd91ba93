"""Shardings for stquant optimizer states: FSDP-style, the quantized state sharded like its parameter.

A quantized moment of a parameter is ``codes`` uint32 ``[n_blocks, words]``
and ``scales`` float32 ``[n_blocks]``, where block ``b`` holds the values
``b * block_size ... (b + 1) * block_size - 1`` of the parameter's row-major
flattening. When the parameter is sharded along its leading axis over mesh
axes ``A`` (``P(A, None, ...)``, the FSDP convention), device ``i`` holds one
contiguous range of the flattening; if that range is a whole number of blocks,
sharding the block axis over the same axes ``A`` gives every device exactly
the blocks of its own parameter shard, and the update (dequantize, Adam,
requantize) runs on each device without moving data. :func:`state_shardings`
builds these shardings for a whole optimizer state.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from stquant_jax._quantize import QuantizedArray

_is_q = lambda x: isinstance(x, QuantizedArray)


def _is_state(x) -> bool:
  # Imported here so that _transform may import this module's helpers.
  from stquant_jax._transform import ScaleByStquantState  # pylint: disable=import-outside-toplevel
  return isinstance(x, ScaleByStquantState)


def _axes(entry) -> tuple[str, ...]:
  """Mesh axis names in one PartitionSpec entry (None / UNCONSTRAINED: none)."""
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return ()
  if isinstance(entry, tuple):
    return tuple(a for a in entry if a is not None)
  return (entry,)


def _spec_axes(sharding: NamedSharding, ndim: int) -> list[tuple[str, ...]]:
  spec = tuple(sharding.spec)
  return [_axes(spec[d]) if d < len(spec) else () for d in range(ndim)]


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _named(sharding: NamedSharding, *spec) -> NamedSharding:
  return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)


def _replicated_like(sharding: Sharding) -> Sharding:
  """A fully replicated sharding over the same devices."""
  if isinstance(sharding, NamedSharding):
    return _named(sharding)
  if sharding.is_fully_replicated:
    return sharding
  raise TypeError(f"cannot build a replicated sharding from {sharding}; use NamedSharding "
                  "for the parameters")


def block_axes(param_sharding: Sharding, shape, n_blocks: int) -> tuple[str, ...]:
  """Mesh axes that shard the block axis of a quantized moment; () when replicated.

  All the mesh axes that shard the parameter (in dimension order), when their
  total size divides ``n_blocks``; otherwise none (the moment is replicated).
  """
  if not isinstance(param_sharding, NamedSharding):
    return ()
  axes = tuple(a for d in _spec_axes(param_sharding, len(shape)) for a in d)
  n = math.prod(param_sharding.mesh.shape[a] for a in axes)
  if not axes or n_blocks % n:
    return ()
  return axes


def is_aligned(param_sharding: Sharding, shape, block_size: int) -> bool:
  """True when block-axis sharding matches the parameter's shards exactly.

  That is: the parameter is sharded along one axis ``j`` only, every axis
  before ``j`` has size 1 (in practice ``j = 0``: the leading axis), the shards
  are even, and each holds a whole number of blocks. Then each device's codes
  encode exactly its own parameter values and the update needs no
  communication.
  """
  if not isinstance(param_sharding, NamedSharding):
    return False
  per_dim = _spec_axes(param_sharding, len(shape))
  sharded = [d for d, a in enumerate(per_dim) if a]
  if len(sharded) != 1:
    return False
  j = sharded[0]
  n = math.prod(param_sharding.mesh.shape[a] for a in per_dim[j])
  size = math.prod(shape)
  return (math.prod(shape[:j]) == 1 and shape[j] % n == 0
          and (size // n) % block_size == 0)


def quantized_shardings(param_sharding: Sharding, shape, n_blocks: int):
  """``(codes_sharding, scales_sharding)`` of a quantized moment of a parameter.

  The block axis is sharded over :func:`block_axes`; the word axis is never
  sharded (its length changes with the bit-width).
  """
  if not isinstance(param_sharding, NamedSharding):
    rep = _replicated_like(param_sharding)
    return rep, rep
  b = _entry(block_axes(param_sharding, shape, n_blocks))
  return _named(param_sharding, b, None), _named(param_sharding, b)


def float_sharding_from_blocks(codes_sharding: Sharding, shape) -> Sharding | None:
  """Sharding for a float32 moment re-created from a quantized one (relayout to float32).

  The block axis' mesh axes go to the leading axis when they divide it, else
  the moment is replicated. None when ``codes_sharding`` is not a NamedSharding.
  """
  if not isinstance(codes_sharding, NamedSharding):
    return None
  spec = tuple(codes_sharding.spec)
  axes = _axes(spec[0]) if spec else ()
  n = math.prod(codes_sharding.mesh.shape[a] for a in axes)
  if not axes or not shape or shape[0] % n:
    return _named(codes_sharding)
  return _named(codes_sharding, _entry(axes), *([None] * (len(shape) - 1)))


def _param_sharding(x):
  if x is None or isinstance(x, Sharding):
    return x
  s = getattr(x, "sharding", None)
  if isinstance(s, Sharding):
    return s
  raise TypeError(
      f"param_shardings leaves must be jax.sharding.Sharding objects or arrays with a "
      f"sharding, got {type(x).__name__}; inside jit pass the concrete shardings")


def _moment(m, ps: Sharding | None, rep: Sharding):
  if m is None:
    return None
  if _is_q(m):
    if ps is None:
      return dataclasses.replace(m, codes=rep, scales=rep)
    codes, scales = quantized_shardings(ps, m.shape, int(m.scales.shape[0]))
    return dataclasses.replace(m, codes=codes, scales=scales)
  shape = tuple(getattr(m, "shape", ()))
  if ps is not None and shape and math.prod(shape) > 0 and _fits(ps, shape):
    return ps  # a float32 moment: the parameter's own sharding
  return rep if ps is None else _replicated_like(ps)


def _fits(sharding: Sharding, shape) -> bool:
  """Whether ``sharding`` can shard an array of ``shape`` evenly."""
  if not isinstance(sharding, NamedSharding):
    return True
  if len(tuple(sharding.spec)) > len(shape):
    return False
  for d, axes in enumerate(_spec_axes(sharding, len(shape))):
    if shape[d] % math.prod(sharding.mesh.shape[a] for a in axes):
      return False
  return True


def state_shardings(opt_state, param_shardings):
  """Shardings for an optimizer state holding stquant states, given the params' shardings.

  Returns a pytree of the same structure as ``opt_state`` (usable as
  ``out_shardings`` / ``in_shardings`` of ``jax.jit``, or with
  ``jax.lax.with_sharding_constraint``) in which:

  * a quantized moment of a parameter sharded with ``NamedSharding(mesh, spec)``
    gets ``codes`` ``P(axes, None)`` and ``scales`` ``P(axes)``, where
    ``axes`` are the mesh axes that shard the parameter, when their size
    divides the number of blocks; otherwise it is replicated. For a
    parameter sharded along its leading axis with a whole number of blocks
    per shard (:func:`is_aligned`), each device's codes are exactly its own
    parameter shard's and the update is communication-free; for other
    layouts (e.g. sharded along a later axis) the state is still split
    evenly, but XLA moves data between the moment and parameter layouts;
  * a float32 moment gets the parameter's sharding;
  * the step count, ``[0]`` placeholders and the policy state are replicated;
  * outside stquant states, a subtree with the structure of the params
    (e.g. ``optax.MultiSteps``' accumulated gradients) gets the parameter
    shardings where the shapes fit, and everything else is replicated.

  The result depends only on shapes and static metadata, so ``opt_state`` may
  be concrete, abstract (``jax.eval_shape(tx.init, params)``) or traced. After
  :func:`~stquant_jax.relayout` changes a leaf between quantized and float32,
  the state's structure changes: call this again on the new state.

  Args:
    opt_state: the optimizer state (any optax state containing stquant states).
    param_shardings: a pytree like the params whose leaves are
      ``jax.sharding.Sharding`` objects, or the (sharded) params themselves.

  Returns:
    A pytree of ``jax.sharding.Sharding`` matching ``opt_state``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import stquant_jax as sq
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> params = {"w": jnp.zeros((256, 128)), "b": jnp.zeros((128,))}
    >>> shardings = {"w": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P())}
    >>> params = jax.device_put(params, shardings)
    >>> tx = sq.adamw(1e-3, policy=sq.FixedBits(4, 4))
    >>> out = sq.state_shardings(jax.eval_shape(tx.init, params), shardings)
    >>> state = jax.jit(tx.init, out_shardings=out)(params)
    >>> state[0].mu["w"].codes.sharding.spec, state[0].nu["b"].sharding.spec
    (P('fsdp', None), P())
  """
  ps_leaves, p_treedef = jax.tree.flatten(param_shardings,
                                          is_leaf=lambda x: isinstance(x, Sharding))
  ps_leaves = [_param_sharding(x) for x in ps_leaves]
  if not ps_leaves:
    raise ValueError("param_shardings has no leaves")
  ref = next((s for s in ps_leaves if isinstance(s, NamedSharding)), ps_leaves[0])
  rep = _replicated_like(ref)

  def stquant(st):
    try:
      mu = p_treedef.flatten_up_to(st.mu)
      nu = p_treedef.flatten_up_to(st.nu)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "state_shardings: param_shardings does not have the structure of the params "
          "the optimizer state was built for (a None in param_shardings is an empty "
          "subtree in JAX, not 'replicated': use NamedSharding(mesh, P()) for replicated "
          f"params): {e}") from e
    new_mu = [_moment(m, s, rep) for m, s in zip(mu, ps_leaves)]
    new_nu = [_moment(v, s, rep) for v, s in zip(nu, ps_leaves)]
    return type(st)(
        count=rep, mu=p_treedef.unflatten(new_mu), nu=p_treedef.unflatten(new_nu),
        policy_state=jax.tree.map(lambda _: rep, st.policy_state))

  def mirrors(x) -> bool:
    if _is_state(x) or _is_q(x):
      return False
    try:
      return jax.tree.structure(x) == p_treedef
    except Exception:  # pylint: disable=broad-except
      return False

  def like_params(x):
    leaves = p_treedef.flatten_up_to(x)
    out = [s if s is not None and _fits(s, tuple(getattr(l, "shape", ()))) else rep
           for l, s in zip(leaves, ps_leaves)]
    return p_treedef.unflatten(out)

  def fix(x):
    if _is_state(x):
      return stquant(x)
    if mirrors(x):
      return like_params(x)
    if _is_q(x):  # a quantized array outside a stquant state: shard by its own shape
      return dataclasses.replace(x, codes=rep, scales=rep)
    return rep

  return jax.tree.map(fix, opt_state, is_leaf=lambda x: _is_state(x) or _is_q(x) or mirrors(x))


def host_value(x) -> np.ndarray:
  """A small array's full value on the host, also when it spans several processes.

  Fully addressable arrays are copied as usual; replicated global arrays are
  read from a local shard; other global arrays are gathered with
  ``multihost_utils.process_allgather`` (every process must call this then).
  """
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def explicit_shards(x) -> int:
  """Shards of ``x``'s leading axis over Explicit mesh axes (sharding in types); 1 otherwise.

  Under ``Auto`` axes (or no mesh) the sharding is not part of the type and
  XLA's partitioner handles any reshape or gather, so this is 1. Under
  Explicit axes a reshape that splits or merges a sharded axis unevenly is a
  type error, so callers check this first.
  """
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return 1
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if mesh is None or spec is None or len(spec) == 0 or spec[0] is None:
    return 1
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  n = 1
  for a in _axes(spec[0]):
    if types.get(a) == jax.sharding.AxisType.Explicit:
      n *= mesh.shape[a]
  return n


def replicated(x):
  """``x`` resharded to replicated over its mesh (for Explicit-mode sharded ``x``);
  ``x`` itself when it has no mesh (a single-device array)."""
  if not _has_mesh(x):
    return x
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))


def _explicit_axes_per_dim(x) -> list[tuple[str, ...]] | None:
  """Per dimension, the Explicit mesh axes sharding ``x``'s type; None when there are none."""
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if mesh is None or spec is None:
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  per_dim = [tuple(a for a in _axes(e) if types.get(a) == jax.sharding.AxisType.Explicit)
             for e in tuple(spec)]
  return per_dim if any(per_dim) else None


def explicit_leaf_is_local(g, moments, block_size: int | None) -> bool:
  """Whether the per-leaf update can run on an Explicit-sharded leaf as typed.

  True when no input carries Explicit shardings, or when they line up: the
  gradient is sharded along its leading axis only (or not at all), each shard
  is a whole number of blocks, and every Explicit-sharded quantized moment's
  block axis (float32 moment) is sharded like the gradient's leading axis
  (like the gradient). Unsharded moments are fine. Anything else (a
  parameter sharded along a later axis, ragged shards, a state sharded
  differently from its parameter) needs :func:`replicated` inputs: under
  Explicit axes the reshapes of the update would be sharding type errors.
  """
  arrays = []
  for m in moments:
    arrays += [m.codes, m.scales] if _is_q(m) else [m]
  per_m = [_explicit_axes_per_dim(a) for a in arrays]
  g_axes = _explicit_axes_per_dim(g)
  if g_axes is None:
    return all(p is None for p in per_m)
  if any(g_axes[1:]):
    return False
  lead = g_axes[0]
  n = math.prod(jax.typeof(g).sharding.mesh.shape[a] for a in lead)
  if block_size is not None and (math.prod(g.shape) // n) % block_size:
    return False
  for p in per_m:
    if p is not None and (p[0] != lead or any(p[1:])):
      return False
  return True


def _has_mesh(x) -> bool:
  try:
    mesh = jax.typeof(x).sharding.mesh
  except (TypeError, AttributeError):
    return False
  return mesh is not None and not getattr(mesh, "empty", False) and bool(mesh.axis_names)


def reshard_like(x, like):
  """``x`` resharded to the (Explicit) sharding of ``like``'s type; ``x`` itself when
  ``like`` has no mesh (a single-device array)."""
  if not _has_mesh(like) or not _has_mesh(x):
    return x
  return jax.sharding.reshard(x, jax.typeof(like).sharding)


def fits(sharding: Sharding, shape) -> bool:
  """Whether ``sharding`` shards an array of ``shape`` evenly."""
  return _fits(sharding, shape)


def concrete_sharding(x) -> NamedSharding | None:
  """The NamedSharding of a concrete array spread over several devices, else None."""
  if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
    return None
  s = getattr(x, "sharding", None)
  if isinstance(s, NamedSharding) and len(s.device_set) > 1:
    return s
  return None


def zeros(shape, dtype, sharding: Sharding | None = None):
  """``jnp.zeros`` created directly with ``sharding`` (also across processes)."""
  if sharding is None:
    return jax.numpy.zeros(shape, dtype)
  return _sharded_zeros(tuple(shape), np.dtype(dtype), sharding)


@functools.lru_cache(maxsize=256)
def _zeros_fn(shape, dtype, sharding):
  return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)


def _sharded_zeros(shape, dtype, sharding):
  return _zeros_fn(shape, dtype, sharding)()


def replicated_on_params_mesh(params) -> NamedSharding | None:
  """Replicated sharding on the mesh of the first concrete, multi-device sharded param."""
  for p in jax.tree.leaves(params):
    s = concrete_sharding(p)
    if s is not None:
      return NamedSharding(s.mesh, PartitionSpec())
  return None
