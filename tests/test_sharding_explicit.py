"""Explicit-axis meshes (jax.make_mesh's default), on 8 forced CPU devices.

Under Explicit axes the sharding is part of each array's type, so reshapes that
would split or merge a sharded axis are type errors. Checked here: ``tx.init``
on concrete sharded params creates the moments sharded like them; leaves whose
shards do not line up with whole blocks (sharded along a later axis, ragged)
run their update replicated and keep their shardings; ``relayout`` with
``param_shardings`` places a float32 moment as ``state_shardings`` says; m and
v at different widths (different packing groups) update sharded. Every result
is compared with one device. The FSDP / pmap / shard_map comparisons are in
tests/test_sharding.py. Runs in a subprocess: the device count must be set
before jax is imported.
"""

import textwrap

import pytest

from _subprocess import run_json

_SCRIPT = textwrap.dedent(r"""
  import contextlib, json
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import stquant_jax as sq

  assert jax.device_count() == 8, jax.devices()
  mesh8 = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  out = {}
  # ---------------------------------------- eager init and non-aligned leaves (Explicit mesh)
  # tx.init on concrete sharded params creates the moments sharded like them (no
  # state_shardings needed); leaves whose shards do not line up with whole blocks
  # (sharded along a later axis, ragged) run replicated inside the update and keep
  # their shardings; results match one device.
  ex_shapes = {"lead": ((1024, 64), P("fsdp", None)), "later": ((64, 1024), P(None, "fsdp")),
               "ragged": ((8, 100), P("fsdp", None)), "rep": ((64, 64), P())}
  ex_params = {k: jax.random.normal(jax.random.fold_in(jax.random.key(7), i), s)
               for i, (k, (s, _)) in enumerate(ex_shapes.items())}
  ex_tx = sq.adamw(1e-2, policy=sq.STQuantPolicy(every=2, min_interval=0, min_size=0,
                                                 anneal_steps=0))
  def ex_loss(p):
    return sum(jnp.sum(jnp.sin(x) ** 2) for x in jax.tree.leaves(p))
  def ex_step(p, s):
    u, s = ex_tx.update(jax.grad(ex_loss)(p), s, p)
    return optax.apply_updates(p, u), s
  def ex_run(params, ctx, st=None):
    st = ex_tx.init(params) if st is None else st
    with ctx:
      f = jax.jit(ex_step)
      for i in range(4):
        params, st = f(params, st)
        if i % 2 == 1:
          st = sq.relayout(st)
    return params, st
  ex_sharded = {k: jax.device_put(v, NamedSharding(mesh8, ex_shapes[k][1]))
                for k, v in ex_params.items()}
  ex_init = ex_tx.init(ex_sharded)[0].mu
  # One device from the same initial state (the same block layout: "later" and "ragged"
  # are in the per-shard layout).
  one = lambda x: jax.device_put(np.asarray(x), jax.devices()[0])
  p1, s1 = ex_run(ex_params, contextlib.nullcontext(),
                  jax.tree.map(one, ex_tx.init(ex_sharded)))
  p8, s8 = ex_run(ex_sharded, jax.set_mesh(mesh8))
  out["explicit"] = {k: {
      "init_codes": str(ex_init[k].codes.sharding.spec),
      "codes": str(s8[0].mu[k].codes.sharding.spec),
      "param": str(p8[k].sharding.spec),
      "max_diff": float(jnp.max(jnp.abs(p1[k] - np.asarray(p8[k])))),
      "moved": float(jnp.max(jnp.abs(p1[k] - ex_params[k]))),
      "bits_equal": (s1[0].mu[k].bits, s1[0].nu[k].bits) == (s8[0].mu[k].bits, s8[0].nu[k].bits),
  } for k in ex_shapes}
  out["explicit_props"] = [np.asarray(s1[0].policy_state.proposed).tolist(),
                           np.asarray(s8[0].policy_state.proposed).tolist()]
  # relayout(param_shardings=...) to float32 for the later-axis leaf: placed as
  # state_shardings says, so a step with in_shardings from state_shardings runs (and the
  # policy's statistics read the float32 moment sharded along a later axis).
  def ex_propose(state, leaf, bits):
    ps = state[0].policy_state
    prop = np.asarray(ps.proposed).copy()
    prop[sorted(ex_shapes).index(leaf), 0] = bits
    ps = ps._replace(proposed=jax.device_put(prop, ps.proposed.sharding))
    return (state[0]._replace(policy_state=ps),) + tuple(state[1:])
  with jax.set_mesh(mesh8):
    s9 = sq.relayout(ex_propose(s8, "later", 32), param_shardings=p8)
    ss9 = sq.state_shardings(s9, p8)
    pss = jax.tree.map(lambda x: x.sharding, p8)
    f9 = jax.jit(ex_step, in_shardings=(pss, ss9), out_shardings=(pss, ss9))
    p10, s10 = f9(p8, s9)
    p10, s10 = f9(p10, s10)
  # m and v at different widths (8 / 4: different packing groups) on an aligned leaf.
  mixed_tx = sq.adamw(1e-2, policy=sq.FixedBits(8, 4, min_size=0))
  def mixed_run(params, ctx):
    st = mixed_tx.init(params)
    def step(p, s):
      u, s = mixed_tx.update(jax.grad(ex_loss)(p), s, p)
      return optax.apply_updates(p, u), s
    with ctx:
      f = jax.jit(step)
      for _ in range(3):
        params, st = f(params, st)
    return params, st
  lead = {"lead": ex_params["lead"]}
  pm1, _ = mixed_run(lead, contextlib.nullcontext())
  pm8, sm8 = mixed_run({"lead": ex_sharded["lead"]}, jax.set_mesh(mesh8))
  out["explicit_mixed"] = {
      "max_diff": float(jnp.max(jnp.abs(pm1["lead"] - np.asarray(pm8["lead"])))),
      "codes": [str(sm8[0].mu["lead"].codes.sharding.spec),
                str(sm8[0].nu["lead"].codes.sharding.spec)],
      "bits": [sm8[0].mu["lead"].bits, sm8[0].nu["lead"].bits]}
  out["explicit_float"] = {
      "relayout_spec": str(s9[0].mu["later"].sharding.spec),
      "state_shardings_spec": str(ss9[0].mu["later"].spec),
      "after_steps_spec": str(s10[0].mu["later"].sharding.spec),
      "finite": bool(all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p10))),
  }
  print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results():
  return run_json(_SCRIPT)


def test_eager_init_shards_the_state_like_its_params(results):
  """``tx.init`` on concrete sharded params (no ``state_shardings``): codes of
  leading-axis-sharded leaves come out block-sharded; non-dividing ones replicated."""
  ex = results["explicit"]
  assert ex["lead"]["init_codes"] == "P('fsdp', None)"
  assert ex["later"]["init_codes"] == "P('fsdp', None)"  # per-shard layout: split
  assert ex["ragged"]["init_codes"] == "P('fsdp', None)"  # per-shard layout: a block per row
  assert ex["rep"]["init_codes"] == "P(None, None)"



def test_explicit_mesh_non_aligned_leaves_train_like_one_device(results):
  """Under an Explicit mesh, params sharded along a later axis or raggedly (in the
  per-shard layout: each device updates its own piece) train like one device from the
  same state within float noise; the params keep their sharding, the codes theirs."""
  ex = results["explicit"]
  for name, info in ex.items():
    assert info["moved"] > 1e-3, (name, info)  # training did move the params
    assert info["max_diff"] <= 1e-5 * max(1.0, info["moved"]) + 1e-6, (name, info)
    assert info["bits_equal"], (name, info)
  assert ex["later"]["param"] == "P(None, 'fsdp')" and ex["later"]["codes"] == "P('fsdp', None)"
  assert ex["ragged"]["param"] == "P('fsdp', None)"
  single, sharded = results["explicit_props"]
  assert single == sharded



def test_relayout_with_param_shardings_matches_state_shardings(results):
  """A moment of a later-axis-sharded param relayouted to float32 with
  ``param_shardings`` gets the param's sharding, exactly ``state_shardings``' rule,
  so a step jitted with ``in_shardings=state_shardings(...)`` accepts it and keeps it."""
  info = results["explicit_float"]
  assert info["relayout_spec"] == info["state_shardings_spec"] == "P(None, 'fsdp')"
  assert info["after_steps_spec"] == "P(None, 'fsdp')" and info["finite"]



def test_explicit_mesh_mixed_widths_for_m_and_v(results):
  """8-bit m with 4-bit v (different packing groups) on a leading-axis-sharded leaf
  under an Explicit mesh: runs sharded and
  equals one device."""
  info = results["explicit_mixed"]
  assert info["bits"] == [8, 4]
  assert info["codes"] == ["P('fsdp', None)", "P('fsdp', None)"]
  assert info["max_diff"] <= 1e-6, info
