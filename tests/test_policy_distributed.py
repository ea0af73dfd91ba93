"""STQuantPolicy decisions on 8 forced CPU devices: pmap, shard_map and jit over sharded arrays.

Each device gets different gradients (no gradient all-reduce), so the moments
differ per device; the policy's statistics are psum-reduced over the axis, so
every replica must propose the same bits, equal to the single-device decision
on the concatenated leaves (whose sums are the devices' sums added up).
Runs in a subprocess: the device count must be set before jax is imported.
"""

import textwrap

import pytest

from _subprocess import run_json

_SCRIPT = textwrap.dedent(r"""
  import json
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  import stquant_jax as sq

  D = jax.device_count()
  assert D == 8, D
  # Per-device leaf shapes (whole blocks, so block boundaries line up when concatenated).
  SHAPES = {"a": (16, 256), "b": (32, 128), "c": (8, 512), "d": (64, 64)}
  SCALES = {"a": 1.0, "b": 0.02, "c": 0.3, "d": 0.001}

  def device_grads(step):
    out = []
    for i in range(D):
      g = {}
      for j, (k, s) in enumerate(SHAPES.items()):
        key = jax.random.fold_in(jax.random.key(100 * step + j), i)
        x = jax.random.normal(key, s)
        if k == "c":  # outliers: a structure-heavy leaf
          x = x * jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), s) < 0.01, 30.0, 1.0)
        g[k] = SCALES[k] * (x + 0.3 * (i + 1))
      out.append(g)
    return out

  def policy(axis_name, every=1):
    return sq.STQuantPolicy(every=every, min_interval=0, min_size=1024, axis_name=axis_name,
                            anneal_steps=0, n_thresholds=(0.9, 1.1), r_thresholds=(0.9, 1.1))

  STEPS = 2
  grads = [device_grads(s) for s in range(STEPS)]  # [step][device] trees
  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  concat = lambda trees: jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *trees)
  local_params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  global_params = {k: jnp.zeros((D * s[0],) + s[1:]) for k, s in SHAPES.items()}
  out = {}

  def single_device(grad_steps, every=1, sharding=None):
    # Final policy state of one device (or plain jit over `sharding`) on the
    # concatenated leaves.
    tx = sq.scale_by_stquant(policy=policy(None, every))
    st = jax.jit(tx.init)(global_params)
    upd = jax.jit(tx.update)
    for g in grad_steps:
      g = concat(g) if sharding is None else jax.device_put(concat(g), sharding)
      _, st = upd(g, st)
    return st.policy_state, g

  def replica_body(every=1):
    # One replica's steps (the pmap / shard_map body): `g_steps` leaves are [step, ...].
    tx = sq.scale_by_stquant(policy=policy("d", every))
    def run(g_steps):
      # The steps in a scan: one update traced and compiled, whatever their number.
      st, _ = jax.lax.scan(lambda st, g: (tx.update(g, st)[1], None), tx.init(local_params),
                           g_steps)
      return st.policy_state.proposed
    return run

  # [device, step, ...] leaves from [step][device] trees.
  per_device = lambda grad_steps: jax.tree.map(lambda *x: jnp.stack(x, axis=1),
                                               *[stack(g) for g in grad_steps])

  # Single device, concatenated leaves.
  ps, _ = single_device(grads)
  out["single"] = np.asarray(ps.proposed).tolist()
  out["single_zone"] = np.asarray(ps.zone).tolist()

  # pmap over 8 devices.
  g_steps = per_device(grads)
  out["pmap"] = np.asarray(jax.pmap(replica_body(), axis_name="d")(g_steps)).tolist()

  # shard_map over a 1-D mesh.
  mesh = jax.make_mesh((D,), ("d",))
  g_sharded = jax.device_put(g_steps, NamedSharding(mesh, P("d")))
  run = replica_body()
  sm = jax.jit(jax.shard_map(lambda g: run(jax.tree.map(lambda x: x[0], g))[None], mesh=mesh,
                             in_specs=(P("d"),), out_specs=P("d")))
  out["shard_map"] = np.asarray(sm(g_sharded)).tolist()

  # Plain jit over arrays sharded along the first axis (statistics are global already).
  ps, g = single_device(grads, sharding=NamedSharding(mesh, P("d")))
  out["jit_sharded"] = np.asarray(ps.proposed).tolist()
  out["jit_sharded_devices"] = len(g["a"].sharding.device_set)

  # every=4: statistics on a rotating 1/4 of the blocks per step, accumulated over the
  # period. Each device holds 32 blocks per leaf (a multiple of 4), so the local strided
  # samples concatenate to the global one and the pmap decision equals the single-device one.
  K = 4
  grads4 = [device_grads(10 + s) for s in range(K)]
  ps, _ = single_device(grads4, K)
  out["single_k4"] = np.asarray(ps.proposed).tolist()
  out["single_k4_decisions"] = int(ps.decisions)
  out["pmap_k4"] = np.asarray(jax.pmap(replica_body(K), axis_name="d")(per_device(grads4))).tolist()
  print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results():
  return run_json(_SCRIPT)


def test_single_device_decision_is_not_trivial(results):
  """The leaves land in different zones and bits, so the equalities below mean something."""
  bits = {b for row in results["single"] for b in row}
  zones = {z for row in results["single_zone"] for z in row}
  assert len(bits) >= 2 and len(zones) >= 2, results["single"]


def test_pmap_replicas_agree_with_each_other_and_single_device(results):
  reps = results["pmap"]
  assert len(reps) == 8
  assert all(r == reps[0] for r in reps)
  assert reps[0] == results["single"]


def test_shard_map_replicas_agree_with_each_other_and_single_device(results):
  reps = results["shard_map"]
  assert len(reps) == 8
  assert all(r == reps[0] for r in reps)
  assert reps[0] == results["single"]


def test_jit_over_sharded_arrays_matches_single_device(results):
  assert results["jit_sharded_devices"] == 8
  assert results["jit_sharded"] == results["single"]


def test_subsampled_statistics_agree_across_replicas_and_with_single_device(results):
  """every=4: each step samples 1/4 of the blocks; the period's sums still match."""
  assert results["single_k4_decisions"] == 1
  reps = results["pmap_k4"]
  assert len(reps) == 8 and all(r == reps[0] for r in reps)
  assert reps[0] == results["single_k4"]
  assert len({b for row in results["single_k4"] for b in row}) >= 2
