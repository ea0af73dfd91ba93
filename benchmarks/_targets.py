"""Compile a function for a named platform on this CPU host: ``cpu``, an H100, or a TPU chip.

``h100*`` goes through :func:`pallas_kernels.compile_for_target` (XLA's deviceless
CUDA compiler; the ``cuda-compile`` extra); ``tpu_v5e`` / ``tpu_v6e`` / ``tpu_v5p``
through libtpu's deviceless compiler (the ``tpu-compile`` extra; run with
``JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1``) on one chip. Nothing is run.
"""

from __future__ import annotations

import jax

TPU_TOPOLOGIES = {"tpu_v5e": "v5e:1x1", "tpu_v6e": "v6e:1x1", "tpu_v5p": "v5p:1x1x1"}
# Peak HBM bandwidth per chip, bytes/s (vendors' datasheets), for modeled step times.
HBM_BYTES_PER_S = {"h100": 3.35e12, "tpu_v5e": 8.19e11, "tpu_v6e": 1.64e12,
                   "tpu_v5p": 2.765e12}


def compile_for(target: str, fn, *args, donate_argnums=()):
  """``fn`` jitted, lowered and compiled for ``target`` with abstract ``args``."""
  if target == "cpu":
    return jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
  if target.startswith("h100"):
    import pallas_kernels as pk
    return pk.compile_for_target(fn, *args, donate_argnums=donate_argnums)
  if target not in TPU_TOPOLOGIES:
    raise ValueError(f"unknown target {target!r}: cpu, h100*, or one of {sorted(TPU_TOPOLOGIES)}")
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  topo = topologies.get_topology_desc(topology_name=TPU_TOPOLOGIES[target], platform="tpu")
  sh = NamedSharding(Mesh(topo.devices[:1], ("d",)), P())
  args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), args)
  return jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
