"""Correctly rounded float32 division and square root inside a kernel.

The jnp reference runs under XLA, whose float32 ``/`` and ``sqrt`` are IEEE
correctly rounded. Triton lowers ``arith.divf`` to the approximate
``div.full.f32`` (up to 2 ulp off), which can move a value across a code
boundary and break bit-exactness with the reference. On the GPU the kernels
therefore use ``div.rn.f32`` and ``sqrt.rn.f32`` through inline PTX. In
interpret mode (CPU) plain jnp is already correctly rounded and inline asm
cannot run, so ``ieee=False`` keeps the jnp operations.

:func:`correctly_rounded` applies that substitution to any jnp function (the
library's ``encode``/``decode``) by re-evaluating its jaxpr, so the kernels run
the library's own map code, whatever it becomes, instead of a copy of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu
from jax.extend import core as jex_core


def _asm(instruction: str, *values):
  values = [jnp.asarray(v, jnp.float32) for v in values]
  values = jnp.broadcast_arrays(*values)
  shape = values[0].shape
  if not shape:  # inline asm needs a tensor operand
    values = [v.reshape(1) for v in values]
  regs = ", ".join(f"${i}" for i in range(len(values) + 1))
  (out,) = plgpu.elementwise_inline_asm(
      f"{instruction} {regs};",
      args=values,
      constraints="=f" + ",f" * len(values),
      pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(values[0].shape, jnp.float32)],
  )
  return out.reshape(shape)


def div(x, y, *, ieee: bool):
  """``x / y`` in float32, correctly rounded on the GPU when ``ieee``."""
  if not ieee:
    return jnp.asarray(x, jnp.float32) / jnp.asarray(y, jnp.float32)
  return _asm("div.rn.f32", x, y)


def sqrt(x, *, ieee: bool):
  """``sqrt(x)`` in float32, correctly rounded on the GPU when ``ieee``."""
  if not ieee:
    return jnp.sqrt(jnp.asarray(x, jnp.float32))
  return _asm("sqrt.rn.f32", x)


_SUBJAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _is_f32(aval) -> bool:
  return getattr(aval, "dtype", None) == jnp.float32


def _eval(jaxpr, consts, args, ieee: bool):
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    prim = eqn.primitive
    if prim is lax.div_p and _is_f32(eqn.outvars[0].aval):
      outs = [div(*invals, ieee=ieee)]
    elif prim is lax.sqrt_p and _is_f32(eqn.outvars[0].aval):
      outs = [sqrt(*invals, ieee=ieee)]
    else:
      sub = next((eqn.params[k] for k in _SUBJAXPR_PARAMS
                  if isinstance(eqn.params.get(k), jex_core.ClosedJaxpr)), None)
      if sub is not None:  # jit / custom_jvp bodies: inline, substituting inside
        outs = _eval(sub.jaxpr, sub.consts, invals, ieee)
      else:
        outs = prim.bind(*invals, **eqn.params)
        outs = outs if prim.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def correctly_rounded(fn, *, ieee: bool):
  """Wraps a jnp function so its float32 ``div``/``sqrt`` use :func:`div`/:func:`sqrt`.

  Args:
    fn: a function of arrays built from jnp/lax operations.
    ieee: substitute the inline-PTX versions (GPU). With False the function's
      own operations run unchanged (interpret mode).

  Returns:
    A function with the same signature and outputs.
  """
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat_args = jax.tree.leaves(args)
    outs = _eval(closed.jaxpr, closed.consts, flat_args, ieee)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)
  return wrapped
