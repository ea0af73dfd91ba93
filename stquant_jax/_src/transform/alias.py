"""Ready-made optimizers: ``adam`` and ``adamw`` with quantized states."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from stquant_jax._src.codec.blocks import DEFAULT_BLOCK_SIZE
from stquant_jax._src.policy.base import Policy
from stquant_jax._src.transform.checks import check_not_policy
from stquant_jax._src.transform.scale_by_stquant import scale_by_stquant


def _float_leaves(params):
  """Default decay mask: every floating-point leaf (integer leaves never decay)."""
  return jax.tree.map(lambda p: jnp.issubdtype(jnp.asarray(p).dtype, jnp.floating), params)


def _floating_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` applied to floating-point updates; other leaves pass through as they are.

  ``scale_by_stquant`` gives integer leaves exact zero updates of their own
  dtype; multiplying those by a float learning rate would make them float32,
  and ``optax.apply_updates`` would then round integer params above 2**24
  (``p + 0.0`` in float32). The state is ``inner``'s own.
  """
  def update_fn(updates, state, params=None):
    new, state = inner.update(updates, state, params)
    def keep(n, u):
      dtype = getattr(u, "dtype", None)
      return n if dtype is None or jnp.issubdtype(dtype, jnp.floating) else u
    return jax.tree.map(keep, new, updates, is_leaf=lambda x: x is None), state
  return optax.GradientTransformation(inner.init, update_fn)


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    policy: Policy | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    mu_map: Callable | None = None,
    nu_map: Callable | None = None,
    rounding="stochastic",
    backend: str = "auto",
) -> optax.GradientTransformation:
  """Adam with block-wise quantized moments: a drop-in for :func:`optax.adam`.

  The positional and keyword arguments of ``optax.adam`` (0.2.8) come first, in
  its order; the quantization options are keyword-only. See
  :func:`scale_by_stquant` for ``mu_dtype`` (only None / float32), ``nesterov``
  and the options.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.ones((64, 128))}
    >>> tx = sq.adam(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, state, params)
    >>> round(float(optax.apply_updates(params, updates)["w"][0, 0]), 6)
    0.999
  """
  return optax.chain(
      scale_by_stquant(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, policy=policy,
                       block_size=block_size, mu_map=mu_map, nu_map=nu_map,
                       rounding=rounding, backend=backend),
      _floating_only(optax.scale_by_learning_rate(learning_rate)),
  )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    nesterov: bool = False,
    policy: Policy | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    mu_map: Callable | None = None,
    nu_map: Callable | None = None,
    rounding="stochastic",
    backend: str = "auto",
) -> optax.GradientTransformation:
  """AdamW with block-wise quantized moments: a drop-in for :func:`optax.adamw`.

  ``chain(scale_by_stquant(...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``, exactly as optax builds ``adamw``,
  except that integer leaves keep their exact zero update of their own dtype
  (optax's learning-rate scaling would make it float32, and
  ``optax.apply_updates`` would then round integer params above 2**24).
  The arguments of ``optax.adamw`` (0.2.8) come first, positionally and by
  keyword in its order; the quantization options are keyword-only.

  Args:
    learning_rate: a fixed rate or an optax schedule.
    b1, b2, eps, eps_root: Adam's hyperparameters.
    mu_dtype: only None (or float32): m is stored as codes (see ``policy``).
    weight_decay: decoupled weight decay.
    mask: optional pytree (or callable) selecting the leaves that decay;
      default: every floating-point leaf.
    nesterov: Nesterov momentum, as ``optax.adamw(nesterov=True)``.
    policy: bit allocation; default ``FixedBits()`` (8-bit m and v).
      Keyword-only, like every quantization option.
    block_size: values per quantization block (multiple of 32).
    mu_map, nu_map: optional ``callable(bits) -> CodeMap`` overriding the maps.
    rounding: ``"stochastic"`` (default), ``"nearest"`` or an ``(m, v)`` pair
      (see :func:`scale_by_stquant`).
    backend: ``"auto"`` (Pallas kernels on GPU, jnp elsewhere), ``"jnp"`` or
      ``"pallas"`` (forced; interpret mode on CPU; see :func:`scale_by_stquant`).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.zeros((256, 64))}
    >>> tx = sq.adamw(1e-2, policy=sq.FixedBits(mu_bits=4, nu_bits=4))
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> round(float(params["w"][0, 0]), 2)
    0.03
  """
  check_not_policy(weight_decay=weight_decay, mask=mask)
  if mask is None:
    mask = _float_leaves
  return optax.chain(
      scale_by_stquant(b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, policy=policy,
                       block_size=block_size, mu_map=mu_map, nu_map=nu_map,
                       rounding=rounding, backend=backend),
      # Integer leaves keep their exact zero update even if a user mask selects
      # them for decay (float32 -wd * p would truncate integer params).
      _floating_only(optax.add_decayed_weights(weight_decay, mask)),
      _floating_only(optax.scale_by_learning_rate(learning_rate)),
  )
