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
   replaced moments) and calls the step compiled for the new layout.

Compiled steps are kept in process (a layout seen again, or the same step function
wrapped again for another run, costs nothing), and
``cache_dir=`` turns on JAX's persistent compilation cache, so a resumed run
loads its executables from disk instead of compiling them.

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
import sys
import threading
import time
import warnings

import jax
import numpy as np

from stquant_jax._src.layout import repack
from stquant_jax._src.layout.abstract import layouts_of, to_abstract, with_layouts
from stquant_jax._src.layout.access import replace_states, settle
from stquant_jax._src.layout.relayout import (
    as_moment, is_stacked, plan, rebuild, release, run_plan, target_bits)
from stquant_jax._src.state.opt_state import find_states
from stquant_jax._src.state.typed import opt_state_of, typed_state
from stquant_jax._src.stepping.signals import Pending, layout_signal, state_positions

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


# Compiled steps of every AdaptiveJit in the process, by what they were compiled for (the
# step function, how it is jitted, and its abstract arguments): a layout seen again, or
# the same step wrapped again for another run, costs no compile.
_COMPILED: dict = {}


def _placement(x):
  """A sharding as the compiled step sees it: one device (committed or not) is one."""
  s = getattr(x, "sharding", None)
  return None if isinstance(s, jax.sharding.SingleDeviceSharding) else s


def _signature(fn, jit, donate, abstract_args) -> tuple:
  leaves, treedef = jax.tree.flatten(tuple(abstract_args))
  avals = tuple((tuple(x.shape), str(x.dtype), _placement(x))
                if hasattr(x, "shape") else type(x).__name__ for x in leaves)
  return (fn, jit, donate, treedef, avals)


def _same(a, b) -> bool:
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


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
    self._call = 0
    self._abstract = None   # abstract arguments at the current layout
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                       thread_name_prefix="stquant-compile")
    self.stats = {"compiles": [], "switches": [], "fallback_compiles": 0, "skipped_layouts": 0,
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

  def _compile(self, abstract_args, layouts, background: bool):
    """The step compiled for ``abstract_args`` (recorded in ``stats`` unless it was
    in the process-wide cache)."""
    sig = _signature(self._fn, self._jit_option, self._donate, abstract_args)
    exe = _COMPILED.get(sig)
    if exe is not None:
      return exe
    t0 = time.perf_counter()
    with _counting(self.stats):
      exe = self._jitted.lower(*abstract_args).compile()
    _COMPILED[sig] = exe
    self.stats["compiles"].append({
        "what": "step", "layout": [l.tolist() for l in layouts], "background": background,
        "seconds": time.perf_counter() - t0})
    return exe

  def _job(self, abstract_args, layouts, repacks):
    """Background: the step for ``layouts`` and each state's re-pack program."""
    exe = self._compile(abstract_args, layouts, background=True)
    programs = []
    for changes, inputs in repacks:
      if not changes:
        programs.append((changes, None))
        continue
      sig = _signature("repack", tuple(changes), True, inputs)
      prog = _COMPILED.get(sig)
      if prog is None:
        t0 = time.perf_counter()
        with warnings.catch_warnings(), _counting(self.stats):
          # donated codes of another width cannot be reused: jax warns, nothing is wrong
          warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
          prog = repack.program(tuple(changes), True).lower(list(inputs)).compile()
        _COMPILED[sig] = prog
        self.stats["compiles"].append({"what": "repack", "background": True,
                                       "seconds": time.perf_counter() - t0})
      programs.append((changes, prog))
    return exe, programs

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
    self._exec = self._compile(self._abstract, self._layout, background=False)

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
      if not _same(targets, latest):
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
        repacks.append((changes, inputs))
    at = None if self._delay is None else asked + self._delay
    future = self._pool.submit(self._job, dst_args, targets, repacks)
    self._scheduled.append(_Switch(targets, at, asked, future, dst_args))

  def _due(self):
    if not self._scheduled:
      return None
    sw = self._scheduled[0]
    if sw.at is None:
      return sw if sw.future.done() else None
    return sw if sw.at <= self._call else None

  # ---- switching -------------------------------------------------------------

  def _switch(self, args, sw: _Switch):
    t0 = time.perf_counter()
    exe, programs = sw.future.result()  # waits only in delay mode, if still compiling
    waited = time.perf_counter() - t0
    args, it, progs = list(args), iter(sw.target), iter(programs)
    for i in self._positions:
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
            release(inputs, raw)
            outs = [as_moment(o, ch) for o, ch in zip(raw, changes)]
        if outs is None:  # compile here
          self.stats["fallback_compiles"] += 1
          outs = run_plan(changes, inputs, donate=True)
        new[id(st)] = rebuild(typed, target, positions, outs, stacked)
      args[i] = replace_states(args[i], new)
    self._scheduled.pop(0)
    self._layout, self._abstract = sw.target, sw.abstract
    self._exec = exe
    self.stats["switches"].append({"call": self._call, "asked": sw.asked, "waited_s": waited,
                                   "repack_s": time.perf_counter() - t0 - waited,
                                   "layout": [l.tolist() for l in sw.target]})
    return tuple(args)

  # ---- calling ---------------------------------------------------------------

  def _fallback(self, args):
    """The arguments do not fit the current executable (other shapes, or a state the
    caller re-laid out itself): compile for them here."""
    abstract = to_abstract(args)
    self._abstract, self._layout = abstract, self._layouts(args)
    before = len(self.stats["compiles"])
    exe = self._compile(abstract, self._layout, background=False)
    self.stats["fallback_compiles"] += len(self.stats["compiles"]) - before
    return exe

  def __call__(self, *args):
    if self._exec is None:
      self._start(args)
    self._poll(args)
    sw = self._due()
    if sw is not None:
      args = self._switch(args, sw)
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
    compiles they ask for are finished (benchmarks, tests)."""
    self._poll(drain=True)
    for sw in list(self._scheduled):
      sw.future.result()

  def close(self) -> None:
    """Stops the compile thread (after the compile in flight, if any)."""
    self._pool.shutdown(wait=True, cancel_futures=True)

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
  donated) and the new executable used: the switch costs a re-pack, not a
  compile. No ``relayout`` call is needed in the loop.

  Args:
    fn: the step, e.g. ``step(params, opt_state, batch) -> (params, opt_state,
      metrics)``, or ``step(model, optimizer, batch) -> metrics`` for nnx
      (mutating the optimizer). Positional arguments only.
    donate_argnums: as for ``jax.jit``.
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
    for a compile, seconds to re-pack) and persistent-cache hits; ``.wait()``
    blocks until scheduled compiles finish; ``.close()`` stops the thread.

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
