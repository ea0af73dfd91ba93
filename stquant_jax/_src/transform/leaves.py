"""The per-leaf special cases of ``scale_by_stquant``, each a named function.

:func:`init_moment` builds one leaf's moment at ``init``; :func:`update_leaf`
runs one leaf's step and handles, in this order: integer and float0 leaves (no
moments, zero update), moments handed back without their metadata
(``flax.nnx``), the backend (jnp path or fused Pallas kernel), and leaves on
Explicit mesh axes whose shards do not line up with whole blocks (run
replicated, resharded back).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from stquant_jax._src.codec.quantized import QuantizedArray, is_quantized
from stquant_jax._src.codec.shards import num_layout_blocks
from stquant_jax._src.distributed import mesh
from stquant_jax._src.distributed.placement import (
    explicit_leaf_is_local, quantized_shardings, shards_for)
from stquant_jax._src.kernels.adam_update import supports
from stquant_jax._src.kernels.dispatch import adam_leaf_fn
from stquant_jax._src.state.typed import typed_moment


def placeholder():
  """The moment of a leaf without moments (integer leaves): float32 ``[0]``."""
  return jnp.zeros((0,), jnp.float32)


def init_moment(param, bits, signed: bool, block_size: int, maps):
  """Initial moment for one leaf: zero codes with zero scales decode to zeros.

  ``bits`` None keeps a float32 moment. A concrete param sharded over several
  devices (FSDP) gets its moment sharded like it (see
  :func:`stquant_jax.state_shardings`), in the per-shard layout where its shards
  are not whole blocks of the plain one (:func:`shards_for`), so every device
  holds the blocks of its own shard; otherwise (single device, or traced params
  under jit) the plain layout and default placement.
  """
  if param is None:
    return None
  shape, dtype = tuple(param.shape), param.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    return placeholder()
  sharding = mesh.concrete_sharding(param)
  if bits is None:
    fs = sharding if sharding is not None and mesh.fits(sharding, shape) else None
    return mesh.zeros(shape, jnp.float32, fs)
  cmap = maps(bits, signed)
  shards = shards_for(sharding, shape, block_size)
  nb = num_layout_blocks(shape, shards, block_size)
  cs, ss = (None, None) if sharding is None else quantized_shardings(sharding, shape, nb)
  return QuantizedArray(
      codes=mesh.zeros((nb, block_size * bits // 32), jnp.uint32, cs),
      scales=mesh.zeros((nb,), jnp.float32, ss),
      code_map=cmap, block_size=block_size, shape=shape, dtype=jnp.dtype(jnp.float32),
      shards=shards)


class LeafUpdate(NamedTuple):
  """One leaf's results: the update, the new moments, and what the policy reads."""

  update: Any
  mu: Any
  nu: Any
  seen: tuple  # (gradient, mu, nu) for the policy's statistics


def non_float_update(g, param):
  """Integer / float0 leaves have no moments and a zero update. A float0 gradient
  (``jax.grad(..., allow_int=True)``) becomes zeros of the param's dtype when the
  param is given, so ``optax.apply_updates`` can add it."""
  if g.dtype == jax.dtypes.float0:
    return g if param is None else jnp.zeros(g.shape, jnp.asarray(param).dtype)
  return jnp.zeros_like(g)


def _replicated_moment(x):
  """A moment with its arrays resharded to replicated."""
  if is_quantized(x):
    return dataclasses.replace(x, codes=mesh.replicated(x.codes),
                               scales=mesh.replicated(x.scales))
  return x if x is None or x.size == 0 else mesh.replicated(x)


def _resharded_moment(new, old):
  """``new`` put back on the (Explicit) sharding of ``old``."""
  if is_quantized(new):
    return dataclasses.replace(new, codes=mesh.reshard_like(new.codes, old.codes),
                               scales=mesh.reshard_like(new.scales, old.scales))
  return new if new is None or new.size == 0 else mesh.reshard_like(new, old)


def replicated_update(leaf_fn, g, mu, nu, hparams) -> LeafUpdate:
  """``leaf_fn`` on replicated copies of an Explicit-sharded leaf whose shards do not
  line up with whole blocks; every output goes back to its input's sharding. The
  policy reads the replicated copies."""
  g_rep = mesh.replicated(g)
  u, new_mu, new_nu = leaf_fn(g_rep, _replicated_moment(mu), _replicated_moment(nu),
                              **hparams)
  return LeafUpdate(mesh.reshard_like(u, g), _resharded_moment(new_mu, mu),
                    _resharded_moment(new_nu, nu),
                    (g_rep, _replicated_moment(new_mu), _replicated_moment(new_nu)))


def update_leaf(g, mu, nu, param, *, hparams, backend: str, block_size, maps,
                shards=None) -> LeafUpdate:
  """One leaf of ``scale_by_stquant``'s update, every special case included.

  ``hparams`` are the keyword arguments of the per-leaf update
  (:func:`~stquant_jax._src.update.adam.adam_leaf`): Adam's scalars, the
  rounding and the stochastic rounding counter (step, leaf index). ``shards`` is
  the leaf's per-shard layout (for moments ``flax.nnx`` hands back bare).
  """
  if not jnp.issubdtype(g.dtype, jnp.floating):
    return LeafUpdate(non_float_update(g, param), mu, nu, (g, mu, nu))
  mu = typed_moment(mu, g.shape, True, block_size, maps, shards)
  nu = typed_moment(nu, g.shape, False, block_size, maps, shards)
  # (A per-shard layout, FSDP of a parameter sharded on a later axis, streams through
  # the jnp path whatever the backend: README "Many devices, many hosts".)
  if (backend == "pallas" and is_quantized(mu) and is_quantized(nu) and not supports(mu, nu)
      and not (mu.shards or nu.shards)):
    raise ValueError(
        f"backend='pallas' forces the fused kernel, which cannot update a leaf of shape "
        f"{tuple(g.shape)} in blocks of {mu.block_size} (it needs a power-of-two block_size "
        "and fewer than 2**31 values); use backend='auto' or 'jnp', or such a block_size")
  leaf_fn = adam_leaf_fn(backend, mu, nu)  # jnp path or the fused kernel
  moments = [x for x in (mu, nu) if x is not None]
  bs = next((x.block_size for x in moments if is_quantized(x)), None)
  if not explicit_leaf_is_local(g, moments, bs):
    return replicated_update(leaf_fn, g, mu, nu, hparams)
  u, new_mu, new_nu = leaf_fn(g, mu, nu, **hparams)
  return LeafUpdate(u, new_mu, new_nu, (g, new_mu, new_nu))
