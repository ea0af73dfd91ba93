"""orbax checkpoints of the full stquant optimizer state (``save_state`` / ``restore_state``)."""

import json
import os
import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from _subprocess import run_json

import stquant_jax as sq

_is_q = lambda x: isinstance(x, sq.QuantizedArray)


def make_params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w1": 0.1 * jax.random.normal(k[0], (64, 256)), "b": jnp.zeros((256,)),
          "w2": 0.1 * jax.random.normal(k[1], (256, 8))}


def loss(p, x, y):
  return jnp.mean((jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"] - y) ** 2)


def policy():
  """Decides every 3 steps; the annealing boost (4 bits, time constant 4 steps) fades
  over the first steps, so the bits go down at every decision (8 -> 7 -> 6 -> 5)."""
  return sq.STQuantPolicy(every=3, min_interval=0, min_size=1024, anneal_steps=4,
                          anneal_bits=4, instability=100.0, critical=(5, 5),
                          magnitude=(4, 5), structure=(4, 4), redundant=(3, 4))


def make_step(tx):
  @jax.jit
  def step(params, state, i):
    kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(1), i))
    x, y = jax.random.normal(kx, (16, 64)), jax.random.normal(ky, (16, 8))
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state
  return step


EVERY, CUT, STEPS = 3, 7, 9


def train(tx, params, state, start, stop, on_step=None):
  """Steps ``start..stop-1`` of the deterministic problem, relayout every EVERY steps."""
  step = make_step(tx)
  for i in range(start, stop):
    params, state = step(params, state, i)
    if (i + 1) % EVERY == 0:
      state = sq.relayout(state)
    if on_step is not None:
      on_step(i + 1, params, state)
  return params, state


def layout(state):
  """Static layout per leaf: (path, map, block size, shape, dtype) or (path, shape, dtype)."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_q)[0]:
    if _is_q(x):
      out.append((jax.tree_util.keystr(path), x.code_map, x.block_size, x.shape, x.dtype))
    else:
      out.append((jax.tree_util.keystr(path), tuple(x.shape), np.dtype(x.dtype)))
  return out


def assert_identical(a, b):
  """Same tree structure (static metadata included), same leaf types, bitwise equal values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert layout(a) == layout(b)
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert type(x) is type(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True)


def policy_state(state):
  return state[0].policy_state  # adamw: the stquant state comes first in the chain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The uninterrupted adaptive run: STEPS steps, relayouts at 3, 6, 9; at step CUT (mid
  decision period, so the policy's accumulators are non-zero) params and state are also
  written with a CheckpointManager."""
  directory = str(tmp_path_factory.mktemp("run") / "ckpts")
  tx = sq.adamw(1e-2, policy=policy())
  params = make_params()
  out = {"tx": tx, "params0": params, "dir": directory,
         "bits": {0: sq.bit_widths(tx.init(params))}}

  def on_step(i, params, state):
    if i % EVERY == 0:
      out["bits"][i] = sq.bit_widths(state)
    if i == CUT:
      out["params_cut"], out["state_cut"] = params, state
      with ocp.CheckpointManager(directory) as mngr:
        mngr.save(i, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             **sq.checkpoint_args(state)))

  out["params"], out["state"] = train(tx, params, tx.init(params), 0, STEPS, on_step=on_step)
  return out


def test_round_trip_fixed_bits(tmp_path):
  """FixedBits(4, 4) with an integer leaf: codes, scales, float32 moments, placeholders
  and the count come back bit for bit with the same static layout."""
  params = {"w": jnp.ones((64, 256)), "b": jnp.ones((256,)), "n": jnp.arange(3)}
  tx = sq.adamw(1e-2, policy=sq.FixedBits(4, 4, min_size=1024))
  grads = {"w": jnp.linspace(-1, 1, 64 * 256).reshape(64, 256), "b": jnp.ones((256,)),
           "n": jnp.zeros((3,), jnp.int32)}
  state, update = tx.init(params), jax.jit(tx.update)
  for _ in range(2):
    _, state = update(grads, state, params)
  path = sq.save_state(tmp_path / "ckpt", state)
  restored = sq.restore_state(path, tx.init(params))
  assert restored[0].mu["w"].bits == 4 and int(restored[0].count) == 2
  assert_identical(restored, state)
  assert_identical(sq.restore_state(path, tx.init(params), strict=True), state)


def test_round_trip_adaptive_layout_and_policy_state(tmp_path, run):
  """After relayouts moved the bits away from init's, restoring from ``tx.init`` gives the
  saved layout (not init's) and every policy-state field, EMAs and accumulators included,
  bit for bit."""
  tx, params, state = run["tx"], run["params0"], run["state_cut"]
  fresh = tx.init(params)
  assert layout(state) != layout(fresh)  # the relayouts changed bits: the test can fail
  assert int(policy_state(state).decisions) == 2
  assert np.abs(np.asarray(policy_state(state).n_ema)).sum() > 0
  assert np.abs(np.asarray(policy_state(state).acc)).sum() > 0
  path = sq.save_state(tmp_path / "ckpt", state)
  restored = sq.restore_state(path, fresh)
  assert_identical(restored, state)
  for name in sq.STQuantPolicyState._fields:
    np.testing.assert_array_equal(getattr(policy_state(restored), name),
                                  getattr(policy_state(state), name), strict=True)
  assert sq.bit_widths(restored) == sq.bit_widths(state)
  # Also into an abstract `like` (nothing allocated).
  assert_identical(sq.restore_state(path, jax.eval_shape(tx.init, params)), state)


def test_unplaced_like_gives_uncommitted_arrays(saved, run):
  """Leaves of ``like`` that are uncommitted arrays (a fresh ``tx.init``) or ShapeDtypeStructs
  without a sharding come back as uncommitted jax.Arrays (free to follow the other arguments
  of a jitted step); committed leaves stay committed."""
  path, params = saved
  tx = run["tx"]
  abstract = jax.eval_shape(tx.init, params)
  assert all(getattr(x, "sharding", None) is None for x in jax.tree.leaves(abstract))
  for like in (abstract, tx.init(params)):
    leaves = jax.tree.leaves(sq.restore_state(path, like))
    assert leaves and all(isinstance(x, jax.Array) and x.committed is False for x in leaves)
  committed = jax.device_put(tx.init(params), jax.local_devices()[0])
  assert all(x.committed for x in jax.tree.leaves(committed))
  leaves = jax.tree.leaves(sq.restore_state(path, committed))
  assert all(x.committed for x in leaves)


def test_round_trip_wrapped_optimizer(tmp_path):
  """inject_hyperparams inside MultiSteps: the nested state (hyperparams, mini-step
  counters, accumulated gradients) round-trips too."""
  params = {"w": jnp.ones((64, 256)), "b": jnp.ones((256,))}
  inner = optax.inject_hyperparams(sq.adamw, static_args=("policy", "block_size"))(
      learning_rate=1e-2, policy=sq.FixedBits(3, 5, min_size=1024))
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  state, update = tx.init(params), jax.jit(tx.update)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  for _ in range(3):
    _, state = update(grads, state, params)
  restored = sq.restore_state(sq.save_state(tmp_path / "ckpt", state), tx.init(params))
  assert_identical(restored, state)


def test_interrupted_run_resumes_bit_identically(run):
  """STEPS steps in one go equal CUT steps, a CheckpointManager save, a restart from
  nothing but the directory (new optimizer, new jitted step, ``tx.init(params)`` and
  a one-call restore) and the remaining steps: params and the whole state bit for bit,
  layout included. Relayouts change bits before (steps 3, 6) and after (step 9) the cut."""
  bits = run["bits"]
  for a, b in ((0, 3), (3, 6), (6, 9)):
    assert bits[a]["mu_bits"] != bits[b]["mu_bits"], bits

  tx = sq.adamw(1e-2, policy=policy())
  params = make_params()
  with ocp.CheckpointManager(run["dir"]) as mngr:
    step = mngr.latest_step()
    params = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params)))["params"]
    state = sq.restore_state(mngr, tx.init(params))
  assert step == CUT and int(state[0].count) == CUT
  params, state = train(tx, params, state, CUT, STEPS)
  assert sq.bit_widths(state) == bits[STEPS]
  assert_identical(params, run["params"])
  assert_identical(state, run["state"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, run):
  path = sq.save_state(tmp_path_factory.mktemp("saved") / "ckpt", run["state_cut"])
  return path, run["params0"]


@pytest.mark.parametrize("make_like, match", [
    (lambda p: sq.adamw(1e-2, policy=policy()).init({**p, "extra": jnp.zeros((8,))}),
     r"tree differs(.|\n)*\['extra'\]: in `like`, missing from the checkpoint"),
    (lambda p: sq.adamw(1e-2, policy=policy()).init({k: v for k, v in p.items() if k != "b"}),
     r"tree differs(.|\n)*\['b'\]: in the checkpoint, missing from `like`"),
    (lambda p: sq.adamw(1e-2, policy=policy()).init({**p, "w2": jnp.zeros((256, 16))}),
     r"\.mu\['w2'\]: parameter shape/dtype differs: saved float32\[256, 8\], "
     r"`like` has float32\[256, 16\]"),
    (lambda p: sq.adamw(1e-2, policy=policy(), block_size=64).init(p),
     r"\.mu\['w1'\]: block_size differs: saved 128, `like` has 64"),
    (lambda p: sq.adam(1e-2, policy=policy()).init(p),
     r"structure differs \(a different optimizer chain\?\)"),
    (lambda p: sq.adamw(1e-2, policy=sq.FixedBits(min_size=1024)).init(p),
     r"tree differs(.|\n)*policy_state\.n_ema: in the checkpoint, missing from `like`"),
    (lambda p: sq.scale_by_stquant(policy=policy()).init(p),
     r"tree differs"),
], ids=["extra-leaf", "missing-leaf", "param-shape", "block-size", "other-chain",
        "other-policy", "bare-transform"])
def test_mismatch_raises_clear_error(saved, make_like, match):
  """Restoring into another params tree, parameter shape, block size, chain or policy raises
  a ValueError naming the leaf and what differs (never a silent reshape)."""
  path, params = saved
  with pytest.raises(ValueError, match=match):
    sq.restore_state(path, make_like(params))


def test_other_code_map_at_equal_bits_raises(tmp_path):
  """A moment saved at the bits ``like`` has but with another code map (a changed
  ``mu_map``) is refused; the check only applies where the bits agree, since the saved
  map is always the one restored."""
  params = {"w": jnp.ones((64, 256))}
  fixed = sq.FixedBits(8, 8, min_size=1024)
  path = sq.save_state(tmp_path / "ckpt", sq.scale_by_stquant(policy=fixed).init(params))
  other = sq.scale_by_stquant(policy=fixed, mu_map=lambda b: sq.CodeMap("power", b, True, 1))
  with pytest.raises(ValueError, match=r"\.mu\['w'\]: code map for 8 bits differs: saved "
                     r"power-p2-s8, `like` has power-p1-s8"):
    sq.restore_state(path, other.init(params))


def test_strict_requires_the_same_bit_layout(saved, run):
  """strict=True refuses a checkpoint whose bits differ from ``like``'s; non-strict restores
  the saved bits."""
  path, params = saved
  tx, state = run["tx"], run["state_cut"]
  with pytest.raises(ValueError, match=r"bit layout differs \(strict=True\): saved power-"):
    sq.restore_state(path, tx.init(params), strict=True)
  assert_identical(sq.restore_state(path, state, strict=True), state)


def test_default_strictness_follows_the_policy(tmp_path, saved, run):
  """By default a FixedBits state refuses a checkpoint at other bits (it would train at the
  checkpoint's bits forever) with an error naming ``strict=False``, which adopts the saved
  bits; an STQuantPolicy state adopts the saved bits; ``strict=False`` and ``strict=True``
  override both ways."""
  params = {"w": jnp.ones((64, 256)), "b": jnp.ones((256,))}
  three = sq.adamw(1e-2, policy=sq.FixedBits(3, 3, min_size=1024))
  path = sq.save_state(tmp_path / "ckpt", three.init(params))
  eight = sq.adamw(1e-2, policy=sq.FixedBits(8, 8, min_size=1024)).init(params)
  with pytest.raises(ValueError, match=r"\.mu\['w'\]: bit layout differs \(fixed policy\): "
                     r"saved power-p2-s3, `like` has power-p2-s8(.|\n)*pass strict=False to "
                     r"adopt the checkpoint's bits"):
    sq.restore_state(path, eight)
  assert sq.restore_state(path, eight, strict=False)[0].mu["w"].bits == 3
  assert sq.restore_state(path, three.init(params))[0].mu["w"].bits == 3  # same bits: fine
  # Adaptive: the policy state carries `proposed`, the saved (relayouted) bits win.
  apath, aparams = saved
  fresh, state = run["tx"].init(aparams), run["state_cut"]
  assert sq.bit_widths(fresh) != sq.bit_widths(state)
  assert sq.bit_widths(sq.restore_state(apath, fresh)) == sq.bit_widths(state)
  with pytest.raises(ValueError, match=r"\(strict=True\)(.|\n)*pass strict=False"):
    sq.restore_state(apath, fresh, strict=True)
  # A policy state held as a mapping (e.g. rebuilt by a wrapper) is recognised as adaptive.
  as_dict = lambda st: (st[0]._replace(policy_state=dict(st[0].policy_state._asdict())),
                        *st[1:])
  mpath = sq.save_state(tmp_path / "mapping", as_dict(state))
  restored = sq.restore_state(mpath, as_dict(fresh))
  assert isinstance(restored[0].policy_state, dict)
  want = sq.bit_widths(state)
  got = sq.bit_widths(restored)
  assert (got["mu_bits"], got["nu_bits"]) == (want["mu_bits"], want["nu_bits"])


def test_corrupt_layout_is_rejected(tmp_path):
  """A layout whose code map this version cannot build (or whose arrays do not fit it)
  fails with a ValueError instead of decoding garbage."""
  params = {"w": jnp.ones((64, 256))}
  tx = sq.adamw(1e-2, policy=sq.FixedBits(4, 4, min_size=1024))
  path = sq.save_state(tmp_path / "ckpt", tx.init(params))
  meta = pathlib.Path(path) / "opt_state_layout" / "metadata"
  layout = json.loads(meta.read_text())
  entry = next(e for e in layout["leaves"] if e["kind"] == "quantized")
  entry["code_map"]["kind"] = "lut"
  meta.write_text(json.dumps(layout))
  with pytest.raises(ValueError, match=r"cannot be represented(.|\n)*kind='lut'"):
    sq.restore_state(path, tx.init(params))
  entry["code_map"]["kind"], entry["bits"], entry["code_map"]["bits"] = "power", 8, 8
  entry["map_name"] = "power-p2-s8"
  meta.write_text(json.dumps(layout))
  with pytest.raises(ValueError, match=r"codes is uint32\[128, 16\], but 8 bits"):
    sq.restore_state(path, tx.init(params))


def test_bad_inputs(tmp_path):
  """Missing directories, non-stquant objects, swapped arguments and overwrites fail
  clearly; force=True overwrites."""
  params = {"w": jnp.ones((64, 256))}
  tx = sq.adamw(1e-2, policy=sq.FixedBits(4, 4, min_size=1024))
  state = tx.init(params)
  with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
    sq.restore_state(tmp_path / "missing", state)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="has no 'opt_state_layout' item"):
    sq.restore_state(tmp_path / "empty", state)
  with pytest.raises(TypeError, match="contains no stquant_jax ScaleByStquantState"):
    sq.save_state(tmp_path / "a", params)
  with pytest.raises(TypeError, match="contains no stquant_jax ScaleByStquantState"):
    sq.save_state(tmp_path / "a", optax.adam(1e-3).init(params))
  with pytest.raises(TypeError, match="wrong order"):
    sq.save_state(state, tmp_path / "a")
  with pytest.raises(TypeError, match="not an array"):
    sq.save_state(tmp_path / "a", (state, {"note": "hello"}))
  assert not os.path.exists(tmp_path / "a")
  path = sq.save_state(tmp_path / "a", state)
  with pytest.raises(TypeError, match="contains no stquant_jax ScaleByStquantState"):
    sq.restore_state(path, params)
  with pytest.raises(FileExistsError, match="force=True"):
    sq.save_state(path, state)
  _, later = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  sq.save_state(path, later, force=True)
  assert int(sq.restore_state(path, state)[0].count) == 1
  with pytest.raises(FileNotFoundError, match="has no checkpoint"):
    with ocp.CheckpointManager(tmp_path / "mngr") as mngr:
      sq.restore_state(mngr, state)


_SHARDED = textwrap.dedent(r"""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  import stquant_jax as sq

  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("d",))
  params = {"w": jnp.linspace(-1, 1, 64 * 256).reshape(64, 256), "u": jnp.ones((256, 64))}
  saved_tx = sq.adamw(1e-2, policy=sq.FixedBits(3, 3, min_size=1024))
  state = saved_tx.init(params)
  _, state = saved_tx.update(params, state, params)
  path = sq.save_state(sys.argv[1] + "/fixed", state)

  # `like`: the 8-bit layout of init, sharded: w's codes along words (32 words / 8 devices),
  # u's codes along blocks; the saved 3-bit codes have 12 words per block.
  like = sq.adamw(1e-2, policy=sq.FixedBits(8, 8, min_size=1024)).init(params)
  def place(path, x):
    name = jax.tree_util.keystr(path)
    if x.ndim == 2:
      spec = P(None, "d") if "'w'" in name else P("d", None)
    elif x.ndim == 1 and x.shape[0] % 8 == 0:
      spec = P("d")
    else:
      spec = P()
    return jax.device_put(x, NamedSharding(mesh, spec))
  like = jax.tree_util.tree_map_with_path(place, like)
  restored = sq.restore_state(path, like, strict=False)  # adopt the saved 3 bits
  out = {}
  for name in ("w", "u"):
    for mom in ("mu", "nu"):
      q, l, s = restored[0]._asdict()[mom][name], like[0]._asdict()[mom][name], state[0]._asdict()[mom][name]
      out[f"{mom}.{name}"] = {
          "bits": q.bits, "codes_shape": list(q.codes.shape),
          "codes_spec": list(q.codes.sharding.spec), "scales_spec": list(q.scales.sharding.spec),
          "like_codes_spec": list(l.codes.sharding.spec),
          "codes_devices": len(q.codes.sharding.device_set),
          "equal": bool(np.array_equal(np.asarray(q.codes), np.asarray(s.codes))
                        and np.array_equal(np.asarray(q.scales), np.asarray(s.scales)))}
  out["count_equal"] = int(restored[0].count) == 1

  # Sharded training with the adaptive policy: params block-aligned along their leading axis.
  pshard = {"w": NamedSharding(mesh, P("d", None)), "u": NamedSharding(mesh, P("d", None))}
  # inject_hyperparams: its count and hyperparams are created uncommitted by optax.
  tx = optax.inject_hyperparams(sq.adamw, static_args=("policy", "block_size"))(
      learning_rate=1e-2, policy=sq.STQuantPolicy(every=2, min_size=1024))
  def step(p, st):
    g = jax.grad(lambda p: jnp.sum(jnp.tanh(p["w"] @ p["u"]) ** 2))(p)
    u, st = tx.update(g, st, p)
    return optax.apply_updates(p, u), st
  plain = jax.jit(step)
  p1, s1 = plain(*plain(jax.device_put(params, pshard), tx.init(jax.device_put(params, pshard))))
  path = sq.save_state(sys.argv[1] + "/sharded", s1)
  ref = plain(p1, s1)  # the uninterrupted step
  same = lambda a, b: jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  # (i) into the eager init of the sharded params, then a plain jitted step.
  like = tx.init(jax.device_put(params, pshard))
  r = sq.restore_state(path, like)
  loose = lambda st: [jax.tree_util.keystr(k)
                      for k, x in jax.tree_util.tree_flatten_with_path(st)[0] if not x.committed]
  out["eager"] = {"like_uncommitted": loose(like), "uncommitted": loose(r),
                  "codes_spec": list(r.inner_state[0].mu["w"].codes.sharding.spec),
                  "equal": same(r, s1), "step_equal": same(plain(p1, r), ref)}

  # (ii) into an abstract `like` with param_shardings, then a step with explicit shardings.
  r = sq.restore_state(path, jax.eval_shape(tx.init, params), param_shardings=pshard)
  codes = r.inner_state[0].mu["w"].codes
  others = [r.count, r.inner_state[0].count] + jax.tree.leaves(r.inner_state[0].policy_state)
  jitted = jax.jit(step, in_shardings=(pshard, sq.state_shardings(r, pshard)))
  out["abstract"] = {
      "codes_spec": list(codes.sharding.spec), "n_blocks": codes.shape[0],
      "rows_per_device": sorted({s.data.shape[0] for s in codes.addressable_shards}),
      "scales_spec": list(r.inner_state[0].nu["u"].scales.sharding.spec),
      "others_replicated_on_mesh": all(
          isinstance(x.sharding, NamedSharding) and x.sharding.is_fully_replicated
          and len(x.sharding.device_set) == 8 for x in others),
      "n_others": len(others),
      "equal": same(r, s1), "step_equal": same(jitted(p1, r), ref)}
  # An abstract `like` traced under jax.set_mesh carries abstract-mesh shardings: uncommitted.
  with jax.set_mesh(mesh):
    typed = jax.eval_shape(tx.init, jax.device_put(params, pshard))
  assert any(getattr(x, "sharding", None) is not None for x in jax.tree.leaves(typed))
  out["abstract_mesh_uncommitted"] = all(
      not x.committed for x in jax.tree.leaves(sq.restore_state(path, typed)))
  print("RESULT" + json.dumps(out))
""")


def test_sharded_restore(tmp_path):
  """On 8 CPU devices: (a) restored arrays take ``like``'s committed NamedSharding when it
  fits the saved shape; codes whose bits changed (32 -> 12 words) keep only the block-axis
  sharding, and are replicated on the same mesh when ``like`` sharded the word axis; values
  are the saved ones. (b) Restoring into ``tx.init(sharded_params)`` returns the leaves that
  are uncommitted there (inject_hyperparams' count and hyperparams) uncommitted, so a
  plain ``jax.jit`` step with sharded params runs and equals the
  uninterrupted step. (c) With an abstract ``like`` and ``param_shardings``, codes are
  block-sharded ``P('d', None)`` (n_blocks / 8 rows per device), count and policy state
  replicated on the mesh, and a step with ``state_shardings`` in_shardings equals (b).
  (d) An abstract ``like`` whose shardings are on an abstract mesh gives uncommitted arrays."""
  out = run_json(_SHARDED, str(tmp_path), timeout=300)
  assert out["count_equal"]
  for mom in ("mu", "nu"):
    w, u = out[f"{mom}.w"], out[f"{mom}.u"]
    assert w["bits"] == u["bits"] == 3 and w["codes_shape"] == [128, 12]
    assert w["equal"] and u["equal"]
    assert w["like_codes_spec"] == [None, "d"]
    assert w["codes_spec"] == [] and w["codes_devices"] == 8  # replicated
    assert u["codes_spec"] == ["d", None] and u["codes_devices"] == 8
    assert w["scales_spec"] == u["scales_spec"] == ["d"]
  eager = out["eager"]
  assert eager["like_uncommitted"] and eager["uncommitted"] == eager["like_uncommitted"]
  assert eager["equal"]
  assert eager["codes_spec"] == ["d", None]
  assert eager["step_equal"]
  ab = out["abstract"]
  assert ab["codes_spec"] == ["d", None] and ab["scales_spec"] == ["d"]
  assert ab["n_blocks"] == 128 and ab["rows_per_device"] == [16]
  assert ab["others_replicated_on_mesh"] and ab["n_others"] > 5
  assert ab["equal"] and ab["step_equal"]
  assert out["abstract_mesh_uncommitted"]
