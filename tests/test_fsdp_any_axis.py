"""FSDP shards every leaf's moments, whatever axis its parameter is sharded on.

8 forced CPU devices (a subprocess). GPT-2's embedding has 50257 rows, which
8 devices cannot split, so it is sharded on its second axis ``P(None, "d")``;
here a 2011-row stand-in (2011 is prime) beside a leading-axis-sharded matrix
and a replicated bias. ``tx.init`` on the sharded params puts the embedding's
moments in the per-shard layout (each device's piece blocked alone). For
Explicit and Auto meshes, fixed 8-bit and the adaptive policy, the test checks:
the layout and the block axis' sharding; per-device state bytes at most 0.27x
``optax.adamw``'s; the compiled step moves nothing but the policy's sums; two
steps equal one device's steps in the same layout (4 float32 ulps of the largest
value: XLA contracts multiply-adds differently per program); a relayout to
4 bits keeps the layout and the placement.
"""

import textwrap

import pytest

from _subprocess import run_json
from stquant_jax._src.policy.scores import NUM_SUMS

_SCRIPT = textwrap.dedent(r"""
  import json, warnings
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import stquant_jax as sq
  from stquant_jax._src.layout.relayout import apply_bits
  from stquant_jax._src.state.opt_state import current_bits
  from tests._hlo import collectives
  warnings.filterwarnings("ignore", category=DeprecationWarning)

  SHAPES = {"wte": ((2011, 128), P(None, "d")), "w": ((128, 512), P("d")), "b": ((128,), P())}
  params0 = {k: jax.random.normal(jax.random.fold_in(jax.random.key(0), i), s) * 0.1
             for i, (k, (s, _)) in enumerate(SHAPES.items())}
  grads = [{k: jax.random.normal(jax.random.fold_in(jax.random.key(t + 1), i), s[0]) * 1e-2
            for i, (k, s) in enumerate(SHAPES.items())} for t in range(2)]

  def per_device_bytes(tree):
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)
               for s in x.addressable_shards if s.device == dev)

  def host(x):
    return np.asarray(jax.device_get(x))

  out = {}
  for mesh_type in ("Explicit", "Auto"):
    for policy in ("fixed", "adaptive"):
      pol = (sq.FixedBits(8, 8, min_size=1024) if policy == "fixed"
             else sq.STQuantPolicy(every=3, min_size=1024))
      tx = sq.adamw(1e-2, policy=pol)
      step = lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
      mesh = jax.make_mesh((8,), ("d",), axis_types=(getattr(AxisType, mesh_type),))
      pshard = {k: NamedSharding(mesh, s) for k, (_, s) in SHAPES.items()}
      params = jax.device_put(params0, pshard)
      state = tx.init(params)
      m = state[0].mu["wte"]
      row = {"shards": m.shards, "codes_spec": str(m.codes.sharding.spec),
             "w_shards": state[0].mu["w"].shards}
      if mesh_type == "Explicit":  # the abstract state: eval_shape under the mesh
        sds = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=pshard[k])
               for k, x in params0.items()}
        with jax.set_mesh(mesh):
          am = jax.eval_shape(tx.init, sds)[0].mu["wte"]
        row["abstract"] = {"shards": am.shards, "codes_spec": str(am.codes.sharding.spec)}
      # The same state on one device: the reference run.
      ref_state = jax.tree.map(lambda x: jax.device_put(host(x), jax.devices()[0]), state)
      ref_params = params0
      for g in grads:
        ref_params, ref_state = jax.jit(step)(ref_params, ref_state, g)
      sshard = sq.state_shardings(state, pshard)
      f = jax.jit(step, in_shardings=(pshard, sshard, pshard), out_shardings=(pshard, sshard))
      with jax.set_mesh(mesh):
        text = f.lower(params, state, params).compile().as_text()
        for g in grads:
          params, state = f(params, state, jax.device_put(g, pshard))
      row["collectives"] = collectives(text)
      row["state_bytes"] = per_device_bytes(state)
      row["adamw_bytes"] = per_device_bytes(optax.adamw(1e-2).init(params))
      diffs = {}
      for k in SHAPES:
        want = host(ref_params[k])
        diffs[k] = float(np.abs(host(params[k]) - want).max() / np.spacing(np.abs(want).max()))
      m, rm = state[0].mu["wte"], ref_state[0].mu["wte"]
      diffs["mu_wte"] = float(np.abs(host(sq.dequantize(m)) - host(sq.dequantize(rm))).max()
                              / np.spacing(np.abs(host(sq.dequantize(rm))).max()))
      row["ulps"] = diffs
      bits = np.array(current_bits(state[0])); bits[bits == 8] = 4
      m4 = apply_bits(state[0], bits, param_shardings=pshard).mu["wte"]
      row["relayout"] = {"bits": m4.bits, "shards": m4.shards,
                         "spec": str(m4.codes.sharding.spec)}
      out[f"{mesh_type}-{policy}"] = row

  # flax.nnx: the optimizer hands moments back without metadata; the per-shard layout is
  # rebuilt from the state's config, and two steps equal the plain optax steps above.
  from flax import nnx

  class Emb(nnx.Module):
    def __init__(self):
      self.wte = nnx.Param(params0["wte"])

  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
  tx = sq.adamw(1e-2, policy=sq.FixedBits(8, 8, min_size=1024))
  with jax.set_mesh(mesh):
    model = Emb()
    model.wte.value = jax.device_put(params0["wte"], NamedSharding(mesh, SHAPES["wte"][1]))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ref_p = {"wte": model.wte.value}
    ref_s = tx.init(ref_p)

    @nnx.jit
    def nnx_step(model, opt, g):
      opt.update(model, jax.tree.map(lambda _: g, nnx.state(model, nnx.Param)))

    for g in grads:
      gw = jax.device_put(g["wte"], NamedSharding(mesh, SHAPES["wte"][1]))
      nnx_step(model, opt, gw)
      u, ref_s = jax.jit(tx.update)({"wte": gw}, ref_s, ref_p)
      ref_p = optax.apply_updates(ref_p, u)
    q = [x for x in jax.tree.leaves(sq.plain_state(opt), is_leaf=lambda x: isinstance(
        x, sq.QuantizedArray)) if isinstance(x, sq.QuantizedArray)][0]
    want = host(ref_p["wte"])
    out["nnx"] = {"shards": q.shards,
                  "ulps": float(np.abs(host(model.wte.value) - want).max()
                                / np.spacing(np.abs(want).max()))}
  print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results():
  return run_json(_SCRIPT)


@pytest.mark.parametrize("case", ["Explicit-fixed", "Explicit-adaptive", "Auto-fixed",
                                  "Auto-adaptive"])
def test_second_axis_sharded_leaf_has_sharded_moments(results, case):
  r = results[case]
  assert r["shards"] == [1, 8] and r["codes_spec"] == "P('d', None)"
  assert r["w_shards"] is None  # leading-axis shards of whole blocks: the plain layout


@pytest.mark.parametrize("case", ["Explicit-fixed", "Explicit-adaptive"])
def test_eval_shape_of_init_under_an_explicit_mesh_gives_the_same_layout(results, case):
  # Under Explicit axes the sharding is in the traced params' types, so the abstract
  # state (what nnx.eval_shape, orbax restore targets and AOT compiles use) matches.
  r = results[case]
  assert r["abstract"] == {"shards": r["shards"], "codes_spec": r["codes_spec"]}, r


@pytest.mark.parametrize("case", ["Explicit-fixed", "Auto-fixed"])
def test_per_device_state_is_under_0_27x_adamw(results, case):
  r = results[case]
  assert r["state_bytes"] <= 0.27 * r["adamw_bytes"], r


@pytest.mark.parametrize("case", ["Explicit-fixed", "Explicit-adaptive", "Auto-fixed",
                                  "Auto-adaptive"])
def test_step_moves_nothing_but_the_policys_sums(results, case):
  budget = 1 if case.endswith("fixed") else 3 * NUM_SUMS  # (a scalar: the finite check)
  moved = [(op, n) for op, n in results[case]["collectives"] if n > budget or op != "all-reduce"]
  assert not moved, results[case]["collectives"]


@pytest.mark.parametrize("case", ["Explicit-fixed", "Explicit-adaptive", "Auto-fixed",
                                  "Auto-adaptive"])
def test_steps_equal_one_device_in_the_same_layout(results, case):
  ulps = results[case]["ulps"]
  assert max(ulps.values()) <= 4, ulps


@pytest.mark.parametrize("case", ["Explicit-fixed", "Auto-fixed"])
def test_relayout_keeps_the_per_shard_layout_and_placement(results, case):
  r = results[case]["relayout"]
  assert r == {"bits": 4, "shards": [1, 8], "spec": "P('d', None)"}, r


def test_nnx_optimizer_keeps_the_per_shard_layout(results):
  r = results["nnx"]
  assert r["shards"] == [1, 8] and r["ulps"] <= 4, r
