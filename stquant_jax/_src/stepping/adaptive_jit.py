"""``adaptive_jit``: a jitted train step that switches bit layouts without stalling.

An adaptive policy proposes new bit-widths inside the jitted step; bit-widths
are static layout, so running the new layout needs the step compiled for it.
Calling :func:`~stquant_jax.relayout` and then the jitted step stalls the run
for one full trace + compile per layout change (9-15 s per change on the
experiments' GPT-2, ``benchmarks/relayout_cost.py``). :class:`AdaptiveJit`
owns the step and the switch instead:

1. The step also returns a tiny *signal* (the proposal where it differs from
   the layout, :mod:`.signals`); the host copies it asynchronously and reads
   it once ready, so no step is waited for.
2. When a signal shows a new layout, a background thread lowers and compiles
   the step for it from abstract arguments
   (``jit(step).lower(<ShapeDtypeStructs of the new layout>).compile()``),
   and the re-pack program that converts the moments, while the steps go on
   at the current layout.
3. The switch re-packs the state with the precompiled program (donating the
   replaced moments when the caller donates the state, ``donate_argnums``) and
   calls the step compiled for the new layout.

Each wrapper keeps the executables it compiled (a layout seen again costs
nothing) until ``close()``; a small process-wide cache keyed weakly by the step
function lets the same function wrapped again for another run reuse them
(:mod:`.cache`). ``cache_dir=`` turns on JAX's persistent compilation cache, so
a resumed run loads its executables from disk instead of compiling them.

Nothing is silent: every proposal and switch is logged (``logging`` logger
``"stquant_jax"``, level INFO), a proposal still unapplied
:data:`UNAPPLIED_CALLS` calls after it showed warns once (the steps are faster
than its compile: ``wait()`` or ``delay=`` make the switch come), and a compile
that fails warns once, is recorded in ``stats["failed_compiles"]``, and leaves
the run on its current layout, still taking later proposals.

When to switch: with ``delay=None``, at the first call after the compile is
done (never waits; the step of the switch depends on machine load; a proposal
that arrives while an older one still waits for the compile thread replaces
it). With
``delay=k``, exactly ``k`` calls after the call whose input state first shows
the proposal, waiting for the compile if it is not done: reproducible, and the
same step in every process, which multi-process runs need (every process must
run the same program; ``delay`` is then required).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import sys
import threading
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np

from stquant_jax._src.layout import repack
from stquant_jax._src.layout.abstract import layouts_of, to_abstract, with_layouts
from stquant_jax._src.layout.access import replace_states, settle
from stquant_jax._src.layout.relayout import (
    as_moment, is_stacked, plan, rebuild, release, run_plan, target_bits)
from stquant_jax._src.state.opt_state import FLOAT32, find_states
from stquant_jax._src.state.typed import opt_state_of, typed_state
from stquant_jax._src.stepping.cache import (
    Executables, fresh_thread_context, signature, trace_context)
from stquant_jax._src.stepping.signals import Pending, layout_signal, state_positions

_LOG = logging.getLogger("stquant_jax")
UNAPPLIED_CALLS = 100  # calls a proposal may wait for its compile before a warning

_LOCAL = threading.local()   # the stats a compile on this thread counts cache events into
_LISTENING = False


def _on_event(name, **_):
  stats = getattr(_LOCAL, "stats", None)
  if stats is not None and name.startswith("/jax/compilation_cache/cache_"):
    key = "persistent_cache_hits" if name.endswith("hits") else "persistent_cache_misses"
    stats[key] = stats.get(key, 0) + 1


@contextlib.contextmanager
def _counting(stats):
  """Persistent-cache events of compiles on this thread count into ``stats``."""
  _LOCAL.stats = stats
  try:
    yield
  finally:
    _LOCAL.stats = None


def _listen():
  global _LISTENING
  if not _LISTENING:
    jax.monitoring.register_event_listener(_on_event)
    _LISTENING = True


def use_persistent_cache(cache_dir: str) -> None:
  """Turns on JAX's persistent compilation cache in ``cache_dir`` for every executable
  (process-wide ``jax.config``; compiles of any duration are kept)."""
  jax.config.update("jax_compilation_cache_dir", str(cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _same(a, b) -> bool:
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _changes(old, new) -> str:
  """The moments a new layout changes, e.g. ``"2 moments: 8->4 x1, 8->5 x1"``."""
  name = lambda b: "f32" if b == FLOAT32 else str(b)
  moved = collections.Counter(
      (int(a), int(b)) for o, n in zip(old, new) for a, b in zip(o.ravel(), n.ravel())
      if a != b)
  return f"{sum(moved.values())} moments: " + ", ".join(
      f"{name(a)}->{name(b)} x{k}" for (a, b), k in sorted(moved.items()))


@dataclasses.dataclass
class _Build:
  """One executable to compile: found under ``key`` in the caches, else lowered and
  compiled (in the thread that builds it)."""

  key: tuple
  owner: Any                   # the step function (shared-cache key); None: a re-pack
  lower: Callable[[], Any]     # -> jax.stages.Lowered
  record: dict                 # what stats["compiles"] records, seconds added


def _is_nnx_node(x) -> bool:
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, getattr(nnx, "Pytree", ()))


@dataclasses.dataclass
class _Switch:
  target: list           # per state, int32 [L, 2]
  at: int | None         # call to switch before (delay mode); None: once compiled
  asked: int             # call whose input state showed the proposal
  future: concurrent.futures.Future  # -> (step executable, [(changes, repack exe) per state])
  abstract: list         # the abstract arguments at ``target``


class AdaptiveJit:
  """A jitted step that compiles proposed bit layouts ahead of time and switches
  between them without a compile stall. Build it with :func:`adaptive_jit`."""

  def __init__(self, fn, *, donate_argnums=(), delay=None, param_shardings=None,
               cache_dir=None, jit=None):
    if delay is not None and (not isinstance(delay, int) or isinstance(delay, bool)
                              or delay < 1):
      raise ValueError(f"delay={delay!r} must be None or an int >= 1 (calls between the "
                       "call that shows a proposal and the switch)")
    if delay is None and jax.process_count() > 1:
      raise ValueError(f"adaptive_jit: {jax.process_count()} processes must switch layouts "
                       "at the same step; pass delay=k (k steps after the proposal shows, "
                       "every process switches, waiting for its compile if needed)")
    self._fn, self._delay, self._param_shardings = fn, delay, param_shardings
    self._donate = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
    self._jit_option = jit
    if cache_dir is not None:
      use_persistent_cache(cache_dir)
    _listen()
    self._jitted = None
    self._positions = ()
    self._layout: list = []
    self._exec = None
    self._pending: collections.deque = collections.deque()
    self._scheduled: list[_Switch] = []
    self._failed: list = []   # layouts whose compile failed (not tried again)
    self._warned: set[str] = set()
    self._closed = False
    self._call = 0
    self._abstract = None   # abstract arguments at the current layout
    self._cache = Executables()
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                       thread_name_prefix="stquant-compile")
    self.stats = {"compiles": [], "switches": [], "failed_compiles": [],
                  "fallback_compiles": 0, "skipped_layouts": 0,
                  "persistent_cache_hits": 0, "persistent_cache_misses": 0}

  # ---- compiling -------------------------------------------------------------

  def _make_jitted(self, args):
    positions = self._positions
    fn = self._fn

    def step_with_signal(*a):
      signal = layout_signal(a, positions)  # before fn: nnx steps mutate their inputs
      return fn(*a), signal

    jit = self._jit_option
    if jit is None:
      if any(_is_nnx_node(a) for a in args):
        from flax import nnx  # pylint: disable=import-outside-toplevel  (nnx steps only)
        jit = nnx.jit
      else:
        jit = jax.jit
    return jit(step_with_signal, donate_argnums=self._donate)

  def _step_build(self, abstract_args, layouts, background: bool) -> _Build:
    """The step for ``abstract_args``, keyed in the calling thread's jax context."""
    key = signature("step", self._jit_option, self._donate, args=abstract_args)
    return _Build(key, self._fn, lambda: self._jitted.lower(*abstract_args),
                  {"what": "step", "layout": [l.tolist() for l in layouts],
                   "background": background})

  @staticmethod
  def _repack_build(changes, inputs, donate: bool) -> _Build:
    key = signature("repack", tuple(changes), donate, args=inputs)
    return _Build(key, None, lambda: repack.program(tuple(changes), donate).lower(list(inputs)),
                  {"what": "repack", "background": True})

  def _build(self, b: _Build):
    """The executable of ``b``: from the caches, else compiled (and recorded in
    ``stats``)."""
    exe = self._cache.get(b.owner, b.key)
    if exe is not None:
      return exe
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _counting(self.stats):
      if b.owner is None:  # a re-pack: donated codes of another width cannot be reused
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
      exe = b.lower().compile()
    self._cache.put(b.owner, b.key, exe)
    self.stats["compiles"].append({**b.record, "seconds": time.perf_counter() - t0})
    return exe

  def _job(self, step: _Build, repacks):
    """Background: the step for the new layout and each state's re-pack program."""
    exe = self._build(step)
    return exe, [(changes, None if b is None else self._build(b)) for changes, b in repacks]

  def _start(self, args):
    """First call: find the states, settle nnx ones, compile the current layout."""
    self._positions = state_positions(args)
    if not self._positions:
      raise ValueError("adaptive_jit: no argument holds a stquant_jax optimizer state; use "
                       "jax.jit for steps without one")
    for i in self._positions:  # nnx: moments in the form nnx keeps after a step
      settle(args[i])
    self._layout = self._layouts(args)
    self._jitted = self._make_jitted(args)
    self._abstract = to_abstract(args)
    self._exec = self._build(self._step_build(self._abstract, self._layout, background=False))

  def _layouts(self, args):
    return [l for i in self._positions for l in layouts_of(args[i])]

  # ---- scheduling ------------------------------------------------------------

  def _poll(self, args=None, drain: bool = False):
    """Reads the signals that are ready (in delay mode, also those that must be read now;
    all of them with ``drain``) and schedules a switch for each new proposal."""
    while self._pending:
      p = self._pending[0]
      must = drain or (self._delay is not None and p.call + self._delay <= self._call)
      # Several processes read a signal at the same call only (reading a global array
      # may gather across processes), never "when ready".
      if not (must or (p.ready() and jax.process_count() == 1)):
        return
      self._pending.popleft()
      targets = [target_bits(lay, prop) for lay, prop in zip(p.layouts, p.proposals())]
      latest = self._scheduled[-1].target if self._scheduled else self._layout
      if not _same(targets, latest) and not any(_same(targets, f) for f in self._failed):
        self._schedule(p.call, targets, args)

  def _abstract_at(self, base, layouts):
    """Abstract arguments with the states at ``layouts``, from ``base`` (arguments at the
    current layout, concrete or abstract)."""
    abstract = list(to_abstract(base))
    it = iter(layouts)
    for i in self._positions:
      n = len(find_states(opt_state_of(abstract[i])))
      abstract[i] = with_layouts(abstract[i], [next(it) for _ in range(n)],
                                 param_shardings=self._param_shardings)
    return abstract

  def _schedule(self, asked: int, targets, args=None):
    if self._delay is None:
      # No fixed switch steps: a newer proposal replaces the layouts whose compile has
      # not started yet (compiles are slower than decisions can be; skip the stale ones).
      kept = [sw for sw in self._scheduled if not sw.future.cancel()]
      self.stats["skipped_layouts"] += len(self._scheduled) - len(kept)
      self._scheduled = kept
      latest = self._scheduled[-1].target if self._scheduled else self._layout
      if _same(targets, latest):
        return
    # The arguments of this call give the placement the step's outputs really have
    # (the first call's inputs may differ: e.g. uncommitted vs pmap-sharded).
    base = self._abstract if args is None else args
    source = self._scheduled[-1].target if self._scheduled else self._layout
    src_args = self._abstract_at(base, source)
    dst_args = self._abstract_at(base, targets)
    repacks, it = [], iter(targets)
    for i in self._positions:
      for st in find_states(opt_state_of(src_args[i])):
        typed = typed_state(st)
        _, changes, inputs = plan(typed, next(it), param_shardings=self._param_shardings,
                                  stacked=is_stacked(typed))
        repacks.append((changes, self._repack_build(changes, inputs, i in self._donate)
                        if changes else None))
    step = self._step_build(dst_args, targets, background=True)
    if trace_context() != fresh_thread_context():
      # A jax config context of this thread (e.g. jax.default_matmul_precision) is not
      # seen by the compile thread: trace here, compile there.
      for b in [step] + [b for _, b in repacks if b is not None]:
        if self._cache.get(b.owner, b.key) is None:
          lowered = b.lower()
          b.lower = lambda lowered=lowered: lowered
    at = None if self._delay is None else asked + self._delay
    future = self._pool.submit(self._job, step, repacks)
    self._scheduled.append(_Switch(targets, at, asked, future, dst_args))
    _LOG.info("adaptive_jit: call %d shows a new layout (%s); compiling it in the "
              "background, switch %s", asked, _changes(source, targets),
              "once compiled" if at is None else f"before call {at}")

  def _due(self):
    if not self._scheduled:
      return None
    sw = self._scheduled[0]
    if sw.at is None:
      return sw if sw.future.done() else None
    return sw if sw.at <= self._call else None

  def _warn_unapplied(self) -> None:
    """Warns once when the oldest proposal has waited :data:`UNAPPLIED_CALLS` calls."""
    sw = self._scheduled[0] if self._scheduled else None
    if (sw is None or sw.at is not None or self._call - sw.asked < UNAPPLIED_CALLS
        or "unapplied" in self._warned):
      return
    self._warned.add("unapplied")
    warnings.warn(
        f"adaptive_jit: the layout the policy proposed at call {sw.asked} is still not in "
        f"use {self._call - sw.asked} calls later: its background compile is slower than "
        "the steps, and the state keeps its bits meanwhile. Call .wait() to block until it "
        "is compiled, or pass delay=k to switch k calls after a proposal (waiting for the "
        "compile); .stats['compiles'] has the compile times.", stacklevel=3)

  # ---- switching -------------------------------------------------------------

  def _compile_failed(self, sw: _Switch, error: BaseException) -> None:
    """A layout's compile failed: the run stays on its layout, the layout is not tried
    again, later proposals are still taken."""
    self._scheduled.pop(0)
    self._failed.append(sw.target)
    message = f"{type(error).__name__}: {error}"
    self.stats["failed_compiles"].append({"call": self._call, "asked": sw.asked,
                                          "layout": [l.tolist() for l in sw.target],
                                          "error": message})
    _LOG.warning("adaptive_jit: the compile of the layout proposed at call %d failed (%s); "
                 "staying on the current layout", sw.asked, message)
    if "failed" not in self._warned:
      self._warned.add("failed")
      warnings.warn(f"adaptive_jit: the compile of the layout proposed at call {sw.asked} "
                    f"failed ({message}); the run stays on its current layout and takes "
                    "later proposals (stats['failed_compiles'] lists every failure)",
                    stacklevel=3)

  def _switch(self, args, sw: _Switch):
    t0 = time.perf_counter()
    try:
      exe, programs = sw.future.result()  # waits only in delay mode, if still compiling
    except Exception as e:  # pylint: disable=broad-except  (any compile error)
      self._compile_failed(sw, e)
      return args
    waited = time.perf_counter() - t0
    args, it, progs = list(args), iter(sw.target), iter(programs)
    for i in self._positions:
      donate = i in self._donate  # the caller's arrays are deleted only if donated
      new = {}
      for st in find_states(opt_state_of(args[i])):
        typed = typed_state(st)
        target, (pre_changes, prog) = next(it), next(progs)
        stacked = is_stacked(typed)
        positions, changes, inputs = plan(typed, target, param_shardings=self._param_shardings,
                                          stacked=stacked)
        if not positions:
          continue
        outs = None
        if prog is not None and tuple(changes) == tuple(pre_changes):
          try:
            raw = prog(list(inputs))
          except (TypeError, ValueError):  # placed otherwise than planned (checked first)
            raw = None
          if raw is not None:
            if donate:
              release(inputs, raw)
            outs = [as_moment(o, ch) for o, ch in zip(raw, changes)]
        if outs is None:  # compile here
          self.stats["fallback_compiles"] += 1
          outs = run_plan(changes, inputs, donate=donate)
        new[id(st)] = rebuild(typed, target, positions, outs, stacked)
      args[i] = replace_states(args[i], new)
    self._scheduled.pop(0)
    self._layout, self._abstract = sw.target, sw.abstract
    self._exec = exe
    record = {"call": self._call, "asked": sw.asked, "waited_s": waited,
              "repack_s": time.perf_counter() - t0 - waited,
              "layout": [l.tolist() for l in sw.target]}
    self.stats["switches"].append(record)
    _LOG.info("adaptive_jit: switched before call %d to the layout proposed at call %d "
              "(waited %.2f s for its compile, re-packed in %.3f s)", record["call"],
              record["asked"], waited, record["repack_s"])
    return tuple(args)

  # ---- calling ---------------------------------------------------------------

  def _fallback(self, args):
    """The arguments do not fit the current executable (other shapes, or a state the
    caller re-laid out itself): compile for them here."""
    abstract = to_abstract(args)
    self._abstract, self._layout = abstract, self._layouts(args)
    before = len(self.stats["compiles"])
    exe = self._build(self._step_build(abstract, self._layout, background=False))
    self.stats["fallback_compiles"] += len(self.stats["compiles"]) - before
    return exe

  def __call__(self, *args):
    if self._closed:
      raise RuntimeError("adaptive_jit: this step was closed (close() drops its compiled "
                         "executables); wrap the step again")
    if self._exec is None:
      self._start(args)
    self._poll(args)
    sw = self._due()
    if sw is not None:
      args = self._switch(args, sw)
    self._warn_unapplied()
    try:
      out, signal = self._exec(*args)
    except (TypeError, ValueError) as e:
      if "compiled" not in str(e) and "does not match" not in str(e):
        raise
      self._exec = self._fallback(args)
      out, signal = self._exec(*args)
    if getattr(signal, "is_fully_addressable", False):
      signal.copy_to_host_async()
    self._pending.append(Pending(self._call, signal, list(self._layout)))
    self._call += 1
    return out

  def wait(self) -> None:
    """Blocks until the steps run so far are done, their proposals are read and the
    compiles they ask for are finished (benchmarks, tests). A compile that failed is
    reported at the next call."""
    self._poll(drain=True)
    concurrent.futures.wait([sw.future for sw in self._scheduled])

  def close(self) -> None:
    """Stops the compile thread (after the compile in flight, if any) and drops this
    step's executables (those of the process-wide cache stay while the step function
    lives). The step cannot be called afterwards."""
    self._pool.shutdown(wait=True, cancel_futures=True)
    if self._scheduled:
      _LOG.info("adaptive_jit: closed with %d proposed layout(s) never switched to",
                len(self._scheduled))
    self._closed = True
    self._scheduled.clear()
    self._pending.clear()
    self._cache.clear()
    self._exec = self._jitted = self._abstract = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  @property
  def layout(self) -> list:
    """The bit layout (int32 ``[L, 2]`` per stquant state) the next call runs."""
    return [l.copy() for l in self._layout]


def adaptive_jit(fn=None, *, donate_argnums=(), delay=None, param_shardings=None,
                 cache_dir=None, jit=None):
  """Jit-compiles a train step that switches adaptive bit layouts without stalling.

  Wrap the step as you would with ``jax.jit`` (or ``flax.nnx.jit``): one of
  its positional arguments holds the optimizer state (an optax state, a
  pytree containing one, or a ``flax.nnx.Optimizer``). Each call runs the
  step compiled for the state's current layout. When the policy proposes
  another layout (``STQuantPolicy`` decides inside the step), the step for
  that layout and the re-pack program are compiled in a background thread
  while training goes on, then the state is re-packed (replaced moments
  donated if the state's argument is in ``donate_argnums``) and the new
  executable used: the switch costs a re-pack, not a compile. No ``relayout``
  call is needed in the loop.

  Args:
    fn: the step, e.g. ``step(params, opt_state, batch) -> (params, opt_state,
      metrics)``, or ``step(model, optimizer, batch) -> metrics`` for nnx
      (mutating the optimizer). Positional arguments only.
    donate_argnums: as for ``jax.jit``; a state argument given here also has
      its replaced moments deleted at a switch (freed at once), one not given
      stays readable.
    delay: None (switch at the first call after the new layout's compile is
      done; never waits) or an int ``k >= 1``: switch exactly ``k`` calls after
      the call whose input state first shows the proposal, waiting for the
      compile if it is still running. Deterministic: required with several
      processes, which must all switch at the same step.
    param_shardings: optional params-shaped pytree of shardings: re-packed
      moments are placed by :func:`~stquant_jax.state_shardings`' rule.
    cache_dir: turns on JAX's persistent compilation cache there
      (process-wide), so a resumed run loads its executables from disk.
    jit: the jit to use, called as ``jit(f, donate_argnums=...)`` and needing
      ``.lower(*args).compile()``: default ``flax.nnx.jit`` when an argument
      is an nnx object, else ``jax.jit``; e.g.
      ``functools.partial(jax.pmap, axis_name="batch")`` for ``pmap``.

  Returns:
    An :class:`AdaptiveJit`: call it like the step; ``.stats`` lists the
    compiles (background or not, seconds), the switches (call, seconds waited
    for a compile, seconds to re-pack), failed compiles and persistent-cache
    hits; ``.wait()`` blocks until scheduled compiles finish (so that the next
    call switches); ``.close()`` stops the thread and drops the executables.
    Proposals and switches are logged (logger ``"stquant_jax"``, INFO).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.ones((64, 128)) * 0.1}
    >>> policy = sq.STQuantPolicy(every=5, min_interval=0, anneal_steps=1, critical=(6, 6),
    ...                           magnitude=(6, 6), structure=(5, 5), redundant=(4, 4))
    >>> tx = sq.adamw(1e-2, policy=policy)   # 7 bits (6 + annealing) until step 5, then 6
    >>> def step(params, state, x):
    ...   g = jax.grad(lambda p: jnp.mean((x @ p["w"]) ** 2))(params)
    ...   u, state = tx.update(g, state, params)
    ...   return optax.apply_updates(params, u), state
    >>> train_step = sq.adaptive_jit(step, delay=3)
    >>> state = tx.init(params)
    >>> for i in range(12):
    ...   params, state = train_step(params, state, jnp.ones((8, 64)))
    >>> train_step.stats["switches"][0]["call"], state[0].mu["w"].bits  # proposal seen at call 5
    (8, 6)
    >>> train_step.close()
  """
  if fn is None:
    return lambda f: adaptive_jit(f, donate_argnums=donate_argnums, delay=delay,
                                  param_shardings=param_shardings, cache_dir=cache_dir,
                                  jit=jit)
  return AdaptiveJit(fn, donate_argnums=donate_argnums, delay=delay,
                     param_shardings=param_shardings, cache_dir=cache_dir, jit=jit)
