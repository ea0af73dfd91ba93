"""Ready-made optimizers on :func:`~stquant_jax._src.transform.quantized.quantized`:
``lion``, ``sgd``, ``rmsprop`` and ``ademamix`` with quantized states.

Each takes the arguments of its optax namesake (optax 0.2.8; ``ademamix`` is
``optax.contrib.ademamix``) positionally and by keyword in optax's order, then
the quantization options, keyword-only, and is
``quantized(optax.<name>(...), policy=..., block_size=..., rounding=...,
elementwise=True)``: these optimizers are elementwise in the parameters, so each
leaf's moments are streamed a chunk of blocks at a time and the step's temporaries
stay a few chunk buffers (measured on one 4096 x 4096 leaf at 8 bits: 0.5-1.6 MB,
under 2.5% of the parameter bytes; ``python -m benchmarks.generic_temps``).
"""

from __future__ import annotations

from typing import Any, Callable

import optax
from optax import contrib

from stquant_jax._src.codec.blocks import DEFAULT_BLOCK_SIZE
from stquant_jax._src.policy.base import Policy
from stquant_jax._src.transform.checks import check_not_policy
from stquant_jax._src.transform.quantized import quantized


def lion(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-3,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    policy: Policy | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    rounding="stochastic",
) -> optax.GradientTransformationExtraArgs:
  """Lion with its momentum stored quantized (signed map, ``policy.mu_bits``).

  ``quantized(optax.lion(learning_rate, b1, b2, mu_dtype, weight_decay, mask), ...)``;
  see :func:`quantized` for the options. Lion keeps one moment, so 8-bit Lion
  stores ~1 byte per parameter (fp32 Lion: 4).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.zeros((64, 128))}
    >>> tx = sq.lion(1e-3, policy=sq.FixedBits(4, 4))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, state, params)
    >>> round(float(updates["w"][0, 0]), 6), state.inner_state[0].mu["w"].bits
    (-0.001, 4)
  """
  check_not_policy(b1=b1, b2=b2, mu_dtype=mu_dtype, weight_decay=weight_decay, mask=mask)
  return quantized(optax.lion(learning_rate, b1, b2, mu_dtype, weight_decay, mask),
                   policy=policy, block_size=block_size, rounding=rounding,
                   elementwise=True)


def sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any | None = None,
    *,
    policy: Policy | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    rounding="stochastic",
) -> optax.GradientTransformationExtraArgs:
  """SGD whose momentum (``optax.trace``'s ``trace``) is stored quantized.

  ``quantized(optax.sgd(learning_rate, momentum, nesterov, accumulator_dtype), ...)``;
  without ``momentum`` there is no state to quantize. See :func:`quantized`.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.zeros((64, 128))}
    >>> tx = sq.sgd(0.1, momentum=0.9)
    >>> state = tx.init(params)
    >>> for _ in range(2):
    ...   updates, state = tx.update({"w": jnp.ones((64, 128))}, state, params)
    >>> round(float(updates["w"][0, 0]), 4), state.inner_state[0].trace["w"].bits
    (-0.19, 8)
  """
  check_not_policy(momentum=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)
  return quantized(optax.sgd(learning_rate, momentum, nesterov, accumulator_dtype),
                   policy=policy, block_size=block_size, rounding=rounding,
                   elementwise=True)


def rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    policy: Policy | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    rounding="stochastic",
) -> optax.GradientTransformationExtraArgs:
  """RMSprop with its statistics stored quantized.

  ``quantized(optax.rmsprop(...), ...)`` with optax's arguments: ``nu`` (the
  mean square) takes the unsigned map and ``policy.nu_bits``; the centered
  variant's ``mu`` and the ``momentum`` trace take the signed map and
  ``policy.mu_bits``. See :func:`quantized`.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.zeros((64, 128))}
    >>> tx = sq.rmsprop(1e-3, policy=sq.FixedBits(8, 4))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, state, params)
    >>> nu = state.inner_state[0].nu["w"]
    >>> nu.bits, nu.signed, round(float(updates["w"][0, 0]), 5)
    (4, False, -0.00316)
  """
  check_not_policy(decay=decay, eps=eps, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt,
                   centered=centered, momentum=momentum, nesterov=nesterov,
                   bias_correction=bias_correction)
  return quantized(
      optax.rmsprop(learning_rate, decay, eps, initial_scale, eps_in_sqrt, centered, momentum,
                    nesterov, bias_correction),
      policy=policy, block_size=block_size, rounding=rounding,
                   elementwise=True)


def ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    policy: Policy | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    rounding="stochastic",
) -> optax.GradientTransformationExtraArgs:
  """AdEMAMix (``optax.contrib.ademamix``) with its three moments stored quantized.

  The fast and slow EMAs ``m1``, ``m2`` take the signed map and
  ``policy.mu_bits``, ``nu`` the unsigned map and ``policy.nu_bits``. See
  :func:`quantized`.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.zeros((64, 128))}
    >>> tx = sq.ademamix(1e-3)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((64, 128))}, state, params)
    >>> [state.inner_state[0]._asdict()[k]["w"].signed for k in ("m1", "m2", "nu")]
    [True, True, False]
  """
  check_not_policy(b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps, eps_root=eps_root,
                   mu_dtype=mu_dtype, weight_decay=weight_decay, mask=mask)
  return quantized(
      contrib.ademamix(learning_rate, b1, b2, b3, alpha, eps, eps_root, mu_dtype, weight_decay,
                       mask),
      policy=policy, block_size=block_size, rounding=rounding,
                   elementwise=True)
