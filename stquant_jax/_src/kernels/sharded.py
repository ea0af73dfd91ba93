"""The fused Adam kernel on each device's own blocks (FSDP without gathers).

``pallas_call`` has no partitioning rule, so with FSDP-sharded moments GSPMD
would gather its operands and every device would update the whole leaf. Here
the kernel runs through :func:`~stquant_jax._src.distributed.local_blocks.map_local_blocks`:
each device updates the blocks it holds, and the stochastic rounding counter is
offset by the global index of the device's first element, so the result is the
bit-identical result of the whole-leaf kernel (and of the jnp path's
``update.adam.adam_leaf``, up to the kernel's FMA contract).

The update is written into the gradient's buffer (``input_output_aliases``):
inside a train step the gradient is a temporary, so no parameter-sized update
buffer exists next to it, and ``optax.apply_updates`` then adds it to the
donated parameters in place.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from stquant_jax._src.codec.quantized import QuantizedArray
from stquant_jax._src.distributed.local_blocks import map_local_blocks, replicated_call
from stquant_jax._src.distributed.mesh import reshard_like
from stquant_jax._src.kernels.adam_update import (
    adam_hparams, adam_update_blocks_pallas, adam_update_leaf, counter)
from stquant_jax._src.kernels.tiling import Tiling
from stquant_jax._src.update.adam import NEAREST


def _like(new: QuantizedArray, old: QuantizedArray) -> QuantizedArray:
  """``new``'s arrays on ``old``'s (Explicit) shardings."""
  return dataclasses.replace(new, codes=reshard_like(new.codes, old.codes),
                             scales=reshard_like(new.scales, old.scales))


def _blocks_view(x, n_blocks: int, block_size: int):
  # Through the flat view: the merge then split keeps a sharded leading axis typed.
  return x.reshape(-1).reshape(n_blocks, block_size)


def local_adam_update(g, mu: QuantizedArray, nu: QuantizedArray, *, b1, b2, eps, eps_root,
                      bc1, bc2, rounding=NEAREST, step=0, leaf: int = 0, interpret: bool = False,
                      tiling: Tiling | None = None):
  """:func:`~stquant_jax._src.kernels.adam_update.adam_update_leaf` on each device's blocks.

  Same arguments and results as ``adam_update_leaf`` (without the fused AdamW
  tail). A leaf that is not a whole number of blocks cannot be split along
  blocks; it runs as one kernel on whole arrays (replicated, as its moments
  are). Outputs keep their inputs' (Explicit) shardings.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> g = jnp.ones((4, 64))
    >>> mu, nu = sq.quantize(jnp.zeros((4, 64)), 8), sq.quantize(jnp.zeros((4, 64)), 8, signed=False)
    >>> u, mu, nu = local_adam_update(g, mu, nu, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
    ...                               bc1=0.1, bc2=0.001, interpret=True)
    >>> float(u[0, 0]), mu.bits
    (1.0, 8)
  """
  hp = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, bc1=bc1, bc2=bc2)
  nb, bs = mu.scales.shape[0], mu.block_size
  if g.size != nb * bs or g.size == 0:
    # Traced hyperparameters and step go in as arguments: shard_map cannot close over
    # values typed with Explicit mesh axes.
    whole = lambda g, mu, nu, hp, step: adam_update_leaf(
        g, mu, nu, **hp, rounding=rounding, step=step, leaf=leaf, interpret=interpret,
        tiling=tiling)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()}
    u, new_mu, new_nu = replicated_call(whole, g, mu, nu, hp, jnp.asarray(step, jnp.int32))
    return reshard_like(u, g), _like(new_mu, mu), _like(new_nu, nu)
  rounding = tuple(rounding)

  def fn(first_block, rep, blk):
    hparams, ctr = rep
    mc, ms, vc, vs, g_local = blk
    ctr = ctr.at[2].add((first_block * bs).astype(jnp.uint32))
    u, mc, ms, vc, vs = adam_update_blocks_pallas(
        hparams, ctr, g_local.reshape(-1), mc, ms, vc, vs, mu_map=mu.code_map,
        nu_map=nu.code_map, block_size=bs, rounding=rounding, interpret=interpret,
        tiling=tiling)
    return [mc, ms, vc, vs, u.reshape(g_local.shape)], ()

  rep = [adam_hparams(b1, b2, eps, eps_root, bc1, bc2), counter(step, leaf)]
  blocks = [mu.codes, mu.scales, nu.codes, nu.scales, _blocks_view(g, nb, bs)]
  (mc, ms, vc, vs, u), _ = map_local_blocks(fn, rep, blocks)
  u = reshard_like(u.reshape(-1).reshape(g.shape), g)
  return (u, _like(dataclasses.replace(mu, codes=mc, scales=ms), mu),
          _like(dataclasses.replace(nu, codes=vc, scales=vs), nu))
