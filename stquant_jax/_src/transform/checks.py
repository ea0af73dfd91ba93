"""Checks of what a user hands ``scale_by_stquant``: its arguments, and each updates tree.

Constructor arguments are checked once, at construction (traced
hyperparameters from ``optax.inject_hyperparams`` pass). An updates tree is
checked against the state built by ``init`` at every trace: shapes, tree
structure and block counts are static, so these checks cost nothing under
``jit``; they turn what would be jax's bare "Dict key mismatch", a
broadcasting error or, worse, a silently accepted reshaped gradient into a
``ValueError`` that names the leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stquant_jax._src.codec.blocks import check_block_size
from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.codec.shards import num_layout_blocks
from stquant_jax._src.core.checks import check_choice, check_number
from stquant_jax._src.kernels.dispatch import BACKENDS
from stquant_jax._src.policy.base import Policy
from stquant_jax._src.state.typed import is_moment_mapping


def check_not_policy(**positional) -> None:
  """A :class:`Policy` given positionally lands in one of optax's arguments: say that
  ``policy`` is keyword-only instead of "b1 must be a number"."""
  for name, value in positional.items():
    if isinstance(value, Policy):
      raise TypeError(f"{name} got a {type(value).__name__}: policy is keyword-only, pass "
                      f"policy={type(value).__name__}(...) (optax's positional arguments come "
                      "first: learning_rate, b1, b2, eps, eps_root, mu_dtype, ...)")


def check_adam_hparams(b1, b2, eps, eps_root) -> None:
  """Concrete Adam hyperparameters in range; traced ones (inject_hyperparams) pass."""
  for name, value, hi in (("b1", b1, 1.0), ("b2", b2, 1.0), ("eps", eps, float("inf")),
                          ("eps_root", eps_root, float("inf"))):
    check_number(name, value, 0.0, hi, hi_open=True, traced_ok=True)


def check_options(policy, backend, mu_map, nu_map) -> None:
  """``scale_by_stquant``'s non-numeric options."""
  check_choice("backend", backend, BACKENDS)
  if not isinstance(policy, Policy):
    raise TypeError(f"policy must be a stquant_jax.Policy (e.g. FixedBits()), "
                    f"got {type(policy).__name__}")
  for name, fn in (("mu_map", mu_map), ("nu_map", nu_map)):
    if fn is not None and not callable(fn):
      raise TypeError(f"{name} must be a callable bits -> CodeMap, got {type(fn).__name__}")


def check_mu_dtype(mu_dtype) -> None:
  """optax's ``mu_dtype``: only None / float32 (what stquant stores besides codes)."""
  if mu_dtype is None:
    return
  try:
    dtype = jnp.dtype(mu_dtype)
  except TypeError as e:
    raise TypeError(f"mu_dtype={mu_dtype!r} is not a dtype") from e
  if dtype != jnp.float32:
    raise ValueError(
        f"mu_dtype={dtype.name} is not supported: stquant_jax stores m as block-quantized "
        "codes (set their width with policy=FixedBits(mu_bits=...)) and keeps float32 m for "
        "the leaves it does not quantize; pass mu_dtype=None")


def _first_map_difference(mine, theirs):
  for i, (a, b) in enumerate(zip(mine, theirs)):
    if a != b:
      name = lambda m: getattr(m, "name", m)
      return i + 2, name(a), name(b)
  return None


def check_config(config, block_size, mu_maps, nu_maps) -> None:
  """The state's :class:`StquantConfig` was built by a transform with these settings;
  raises a ``ValueError`` naming both values otherwise. Nothing to check for states
  built by hand (``config=None``) or a traced ``block_size``."""
  if config is None:
    return
  if block_size is not None and config.block_size != block_size:
    raise ValueError(f"scale_by_stquant(block_size={block_size}) was given a state built "
                     f"with block_size={config.block_size}; use the transform that built "
                     "the state (or re-initialise it)")
  for name, mine, theirs in (("mu_map", mu_maps, config.mu_maps),
                             ("nu_map", nu_maps, config.nu_maps)):
    diff = _first_map_difference(mine, theirs)
    if diff is not None:
      bits, a, b = diff
      raise ValueError(f"scale_by_stquant: this transform's {name} gives {a} at {bits} bits, "
                       f"the state was built with {b}; use the transform that built the state")


def static_block_size(block_size):
  """``block_size`` as a Python int; None when traced (inject_hyperparams' update).

  The block size only shapes the state at ``init``; ``update`` reads the layout
  from the state's static metadata, so a traced value there is harmless.
  """
  if isinstance(block_size, jax.core.Tracer):
    return None
  if isinstance(block_size, (jax.Array, np.ndarray)) and block_size.ndim == 0 \
      and jnp.issubdtype(block_size.dtype, jnp.integer):
    block_size = int(block_size)  # inject_hyperparams hands ints over as arrays
  check_block_size(block_size)
  return block_size


def _structure_matches(treedef, tree) -> bool:
  try:
    treedef.flatten_up_to(tree)
    return True
  except (ValueError, TypeError):
    return False


def _is_empty(x) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _paths(tree, is_leaf):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {jax.tree_util.keystr(path): x for path, x in flat}


def _listing(paths, limit=8):
  paths = sorted(paths)
  more = f" (+{len(paths) - limit} more)" if len(paths) > limit else ""
  return ", ".join(paths[:limit]) + more


def _describe(x) -> str:
  if x is None:
    return "None"
  if isinstance(x, optax.MaskedNode):
    return "a masked leaf"
  if is_quantized(x):
    return f"a quantized moment of shape {tuple(x.shape)}"
  return f"an array of shape {tuple(jnp.shape(x))}"


def _structure_error(updates, moments) -> ValueError:
  """A readable error for an updates tree that does not match the state's."""
  got = _paths(updates, _is_empty)
  want = _paths(moments, lambda x: _is_empty(x) or is_quantized(x) or is_moment_mapping(x))
  lines = []
  if missing := set(want) - set(got):
    lines.append(f"in the optimizer state but not in the updates: {_listing(missing)}")
  if extra := set(got) - set(want):
    lines.append(f"in the updates but not in the optimizer state: {_listing(extra)}")
  for k in sorted(set(got) & set(want)):
    a, b = got[k], want[k]
    if (_is_empty(a) or _is_empty(b)) and _describe(a) != _describe(b):
      lines.append(f"{k}: the updates have {_describe(a)}, the state has {_describe(b)}")
  if not lines:
    lines.append(f"updates {jax.tree.structure(updates)} vs state "
                 f"{jax.tree.structure(moments, is_leaf=is_quantized)}")
  return ValueError("scale_by_stquant: the updates tree does not match the optimizer "
                    "state built by init (was the state initialised from other "
                    "params?): " + "; ".join(lines))


def _leaf_mismatch(path, g, mu, nu, block_size, shards=None) -> str | None:
  """Why a gradient leaf does not fit its stored moments (static checks), or None."""
  shape = tuple(g.shape)
  floating = jnp.issubdtype(g.dtype, jnp.floating)
  for name, q in (("mu", mu), ("nu", nu)):
    if is_quantized(q) or is_moment_mapping(q):
      if not floating:
        return (f"{path}: gradient dtype {g.dtype}, but the state holds moments of a "
                f"floating leaf")
      if is_quantized(q):
        if tuple(q.shape) != shape:
          return f"{path}: gradient shape {shape}, state {name} shape {tuple(q.shape)}"
        nb, bs = num_layout_blocks(shape, q.shards, q.block_size), q.block_size
      elif block_size is None:
        continue  # typed_moment (state/typed.py) explains
      else:
        nb, bs = num_layout_blocks(shape, shards, block_size), block_size
      codes, scales = (q.codes, q.scales) if is_quantized(q) else (q["codes"], q["scales"])
      if jnp.shape(scales) != (nb,) or jnp.shape(codes)[:1] != (nb,):
        return (f"{path}: gradient shape {shape} needs {nb} blocks of {bs}; state "
                f"{name} has codes {tuple(jnp.shape(codes))} and scales "
                f"{tuple(jnp.shape(scales))}")
    else:
      qshape = tuple(jnp.shape(q))
      if floating and qshape != shape:
        if qshape == (0,):
          return (f"{path}: gradient dtype {g.dtype} shape {shape}, but the state holds "
                  f"no moments there (the param was not floating at init)")
        return f"{path}: gradient shape {shape}, state {name} shape {qshape}"
      if not floating and qshape != (0,):
        return (f"{path}: gradient dtype {g.dtype}, but the state holds float32 moments "
                f"of shape {qshape} (the param was floating at init)")
  return None


def moments_for_updates(updates, treedef, leaves, mu, nu, block_size, shards=None):
  """``(mu_leaves, nu_leaves)`` aligned with the update leaves, after checking that every
  leaf fits its stored moments (``shards``: each leaf's per-shard layout, for bare
  ``{codes, scales}`` moments); raises a ``ValueError`` naming the leaves otherwise."""
  try:
    mu_leaves = treedef.flatten_up_to(mu)
    nu_leaves = treedef.flatten_up_to(nu)
  except (ValueError, TypeError) as e:
    bad = nu if _structure_matches(treedef, mu) else mu
    raise _structure_error(updates, bad) from e
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(updates)[0]]
  shards = [None] * len(leaves) if shards is None else shards
  problems = [p for p in map(_leaf_mismatch, paths, leaves, mu_leaves, nu_leaves,
                             [block_size] * len(leaves), shards) if p]
  if problems:
    raise ValueError("scale_by_stquant: the updates do not match the optimizer state "
                     "built by init: " + "; ".join(problems[:8])
                     + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))
  return mu_leaves, nu_leaves
