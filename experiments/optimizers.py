"""Optimizers by name, and optimizer-state memory accounting.

Example:
  >>> tx = make_optimizer("adamw_bf16", 1e-3, weight_decay=0.1)
  >>> state = tx.init({"w": jnp.zeros((4, 4))})
  >>> state_bytes(state)  # count 4 + mu 16*2 + nu 16*4
  100
"""

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import quality

# name -> (stquant_jax policy class name, policy keyword arguments).
STQUANT_POLICIES = {
    "stquant8": ("FixedBits", {"mu_bits": 8, "nu_bits": 8}),
    "stquant4": ("FixedBits", {"mu_bits": 4, "nu_bits": 4}),
    "stquant_adaptive": ("STQuantPolicy", {}),
    "stquant_budget": ("STQuantPolicy", {"target_bits": 4.5}),
}
OPTIMIZERS = ("adamw", "adamw_bf16", "adamw_control", "adamw_jitter", *STQUANT_POLICIES)
GRAMMAR = ("stquant<M> / stquant<M>v<V> (fixed bits for m and v, e.g. stquant4v3), "
           "stquant_t<X> (STQuantPolicy(target_bits=X), e.g. stquant_t4.5); "
           "_b<B> after either sets the block size (e.g. stquant3_b32: 3 bits in blocks of 32; "
           "default 128); a trailing _nearest selects round-to-nearest moments; "
           "adamw_lr<F> is fp32 AdamW with the learning rate scaled by F "
           "(e.g. adamw_lr0.5: is the reference's learning rate tuned?); "
           "adamw_jitter<X> multiplies fp32 AdamW's m by 1 ± X u each step "
           "(e.g. adamw_jitter0.5: does noise of a low-bit m's size help or hurt?)")
CONTROL_PERTURBATION = 1e-6
# ``adamw_jitter``: the same perturbation at bfloat16's size (its largest relative
# rounding error is 2**-9; u * 2**-8 has the same spread). Not a control: it shows how
# far *any* perturbation as large as a low-precision moment's moves a run's final loss.
JITTER_PERTURBATION = 2.0 ** -8
_OPTAX = ("adamw", "adamw_bf16", "adamw_control", "adamw_jitter")


def parse_stquant(name: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """``(policy class name, policy kwargs, optimizer kwargs)`` of a quantized name.

  Besides :data:`STQUANT_POLICIES`, names follow :data:`GRAMMAR`.

  Example:
    >>> parse_stquant("stquant4v3_nearest")
    ('FixedBits', {'mu_bits': 4, 'nu_bits': 3}, {'rounding': 'nearest'})
    >>> parse_stquant("stquant_t4.5")
    ('STQuantPolicy', {'target_bits': 4.5}, {})
    >>> parse_stquant("stquant3_b32")
    ('FixedBits', {'mu_bits': 3, 'nu_bits': 3}, {'block_size': 32})
  """
  base, block, nearest = quality.name_parts(name)
  opt_kw = {"rounding": "nearest"} if nearest else {}
  if block is not None:
    if block <= 0 or block % 32:
      raise ValueError(f"{name!r}: the block size must be a positive multiple of 32")
    opt_kw["block_size"] = block
  if base in STQUANT_POLICIES:
    cls, kw = STQUANT_POLICIES[base]
    return cls, dict(kw), opt_kw
  m = re.fullmatch(r"stquant(\d)(?:v(\d))?", base)
  if m:
    mu = int(m.group(1))
    return "FixedBits", {"mu_bits": mu, "nu_bits": int(m.group(2) or mu)}, opt_kw
  m = re.fullmatch(r"stquant_t(\d+(?:\.\d+)?)", base)
  if m:
    return "STQuantPolicy", {"target_bits": float(m.group(1))}, opt_kw
  raise ValueError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)} "
                   f"or {GRAMMAR}")


def lr_scale(name: str) -> float | None:
  """``F`` of an ``adamw_lr<F>`` name (fp32 AdamW, learning rate times ``F``), else None.

  Example:
    >>> lr_scale("adamw_lr0.5"), lr_scale("adamw")
    (0.5, None)
  """
  m = re.fullmatch(r"adamw_lr(\d+(?:\.\d+)?)", name)
  if not m:
    return None
  scale = float(m.group(1))
  if scale <= 0:
    raise ValueError(f"{name!r}: the learning-rate factor must be positive")
  return scale


def jitter_size(name: str) -> float | None:
  """``X`` of an ``adamw_jitter<X>`` name (fp32 AdamW, m times ``1 ± X u`` each step).

  Example:
    >>> jitter_size("adamw_jitter0.5"), jitter_size("adamw_jitter"), jitter_size("adamw")
    (0.5, 0.00390625, None)
  """
  if name == "adamw_jitter":
    return JITTER_PERTURBATION
  m = re.fullmatch(r"adamw_jitter(\d+(?:\.\d+)?)", name)
  if not m:
    return None
  size = float(m.group(1))
  if not 0 < size <= 1:
    raise ValueError(f"{name!r}: the jitter must be in (0, 1]")
  return size


def _plain(name: str) -> bool:
  """Whether ``name`` is float32 optax AdamW or one of its variants (no policy)."""
  return name in _OPTAX or lr_scale(name) is not None or jitter_size(name) is not None


def is_known(name: str) -> bool:
  """Whether ``name`` is an optimizer this module can build."""
  if _plain(name):
    return True
  try:
    parse_stquant(name)
  except ValueError:
    return False
  return True


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


def perturbed_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                   perturbation: float = CONTROL_PERTURBATION,
                   seed: int = 0) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` whose stored m is multiplied by ``1 + perturbation * u``
  after every step, ``u`` uniform in [-1, 1] (a fresh draw per element and step).

  The quality protocol's control: a change a thousand times below bfloat16's
  rounding, so the spread it causes in the final loss is the noise floor of a
  comparison (the trajectory's own sensitivity), not an optimizer effect.
  """
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def update_fn(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    key = jax.random.fold_in(jax.random.key(seed + 7919), state.count)
    leaves, treedef = jax.tree.flatten(state.mu)
    keys = jax.random.split(key, max(len(leaves), 1))
    mu = [m * (1 + perturbation * jax.random.uniform(k, m.shape, m.dtype, -1.0, 1.0))
          for m, k in zip(leaves, keys)]
    return updates, state._replace(mu=treedef.unflatten(mu))

  return optax.GradientTransformation(inner.init, update_fn)


def make_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 1e-4, mask: Any = None, seed: int = 0,
                   **policy_kw) -> optax.GradientTransformation:
  """Returns the AdamW variant called ``name``.

  Args:
    name: ``"adamw"`` (f32 moments), ``"adamw_bf16"`` (bf16 first moment),
      ``"adamw_control"`` (f32, m perturbed by 1e-6 each step: the noise-floor
      control), ``"adamw_jitter"`` (m perturbed by 2**-8, bfloat16's size),
      ``"adamw_lr<F>"`` (f32, learning rate times F), ``"adamw_jitter<X>"`` (m
      perturbed by X), or a quantized name
      (:data:`STQUANT_POLICIES`, :data:`GRAMMAR`).
    learning_rate: Scalar or optax schedule.
    b1: First-moment decay.
    b2: Second-moment decay.
    eps: Denominator epsilon.
    weight_decay: Decoupled weight decay.
    mask: Optional weight-decay mask (pytree of bools or callable).
    seed: The run's seed (the control's perturbations depend on it).
    **policy_kw: Overrides of the stquant policy's keyword arguments.

  Returns:
    An ``optax.GradientTransformation``.
  """
  if _plain(name):
    if policy_kw:
      raise ValueError(f"{name=} takes no policy arguments, got {policy_kw}")
    scale = lr_scale(name)
    if scale is not None:
      lr = (learning_rate * scale if not callable(learning_rate)
            else lambda count: learning_rate(count) * scale)
      return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    size = CONTROL_PERTURBATION if name == "adamw_control" else jitter_size(name)
    if size is not None:
      return optax.chain(perturbed_adam(b1, b2, eps, perturbation=size, seed=seed),
                         optax.add_decayed_weights(weight_decay, mask),
                         optax.scale_by_learning_rate(learning_rate))
    mu_dtype = jnp.bfloat16 if name == "adamw_bf16" else None
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
                       weight_decay=weight_decay, mask=mask)
  policy = make_policy(name, **policy_kw)
  extra = {} if mask is None else {"mask": mask}
  extra.update(parse_stquant(name)[2])
  return _import_stquant().adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                                 weight_decay=weight_decay, policy=policy,
                                 **extra)


def make_policy(name: str, **policy_kw):
  """The ``stquant_jax`` bit-allocation policy of a quantized optimizer name.

  Returns:
    The policy, or None for the plain optax optimizers.
  """
  if _plain(name):
    return None
  policy_name, kw, _ = parse_stquant(name)
  stquant_jax = _import_stquant()
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
