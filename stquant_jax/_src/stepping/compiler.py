"""The background compiler of :class:`~stquant_jax.AdaptiveJit`.

A :class:`Build` is one executable to make (a train step at a layout, or a
state's re-pack program): looked up in the wrapper's caches (:mod:`.cache`),
else lowered and compiled. :class:`Compiler` makes them, either in the calling
thread (the first layout, a fallback) or in one background thread (a proposed
layout, while the steps go on), and records each compile in the wrapper's
``stats``, with the persistent-cache hits and misses it caused.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
import warnings
from typing import Any, Callable

import jax

from stquant_jax._src.layout import repack
from stquant_jax._src.stepping.cache import (
    Executables, fresh_thread_context, signature, trace_context)

_LOG = logging.getLogger("stquant_jax")
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
  """Turns on JAX's persistent compilation cache in ``cache_dir``.

  This changes the process-wide ``jax.config``, not just one wrapper: from now on
  every compile in the process (any ``jax.jit``) reads and writes the cache, of
  any duration and size (``jax_persistent_cache_min_compile_time_secs=0``,
  ``jax_persistent_cache_min_entry_size_bytes=-1``), and the settings stay after
  ``close()``. jax opens the cache once per process, so a second, different
  directory warns (the first one may stay in use).
  """
  current = jax.config.jax_compilation_cache_dir
  if current and current != str(cache_dir):
    warnings.warn(f"adaptive_jit(cache_dir={str(cache_dir)!r}): jax's persistent compilation "
                  f"cache is process-wide and already set to {current!r}; once jax has "
                  "opened it, it keeps that directory", stacklevel=4)
  _LOG.info("adaptive_jit: jax's persistent compilation cache in %s, for every compile of "
            "this process (process-wide jax.config)", cache_dir)
  jax.config.update("jax_compilation_cache_dir", str(cache_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@dataclasses.dataclass
class Build:
  """One executable to compile: found under ``key`` in the caches, else lowered and
  compiled (in the thread that builds it)."""

  key: tuple
  owner: Any                   # the step function (shared-cache key); None: a re-pack
  lower: Callable[[], Any]     # -> jax.stages.Lowered
  record: dict                 # what stats["compiles"] records, seconds added


def repack_build(changes, inputs, donate: bool) -> Build:
  """The re-pack program of one state (:func:`repack.program`) for ``inputs``."""
  key = signature("repack", tuple(changes), donate, args=inputs)
  return Build(key, None, lambda: repack.program(tuple(changes), donate).lower(list(inputs)),
               {"what": "repack", "background": True})


class Compiler:
  """Builds executables for one wrapper: cached, counted in ``stats``, and in a
  background thread on request."""

  def __init__(self, stats: dict):
    self.stats = stats
    self.cache = Executables()
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                       thread_name_prefix="stquant-compile")
    _listen()

  def build(self, b: Build):
    """The executable of ``b``: from the caches, else compiled (and recorded in
    ``stats``)."""
    exe = self.cache.get(b.owner, b.key)
    if exe is not None:
      return exe
    t0 = time.perf_counter()
    with warnings.catch_warnings(), _counting(self.stats):
      if b.owner is None:  # a re-pack: donated codes of another width cannot be reused
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
      exe = b.lower().compile()
    self.cache.put(b.owner, b.key, exe)
    self.stats["compiles"].append({**b.record, "seconds": time.perf_counter() - t0})
    return exe

  def _job(self, step: Build, repacks):
    """Background: the step for the new layout and each state's re-pack program."""
    exe = self.build(step)
    return exe, [(changes, None if b is None else self.build(b)) for changes, b in repacks]

  def submit(self, step: Build, repacks) -> concurrent.futures.Future:
    """Builds ``step`` and the ``(changes, Build or None)`` ``repacks`` in the background
    thread: a future of ``(step executable, [(changes, program or None)])``."""
    if trace_context() != fresh_thread_context():
      # A jax config context of this thread (e.g. jax.default_matmul_precision) is not
      # seen by the compile thread: trace here, compile there.
      for b in [step] + [b for _, b in repacks if b is not None]:
        if self.cache.get(b.owner, b.key) is None:
          lowered = b.lower()
          b.lower = lambda lowered=lowered: lowered
    return self._pool.submit(self._job, step, repacks)

  def close(self) -> None:
    """Stops the thread (after the compile in flight, if any) and drops the wrapper's
    executables."""
    self._pool.shutdown(wait=True, cancel_futures=True)
    self.cache.clear()
