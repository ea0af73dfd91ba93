"""Optimizers by name, and optimizer-state memory accounting.

Example:
  >>> tx = make_optimizer("adamw_bf16", 1e-3, weight_decay=0.1)
  >>> state = tx.init({"w": jnp.zeros((4, 4))})
  >>> state_bytes(state)  # count 4 + mu 16*2 + nu 16*4
  100
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# name -> (stquant_jax policy class name, policy keyword arguments).
STQUANT_POLICIES = {
    "stquant8": ("FixedBits", {"mu_bits": 8, "nu_bits": 8}),
    "stquant4": ("FixedBits", {"mu_bits": 4, "nu_bits": 4}),
    "stquant_adaptive": ("STQuantPolicy", {}),
    "stquant_budget": ("STQuantPolicy", {"target_bits": 4.5}),
}
OPTIMIZERS = ("adamw", "adamw_bf16", *STQUANT_POLICIES)


def _import_stquant():
  try:
    import stquant_jax
  except ImportError as e:
    raise ImportError(
        "The quantized optimizers need the stquant_jax library: run "
        "`pip install -e .` from the repository root.") from e
  if not hasattr(stquant_jax, "adamw"):
    raise ImportError("stquant_jax is installed but has no `adamw`.")
  return stquant_jax


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 1e-4, mask: Any = None,
                   **policy_kw) -> optax.GradientTransformation:
  """Returns the AdamW variant called ``name``.

  Args:
    name: One of :data:`OPTIMIZERS`: ``"adamw"`` (f32 moments),
      ``"adamw_bf16"`` (bf16 first moment) or a quantized ``"stquant*"``.
    learning_rate: Scalar or optax schedule.
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Denominator epsilon.
    weight_decay: Decoupled weight decay.
    mask: Optional weight-decay mask (pytree of bools or callable).
    **policy_kw: Overrides of the stquant policy's keyword arguments.

  Returns:
    An ``optax.GradientTransformation``.
  """
  if name == "adamw" or name == "adamw_bf16":
    if policy_kw:
      raise ValueError(f"{name=} takes no policy arguments, got {policy_kw}")
    mu_dtype = jnp.bfloat16 if name == "adamw_bf16" else None
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
                       weight_decay=weight_decay, mask=mask)
  policy = make_policy(name, **policy_kw)
  extra = {} if mask is None else {"mask": mask}
  return _import_stquant().adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                                 weight_decay=weight_decay, policy=policy,
                                 **extra)


def make_policy(name: str, **policy_kw):
  """The ``stquant_jax`` bit-allocation policy of a quantized optimizer name.

  Returns:
    The policy, or None for the plain optax optimizers.
  """
  if name in ("adamw", "adamw_bf16"):
    return None
  if name not in STQUANT_POLICIES:
    raise ValueError(f"{name=} must be one of {OPTIMIZERS}")
  stquant_jax = _import_stquant()
  policy_name, kw = STQUANT_POLICIES[name]
  if not hasattr(stquant_jax, policy_name):
    raise ImportError(f"{name=} needs stquant_jax.{policy_name}, which this "
                      "version of stquant_jax does not provide.")
  return getattr(stquant_jax, policy_name)(**{**kw, **policy_kw})


def _leaf_nbytes(x) -> int:
  if hasattr(x, "shape") and hasattr(x, "dtype"):  # arrays and ShapeDtypeStruct
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize
  return 0


def _stquant_attr(name: str):
  """``stquant_jax.<name>`` if the library is importable and has it."""
  try:
    import stquant_jax
  except ImportError:
    return None
  return getattr(stquant_jax, name, None)


def state_bytes(opt_state) -> int:
  """Bytes held by an optimizer state (arrays or ``jax.ShapeDtypeStruct``).

  Uses ``stquant_jax.state_nbytes`` when the library provides it, otherwise
  sums the array leaves.
  """
  fn = _stquant_attr("state_nbytes")
  if fn is not None:
    return int(fn(opt_state))
  return sum(_leaf_nbytes(x) for x in jax.tree.leaves(opt_state))


def average_bits(opt_state) -> float | None:
  """``stquant_jax.average_bits(opt_state)``, or None when not available."""
  fn = _stquant_attr("average_bits")
  return None if fn is None else float(fn(opt_state))  # Raises if not stquant.
