"""Compiling for an NVIDIA H100 on a machine without a GPU (deviceless ahead-of-time).

Lowering (``lowering.lower_for_cuda``) proves that Pallas produced Triton MLIR;
compiling runs the rest of a GPU build on this CPU: Triton -> LLVM -> PTX ->
``ptxas`` for ``sm_90a``, XLA's GPU passes, buffer assignment. It catches
shared-memory overflow, Triton compiler errors and (with
:data:`SPILL_FLAG` in ``XLA_FLAGS``) register spills, and
``compiled.memory_analysis()`` gives the program's argument, output, alias and
temporary bytes on the target. It does not catch launch-time limits, and
nothing is run.

Needs the CUDA plugin (``pip install "stquant-jax[cuda-compile]"``: ``jax-cuda12-plugin``,
``jax-cuda12-pjrt`` at jax's version and ``nvidia-cuda-nvcc-cu12`` for ``ptxas``);
no driver, cuDNN or GPU. Set ``JAX_PLATFORMS=cpu`` so the plugin does not try
to open a GPU at start-up. An LLVM fatal error aborts the whole process: run
each compile in a subprocess with a timeout.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, Mesh, NamedSharding

# XLA's GpuTargetConfig for an H100 SXM (80 GB HBM3), text form.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024  threads_per_warp: 32
  shared_memory_per_block: 49152  shared_memory_per_core: 233472
  threads_per_core_limit: 2048  core_count: 132  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000  l2_cache_size: 52428800  clock_rate_ghz: 1.98
  device_memory_size: 84929347584  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_HBM_BYTES_PER_S = 3.35e12  # the config's memory_bandwidth
SPILL_FLAG = "--xla_gpu_fail_ptx_compilation_on_register_spilling=true"


@dataclasses.dataclass(frozen=True)
class CudaTarget:
  """A GPU to compile for: XLA's target config and Pallas' abstract device."""

  target_config: str = H100_TARGET_CONFIG
  device_kind: str = "NVIDIA H100"
  num_cores: int = 132


H100 = CudaTarget()


def target_devices(n: int = 1, target: CudaTarget = H100):
  """``n`` compile-only devices of ``target`` (one host), from a topology description."""
  return topologies.get_topology_desc(
      platform="cuda", target_config=target.target_config, topology=f"1x1x{n}").devices


def _abstract_mesh(shape, names, axis_types, target: CudaTarget) -> AbstractMesh:
  return AbstractMesh(tuple(shape), tuple(names), tuple(axis_types),
                      abstract_device=AbstractDevice(device_kind=target.device_kind,
                                                     num_cores=target.num_cores,
                                                     platform="gpu"))


def _lower(fn, *args, specs=None, mesh_shape=None, mesh_axes=("d",), axis_types=None,
           donate_argnums=(), out_specs=None, target: CudaTarget = H100):
  """:func:`lower_for_target`'s work; returns ``(lowered, abstract mesh)``."""
  if mesh_shape is None:
    dev = target_devices(1, target)[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), args)
    amesh = _abstract_mesh((1,), ("x",), axis_types or (AxisType.Explicit,), target)
    jitted = jax.jit(fn, donate_argnums=donate_argnums)
  else:
    types = axis_types or (AxisType.Auto,) * len(mesh_shape)
    devs = np.array(target_devices(int(np.prod(mesh_shape)), target)).reshape(mesh_shape)
    mesh = Mesh(devs, tuple(mesh_axes), axis_types=tuple(types))
    named = lambda s: NamedSharding(mesh, s)
    shardings = jax.tree.map(named, specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        args, shardings)
    amesh = _abstract_mesh(mesh_shape, mesh_axes, types, dataclasses.replace(
        target, device_kind=devs.flat[0].device_kind))  # must match the devices' mesh
    out = None if out_specs is None else jax.tree.map(
        named, out_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    jitted = jax.jit(fn, donate_argnums=donate_argnums, out_shardings=out)
  with jax.sharding.use_abstract_mesh(amesh):
    return jitted.trace(*args).lower(lowering_platforms=("cuda",)), amesh


def lower_for_target(fn, *args, **kwargs):
  """``jax.jit(fn)`` traced and lowered for CUDA devices of ``target`` (not compiled).

  Args:
    fn: the function.
    *args: arrays or ``jax.ShapeDtypeStruct`` (only shapes and dtypes are used).
    **kwargs: ``specs``, ``mesh_shape``, ``mesh_axes``, ``axis_types``,
      ``donate_argnums``, ``out_specs``, ``target``: see :func:`compile_for_target`.

  Returns:
    The ``jax.stages.Lowered``.
  """
  return _lower(fn, *args, **kwargs)[0]


def compile_for_target(fn, *args, **kwargs):
  """``jax.jit(fn)`` compiled for CUDA devices of ``target`` (Triton, PTX, ``ptxas``).

  Args:
    fn: the function.
    *args: arrays or ``jax.ShapeDtypeStruct`` (only shapes and dtypes are used).
    specs: with ``mesh_shape``: a pytree of ``PartitionSpec`` matching ``args``.
    mesh_shape: compile for ``prod(mesh_shape)`` devices laid out as a mesh with
      ``mesh_axes`` (default: one device).
    mesh_axes: the mesh's axis names.
    axis_types: the mesh's axis types (default ``Explicit`` for one device, as
      Pallas needs an abstract device, ``Auto`` for several).
    donate_argnums: donated arguments (their buffers may hold outputs).
    out_specs: with ``mesh_shape``: output ``PartitionSpec`` pytree (or None).
    target: the GPU.

  Example (needs the ``cuda-compile`` extra, so not run here)::

    compiled = compile_for_target(step, params, state, batch, donate_argnums=(0, 1))
    compiled.memory_analysis().temp_size_in_bytes

  Returns:
    The ``jax.stages.Compiled`` (not runnable here: there is no GPU).
  """
  lowered, amesh = _lower(fn, *args, **kwargs)
  # Partitioning several devices lowers custom_partitioning's per-shard kernels during
  # the compile: Pallas needs the abstract GPU then as well.
  with jax.sharding.use_abstract_mesh(amesh):
    return lowered.compile()


def memory_summary(compiled) -> dict:
  """Bytes of a compiled program on its device: arguments, outputs, aliased, temporaries,
  and the peak ``arguments + outputs - aliased + temporaries``."""
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes)}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out
