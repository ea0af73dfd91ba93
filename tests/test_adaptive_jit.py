"""``adaptive_jit``: layout switches compiled ahead of time, without changing results.

The reference for every run is the plain loop (``jax.jit`` step, ``sq.relayout``
before the call at which the helper switched): the helper must give the same
params and state bit for bit, compile each new layout in its background thread
(never in the call that switches), reuse a layout it compiled before, and switch
at a step fixed by ``delay`` (what multi-process runs rely on). Layout changes
come from :class:`_policies.Scheduled` (proposals at fixed steps) or from
``STQuantPolicy`` itself.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from _policies import Scheduled
from _subprocess import run_json

import stquant_jax as sq


def make_params():
  k = jax.random.split(jax.random.key(0), 2)
  return {"w1": 0.1 * jax.random.normal(k[0], (64, 128)), "b": jnp.zeros((128,)),
          "w2": 0.1 * jax.random.normal(k[1], (128, 16))}


def batch(i):
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(1), i))
  return jax.random.normal(kx, (8, 64)), jax.random.normal(ky, (8, 16))


def loss(p, x, y):
  return jnp.mean((jnp.tanh(x @ p["w1"] + p["b"]) @ p["w2"] - y) ** 2)


def make_step(tx):
  def step(params, state, x, y):
    updates, state = tx.update(jax.grad(loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state
  return step


def run_reference(tx, steps, switch_calls):
  """The plain loop: jax.jit step, sq.relayout before each call in ``switch_calls``."""
  step, params = jax.jit(make_step(tx)), make_params()
  state = tx.init(params)
  for i in range(steps):
    if i in switch_calls:
      state = sq.relayout(state)
    params, state = step(params, state, *batch(i))
  return params, state


def assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


SCHEDULE = Scheduled(start=(8, 8), at=(3, 9, 15), bits=((4, 5), (6, 3), (8, 8)))


def run_helper(tx, steps, **kw):
  step = sq.adaptive_jit(make_step(tx), **kw)
  params = make_params()
  state = tx.init(params)
  for i in range(steps):
    params, state = step(params, state, *batch(i))
  step.close()
  return params, state, step.stats


def test_delay_switches_at_a_fixed_call_with_results_of_the_plain_loop():
  """A proposal made by step 3 is in the input of call 3; with delay=2 the switch is
  before call 5, deterministically. Every new layout was compiled in the background;
  going back to the first layout reuses its executable."""
  tx = sq.adamw(1e-2, policy=SCHEDULE)
  params, state, stats = run_helper(tx, 20, delay=2)
  calls = [s["call"] for s in stats["switches"]]
  assert calls == [5, 11, 17]
  assert [s["asked"] for s in stats["switches"]] == [3, 9, 15]
  want_params, want_state = run_reference(tx, 20, set(calls))
  assert_trees_equal(params, want_params)
  assert_trees_equal(state, want_state)
  steps = [c for c in stats["compiles"] if c["what"] == "step"]
  assert [c["background"] for c in steps] == [False, True, True]  # 8/8 again: cached
  assert stats["fallback_compiles"] == 0
  assert state[0].mu["w1"].bits == 8 and state[0].nu["w2"].bits == 8


def test_without_delay_it_switches_once_compiled_and_matches_the_plain_loop():
  """delay=None never waits for a compile: the switch comes at the first call after it
  is done (here made certain by ``wait()`` after call 4)."""
  tx = sq.adamw(1e-2, policy=Scheduled(start=(8, 8), at=(2,), bits=((4, 4),)))
  step = sq.adaptive_jit(make_step(tx))
  params = make_params()
  state = tx.init(params)
  for i in range(8):
    if i == 5:
      step.wait()
    params, state = step(params, state, *batch(i))
  step.close()
  (switch,) = step.stats["switches"]
  assert switch["asked"] == 2 and 2 < switch["call"] <= 5 and switch["waited_s"] < 0.05
  assert state[0].mu["w1"].bits == 4
  want_params, want_state = run_reference(tx, 8, {switch["call"]})
  assert_trees_equal(params, want_params)
  assert_trees_equal(state, want_state)


def test_stquant_policy_in_the_loop_needs_no_relayout_call():
  """The adaptive policy's own decisions are applied (bits follow its proposal)."""
  policy = sq.STQuantPolicy(every=4, min_interval=0, anneal_steps=2, min_size=1024)
  tx = sq.adamw(1e-2, policy=policy)
  params, state, stats = run_helper(tx, 10, delay=1)
  assert stats["switches"], stats
  want_params, want_state = run_reference(tx, 10, {s["call"] for s in stats["switches"]})
  assert_trees_equal(params, want_params)
  assert sq.bit_widths(state) == sq.bit_widths(want_state)


def test_other_argument_shapes_compile_on_the_spot():
  """A batch of another size does not fit the compiled step: it is compiled for it
  (counted as a fallback) and training goes on."""
  tx = sq.adamw(1e-2, policy=SCHEDULE)
  step = sq.adaptive_jit(make_step(tx), delay=1)
  params = make_params()
  state = tx.init(params)
  x, y = batch(0)
  params, state = step(params, state, x, y)
  params, state = step(params, state, x[:4], y[:4])
  params, state = step(params, state, x[:4], y[:4])
  assert step.stats["fallback_compiles"] == 1
  step.close()


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="delay=0"):
    sq.adaptive_jit(lambda s: s, delay=0)
  with pytest.raises(ValueError, match="no argument holds"):
    sq.adaptive_jit(lambda x: x)(jnp.ones(3))


# ---- what the caller gave, what the process keeps, what can go wrong ---------------


def test_a_state_the_caller_did_not_donate_survives_the_switch():
  """Without donate_argnums the state passed at the switch call stays readable (the
  switch deleted its old moments: "called on deleted or donated buffer")."""
  tx = sq.adamw(1e-2, policy=Scheduled(start=(8, 8), at=(2,), bits=((4, 5),)))
  step = sq.adaptive_jit(make_step(tx), delay=1)
  params = make_params()
  state = tx.init(params)
  given = []
  for i in range(5):
    given.append(state)
    params, state = step(params, state, *batch(i))
  step.close()
  assert [s["call"] for s in step.stats["switches"]] == [3]
  for old in given:  # every state handed in, the one of the switch call included
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(old))
  assert given[3][0].mu["w1"].bits == 8 and state[0].mu["w1"].bits == 4


def test_close_lets_the_step_function_and_its_executables_go():
  """A wrapper's executables go at close(), and the process-wide cache holds the step
  function (and its closure) only weakly."""
  import gc
  import weakref

  class Marker:
    pass

  def run_once():
    marker, tx = Marker(), sq.adamw(1e-2, policy=Scheduled(start=(8, 8), at=(1,),
                                                          bits=((4, 5),)))
    def fn(params, state, x, y):
      assert marker is not None  # the closure a leak would keep
      return make_step(tx)(params, state, x, y)
    step = sq.adaptive_jit(fn, delay=1)
    params = make_params()
    state = tx.init(params)
    for i in range(4):
      params, state = step(params, state, *batch(i))
    assert step.stats["switches"]
    step.close()
    return weakref.ref(marker), weakref.ref(fn)

  marker, fn = run_once()
  gc.collect()
  assert marker() is None and fn() is None


def test_shared_cache_is_bounded_and_forgets_a_dead_owner():
  from stquant_jax._src.stepping.cache import SHARED, SHARED_MAXSIZE, SharedCache
  assert len(SHARED) <= SHARED_MAXSIZE

  def owner():
    pass

  c = SharedCache(2)
  for k in range(3):
    c.put(owner, k, f"exe{k}")
  assert [c.get(owner, k) for k in range(3)] == [None, "exe1", "exe2"]  # oldest dropped
  c.put(None, "repack", "program")  # no owner: held until evicted
  assert c.get(None, "repack") == "program" and len(c) == 2
  del owner
  assert len(c) == 1


def test_the_jax_config_context_is_part_of_the_key_and_reaches_the_compile_thread():
  """The same step wrapped again under jax.default_matmul_precision compiles again (not
  served the executables compiled without it), and the layout compiled in the
  background carries the precision (the compile thread does not see the caller's
  thread-local context: the step is traced in the caller's thread)."""
  tx = sq.adamw(1e-2, policy=Scheduled(start=(8, 8), at=(1,), bits=((4, 5),)))
  fn = make_step(tx)
  for context in (None, "highest"):
    step = sq.adaptive_jit(fn, delay=1)
    params = make_params()
    state = tx.init(params)
    with jax.default_matmul_precision(context):
      for i in range(4):
        params, state = step(params, state, *batch(i))
    assert step.stats["switches"]
    if context:
      assert [c["background"] for c in step.stats["compiles"] if c["what"] == "step"] == [
          False, True]
      assert "operand_precision={highest,highest}" in step._exec.as_text()
    step.close()


def _fails_at_4_bits(tx):
  def step(params, state, x, y):
    if state[0].mu["w1"].bits == 4:
      raise RuntimeError("no executable for 4-bit m")
    return make_step(tx)(params, state, x, y)
  return step


def test_a_failed_compile_keeps_the_layout_and_takes_later_proposals():
  """A failed background compile warns once, is recorded in stats, the run stays on
  its layout (later calls do not raise), and the next proposal switches."""
  tx = sq.adamw(1e-2, policy=Scheduled(start=(8, 8), at=(2, 6), bits=((4, 5), (6, 3))))
  step = sq.adaptive_jit(_fails_at_4_bits(tx), delay=2)
  params = make_params()
  state = tx.init(params)
  with pytest.warns(UserWarning, match="compile of the layout proposed at call 2 failed"):
    for i in range(10):
      params, state = step(params, state, *batch(i))
  step.close()
  (failed,) = step.stats["failed_compiles"]
  assert failed["asked"] == 2 and "no executable for 4-bit m" in failed["error"]
  assert [s["call"] for s in step.stats["switches"]] == [8]
  assert state[0].mu["w1"].bits == 6 and np.isfinite(np.asarray(params["w1"])).all()


def test_proposals_and_switches_are_logged_and_a_proposal_left_waiting_warns(
    monkeypatch, caplog):
  """A proposal never applied is not silent: each proposal and switch is a log line,
  and a proposal whose compile has not come after UNAPPLIED_CALLS calls warns (here
  the compile thread is held back)."""
  import threading
  from stquant_jax._src.stepping import adaptive_jit as aj, compiler
  gate, job = threading.Event(), compiler.Compiler._job
  monkeypatch.setattr(aj, "UNAPPLIED_CALLS", 4, raising=False)
  monkeypatch.setattr(compiler.Compiler, "_job", lambda self, *a: gate.wait() and job(self, *a))
  tx = sq.adamw(1e-2, policy=Scheduled(start=(8, 8), at=(1,), bits=((4, 5),)))
  step = sq.adaptive_jit(make_step(tx))
  params = make_params()
  state = tx.init(params)
  caplog.set_level("INFO", logger="stquant_jax")
  try:
    with pytest.warns(UserWarning, match="proposed at call 1 is still not in use"):
      for i in range(8):
        params, state = step(params, state, *batch(i))
    assert step.stats["switches"] == [] and state[0].mu["w1"].bits == 8
    assert "2 leaves have a proposal not applied yet" in sq.summary(state)
    history = sq.BitHistory()
    history.record(8, state)
    assert repr(history) == (
        "BitHistory(1 records, steps 8..8, average bits 8.56 -> 8.56, last m bits "
        "{8: 2, 32: 1}, v bits {8: 2, 32: 1} (leaves per width; 32: float32), 2 leaves "
        "proposed at other bits)")
  finally:
    gate.set()
  step.wait()
  params, state = step(params, state, *batch(8))
  step.close()
  assert state[0].mu["w1"].bits == 4
  lines = [r.getMessage() for r in caplog.records]
  assert any("shows a new layout (4 moments: 8->4 x2, 8->5 x2)" in l for l in lines), lines
  assert any(l.startswith("adaptive_jit: switched before call 8") for l in lines), lines


# ---- flax.nnx -------------------------------------------------------------------


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 128, rngs=rngs)
    self.l2 = nnx.Linear(128, 16, rngs=rngs)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


def nnx_train_step(model, optimizer, x, y):
  def loss_fn(m):
    return jnp.mean((m(x) - y) ** 2)
  value, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return value


def test_nnx_optimizer_switches_like_the_plain_nnx_loop():
  """``adaptive_jit`` on an nnx step (model, optimizer) gives exactly what ``nnx.jit``
  plus ``sq.relayout(optimizer)`` gives, without retracing at the switch."""
  policy = Scheduled(start=(8, 8), at=(3, 7), bits=((4, 5), (6, 6)))
  runs = {}
  for mode in ("helper", "manual"):
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, sq.adamw(1e-2, policy=policy), wrt=nnx.Param)
    step = sq.adaptive_jit(nnx_train_step, delay=2) if mode == "helper" else None
    plain = nnx.jit(nnx_train_step)
    losses = []
    for i in range(12):
      if mode == "manual" and i in (5, 9):
        sq.relayout(opt)
      losses.append(float((step or plain)(model, opt, *batch(i))))
    runs[mode] = (model, opt, losses, step)
  (m1, o1, l1, step), (m2, o2, l2, _) = runs["helper"], runs["manual"]
  assert [s["call"] for s in step.stats["switches"]] == [5, 9]
  assert l1 == l2
  assert_trees_equal(nnx.state(m1, nnx.Param), nnx.state(m2, nnx.Param))
  assert sq.bit_widths(o1) == sq.bit_widths(o2)
  assert sq.bit_widths(o1)["mu_bits"]["l1/kernel"] == 6
  assert [c["background"] for c in step.stats["compiles"] if c["what"] == "step"] == [
      False, True, True]
  assert step.stats["fallback_compiles"] == 0
  step.close()


# ---- many devices, persistent cache (subprocesses) ---------------------------------

_SHARDED = textwrap.dedent(r"""
  import json, sys, functools
  import jax, jax.numpy as jnp, numpy as np, optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  sys.path.insert(0, "tests")
  from _policies import Scheduled
  import stquant_jax as sq
  from test_adaptive_jit import make_params, batch, loss, make_step

  policy = Scheduled(start=(8, 8), at=(2, 6), bits=((4, 5), (3, 8)), min_size=1024)
  tx = sq.adamw(1e-2, policy=policy)
  STEPS, DELAY = 10, 2
  out = {}

  # the plain loop (a jitted step, relayout at the helper's switch calls), placed by put
  def reference(calls, step, params, state, args=lambda i: batch(i), **relayout_kw):
    for i in range(STEPS):
      if i in calls:
        state = sq.relayout(state, **relayout_kw)
      params, state = step(params, state, *args(i))
    return params, state

  # FSDP over 8 devices: params and state sharded, batch replicated
  mesh = jax.make_mesh((8,), ("fsdp",))
  pshard = {"w1": NamedSharding(mesh, P("fsdp")), "w2": NamedSharding(mesh, P("fsdp")),
            "b": NamedSharding(mesh, P())}
  params = jax.device_put(make_params(), pshard)
  state = tx.init(params)
  step = sq.adaptive_jit(make_step(tx), delay=DELAY, param_shardings=pshard,
                         donate_argnums=(0, 1))
  for i in range(STEPS):
    params, state = step(params, state, *batch(i))
  calls = [s["call"] for s in step.stats["switches"]]
  one = make_params()
  one_params, one_state = reference(set(calls), jax.jit(make_step(tx)), one, tx.init(one))
  p8 = jax.device_put(make_params(), pshard)
  ref_params, ref_state = reference(set(calls), jax.jit(make_step(tx)), p8, tx.init(p8),
                                    param_shardings=pshard)
  diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  out["fsdp"] = {
      "calls": calls, "fallbacks": step.stats["fallback_compiles"],
      "background": [c["background"] for c in step.stats["compiles"] if c["what"] == "step"],
      "codes_spec": [str(state[0].mu["w1"].codes.sharding.spec),
                     str(state[0].nu["w2"].codes.sharding.spec)],
      "bits": sq.bit_widths(state), "ref_bits": sq.bit_widths(one_state),
      "param_diff": diff(params, ref_params), "state_diff": diff(state, ref_state),
      "one_device_diff": diff(params, one_params)}
  step.close()

  # pmap over 8 devices: replicated params and state, batch split
  pstep = make_step(tx)
  def pmapped(params, state, x, y):
    g = jax.lax.pmean(jax.grad(loss)(params, x, y), "b")
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state
  step = sq.adaptive_jit(pmapped, delay=DELAY, jit=functools.partial(jax.pmap, axis_name="b"))
  rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (8,) + jnp.shape(a)), t)
  params, state = rep(make_params()), rep(tx.init(make_params()))
  for i in range(STEPS):
    x, y = batch(i)
    params, state = step(params, state, x.reshape(8, 1, 64), y.reshape(8, 1, 16))
  step.wait()
  calls = [s["call"] for s in step.stats["switches"]]
  xs = lambda i: tuple(a.reshape((8, 1) + a.shape[1:]) for a in batch(i))
  ref_params, ref_state = reference(set(calls), jax.pmap(pmapped, axis_name="b"),
                                    rep(make_params()), rep(tx.init(make_params())), xs)
  first = lambda t: jax.tree.map(lambda a: a[0], t)
  out["pmap"] = {"calls": calls, "fallbacks": step.stats["fallback_compiles"],
                 "bits": sq.bit_widths(first(state)),
                 "param_diff": diff(params, ref_params), "state_diff": diff(state, ref_state),
                 "one_device_diff": diff(first(params), one_params)}
  step.close()
  print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded():
  return run_json(_SHARDED, devices=8)


def test_fsdp_sharded_switches_keep_the_sharding_and_match_the_plain_loop(sharded):
  """FSDP on 8 devices: the helper equals jit + relayout(param_shardings=...) on the
  same mesh exactly, keeps codes sharded, and never had to recompile in the loop."""
  r = sharded["fsdp"]
  assert r["calls"] == [4, 8]
  assert r["fallbacks"] == 0                       # outputs kept the compiled placement
  assert r["background"] == [False, True, True]
  assert r["codes_spec"] == ["P('fsdp', None)"] * 2
  assert r["param_diff"] == 0 and r["state_diff"] == 0
  assert r["bits"] == r["ref_bits"]                 # the one-device run's layout
  # against one device: cross-device sums round differently and low-bit codes can
  # flip a level, so only a step-sized bound (lr = 1e-2 per step, 10 steps)
  assert r["one_device_diff"] < 0.05


def test_pmap_switches_every_replica(sharded):
  r = sharded["pmap"]
  assert r["calls"] == [4, 8] and r["fallbacks"] == 0
  assert r["param_diff"] == 0 and r["state_diff"] == 0
  assert r["bits"] == sharded["fsdp"]["ref_bits"]
  assert r["one_device_diff"] < 0.05


_RESUME = textwrap.dedent(r"""
  import json, sys
  import jax, jax.numpy as jnp, optax
  sys.path.insert(0, "tests")
  from _policies import Scheduled
  import stquant_jax as sq
  from test_adaptive_jit import make_params, batch, make_step
  tx = sq.adamw(1e-2, policy=Scheduled(start=(8, 8), at=(2,), bits=((4, 5),)))
  step = sq.adaptive_jit(make_step(tx), delay=2, cache_dir=sys.argv[1])
  params = make_params()
  state = tx.init(params)
  for i in range(6):
    params, state = step(params, state, *batch(i))
  step.close()
  print("RESULT" + json.dumps({k: step.stats[k] for k in
        ("persistent_cache_hits", "persistent_cache_misses")} |
        {"compiles": len([c for c in step.stats["compiles"] if c["what"] == "step"])}))
""")


def test_persistent_cache_lets_a_rerun_load_instead_of_compile(tmp_path):
  """The second process compiles nothing: every executable of the helper (both step
  layouts and the re-pack program) comes from the cache directory."""
  first = run_json(_RESUME, str(tmp_path / "cache"), devices=1)
  second = run_json(_RESUME, str(tmp_path / "cache"), devices=1)
  assert first["persistent_cache_misses"] >= 3 and first["persistent_cache_hits"] == 0
  assert second["persistent_cache_misses"] == 0
  assert second["persistent_cache_hits"] == first["persistent_cache_misses"]


def test_cache_dir_sets_the_process_wide_config_and_a_second_directory_warns(tmp_path):
  """cache_dir is jax's process-wide persistent cache, not the wrapper's: it stays set
  after close(), and another directory already set is named in a warning."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  try:
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "a"))
    with pytest.warns(UserWarning, match="process-wide and already set to .*a'"):
      sq.adaptive_jit(make_step(sq.adamw(1e-2)), cache_dir=tmp_path / "b").close()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "b")
  finally:
    for k, v in old.items():
      jax.config.update(k, v)


def test_the_same_step_wrapped_again_reuses_every_compiled_layout():
  """A second run (another seed) of the same step function compiles nothing: the
  executables of every layout are kept in the process."""
  tx = sq.adamw(1e-2, policy=SCHEDULE)
  fn = make_step(tx)
  stats = []
  for _ in range(2):
    step = sq.adaptive_jit(fn, delay=2)
    params = make_params()
    state = tx.init(params)
    for i in range(12):
      params, state = step(params, state, *batch(i))
    step.close()
    stats.append(step.stats)
  # three layouts (8/8, 4/5, 6/3); re-pack programs may come from earlier tests
  assert [c["what"] for c in stats[0]["compiles"]].count("step") == 3
  assert stats[1]["compiles"] == []
  assert [s["call"] for s in stats[0]["switches"]] == [s["call"] for s in stats[1]["switches"]]
