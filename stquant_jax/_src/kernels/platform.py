"""Choose code by the platform being lowered for, not the host's default backend.

``jax.default_backend()`` at trace time says where *this process* runs, not
what the traced program is compiled for: ``jit(step).lower(lowering_platforms=
("cuda",))`` on a CPU host, a deviceless ahead-of-time compile for an H100, or
``jax.export`` for several platforms would all get the CPU code. :func:`cuda_or`
stages out both alternatives and lets lowering choose: the CUDA one when the
module is lowered for CUDA, the other one elsewhere; a module lowered for
several platforms carries both, behind a switch on the platform that XLA
resolves before compiling.

``jax.lax.platform_dependent`` does the same for ordinary code, but lowers every
branch for every platform of the module: a ``pallas_call`` in the CUDA branch
would be lowered for CPU too (an error outside interpret mode). The primitive
here lowers each alternative for its own platforms only
(``mlir.lower_per_platform``).
"""

from __future__ import annotations

import jax
from jax._src.interpreters import mlir as mlir_internal  # lower_per_platform
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

_cuda_or_p = jex_core.Primitive("stquant_cuda_or")
_cuda_or_p.multiple_results = True


def _abstract_eval(*avals, cuda, fallback):
  del avals, fallback
  return cuda.out_avals


def _impl(*args, cuda, fallback):
  # Eager calls: lower for the platform of the arrays like any jitted op.
  return jax.jit(lambda *a: _cuda_or_p.bind(*a, cuda=cuda, fallback=fallback))(*args)


def _lowering(ctx, *args, cuda, fallback):
  as_rule = lambda j: mlir.lower_fun(jex_core.jaxpr_as_fun(j), multiple_results=True)
  return mlir_internal.lower_per_platform(
      ctx, "stquant_cuda_or", {"cuda": as_rule(cuda)}, as_rule(fallback),
      jex_core.no_effects, *args)


def _batching(args, dims, *, cuda, fallback):
  in_axes = [d if isinstance(d, int) else None for d in dims]  # not mapped: None
  vm = lambda j: jax.vmap(jex_core.jaxpr_as_fun(j), in_axes=in_axes)
  outs = _bind(vm(cuda), vm(fallback), list(args))
  return outs, [0] * len(outs)


_cuda_or_p.def_abstract_eval(_abstract_eval)
_cuda_or_p.def_impl(_impl)
mlir.register_lowering(_cuda_or_p, _lowering)
batching.primitive_batchers[_cuda_or_p] = _batching


def _bind(cuda_fn, fallback_fn, flat):
  cuda = jax.make_jaxpr(cuda_fn)(*flat)
  fallback = jax.make_jaxpr(fallback_fn)(*flat)
  got = [(a.shape, a.dtype) for a in fallback.out_avals]
  want = [(a.shape, a.dtype) for a in cuda.out_avals]
  if got != want:
    raise TypeError(f"cuda_or: the alternatives' outputs differ: {want} vs {got}")
  return _cuda_or_p.bind(*flat, cuda=cuda, fallback=fallback)


def cuda_or(cuda_fn, fallback_fn, *args):
  """``cuda_fn(*args)`` where the program is lowered for CUDA, ``fallback_fn(*args)`` elsewhere.

  Both are traced; their outputs must have the same pytree structure, shapes and
  dtypes. Neither may close over traced values: pass those in ``args``.

  Args:
    cuda_fn: the CUDA alternative (e.g. a Pallas Triton kernel).
    fallback_fn: the alternative for every other platform.
    *args: pytrees of arrays passed to the chosen function.

  Returns:
    The chosen function's outputs.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = jax.jit(lambda x: cuda_or(lambda x: x + 1, lambda x: x - 1, x))
    >>> float(f(jnp.float32(0)))  # lowered for this CPU: the fallback
    -1.0
  """
  flat, in_tree = jax.tree.flatten(args)
  out_tree = []

  def flat_fn(fn):
    def run(*xs):
      out = fn(*jax.tree.unflatten(in_tree, xs))
      leaves, tree = jax.tree.flatten(out)
      out_tree.append(tree)
      return leaves
    return run

  outs = _bind(flat_fn(cuda_fn), flat_fn(fallback_fn), flat)
  if out_tree[0] != out_tree[1]:
    raise TypeError(f"cuda_or: the alternatives return different pytrees: "
                    f"{out_tree[0]} vs {out_tree[1]}")
  return jax.tree.unflatten(out_tree[0], outs)
