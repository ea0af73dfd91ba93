"""Which per-leaf update a backend runs: the fused kernel for CUDA, the jnp path elsewhere.

``backend="auto"`` stages out both and lets lowering choose
(:func:`~stquant_jax._src.kernels.platform.cuda_or`): a step lowered or
compiled for CUDA (on a GPU, or ahead of time on a CPU host) carries the
fused kernel, run on each device's own blocks
(:func:`~stquant_jax._src.kernels.sharded.local_adam_update`); the same step
lowered for CPU or TPU carries the jnp path, and an export for several
platforms carries both. ``backend="pallas"`` runs the kernel everywhere (Pallas
interpret mode off CUDA: tests). ``backend="jnp"`` never uses it.

On a local CUDA GPU each kernel configuration passes a first-use check
(:mod:`~stquant_jax._src.kernels.self_test`) before a step uses it; one that
fails takes the jnp path with one warning.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from stquant_jax._src.kernels.adam_update import supports
from stquant_jax._src.kernels.platform import cuda_or
from stquant_jax._src.kernels.self_test import KernelConfig, kernel_works
from stquant_jax._src.kernels.sharded import local_adam_update
from stquant_jax._src.kernels.tiling import DEFAULT_TILING, Tiling
from stquant_jax._src.update.adam import NEAREST, adam_leaf

BACKENDS = ("auto", "jnp", "pallas")


def _is_array(x) -> bool:
  return isinstance(x, jax.Array)  # tracers included


def _fused(g, mu, nu, *, backend: str, tiling: Tiling, rounding=NEAREST, leaf: int = 0,
           **scalars):
  rounding = tuple(rounding)
  # Traced scalars travel as arguments (the alternatives are traced apart);
  # Python numbers stay static so the kernel's hyperparameters round as before.
  traced = {k: v for k, v in scalars.items() if _is_array(v)}
  static = {k: v for k, v in scalars.items() if not _is_array(v)}
  common = dict(rounding=rounding, leaf=leaf, **static)

  def kernel(interpret):
    return lambda g, mu, nu, t: local_adam_update(g, mu, nu, **t, **common,
                                                  interpret=interpret, tiling=tiling)

  def jnp_path(g, mu, nu, t):
    return adam_leaf(g, mu, nu, **t, **common)

  fallback = kernel(True) if backend == "pallas" else jnp_path
  config = KernelConfig(mu.code_map, nu.code_map, mu.block_size, rounding,
                        jnp.dtype(g.dtype).name, tiling)
  cuda = kernel(False) if kernel_works(config) else jnp_path
  return cuda_or(cuda, fallback, g, mu, nu, traced)


def adam_leaf_fn(backend: str, mu, nu, *, tiling: Tiling | None = None):
  """The per-leaf update ``fn(g, mu, nu, **hparams) -> (u, mu, nu)`` for a backend.

  Args:
    backend: ``"auto"``, ``"jnp"`` or ``"pallas"`` (see the module docstring).
    mu, nu: the leaf's moments; float32 moments, or quantized ones the kernel
      cannot take (:func:`~stquant_jax._src.kernels.adam_update.supports`), always
      use the jnp path.
    tiling: the kernel's launch configuration.

  Returns:
    A function with :func:`~stquant_jax._src.update.adam.adam_leaf`'s signature.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> g = jnp.ones((4, 64))
    >>> mu, nu = sq.quantize(g * 0, 8), sq.quantize(g * 0, 8, signed=False)
    >>> fn = adam_leaf_fn("auto", mu, nu)
    >>> u, mu, nu = jax.jit(lambda g, mu, nu: fn(g, mu, nu, b1=0.9, b2=0.999, eps=1e-8,
    ...     eps_root=0.0, bc1=0.1, bc2=0.001))(g, mu, nu)
    >>> float(u[0, 0])  # lowered for this CPU: the jnp path
    1.0
  """
  if backend not in BACKENDS:
    raise ValueError(f"{backend=} must be one of {BACKENDS}")
  tiling = tiling or DEFAULT_TILING
  if backend == "jnp" or not supports(mu, nu, tiling=tiling):
    return adam_leaf
  return functools.partial(_fused, backend=backend, tiling=tiling)
