"""The transform's settings that travel with its state: block size, code maps, param shapes,
policy.

Everything a re-pack needs besides the arrays is bound once, by
:func:`~stquant_jax.scale_by_stquant` at ``init``, into a
:class:`StquantConfig` stored in the state
(:attr:`ScaleByStquantState.config`). It is a pytree node with no data
leaves: jit, ``lax.cond``, ``MultiSteps`` and orbax see nothing, and
``flax.nnx.Optimizer`` keeps it intact (it only rewrites the arrays it wraps
in ``nnx.Variable``), so tools that act on a state from outside ``jit``
(``relayout``, ``bit_widths``, checkpoints...) take no settings and cannot
disagree with the transform.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.maps import CodeMap, resolve_map
from stquant_jax._src.codec.packing import MAX_BITS, MIN_BITS

WIDTHS = tuple(range(MIN_BITS, MAX_BITS + 1))


def resolve_maps(fn, signed: bool, name: str) -> tuple:
  """``fn(bits)`` for every width 2..8 (:func:`default_map` where ``fn`` is None), each
  checked; a width whose map cannot be built holds the error message instead, raised
  when a moment needs that width (:meth:`StquantConfig.code_map`)."""
  out = []
  for bits in WIDTHS:
    try:
      out.append(resolve_map(fn, bits, signed, name))
    except (TypeError, ValueError) as e:
      out.append(f"{type(e).__name__}: {e}")
  return tuple(out)


def leaf_shape_dtype(p) -> tuple[tuple[int, ...], np.dtype]:
  """Global shape and dtype of a parameter leaf: an array, a ShapeDtypeStruct or a Python
  scalar (``{"n": 3}`` is an int32 scalar, as jnp sees it)."""
  if hasattr(p, "shape") and hasattr(p, "dtype"):
    return tuple(int(d) for d in p.shape), np.dtype(p.dtype)
  return tuple(jnp.shape(p)), np.dtype(jnp.result_type(p))


@dataclasses.dataclass(frozen=True)
class StquantConfig:
  """Static settings of one :func:`~stquant_jax.scale_by_stquant` state.

  Attributes:
    block_size: values per quantization block.
    mu_maps, nu_maps: the code map of m / v for each width 2..8 (index
      ``bits - 2``), as the transform's ``mu_map`` / ``nu_map`` give them (an
      error message where the callable refuses that width).
    shapes: each parameter leaf's global shape, in ``jax.tree.leaves(params)``
      order (the rows of the policy state).
    dtypes: each parameter leaf's dtype name, same order.
    policy: the transform's bound :class:`~stquant_jax.Policy` (None in a config
      built by hand): how ``relayout``, ``adaptive_jit``, the telemetry and the
      checkpoints reach the policy's interface
      (:func:`~stquant_jax._src.policy.base.policy_of`).
    shards: each leaf's per-shard layout (:mod:`~stquant_jax._src.codec.shards`;
      None: the plain layout), same order, or ``()`` when every leaf has the plain
      one: what rebuilds a moment that ``flax.nnx`` hands back without its metadata.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> state = sq.adamw(1e-3, block_size=64).init({"w": jnp.zeros((128, 64))})
    >>> cfg = state[0].config
    >>> cfg.block_size, cfg.shapes, cfg.code_map(4, signed=False).name
    (64, ((128, 64),), 'power-p4-u4')
  """

  block_size: int
  mu_maps: tuple
  nu_maps: tuple
  shapes: tuple
  dtypes: tuple
  policy: Any = None
  shards: tuple = ()
  _hash: int = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    # jit hashes the tree structure of its arguments on every call: hash once. An
    # unhashable policy (a mutable dataclass) counts by identity.
    try:
      policy = hash(self.policy)
    except TypeError:
      policy = id(self.policy)
    object.__setattr__(self, "_hash", hash((self.block_size, self.mu_maps, self.nu_maps,
                                            self.shapes, self.dtypes, policy, self.shards)))

  def __hash__(self):
    return self._hash

  def code_map(self, bits: int, signed: bool) -> CodeMap:
    """The transform's map for ``bits`` (m if ``signed``, else v)."""
    maps = self.mu_maps if signed else self.nu_maps
    if not MIN_BITS <= bits <= MAX_BITS:
      raise ValueError(f"bits={bits} must be in {MIN_BITS}..{MAX_BITS}")
    m = maps[bits - MIN_BITS]
    if not isinstance(m, CodeMap):
      raise ValueError(f"the transform's {'mu_map' if signed else 'nu_map'} has no map for "
                       f"{bits} bits: {m}")
    return m

  def leaf_shards(self, i: int):
    """Leaf ``i``'s per-shard layout, or None (the plain layout)."""
    return self.shards[i] if self.shards else None

  def num_values(self, i: int) -> int:
    return math.prod(self.shapes[i])

  def __repr__(self):
    # Deterministic and short: it is part of the state's tree structure, which
    # checkpoints record and compare as text.
    names = lambda maps: ",".join(m.name if isinstance(m, CodeMap) else "-" for m in maps)
    # (shards only where a leaf has them: a plain-layout state's text is unchanged)
    key = (self.shapes, self.dtypes) + ((self.shards,) if self.shards else ())
    digest = hashlib.sha1(repr(key).encode()).hexdigest()[:10]
    return (f"StquantConfig(block_size={self.block_size}, mu_maps=[{names(self.mu_maps)}], "
            f"nu_maps=[{names(self.nu_maps)}], leaves={len(self.shapes)}, shapes#{digest})")


jax.tree_util.register_static(StquantConfig)


def make_config(params, block_size: int, mu_maps: tuple, nu_maps: tuple,
                policy=None, shards=()) -> StquantConfig:
  """The :class:`StquantConfig` of a state built for ``params`` by ``policy`` (``shards``:
  the leaves' per-shard layouts, if any has one)."""
  pairs = [leaf_shape_dtype(p) for p in jax.tree.leaves(params)]
  shards = tuple(shards) if any(x is not None for x in shards) else ()
  return StquantConfig(block_size, mu_maps, nu_maps, tuple(s for s, _ in pairs),
                       tuple(d.name for _, d in pairs), policy, shards)
