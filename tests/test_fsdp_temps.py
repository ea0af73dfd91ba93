"""Under FSDP the optimizer step's temporaries stay a few chunks, whatever the leaves.

8 forced CPU devices (a subprocess); the step ``update + apply`` compiled (not
run) with the state and gradients donated, as in a train step. Leaves of 1 MiB
per device, sharded on their rows (plain layout) and on their columns
(per-shard layout), and leaves whose part on a device is under two chunks, each device's part streamed through
:func:`~stquant_jax._src.distributed.local_blocks.map_local_blocks`. The test
checks, under Explicit and Auto meshes: the temporaries are under a quarter of
the parameter bytes per device (a leaf-sized buffer per leaf, the update held
beside the gradient, made them 1x and more), and four leaves need no more than
one does plus a little (each leaf's pieces run in its own loop, so the leaves'
temporaries do not add up: they did, 19 MB per device for GPT-2 small, before
the small parts of leaves were streamed in two chunks).
"""

import textwrap

import pytest

from _subprocess import run_json

_SCRIPT = textwrap.dedent(r"""
  import json, warnings
  import jax, jax.numpy as jnp, optax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import stquant_jax as sq
  warnings.simplefilter("ignore")

  SPECS = (P("d"), P(None, "d"))
  tx = sq.adamw(1e-3)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def temps(mesh_type, n_leaves):
    mesh = jax.make_mesh((8,), ("d",), axis_types=(getattr(AxisType, mesh_type),))
    # Big leaves on rows and on columns, and small ones (under two chunks per device).
    shapes = {f"w{i}": ((1024, 2048), SPECS[i % 2]) for i in range(n_leaves)}
    shapes.update({f"s{i}": ((768, 768), P("d")) for i in range(n_leaves)})
    ps = {k: NamedSharding(mesh, spec) for k, (_, spec) in shapes.items()}
    shapes = {k: shape for k, (shape, _) in shapes.items()}
    state = tx.init(jax.device_put({k: jnp.zeros(s) for k, s in shapes.items()}, ps))
    ss = sq.state_shardings(state, ps)
    put = lambda t, sh: jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t, sh)
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      c = jax.jit(step, donate_argnums=(1, 2), out_shardings=(ps, ss)).trace(
          put(params, ps), put(state, ss), put(params, ps)).lower().compile()
    layouts = [q.shards for q in jax.tree.leaves(
        state[0].mu, is_leaf=lambda x: isinstance(x, sq.QuantizedArray))]
    return {"temp": c.memory_analysis().temp_size_in_bytes,
            "param_per_device": sum(a * b for a, b in shapes.values()) * 4 // 8, "layouts": str(layouts)}

  out = {m: {n: temps(m, n) for n in (1, 4)} for m in ("Explicit", "Auto")}
  print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result():
  return run_json(_SCRIPT)


@pytest.mark.parametrize("mesh_type", ["Explicit", "Auto"])
def test_fsdp_step_temporaries_are_bounded(result, mesh_type):
  one, four = result[mesh_type]["1"], result[mesh_type]["4"]
  # Both layouts are exercised: rows (plain, shards None) and columns (per-shard).
  assert "None" in four["layouts"] and "(1, 8)" in four["layouts"], four["layouts"]
  assert four["temp"] <= 0.25 * four["param_per_device"], four
  assert four["temp"] <= 1.25 * one["temp"] + 64 * 1024, (one, four)
