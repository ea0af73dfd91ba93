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

The compile thread is :mod:`.compiler`, the re-pack at a switch :mod:`.switch`.
Each wrapper keeps the executables it compiled (a layout seen again costs
nothing) until ``close()``; a small process-wide cache keyed weakly by the step
function lets the same function wrapped again for another run reuse them
(:mod:`.cache`). ``cache_dir=`` turns on JAX's persistent compilation cache
(a process-wide ``jax.config`` change), so a resumed run loads its executables
from disk instead of compiling them.

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
import logging
import time
import warnings

import jax

from stquant_jax._src.core.trees import is_nnx_object
from stquant_jax._src.layout.abstract import layouts_of, to_abstract
from stquant_jax._src.layout.access import settle
from stquant_jax._src.layout.relayout import target_bits
from stquant_jax._src.stepping.cache import signature
from stquant_jax._src.stepping.compiler import Build, Compiler, use_persistent_cache
from stquant_jax._src.stepping.signals import Pending, layout_signal, state_positions
from stquant_jax._src.stepping.switch import (
    Switch, abstract_at, describe_changes, plan_repacks, repack_states, same_layouts)

_LOG = logging.getLogger("stquant_jax")
UNAPPLIED_CALLS = 100  # calls a proposal may wait for its compile before a warning


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
      use_persistent_cache(cache_dir)  # process-wide jax.config, not only this wrapper
    self._jitted = None
    self._positions = ()
    self._layout: list = []
    self._exec = None
    self._pending: collections.deque = collections.deque()
    self._scheduled: list[Switch] = []
    self._failed: list = []   # layouts whose compile failed (not tried again)
    self._warned: set[str] = set()
    self._closed = False
    self._call = 0
    self._abstract = None   # abstract arguments at the current layout
    self.stats = {"compiles": [], "switches": [], "failed_compiles": [],
                  "fallback_compiles": 0, "skipped_layouts": 0,
                  "persistent_cache_hits": 0, "persistent_cache_misses": 0}
    self._compiler = Compiler(self.stats)

  # ---- compiling -------------------------------------------------------------

  def _make_jitted(self, args):
    positions = self._positions
    fn = self._fn

    def step_with_signal(*a):
      signal = layout_signal(a, positions)  # before fn: nnx steps mutate their inputs
      return fn(*a), signal

    jit = self._jit_option
    if jit is None:
      if any(is_nnx_object(a) for a in args):
        from flax import nnx  # pylint: disable=import-outside-toplevel  (nnx steps only)
        jit = nnx.jit
      else:
        jit = jax.jit
    return jit(step_with_signal, donate_argnums=self._donate)

  def _step_build(self, abstract_args, layouts, background: bool) -> Build:
    """The step for ``abstract_args``, keyed in the calling thread's jax context."""
    key = signature("step", self._jit_option, self._donate, args=abstract_args)
    return Build(key, self._fn, lambda: self._jitted.lower(*abstract_args),
                 {"what": "step", "layout": [l.tolist() for l in layouts],
                  "background": background})

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
    self._exec = self._compiler.build(self._step_build(self._abstract, self._layout,
                                                       background=False))

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
      if not same_layouts(targets, latest) and not any(same_layouts(targets, f)
                                                        for f in self._failed):
        self._schedule(p.call, targets, args)

  def _schedule(self, asked: int, targets, args=None):
    if self._delay is None:
      # No fixed switch steps: a newer proposal replaces the layouts whose compile has
      # not started yet (compiles are slower than decisions can be; skip the stale ones).
      kept = [sw for sw in self._scheduled if not sw.future.cancel()]
      self.stats["skipped_layouts"] += len(self._scheduled) - len(kept)
      self._scheduled = kept
      latest = self._scheduled[-1].target if self._scheduled else self._layout
      if same_layouts(targets, latest):
        return
    # The arguments of this call give the placement the step's outputs really have
    # (the first call's inputs may differ: e.g. uncommitted vs pmap-sharded).
    base = self._abstract if args is None else args
    source = self._scheduled[-1].target if self._scheduled else self._layout
    src_args = abstract_at(base, self._positions, source, self._param_shardings)
    dst_args = abstract_at(base, self._positions, targets, self._param_shardings)
    repacks = plan_repacks(src_args, self._positions, targets, self._donate,
                           self._param_shardings)
    step = self._step_build(dst_args, targets, background=True)
    at = None if self._delay is None else asked + self._delay
    future = self._compiler.submit(step, repacks)
    self._scheduled.append(Switch(targets, at, asked, future, dst_args))
    _LOG.info("adaptive_jit: call %d shows a new layout (%s); compiling it in the "
              "background, switch %s", asked, describe_changes(source, targets),
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

  def _compile_failed(self, sw: Switch, error: BaseException) -> None:
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

  def _switch(self, args, sw: Switch):
    t0 = time.perf_counter()
    try:
      exe, programs = sw.future.result()  # waits only in delay mode, if still compiling
    except Exception as e:  # pylint: disable=broad-except  (any compile error)
      self._compile_failed(sw, e)
      return args
    waited = time.perf_counter() - t0
    args = repack_states(args, self._positions, sw.target, programs, self._donate,
                         self._param_shardings, self.stats)
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
    return args

  # ---- calling ---------------------------------------------------------------

  def _fallback(self, args):
    """The arguments do not fit the current executable (other shapes, or a state the
    caller re-laid out itself): compile for them here."""
    abstract = to_abstract(args)
    self._abstract, self._layout = abstract, self._layouts(args)
    before = len(self.stats["compiles"])
    exe = self._compiler.build(self._step_build(abstract, self._layout, background=False))
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
    self._compiler.close()
    if self._scheduled:
      _LOG.info("adaptive_jit: closed with %d proposed layout(s) never switched to",
                len(self._scheduled))
    self._closed = True
    self._scheduled.clear()
    self._pending.clear()
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
    cache_dir: turns on JAX's persistent compilation cache there, so a
      resumed run loads its executables from disk. A process-wide
      ``jax.config`` change: every compile of the process uses that cache
      from then on, after ``close()`` too.
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
