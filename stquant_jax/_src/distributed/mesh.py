"""Mesh and sharding helpers with no quantization in them.

Parsing ``PartitionSpec`` entries, replicated and resharded copies under
Explicit mesh axes (sharding in types), sharded zeros created in place (also
across processes), and reading small global arrays on the host.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec, Sharding


def axes_of(entry) -> tuple[str, ...]:
  """Mesh axis names in one PartitionSpec entry (None / UNCONSTRAINED: none)."""
  if entry is None or entry is PartitionSpec.UNCONSTRAINED:
    return ()
  if isinstance(entry, tuple):
    return tuple(a for a in entry if a is not None)
  return (entry,)


def spec_axes(sharding: NamedSharding, ndim: int) -> list[tuple[str, ...]]:
  spec = tuple(sharding.spec)
  return [axes_of(spec[d]) if d < len(spec) else () for d in range(ndim)]


def spec_entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def named(sharding: NamedSharding, *spec) -> NamedSharding:
  return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)


def replicated_like(sharding: Sharding) -> Sharding:
  """A fully replicated sharding over the same devices."""
  if isinstance(sharding, NamedSharding):
    return named(sharding)
  if sharding.is_fully_replicated:
    return sharding
  raise TypeError(f"cannot build a replicated sharding from {sharding}; use NamedSharding "
                  "for the parameters")


def fits(sharding: Sharding, shape) -> bool:
  """Whether ``sharding`` can shard an array of ``shape`` evenly."""
  if not isinstance(sharding, NamedSharding):
    return True
  if len(tuple(sharding.spec)) > len(shape):
    return False
  for d, axes in enumerate(spec_axes(sharding, len(shape))):
    if shape[d] % math.prod(sharding.mesh.shape[a] for a in axes):
      return False
  return True


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
  for a in axes_of(spec[0]):
    if types.get(a) == jax.sharding.AxisType.Explicit:
      n *= mesh.shape[a]
  return n


def replicated(x):
  """``x`` resharded to replicated over its mesh (for Explicit-mode sharded ``x``);
  ``x`` itself when it has no mesh (a single-device array)."""
  if not has_mesh(x):
    return x
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))


def explicit_axes_per_dim(x) -> list[tuple[str, ...]] | None:
  """Per dimension, the Explicit mesh axes sharding ``x``'s type; None when there are none."""
  try:
    sharding = jax.typeof(x).sharding
  except (TypeError, AttributeError):
    return None
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  if mesh is None or spec is None:
    return None
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  per_dim = [tuple(a for a in axes_of(e) if types.get(a) == jax.sharding.AxisType.Explicit)
             for e in tuple(spec)]
  return per_dim if any(per_dim) else None


def has_mesh(x) -> bool:
  try:
    mesh = jax.typeof(x).sharding.mesh
  except (TypeError, AttributeError):
    return False
  return mesh is not None and not getattr(mesh, "empty", False) and bool(mesh.axis_names)


def reshard_like(x, like):
  """``x`` resharded to the (Explicit) sharding of ``like``'s type; ``x`` itself when
  ``like`` has no mesh (a single-device array)."""
  if not has_mesh(like) or not has_mesh(x):
    return x
  return jax.sharding.reshard(x, jax.typeof(like).sharding)


def concrete_sharding(x) -> NamedSharding | None:
  """The NamedSharding of an array spread over several devices, else None: a concrete
  array's, or a traced one's whose type is sharded on Explicit mesh axes (under
  ``jax.eval_shape`` or ``jit`` in ``jax.set_mesh`` with Explicit axes, where the
  sharding is part of the type)."""
  if isinstance(x, jax.core.Tracer):
    return jax.typeof(x).sharding if explicit_axes_per_dim(x) else None
  if not isinstance(x, jax.Array):
    return None
  s = getattr(x, "sharding", None)
  if isinstance(s, NamedSharding) and len(s.device_set) > 1:
    return s
  return None


def zeros(shape, dtype, sharding: Sharding | None = None):
  """``jnp.zeros`` created directly with ``sharding`` (also across processes); under a
  trace, typed with it (a sharding over an abstract mesh, from a traced array's type)."""
  if sharding is None:
    return jax.numpy.zeros(shape, dtype)
  if isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
    return jax.numpy.zeros(shape, dtype, out_sharding=sharding)
  return _sharded_zeros(tuple(shape), np.dtype(dtype), sharding)


@functools.lru_cache(maxsize=256)
def _sharded_zeros_fn(shape, dtype, sharding):
  return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)


def _sharded_zeros(shape, dtype, sharding):
  return _sharded_zeros_fn(shape, dtype, sharding)()


def replicated_on_params_mesh(params) -> NamedSharding | None:
  """Replicated sharding on the mesh of the first concrete, multi-device sharded param."""
  for p in jax.tree.leaves(params):
    s = concrete_sharding(p)
    if s is not None:
      return NamedSharding(s.mesh, PartitionSpec())
  return None


