"""Lowering a function for a CUDA GPU on a machine without one.

Interpret mode runs kernels as jnp on the CPU and so cannot catch what Triton
refuses (``jnp.round``, value slicing, non-power-of-two tensors). Declaring an
abstract H100 and lowering for ``"cuda"`` runs the real Pallas -> Triton
lowering with no GPU present; the result contains one
``custom_call @__gpu$xla.gpu.triton`` per kernel.
"""

from __future__ import annotations

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_cuda(fn, *args, device_kind: str = "NVIDIA H100", num_cores: int = 132,
                   **kwargs) -> str:
  """StableHLO text of ``jax.jit(fn)(*args, **kwargs)`` lowered for a CUDA GPU.

  Args:
    fn: the function to lower (with ``interpret=False`` kernels inside).
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct``).
    device_kind: the abstract device's kind string.
    num_cores: its number of SMs.
    **kwargs: static keyword arguments passed to ``fn``.

  Returns:
    The lowered module as text.
  """
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice(
      device_kind=device_kind, num_cores=num_cores, platform="gpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    traced = jax.jit(lambda *a: fn(*a, **kwargs)).trace(*args)
    return traced.lower(lowering_platforms=("cuda",)).as_text()
