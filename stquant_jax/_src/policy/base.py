"""Bit-allocation policies: which leaves are quantized, and at how many bits.

A policy is consulted at ``init`` with each parameter's *global* shape and
dtype (never a device-local shard), and returns the bit-width for m and for v,
or ``None`` to keep that moment in float32. Policies may also carry state in
the optimizer state (the adaptive STQuant policy keeps its statistics there);
:class:`FixedBits` has none.

The :class:`Policy` methods are the only contract between a policy and the
rest of the library: :func:`~stquant_jax.relayout`,
:func:`~stquant_jax.adaptive_jit`, the telemetry and the checkpoints reach the
policy that built a state through :func:`policy_of` and never read its state's
fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    layout the policy wants now; :func:`~stquant_jax.relayout` and
    :func:`~stquant_jax.adaptive_jit` apply it outside the compiled step (bit-widths
    are static layout, so they never change inside one). After a switch they
    hand the new layout back through :meth:`with_actual`.
  * :meth:`describe` (optional) reports the policy state on the host for
    :func:`~stquant_jax.bit_widths`, :class:`~stquant_jax.BitHistory` and
    :func:`~stquant_jax.summary`.
  * :meth:`bind` (optional) receives the transform's block size once.

  The transform keeps the bound policy with the state (:func:`policy_of`), so the
  tools above need no ``policy`` argument and never read the policy state
  themselves: any policy that implements these methods switches layouts as
  ``STQuantPolicy`` does. Bits codes: 2..8 quantized, 32 float32, 0 no moment (integer leaves).

  Example:
    A policy that quantizes every moment at 8 bits for the first ``n`` steps,
    then at 4 (its state: the step count and the layout the moments have):

    >>> import jax, jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> class EightThenFour(sq.Policy):
    ...   n = 3
    ...   def leaf_bits(self, shape, dtype):
    ...     return 8, 8
    ...   def init_state(self, params):
    ...     return {"count": jnp.zeros([], jnp.int32),
    ...             "layout": jnp.full((len(jax.tree.leaves(params)), 2), 8, jnp.int32)}
    ...   def update_state(self, state, updates, mu, nu, count):
    ...     return {**state, "count": count}
    ...   def proposed_bits(self, state):
    ...     return jnp.full_like(state["layout"], jnp.where(state["count"] < self.n, 8, 4))
    ...   def with_actual(self, state, bits):
    ...     return {**state, "layout": jnp.asarray(bits)}
    >>> tx = sq.adamw(1e-2, policy=EightThenFour())
    >>> params = {"w": jnp.ones((64, 64))}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   _, state = tx.update(params, state, params)
    >>> state = sq.relayout(state)   # re-packs at the bits proposed_bits gives
    >>> state[0].mu["w"].bits, state[0].policy_state["layout"].tolist()
    (4, [[4, 4]])
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

  def proposed_bits(self, state) -> jax.Array | None:
    """The layout the policy wants now, from its ``state``.

    Called inside the jitted step by :func:`~stquant_jax.adaptive_jit` (so it must
    be traceable: jnp only, no host round-trip) and outside ``jit`` by
    :func:`~stquant_jax.relayout`, the telemetry and ``restore_state``.

    Args:
      state: the policy state, as :meth:`update_state` returned it (with a leading
        replica axis on every array for a ``jax.pmap`` state; possibly a mapping
        after a ``flax.nnx.Optimizer`` step).

    Returns:
      int32 ``[L, 2]`` bits codes of (m, v) per leaf of ``jax.tree.leaves(params)``
      (2..8, 32 for float32; a leaf without moments ignores its row), with the
      state's leading replica axis if it has one; or None (the default): this
      policy never changes a layout. Whether it returns None must not depend on
      the state's values.
    """
    del state
    return None

  def with_actual(self, state, bits: np.ndarray) -> Any:
    """The policy ``state`` after its moments were re-laid out to ``bits``.

    :func:`~stquant_jax.relayout` and :func:`~stquant_jax.adaptive_jit` call it,
    outside ``jit``, after a switch; a policy that records the layout it runs
    with (``STQuantPolicy``'s ``actual``) updates it here. Default: ``state``.

    Args:
      state: the policy state (concrete arrays).
      bits: int32 ``[L, 2]`` host array, the bits codes the moments have now.
    """
    del bits
    return state

  def describe(self, state) -> dict[str, Any]:
    """Host telemetry of a (concrete) policy ``state``, for
    :func:`~stquant_jax.bit_widths` and :func:`~stquant_jax.summary`.

    Returns:
      ``{name: value}``: a numpy array of shape ``[L, 2]`` is reported per leaf and
      moment (``"zone"`` becomes ``mu_zone`` / ``nu_zone``, and a summary column);
      any other value (a JSON-friendly scalar) as it is. Default: ``{}``.
    """
    del state
    return {}


def policy_of(state) -> Policy:
  """The policy that built a :class:`~stquant_jax.ScaleByStquantState` (the one its
  transform bound, kept in ``state.config``); a policy that proposes nothing for a
  state built without one."""
  config = getattr(state, "config", None)
  policy = getattr(config, "policy", None)
  return Policy() if policy is None else policy


def is_concrete(tree) -> bool:
  """Whether every leaf of ``tree`` has a value (no ``ShapeDtypeStruct``, no tracer)."""
  return not any(isinstance(x, (jax.ShapeDtypeStruct, jax.core.Tracer))
                 for x in jax.tree.leaves(tree))


def proposes(policy: Policy, state) -> bool:
  """Whether ``policy`` can change the layout of a state whose policy state is
  ``state`` (concrete or abstract): its :meth:`Policy.proposed_bits` is not None."""
  return jax.eval_shape(policy.proposed_bits, state) is not None


def place_like(value: np.ndarray, old):
  """A small host array placed like ``old`` (e.g. replicated over a mesh that may span
  several processes); uncommitted like ``old`` when ``old`` is uncommitted. For
  :meth:`Policy.with_actual`, which writes host bits into a placed state."""
  if isinstance(old, jax.Array) and old.committed:
    return jax.device_put(value, old.sharding)
  return jnp.asarray(value)


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
