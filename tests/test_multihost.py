"""Multi-host training: 2 processes joined by ``jax.distributed.initialize`` on 127.0.0.1.

Each process has 2 forced CPU devices; together they form one 4-device
``fsdp`` mesh (CPU collectives across processes: gloo, jax's default). They
build global params from the same values (``jax.make_array_from_callback``)
and the batch from process-local halves (``jax.make_array_from_process_local_data``),
shard the optimizer state with :func:`stquant_jax.state_shardings`, and train a
few steps of ``stquant_jax.adamw`` with an adaptive :class:`STQuantPolicy`,
calling :func:`stquant_jax.relayout` after every decision (the policy changes
bits, so relayout re-packs codes that span both processes). Each process
writes its own view (its devices' copies of the proposed / actual bits, the
layout bits from the static metadata, the shapes of its codes shards, and
the final params and dequantized moments gathered with
``multihost_utils.process_allgather``) to a JSON file. A third process runs
the same global computation on 4 local devices.

Each process also initialises a state eagerly on the global params, and
saves the trained state with :func:`stquant_jax.save_state` (one checkpoint,
each process writing its shards) and restores it onto the mesh with
``restore_state(..., param_shardings=...)``.

Checked: both processes hold identical bit decisions, equal to the
single-process run; no device holds a full copy of a quantized moment; the
eager init is sharded across both processes; the checkpoint round trip keeps
the trained layout and continues bit-identically; the
gathered params agree between the processes exactly and with the
single-process run within float tolerance (cross-process all-reduces may sum
in another order; see tests/test_sharding.py for why a tolerance is needed).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

_WORKER = textwrap.dedent(r"""
  import json, sys
  import numpy as np
  mode, out_path = sys.argv[1], sys.argv[2]
  import jax
  if mode == "dist":
    pid, port = int(sys.argv[3]), int(sys.argv[4])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)
  import jax.numpy as jnp, optax
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P
  import stquant_jax as sq
  from stquant_jax._src.codec.quantized import QuantizedArray

  assert jax.device_count() == 4, jax.devices()
  assert jax.local_device_count() == (2 if mode == "dist" else 4)
  B, STEPS, LR = 32, 4, 1e-2
  SHAPES = {"b": (64,), "w1": (256, 128), "w2": (512, 64)}
  rng = np.random.default_rng(0)  # the same values in every process
  FULL = {"b": np.zeros(SHAPES["b"], np.float32),
          "w1": (0.05 * rng.standard_normal(SHAPES["w1"])).astype(np.float32),
          "w2": (0.05 * rng.standard_normal(SHAPES["w2"])).astype(np.float32)}
  XS = rng.standard_normal((STEPS, B, 256)).astype(np.float32)
  YS = rng.standard_normal((STEPS, B, 64)).astype(np.float32)

  mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  rep = NamedSharding(mesh, P())
  pshard = {"b": rep, "w1": NamedSharding(mesh, P("fsdp")), "w2": NamedSharding(mesh, P("fsdp"))}
  bshard = NamedSharding(mesh, P("fsdp"))
  params = {k: jax.make_array_from_callback(SHAPES[k], pshard[k], lambda idx, k=k: FULL[k][idx])
            for k in SHAPES}

  def local_rows(global_np):
    # This process's rows of a batch sharded along axis 0: process-local data.
    idx = bshard.addressable_devices_indices_map(global_np.shape).values()
    lo, hi = min(i[0].start for i in idx), max(i[0].stop for i in idx)
    return global_np[lo:hi]

  def batch(i):
    return [jax.make_array_from_process_local_data(bshard, local_rows(a[i]), a[i].shape)
            for a in (XS, YS)]

  def loss_fn(p, x, y):
    h = jnp.tanh(x @ p["w1"])
    h2 = jnp.concatenate([h, h * h, jnp.sin(h), h[:, ::-1]], axis=1)
    return jnp.mean((h2 @ p["w2"] + p["b"] - y) ** 2)

  policy = sq.STQuantPolicy(every=2, min_interval=0, min_size=1024, anneal_steps=0,
                            n_thresholds=(1.0, 1.0), r_thresholds=(1.0, 1.0))
  tx = sq.adamw(LR, policy=policy)
  state = jax.jit(tx.init, out_shardings=sq.state_shardings(jax.eval_shape(tx.init, params),
                                                            pshard))(params)

  def raw_step(p, s, x, y):
    u, s = tx.update(jax.grad(loss_fn)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

  def make_step(state):
    # One function for every layout: steps of the same layout and shardings (the live
    # and the restored state below) share one compilation.
    ss = sq.state_shardings(state, pshard)
    return jax.jit(raw_step, in_shardings=(pshard, ss, bshard, bshard),
                   out_shardings=(pshard, ss), donate_argnums=(0, 1))

  def local_copies(x):
    # Every local device's own copy of a replicated array.
    return [np.asarray(s.data).tolist() for s in sorted(x.addressable_shards,
                                                          key=lambda s: s.device.id)]

  def shard_rows(state):
    st = state[0]
    return {f"{m}/{k}": [sorted({s.data.shape[0] for s in a.addressable_shards}),
                         int(a.shape[0]), str(a.sharding.spec)]
            for m in ("mu", "nu") for k in ("w1", "w2")
            for a in (getattr(st, m)[k].codes, getattr(st, m)[k].scales)}

  out = {"process_index": jax.process_index(), "props": [], "actual": [], "layouts": [],
         "shards": [shard_rows(state)], "relayouts": 0}
  step = make_step(state)
  for i in range(STEPS):
    x, y = batch(i)
    params, state = step(params, state, x, y)
    if (i + 1) % policy.every == 0:
      out["props"].append(local_copies(state[0].policy_state.proposed))
      new = sq.relayout(state)  # every process calls it: the re-packing is a global computation
      if new is not state:
        out["relayouts"] += 1
        state = new
        out["shards"].append(shard_rows(state))
        step = make_step(state)
      out["actual"].append(local_copies(state[0].policy_state.actual))
      bw = sq.bit_widths(state)
      out["layouts"].append([bw["mu_bits"], bw["nu_bits"], bw["mu_proposed"], bw["nu_proposed"]])

  deq = jax.jit(lambda q: sq.dequantize(q, jnp.float32))
  gathered = multihost_utils.process_allgather(
      {"params": params, "mu": {k: deq(state[0].mu[k]) for k in ("w1", "w2")},
       "nu": {k: deq(state[0].nu[k]) for k in ("w1", "w2")}}, tiled=True)
  out["final"] = jax.tree.map(lambda a: np.asarray(a).tolist(), gathered)
  out["checksum"] = float(sum(np.asarray(a, np.float64).sum() for a in jax.tree.leaves(gathered)))

  # Eager init on the global params: moments created block-sharded across both
  # processes, count replicated on the mesh.
  st0 = tx.init(params)
  out["eager_init"] = {"codes": str(st0[0].mu["w1"].codes.sharding.spec),
                       "rows": sorted({s.data.shape[0]
                                       for s in st0[0].mu["w1"].codes.addressable_shards}),
                       "count_devices": len(st0[0].count.sharding.device_set)}

  # Checkpoint spanning both processes (each writes its own shards), restored onto the
  # mesh from an abstract state; then both the restored and the live state take one
  # more step: they must agree bit for bit.
  import os
  ckdir = os.path.join(os.path.dirname(out_path), f"ckpt_{mode}")
  sq.save_state(ckdir, state)
  restored = sq.restore_state(ckdir, jax.eval_shape(tx.init, params), param_shardings=pshard)
  out["restored_layout"] = sq.bit_widths(restored)["mu_bits"] == sq.bit_widths(state)["mu_bits"]
  x, y = batch(0)
  live_p, live_s = make_step(state)(jax.tree.map(jnp.copy, params), state, x, y)
  x, y = batch(0)
  res_p, res_s = make_step(restored)(jax.tree.map(jnp.copy, params), restored, x, y)
  live, res = (live_p, live_s), (res_p, res_s)
  all_equal = jax.jit(lambda t1, t2: jnp.stack([jnp.all(a == b) for a, b in zip(
      jax.tree.leaves(t1), jax.tree.leaves(t2))]).all(), out_shardings=rep)
  out["restored_equal"] = (jax.tree.structure(live) == jax.tree.structure(res)
                           and bool(np.asarray(all_equal(live, res).addressable_data(0))))
  # adaptive_jit with delay=2: both processes switch layouts at the same calls, and
  # the run equals the single-process one.
  p0 = {k: jax.make_array_from_callback(SHAPES[k], pshard[k], lambda idx, k=k: FULL[k][idx])
        for k in SHAPES}
  s0 = jax.jit(tx.init, out_shardings=sq.state_shardings(jax.eval_shape(tx.init, p0),
                                                         pshard))(p0)
  astep = sq.adaptive_jit(raw_step, delay=2, param_shardings=pshard, donate_argnums=(0, 1))
  for i in range(2 * STEPS):  # decisions every 2 steps: proposals switch 2 calls later
    p0, s0 = astep(p0, s0, *batch(i % STEPS))
  astep.close()
  g = multihost_utils.process_allgather(p0, tiled=True)
  out["adaptive_jit"] = {
      "switches": [s["call"] for s in astep.stats["switches"]],
      "fallbacks": astep.stats["fallback_compiles"],
      "layout": [sq.bit_widths(s0)["mu_bits"], sq.bit_widths(s0)["nu_bits"]],
      "checksum": float(sum(np.asarray(a, np.float64).sum() for a in jax.tree.leaves(g)))}
  with open(out_path, "w") as f:
    json.dump(out, f)
  if mode == "dist":
    jax.distributed.shutdown()
""")

TIMEOUT = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  # The worker script lives in a temporary directory: put this checkout first on the
  # path (not whichever stquant_jax is installed).
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _finish(procs, logs, deadline):
  """Waits for all; if one fails or time runs out, kills the others. Returns [(rc, stderr)]."""
  results = {}
  while len(results) < len(procs):
    for i, p in enumerate(procs):
      if i not in results and p.poll() is not None:
        results[i] = p.returncode
    failed = any(rc != 0 for rc in results.values())
    if failed or time.monotonic() > deadline:
      for i, p in enumerate(procs):
        if i not in results:
          p.kill()
          p.wait()
          results[i] = "killed"
      break
    time.sleep(0.2)
  return [(results[i], log.read_text()) for i, log in enumerate(logs)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp / "worker.py"
  script.write_text(_WORKER)
  port = _free_port()
  logs = [tmp / f"stderr{i}.txt" for i in range(3)]

  def launch(args, devices, log):
    with open(log, "w") as err:  # a file, not a pipe: a chatty child never blocks
      return subprocess.Popen([sys.executable, str(script)] + args, cwd=root,
                              env=_env(devices), stdout=subprocess.DEVNULL, stderr=err)
  procs = [launch(["dist", str(tmp / f"proc{i}.json"), str(i), str(port)], 2, logs[i])
           for i in range(2)]
  procs.append(launch(["single", str(tmp / "single.json")], 4, logs[2]))
  done = _finish(procs, logs, time.monotonic() + TIMEOUT)
  names = ("process 0", "process 1", "single process")
  for name, (rc, err) in zip(names, done):
    assert rc == 0, f"{name} exited with {rc}:\n{err[-5000:]}"
  load = lambda n: json.loads((tmp / n).read_text())
  return {"p0": load("proc0.json"), "p1": load("proc1.json"), "single": load("single.json")}


def test_processes_hold_identical_bit_decisions(runs):
  """Every device of both processes proposes and applies the same bits, as the
  single-process run; the policy changed bits at least once (relayout ran)."""
  p0, p1, single = runs["p0"], runs["p1"], runs["single"]
  assert (p0["process_index"], p1["process_index"]) == (0, 1)
  assert p0["relayouts"] >= 1 and p0["relayouts"] == p1["relayouts"] == single["relayouts"]
  for key in ("props", "actual"):
    assert len(p0[key]) == 2
    for d0, d1, ref in zip(p0[key], p1[key], single[key]):
      assert len(d0) == len(d1) == 2 and len(ref) == 4
      assert all(d == ref[0] for d in d0 + d1 + ref), (key, d0, d1, ref)
  assert p0["layouts"] == p1["layouts"] == single["layouts"]
  assert p0["layouts"][0][0] != {"b": 32, "w1": 8, "w2": 8}  # bits did change


def test_no_device_holds_a_full_copy_of_the_codes(runs):
  """Codes and scales of each quantized moment stay split in 4 (1/4 of the blocks per
  device, 2 devices per process), at init and after every relayout."""
  for name in ("p0", "p1"):
    for shards in runs[name]["shards"]:
      for key, (rows, total, spec) in shards.items():
        assert rows == [total // 4], (name, key, rows, total, spec)
        assert "fsdp" in spec, (name, key, spec)


def test_result_matches_single_process(runs):
  """Gathered params and moments: identical in both processes; within float tolerance
  of the single-process run (>= 95% of elements within 1e-3, params within 10% of how
  far training moved them)."""
  p0, p1, single = runs["p0"], runs["p1"], runs["single"]
  assert p0["final"] == p1["final"] and p0["checksum"] == p1["checksum"]
  rng = np.random.default_rng(0)
  init = {"w1": 0.05 * rng.standard_normal((256, 128)), "w2": 0.05 * rng.standard_normal((512, 64))}
  for group in ("params", "mu", "nu"):
    for k in ("w1", "w2"):
      a, ref = np.asarray(p0["final"][group][k]), np.asarray(single["final"][group][k])
      scale = np.abs(ref - init[k]).max() if group == "params" else np.abs(ref).max()
      d = np.abs(a - ref) / scale
      assert (d > 1e-3).mean() <= 0.05, (group, k, (d > 1e-3).mean())
      if group == "params":
        assert d.max() <= 0.1, (group, k, d.max())


def test_eager_init_on_global_params_is_sharded(runs):
  """``tx.init`` on global params spanning both processes creates each quantized
  moment block-sharded (1/4 of the blocks per device) and the count on all 4 devices."""
  for name in ("p0", "p1", "single"):
    info = runs[name]["eager_init"]
    assert info["codes"] == "P('fsdp', None)", (name, info)
    assert info["rows"] == [256 // 4] and info["count_devices"] == 4, (name, info)


def test_checkpoint_round_trip_across_processes(runs):
  """save_state / restore_state(param_shardings=...) with the state spread over two
  processes: the restored state has the trained bit layout and continues bit-identically."""
  for name in ("p0", "p1", "single"):
    assert runs[name]["restored_layout"], name
    assert runs[name]["restored_equal"], name


def test_adaptive_jit_switches_in_lockstep(runs):
  """With delay=2 both processes switch at the same calls (as the single process does),
  without recompiling in the loop, and reach the same layout; their params are
  identical, and near the single process's (cross-process sums round differently and
  3-6-bit codes can then flip a level: the summed params agree within 1%)."""
  a0, a1, single = (runs[k]["adaptive_jit"] for k in ("p0", "p1", "single"))
  assert a0["switches"] and a0["switches"] == a1["switches"] == single["switches"]
  assert a0["fallbacks"] == a1["fallbacks"] == 0
  assert a0["layout"] == a1["layout"] == single["layout"]
  assert a0["checksum"] == a1["checksum"]
  assert abs(a0["checksum"] - single["checksum"]) <= 1e-2 * max(1.0, abs(single["checksum"]))
