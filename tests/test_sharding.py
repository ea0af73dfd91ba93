"""Data parallel and fully sharded (FSDP) training on 8 forced CPU devices.

One global computation (a small MLP, AdamW with quantized moments, the same
global batch every step) runs on one device, under ``jax.pmap`` and
``jax.shard_map`` (data parallel, gradients averaged over the axis, the
policy's statistics psum-reduced with ``axis_name``) and under ``jax.jit`` with
the params and the optimizer state sharded FSDP-style with
:func:`stquant_jax.state_shardings` (an 8-device ``fsdp`` mesh with Explicit
axes, and a 2 x 4 ``data`` x ``fsdp`` mesh with Auto axes). The adaptive runs
call :func:`stquant_jax.relayout` after every decision and the policy does
change bits. Runs in a subprocess: the device count must be set before jax is
imported.

Tolerances. Every run computes the same math, but XLA sums the gradient in a
different order on 8 devices (differences ~1e-7 relative). Quantization is a
step function: now and then (measured: 4-8 of 32768 8-bit codes per leaf per
step) a value lies within that noise of a rounding boundary and its code
differs by one level, which after the policy moved a leaf to 4 bits is up to
~27% of its block maximum. The update feeds the difference back into the
params and the next gradients, so it spreads (training is chaotic at this
scale). Hence: after the first step, >= 99.9% of each moment's elements agree
to 1e-5 of its maximum (measured: all but 0.003%); after all steps, params
agree to 10% of how far training moved them (measured: <= 3%) and >= 95% of
the params' and moments' elements agree to 1e-3 (measured: >= 98%). The
FixedBits run, without 4-bit flips so far, agrees far closer. A misplaced
shard (1/8 of the elements) or a missing gradient average (all of them)
fails these bounds at the first step.
"""

import textwrap

import pytest

from _subprocess import run_json

_SCRIPT = textwrap.dedent(r"""
  import json, time
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  import stquant_jax as sq
  from stquant_jax._src.distributed import placement as _sharding
  from stquant_jax._src.codec.quantized import QuantizedArray
  from tests import _hlo as hlo

  D = jax.device_count()
  assert D == 8, D
  B, STEPS, LR = 64, 4, 1e-2
  T0 = time.time()
  SHAPES = {"w1": (256, 128), "w2": (512, 64), "e": (8, 64), "b": (64,)}
  QUANT = ("w1", "w2")  # 256 blocks of 128 each; "e" and "b" keep float32 moments
  is_q = lambda x: isinstance(x, QuantizedArray)
  keys = jax.random.split(jax.random.key(0), 5)
  PARAMS0 = {"w1": 0.05 * jax.random.normal(keys[0], SHAPES["w1"]),
             "w2": 0.05 * jax.random.normal(keys[1], SHAPES["w2"]),
             "e": 0.05 * jax.random.normal(keys[2], SHAPES["e"]), "b": jnp.zeros(SHAPES["b"])}
  X = jax.random.normal(keys[3], (STEPS, B, 256))
  Y = jax.random.normal(keys[4], (STEPS, B, 64))

  def loss_fn(p, x, y, gather=lambda w: w):
    h = jnp.tanh(x @ gather(p["w1"]))
    h2 = jnp.concatenate([h, h * h, jnp.sin(h), h[:, ::-1]], axis=1)
    out = h2 @ gather(p["w2"]) + p["b"] + x[:, :8] @ gather(p["e"])
    return jnp.mean((out - y) ** 2)

  fixed = lambda: sq.FixedBits(4, 4, min_size=1024)
  # Thresholds (1, 1): a leaf is "high" iff above the geometric mean, so with two adaptive
  # leaves the decisions move bits away from the initial critical (8, 8). Zones spelled
  # out (8-bit and 4-bit codes pack in whole bytes; the tolerances below assume them).
  adaptive = lambda axis_name=None: sq.STQuantPolicy(
      every=2, min_interval=0, min_size=1024, anneal_steps=0, critical=(8, 8),
      magnitude=(6, 8), structure=(6, 6), redundant=(4, 5), n_thresholds=(1.0, 1.0),
      r_thresholds=(1.0, 1.0), axis_name=axis_name)
  make_tx = lambda policy: sq.adamw(LR, policy=policy)
  decision = lambda i: (i + 1) % 2 == 0

  def host(tree):
    return jax.tree.map(lambda x: np.asarray(sq.dequantize(x)) if is_q(x) else np.asarray(x),
                        tree, is_leaf=is_q)

  def moments(state):
    return {"mu": host(state[0].mu), "nu": host(state[0].nu)}

  def layout(state):
    bw = sq.bit_widths(state)
    return [bw["mu_bits"], bw["nu_bits"]]

  def per_device(x):
    # Each device's own buffer of a replicated array.
    return [np.asarray(s.data).tolist() for s in sorted(x.addressable_shards,
                                                          key=lambda s: s.device.id)]

  out, single = {}, {}

  def compare(ref, params, mom, mom1):
    res = {}
    # [max |difference| / scale, fraction of elements off by more than 1e-5 and 1e-3 scale]
    def diff(a, b, scale):
      d = np.abs(a - b) / scale
      return [float(d.max()), float((d > 1e-5).mean()), float((d > 1e-3).mean())]
    for k in SHAPES:
      moved = float(np.abs(ref["params"][k] - np.asarray(PARAMS0[k])).max())
      res[f"params/{k}"] = diff(params[k], ref["params"][k], moved)
      for m in ("mu", "nu"):
        for tag, a, b in (("", mom, ref["moments"]), ("step1/", mom1, ref["moments1"])):
          res[f"{tag}{m}/{k}"] = diff(a[m][k], b[m][k], float(np.abs(b[m][k]).max()))
    return res

  # ------------------------------------------------------------------ (a) one device
  for name, pol in (("fixed", fixed()), ("adaptive", adaptive())):
    tx = make_tx(pol)
    params, state = PARAMS0, tx.init(PARAMS0)

    @jax.jit
    def step(p, s, x, y):
      u, s = tx.update(jax.grad(loss_fn)(p, x, y), s, p)
      return optax.apply_updates(p, u), s
    props = []
    for i in range(STEPS):
      params, state = step(params, state, X[i], Y[i])
      if i == 0:
        mom1 = moments(state)
      if name == "adaptive" and decision(i):
        props.append(np.asarray(state[0].policy_state.proposed).tolist())
        state = sq.relayout(state)
    single[name] = {"params": host(params), "moments": moments(state), "moments1": mom1}
    if name == "adaptive":
      out["single"] = {"props": props, "layout": layout(state), "init_layout":
                       layout(tx.init(PARAMS0)),
                       "actual": np.asarray(state[0].policy_state.actual).tolist()}

  out["t_single"] = time.time() - T0
  # ------------------------------------------------------------------ (b) pmap
  tx = make_tx(adaptive("d"))
  replicate = lambda tree: jax.tree.map(lambda x: np.stack([np.asarray(x)] * D), tree)
  first = lambda tree: jax.tree.map(lambda x: x[0], tree)

  def pstep(p, s, x, y):
    g = jax.lax.pmean(jax.grad(loss_fn)(p, x, y), "d")
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  pstep = jax.pmap(pstep, axis_name="d")
  params, state = replicate(PARAMS0), replicate(tx.init(PARAMS0))
  props, relayout_matches = [], []
  for i in range(STEPS):
    params, state = pstep(params, state, X[i].reshape(D, B // D, -1), Y[i].reshape(D, B // D, -1))
    if i == 0:
      mom1 = moments(first(state))
    if decision(i):
      props.append(np.asarray(state[0].policy_state.proposed).tolist())  # [replica][leaf][2]
      # relayout takes the pmap state (leading device axis) as it is; the one-replica
      # route (relayout the first replica, replicate it again) must give the same state.
      one = sq.relayout(first(state))
      new = sq.relayout(state)
      if new is not state:
        same = jax.tree.structure(new) == jax.tree.structure(replicate(one)) and all(
            bool((np.asarray(a) == np.asarray(b)).all())
            for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(replicate(one))))
        relayout_matches.append(same)
        state = new
  out["pmap"] = {
      "props": props, "layout": layout(first(state)), "relayout_matches": relayout_matches,
      "actual": np.asarray(state[0].policy_state.actual).tolist(),
      "replicas_equal": all(bool((np.asarray(v) == np.asarray(v)[:1]).all())
                            for v in jax.tree.leaves(params)),
      "cmp": compare(single["adaptive"], host(first(params)), moments(first(state)), mom1)}

  out["t_pmap"] = time.time() - T0
  # ------------------------------------------------------------------ (c) shard_map
  mesh = jax.make_mesh((D,), ("d",), axis_types=(AxisType.Explicit,))
  rep, bsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("d"))

  def sstep(p, s, x, y):
    # The params are replicated (unvarying over "d"), so their gradient comes out of
    # jax.grad already summed over "d" (shard_map's check_vma); averaging the loss
    # over the axis makes it the global-batch mean gradient.
    g = jax.grad(lambda p: jax.lax.pmean(loss_fn(p, x, y), "d"))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  sstep = jax.jit(jax.shard_map(sstep, mesh=mesh, in_specs=(P(), P(), P("d"), P("d")),
                                out_specs=(P(), P())))
  params = jax.device_put(jax.tree.map(np.asarray, PARAMS0), rep)
  state = jax.device_put(tx.init(PARAMS0), rep)
  props = []
  for i in range(STEPS):
    params, state = sstep(params, state, jax.device_put(X[i], bsh), jax.device_put(Y[i], bsh))
    if i == 0:
      mom1 = moments(state)
    if decision(i):
      props.append(per_device(state[0].policy_state.proposed))
      state = sq.relayout(state)
  out["shard_map"] = {"props": props, "layout": layout(state),
                      "actual": per_device(state[0].policy_state.actual),
                      "cmp": compare(single["adaptive"], host(params), moments(state), mom1)}

  out["t_shard_map"] = time.time() - T0
  # ------------------------------------------------------------------ (d) jit, FSDP
  def shard_info(state):
    # Per moment: the spec of codes and scales (or of the float32 moment), the rows each
    # device holds, and the bits.
    info = {}
    for m in ("mu", "nu"):
      for k in SHAPES:
        x = getattr(state[0], m)[k]
        arrs = {"codes": x.codes, "scales": x.scales} if is_q(x) else {"value": x}
        info[f"{m}/{k}"] = {"bits": x.bits if is_q(x) else 32, "shape": list(x.shape)}
        for a, arr in arrs.items():
          info[f"{m}/{k}"][a] = {
              "spec": [None if e is None else str(e) for e in arr.sharding.spec],
              "rows": sorted({s.data.shape[0] for s in arr.addressable_shards}),
              "global_rows": int(arr.shape[0]), "devices": len(arr.addressable_shards)}
    return info

  def collectives(text):  # every collective that moves array data (all-reduce excluded)
    return hlo.collectives(text, hlo.MOVING)

  def run_fsdp(policy, mesh, batch_axes, explicit, check_collectives, float_roundtrip=False):
    tx = make_tx(policy)
    rep = NamedSharding(mesh, P())
    pshard = {"w1": NamedSharding(mesh, P("fsdp")), "w2": NamedSharding(mesh, P("fsdp")),
              "e": NamedSharding(mesh, P("fsdp")), "b": rep}
    bsh = NamedSharding(mesh, P(batch_axes))
    gather = (lambda w: jax.sharding.reshard(w, rep)) if explicit else (lambda w: w)
    params = jax.device_put(jax.tree.map(np.asarray, PARAMS0), pshard)
    sshard = sq.state_shardings(jax.eval_shape(tx.init, params), pshard)
    state = jax.jit(tx.init, out_shardings=sshard)(params)
    res = {"init": shard_info(state), "relayouts": []}
    if check_collectives:
      upd = jax.jit(tx.update, out_shardings=(pshard, sshard))
      res["collectives"] = collectives(upd.lower(params, state, params).compile().as_text())

    def make_step(state):  # one jitted step per layout
      ss = sq.state_shardings(state, pshard)

      def step(p, s, x, y):
        u, s = tx.update(jax.grad(loss_fn)(p, x, y, gather), s, p)
        return optax.apply_updates(p, u), s
      return jax.jit(step, in_shardings=(pshard, ss, bsh, bsh), out_shardings=(pshard, ss),
                     donate_argnums=(0, 1))
    step, props = make_step(state), []
    for i in range(STEPS):
      params, state = step(params, state, jax.device_put(X[i], bsh), jax.device_put(Y[i], bsh))
      if i == 0:
        mom1 = moments(state)
      if isinstance(policy, sq.STQuantPolicy) and decision(i):
        props.append(per_device(state[0].policy_state.proposed))
        new = sq.relayout(state)
        if new is not state:
          state = new
          res["relayouts"].append(shard_info(state))  # straight out of relayout
          step = make_step(state)
    ref = single["adaptive" if isinstance(policy, sq.STQuantPolicy) else "fixed"]
    res.update(final=shard_info(state), props=props, layout=layout(state),
               actual=per_device(state[0].policy_state.actual)
               if isinstance(policy, sq.STQuantPolicy) else None,
               cmp=compare(ref, host(params), moments(state), mom1))
    if float_roundtrip:
      # relayout to float32 and back (a proposal set by hand): the block axis' sharding
      # goes to the float32 moment's leading axis and back to the codes.
      def propose(state, bits):  # m of w1 (leaf order: b, e, w1, w2)
        ps = state[0].policy_state
        prop = np.asarray(ps.proposed).copy()
        prop[sorted(SHAPES).index("w1"), 0] = bits
        ps = ps._replace(proposed=jax.device_put(prop, ps.proposed.sharding))
        return (state[0]._replace(policy_state=ps),) + tuple(state[1:])
      to_float = sq.relayout(propose(state, 32))
      back = sq.relayout(propose(to_float, 5))
      res["to_float"], res["back"] = shard_info(to_float), shard_info(back)
      before, after = host(state[0].mu["w1"]), host(back[0].mu["w1"])
      res["roundtrip_err"] = float(np.abs(before - after).max() / np.abs(before).max())
    return res

  mesh8 = jax.make_mesh((D,), ("fsdp",), axis_types=(AxisType.Explicit,))
  out["fsdp8_fixed"] = run_fsdp(fixed(), mesh8, "fsdp", True, True)
  out["t_fsdp8_fixed"] = time.time() - T0
  out["fsdp8_adaptive"] = run_fsdp(adaptive(), mesh8, "fsdp", True, False, float_roundtrip=True)
  out["t_fsdp8_adaptive"] = time.time() - T0
  mesh24 = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  out["fsdp24_adaptive"] = run_fsdp(adaptive(), mesh24, ("data", "fsdp"), False, True)

  out["t_fsdp"] = time.time() - T0
  # ------------------------------------------------------------------ fallbacks of the rule
  m8 = NamedSharding(mesh8, P("fsdp"))
  cols = NamedSharding(mesh8, P(None, "fsdp"))
  out["rules"] = {
      "aligned_rows": _sharding.is_aligned(m8, (256, 128), 128),
      "aligned_cols": _sharding.is_aligned(cols, (256, 128), 128),
      "aligned_partial_block": _sharding.is_aligned(m8, (8, 64), 128),
      "cols_codes": str(_sharding.quantized_shardings(cols, (256, 128), 256)[0].spec),
      "odd_blocks_codes": str(_sharding.quantized_shardings(m8, (8, 300), 19)[0].spec),
  }
  print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results():
  return run_json(_SCRIPT)


RUNS = ("pmap", "shard_map", "fsdp8_fixed", "fsdp8_adaptive", "fsdp24_adaptive")
ADAPTIVE = ("pmap", "shard_map", "fsdp8_adaptive", "fsdp24_adaptive")
FSDP = {"fsdp8_fixed": 8, "fsdp8_adaptive": 8, "fsdp24_adaptive": 4}  # shards per leaf


def test_policy_changes_bits(results):
  """The single-device adaptive run changes bits, so relayouts below re-pack sharded codes."""
  single = results["single"]
  assert single["layout"] != single["init_layout"], single


@pytest.mark.parametrize("run", RUNS)
def test_training_matches_one_device(results, run):
  """Params and dequantized moments equal the one-device run within float tolerance.

  Each entry is [max |diff|, fraction > 1e-5, fraction > 1e-3], relative to how far
  training moved the params / to the moment's maximum (see the module docstring).
  """
  cmp = results[run]["cmp"]
  assert len(cmp) == 4 * 5  # 4 leaves x (params, m, v, m after step 1, v after step 1)
  for key, (max_rel, frac_5, frac_3) in cmp.items():
    if key.startswith("step1/"):  # one step: only isolated rounding flips
      assert frac_5 <= 1e-3 and max_rel <= 0.02, (run, key, cmp[key])
    elif key.startswith("params/"):
      assert max_rel <= 0.1 and frac_3 <= 0.05, (run, key, cmp[key])
    else:  # a 1-level flip of a 4-bit code moves its value by up to ~27% of the block max
      assert max_rel <= 0.5 and frac_3 <= 0.05, (run, key, cmp[key])


def test_pmap_replicas_hold_identical_params(results):
  assert results["pmap"]["replicas_equal"]


def test_relayout_takes_a_pmap_state_directly(results):
  """``relayout`` on the stacked pmap state (leading device axis) re-packs every
  replica, identical to re-packing one replica and replicating it; bits did change."""
  matches = results["pmap"]["relayout_matches"]
  assert matches and all(matches), matches


@pytest.mark.parametrize("run", ADAPTIVE)
def test_bit_decisions_identical_on_every_device(results, run):
  """Each device's own proposed and actual bits agree with each other and the one-device run."""
  r, single = results[run], results["single"]
  assert len(r["props"]) == len(single["props"]) == 2
  for per_dev, ref in zip(r["props"], single["props"]):
    assert len(per_dev) == 8
    assert all(p == ref for p in per_dev), (run, per_dev, ref)
  assert len(r["actual"]) == 8 and all(a == single["actual"] for a in r["actual"])
  assert r["layout"] == single["layout"]


def _check_sharded(info, shards, run, when):
  for name, leaf in info.items():
    leaf_name = name.split("/")[1]
    if leaf["bits"] != 32:
      for arr in ("codes", "scales"):
        a = leaf[arr]
        assert a["spec"][0] == "fsdp", (run, when, name, arr, a)
        assert all(s is None for s in a["spec"][1:]), (run, when, name, arr, a)
        assert a["rows"] == [a["global_rows"] // shards], (run, when, name, arr, a)
        assert a["devices"] == 8, (run, when, name, a)
    elif leaf_name == "e":  # float32 moment of a sharded param: the param's sharding
      assert leaf["value"]["spec"][0] == "fsdp" and leaf["value"]["rows"] == [8 // shards], leaf
    elif leaf_name == "b":  # replicated param: replicated moment
      assert leaf["value"]["rows"] == [64], leaf


@pytest.mark.parametrize("run", sorted(FSDP))
def test_state_is_sharded_like_its_parameter(results, run):
  """No device holds a full copy of a sharded leaf's codes or scales: at init, after
  every step and straight after every relayout (bits changed, word count changed)."""
  r, shards = results[run], FSDP[run]
  assert {k: v["bits"] for k, v in r["init"].items()}["mu/w1"] in (4, 8)
  _check_sharded(r["init"], shards, run, "init")
  _check_sharded(r["final"], shards, run, "final")
  for i, info in enumerate(r["relayouts"]):
    _check_sharded(info, shards, run, f"relayout {i}")
  if run != "fsdp8_fixed":
    assert r["relayouts"], "the policy changed no bits; the relayout check is vacuous"
    bits = lambda info: {k: v["bits"] for k, v in info.items()}
    assert bits(r["relayouts"][0]) != bits(r["init"])


def test_relayout_to_float32_and_back_keeps_the_block_axis_sharded(results):
  """Quantized -> float32 puts the block axis' mesh axes on the param's leading axis;
  float32 -> quantized shards the new codes' block axis like the param."""
  r = results["fsdp8_adaptive"]
  f = r["to_float"]["mu/w1"]
  assert f["bits"] == 32 and f["value"]["spec"][0] == "fsdp" and f["value"]["rows"] == [32]
  _check_sharded(r["back"], 8, "fsdp8_adaptive", "back")
  assert r["back"]["mu/w1"]["bits"] == 5
  assert r["roundtrip_err"] <= 0.05  # 5-bit re-quantization of the 8-bit moment


def test_sharded_update_is_communication_free(results):
  """With params sharded along their leading axis and whole blocks per shard, the
  optimizer update moves no array data between devices (only the adaptive policy's
  scalar statistics are all-reduced)."""
  assert results["fsdp8_fixed"]["collectives"] == []
  moved = sum(n for _, n in results["fsdp24_adaptive"]["collectives"])
  assert moved <= 1024, results["fsdp24_adaptive"]["collectives"]


def test_block_axis_rule_fallbacks(results):
  rules = results["rules"]
  assert rules["aligned_rows"] and not rules["aligned_cols"]
  assert not rules["aligned_partial_block"]
  assert rules["cols_codes"] == "P('fsdp', None)"  # still split evenly
  assert rules["odd_blocks_codes"] == "P(None, None)"  # 19 blocks: replicated


def test_state_shardings_structure_on_one_device():
  """In process (1 device): the result mirrors the state; quantized moments get block
  shardings, float32 moments the param's, the rest replicated; optax.MultiSteps'
  gradient accumulator (shaped like the params) gets the param shardings; plain
  single-device shardings pass through; a leaf that is not a sharding is a TypeError."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
  import stquant_jax as sq

  mesh = jax.make_mesh((1,), ("fsdp",))
  params = {"w": jnp.zeros((256, 128)), "b": jnp.zeros((128,))}
  shard = {"w": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P())}
  tx = optax.MultiSteps(sq.adamw(1e-3, policy=sq.FixedBits(4, 4)), every_k_schedule=2)
  abstract = jax.eval_shape(tx.init, params)
  out = sq.state_shardings(abstract, shard)
  assert jax.tree.structure(out) == jax.tree.structure(abstract)
  st = out.inner_opt_state[0]
  assert st.mu["w"].codes.spec == P("fsdp", None) and st.mu["w"].scales.spec == P("fsdp")
  assert st.nu["b"] is shard["b"] and st.count.spec == P()
  assert out.acc_grads["w"] is shard["w"] and out.mini_step.spec == P()
  state = jax.jit(tx.init, out_shardings=out)(jax.device_put(params, shard))
  assert state.inner_opt_state[0].mu["w"].codes.sharding.spec == P("fsdp", None)

  single = SingleDeviceSharding(jax.devices()[0])
  out1 = sq.state_shardings(abstract, {"w": single, "b": single})
  assert all(s == single for s in jax.tree.leaves(out1))
  with pytest.raises(TypeError, match="Sharding"):
    sq.state_shardings(abstract, {"w": "fsdp", "b": None})
  with pytest.raises(ValueError, match="structure of the params.*P\\(\\)"):
    sq.state_shardings(abstract, {"w": shard["w"], "b": None})



def test_relayout_rejects_pmap_replicas_that_disagree():
  """A stacked (pmap) state whose replicas propose different bits (policy without
  ``axis_name``) is refused with a message naming the fix, never re-packed."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import stquant_jax as sq

  tx = sq.adamw(1e-3, policy=sq.STQuantPolicy(min_size=0))
  state = tx.init({"w": jnp.zeros((64, 128))})
  stacked = jax.tree.map(lambda x: np.stack([np.asarray(x)] * 2), state)
  ps = stacked[0].policy_state
  prop = np.array(ps.proposed)
  prop[1, 0, 0] = 4  # replica 1 wants 4-bit m
  bad = (stacked[0]._replace(policy_state=ps._replace(proposed=prop)),) + tuple(stacked[1:])
  with pytest.raises(ValueError, match="replicas propose different bits.*axis_name"):
    sq.relayout(bad)
  prop[0, 0, 0] = 4  # both agree: re-packed on every replica
  good = (stacked[0]._replace(policy_state=ps._replace(proposed=prop)),) + tuple(stacked[1:])
  new = sq.relayout(good)
  assert new[0].mu["w"].bits == 4 and new[0].mu["w"].codes.shape == (2, 64, 16)
  assert np.asarray(new[0].policy_state.actual).shape == (2, 1, 2)
