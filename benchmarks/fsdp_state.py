"""Per-device optimizer state and step temporaries under FSDP, compiled for a TPU slice (not run).

GPT-2 small (``experiments/models.py``, the real 50257-row vocabulary) with
every parameter sharded over one ``"d"`` mesh axis of a deviceless TPU topology
(default ``v5e:2x2``, 4 chips): on its leading axis where the chips divide it,
else on its last axis (the embedding ``wte`` goes ``P(None, "d")``: 50257 rows
do not split), else replicated. For ``optax.adamw`` and stquant 8-bit / 4-bit,
the state in the layout ``tx.init`` gives those sharded params (the per-shard
layout where a parameter's shards are not whole blocks of the plain one) and,
for comparison, in the plain layout (what a state had before: its moments of
``wte`` cannot be split and stay replicated). Reported per row: state bytes per
chip (from the shardings), the isolated optimizer step's (update + apply;
``--donate``: params, state and gradients by default, ``1 2`` for state and
gradients as in a train step) temporaries per chip and the elements its
collectives move (from ``memory_analysis()`` and the compiled HLO).

Usage: ``JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1 python -m benchmarks.fsdp_state
[--topology v5e:2x2] [--bits 8 4] [--json docs/fsdp_state.json]``; ``--topology
cpu:8`` compiles for 8 forced CPU devices instead. (needs the ``tpu-compile``
extra). Nothing runs on a TPU: these are compiler figures.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import stquant_jax as sq
from benchmarks._gpt2_step import abstract_params, gpt2_config
from benchmarks._io import print_and_write
from stquant_jax._src.distributed.placement import shards_for
from tests._hlo import MOVING, collectives


def param_spec(shape, n: int) -> P:
  """FSDP over one axis: the leading axis where ``n`` divides it, else the last, else none."""
  if len(shape) >= 1 and shape[0] % n == 0:
    return P("d")
  if len(shape) >= 2 and shape[-1] % n == 0:
    return P(*([None] * (len(shape) - 1)), "d")
  return P()


def per_shard_layout(state, pshard):
  """``state`` (abstract) with each quantized moment in the layout ``tx.init`` gives a
  parameter of that sharding (what the concrete sharded init builds)."""
  def leaf(q, ps):
    if not isinstance(q, sq.QuantizedArray):
      return q
    shards = shards_for(ps, q.shape, q.block_size)
    if shards is None:
      return q
    return jax.eval_shape(lambda: sq.quantize(jnp.zeros(q.shape), q.bits, signed=q.signed,
                                              block_size=q.block_size, shards=shards))
  st = state[0]
  mu = jax.tree.map(leaf, st.mu, pshard, is_leaf=lambda x: isinstance(x, sq.QuantizedArray))
  nu = jax.tree.map(leaf, st.nu, pshard, is_leaf=lambda x: isinstance(x, sq.QuantizedArray))
  return (st._replace(mu=mu, nu=nu),) + tuple(state[1:])


def per_device_bytes(abstract, shardings) -> int:
  leaves = jax.tree.leaves(abstract)
  shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, shs))


def case(name, tx, params, pshard, layout: str, donate=(0, 1, 2)):
  state = jax.eval_shape(tx.init, params)
  if layout == "per-shard":
    state = per_shard_layout(state, pshard)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the plain layout's mismatch warning is the point
    sshard = sq.state_shardings(state, pshard)
  put = lambda tree, sh: jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  t0 = time.perf_counter()
  mesh = jax.tree.leaves(pshard, is_leaf=lambda x: isinstance(x, NamedSharding))[0].mesh
  # Traced under the slice's (abstract) mesh, as on the slice itself: the per-device
  # work (map_local_blocks) sees several devices.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    lowered = jax.jit(step, donate_argnums=donate, out_shardings=(pshard, sshard)).trace(
        put(params, pshard), put(state, sshard), put(params, pshard)).lower()
  compiled = lowered.compile()
  secs = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  moved = [n for op, n in collectives(compiled.as_text()) if op in MOVING]
  return {"optimizer": name, "layout": layout, "donate": list(donate),
          "state_MB_per_chip": per_device_bytes(state, sshard) / 1e6,
          "temp_MB_per_chip": mem.temp_size_in_bytes / 1e6,
          "moved_elements": int(sum(moved)), "compile_s": round(secs, 1)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", default="v5e:2x2",
                  help="a TPU topology (deviceless), or cpu:N for N forced CPU devices")
  ap.add_argument("--model", default="small")
  ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
  ap.add_argument("--donate", type=int, nargs="+", default=[0, 1, 2],
                  help="donated arguments of step(params, state, grads) for stquant (adamw: "
                       "all three); 1 2 is a train step's case, where the gradient is a "
                       "temporary the update may overwrite")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  if args.topology.startswith("cpu:"):
    # Read when the CPU client starts (the first use of a device), not at import.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.topology[4:]}")
    devices = jax.devices("cpu")
  else:
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices
  # Explicit axes: the per-device update goes through shard_map (libtpu's deviceless
  # compiler has no emitter for custom_partitioning, which Auto axes would use).
  mesh = Mesh(devices, ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
  n = len(devices)
  _, params = abstract_params(gpt2_config(args.model))
  pshard = jax.tree.map(lambda a: NamedSharding(mesh, param_spec(a.shape, n)), params)
  rows = [case("optax.adamw", optax.adamw(1e-3), params, pshard, "-")]
  for bits in args.bits:
    tx = sq.adamw(1e-3, policy=sq.FixedBits(bits, bits))
    for layout in ("per-shard", "plain"):
      rows.append(case(f"stquant {bits}-bit", tx, params, pshard, layout, tuple(args.donate)))
  base = rows[0]["state_MB_per_chip"]
  for r in rows:
    r["state_vs_adamw"] = round(r["state_MB_per_chip"] / base, 4)
  param_mb = sum(math.prod(a.shape) * 4 for a in jax.tree.leaves(params)) / 1e6
  table = "\n".join(
      ["| optimizer | layout | state MB / chip | vs adamw | temp MB / chip | moved elements |",
       "|---|---|---|---|---|---|"]
      + [f"| {r['optimizer']} | {r['layout']} | {r['state_MB_per_chip']:.1f} | "
         f"{r['state_vs_adamw']:.3f} | {r['temp_MB_per_chip']:.1f} | {r['moved_elements']} |"
         for r in rows])
  print_and_write({"topology": args.topology, "chips": n, "model": args.model,
                   "param_MB": param_mb, "param_MB_per_chip": param_mb / n, "rows": rows},
                  table, args.json)


if __name__ == "__main__":
  main()
