"""Bit-allocation policies: which leaves are quantized, and at how many bits.

A policy is consulted at ``init`` with each parameter's *global* shape and
dtype (never a device-local shard), and returns the bit-width for m and for v,
or ``None`` to keep that moment in float32. Policies may also carry state in
the optimizer state (the adaptive STQuant policy keeps its statistics there);
:class:`FixedBits` has none.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from stquant_jax._src.codec.packing import check_bits
from stquant_jax._src.core.checks import check_int


def is_float(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


class Policy:
  """Interface every bit-allocation policy implements.

  * :meth:`leaf_bits` (required) decides, at ``init``, each leaf's bit-widths
    from its global shape and dtype; :meth:`layout` (optional) decides them
    for the whole tree at once (a memory budget counts every leaf).
  * :meth:`init_state` / :meth:`update_state` (optional) keep the policy's own
    state inside the optimizer state. ``update_state`` runs inside the jitted
    update after the moments are refreshed; it must be pure jnp (no host
    round-trips) and may collect statistics with collectives over an axis name.
  * :meth:`proposed_bits` (optional) returns, from the policy state, the
    bit-widths the policy wants now; :func:`stquant_jax.relayout` applies them
    outside ``jit``. Bit-widths are static layout, so they never change inside
    a compiled step.
  * :meth:`bind` (optional) receives the transform's block size once.
  """

  def leaf_bits(self, shape: tuple[int, ...], dtype) -> tuple[int | None, int | None]:
    """(mu_bits, nu_bits) for a float leaf of global ``shape``; None keeps float32."""
    raise NotImplementedError

  def layout(self, params) -> list[tuple[int | None, int | None]]:
    """(mu_bits, nu_bits) per leaf of ``jax.tree.leaves(params)`` (global shapes):
    what ``init`` stores. Default: :meth:`leaf_bits` of each leaf."""
    return [self.leaf_bits(tuple(p.shape), p.dtype) for p in jax.tree.leaves(params)]

  def init_state(self, params) -> Any:
    del params
    return ()

  def update_state(self, state, updates, mu, nu, count) -> Any:
    """New policy state. ``updates`` are the incoming gradients; ``mu``/``nu``
    the refreshed moment trees (QuantizedArray, float32 array or placeholder
    leaves, aligned with ``updates``); ``count`` the new step count."""
    del updates, mu, nu, count
    return state

  def bind(self, block_size: int) -> "Policy":
    """This policy for a transform with ``block_size`` (``scale_by_stquant`` calls it
    once); policies whose decisions depend on the block size take it from here."""
    del block_size
    return self

  def proposed_bits(self, state) -> Any:
    """Pytree mirroring params of ``(mu_bits, nu_bits)`` wanted now, or None."""
    del state
    return None


@dataclasses.dataclass(frozen=True)
class FixedBits(Policy):
  """The same bit-widths for every large floating-point leaf.

  Leaves with fewer than ``min_size`` values (biases, norms, tiny tensors) keep
  float32 moments, as in bitsandbytes and torchao; so do moments whose bit-width
  is ``None``. Integer leaves get no moments at all.

  Args:
    mu_bits: bits for the first moment m (2..8), or None for float32.
    nu_bits: bits for the second moment v (2..8), or None for float32.
    min_size: leaves with fewer values stay in float32.

  Example:
    >>> import stquant_jax as sq
    >>> sq.FixedBits(mu_bits=4, nu_bits=4).leaf_bits((1024, 1024), "float32")
    (4, 4)
    >>> sq.FixedBits().leaf_bits((64,), "float32")
    (None, None)
  """

  mu_bits: int | None = 8
  nu_bits: int | None = 8
  min_size: int = 4096

  def __post_init__(self):
    check_bits(self.mu_bits, "mu_bits", allow_none=True)
    check_bits(self.nu_bits, "nu_bits", allow_none=True)
    check_int("min_size", self.min_size, 0)

  def leaf_bits(self, shape, dtype):
    if not is_float(dtype) or math.prod(shape) < self.min_size:
      return None, None
    return self.mu_bits, self.nu_bits
