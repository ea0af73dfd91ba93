"""Where :class:`~stquant_jax.AdaptiveJit` keeps its compiled executables.

Each wrapper keeps the executables it compiled (:class:`Executables`), so a layout
seen again in a run costs nothing, and drops them at ``close()``. Beside them, a
small cache shared by the process (:data:`SHARED`) lets the same step function
wrapped again (another seed of a sweep) reuse what an earlier wrapper compiled,
as jax's own caches do: keyed *weakly* by the step function (an entry goes when
the function is garbage collected) and bounded (the least recently used
executables go first). Keys also hold what makes two compiles differ besides
the arguments' shapes and dtypes: their devices and jax's configuration context
(:func:`trace_context`).
"""

from __future__ import annotations

import collections
import threading
import weakref

import jax

SHARED_MAXSIZE = 32  # executables kept for wrappers to come, in all


def trace_context():
  """jax's configuration that shapes a trace, as jax's own jit cache keys on it: the
  thread's config contexts (``jax.default_matmul_precision``, ``jax.default_device``,
  x64 ...). None where this jax does not expose it."""
  try:
    from jax._src.config import trace_context as jax_trace_context  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - another jax
    return None
  return jax_trace_context()


def fresh_thread_context():
  """:func:`trace_context` as a new thread sees it (contexts are thread-local): what
  the background compile thread traces under."""
  out = []
  t = threading.Thread(target=lambda: out.append(trace_context()))
  t.start()
  t.join()
  return out[0]


def _placement(x):
  """Where an argument lives, as a compiled step sees it: its device for one device
  (committed or not; an uncommitted one is the default device, in the trace context),
  else its sharding."""
  s = getattr(x, "sharding", None)
  if isinstance(s, jax.sharding.SingleDeviceSharding):
    return next(iter(s.device_set))
  return s


def signature(*parts, args) -> tuple:
  """A cache key: ``parts`` (hashable), then the abstract arguments' tree, shapes,
  dtypes and placements, and the trace context."""
  leaves, treedef = jax.tree.flatten(tuple(args))
  avals = tuple((tuple(x.shape), str(x.dtype), _placement(x))
                if hasattr(x, "shape") else type(x).__name__ for x in leaves)
  return (*parts, treedef, avals, trace_context())


class SharedCache:
  """Executables shared by wrappers, keyed weakly by an owner (the step function; None
  for programs that belong to no function), at most ``maxsize`` in all."""

  def __init__(self, maxsize: int):
    self.maxsize = maxsize
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  @staticmethod
  def _owner_key(owner, callback=None):
    if owner is None:
      return None
    try:
      return weakref.ref(owner, callback) if callback else weakref.ref(owner)
    except TypeError:  # not weakly referenceable: never shared
      return False

  def get(self, owner, key):
    ref = self._owner_key(owner)
    if ref is False:
      return None
    with self._lock:
      value = self._entries.get((ref, key))
      if value is not None:
        self._entries.move_to_end((ref, key))
      return value

  def put(self, owner, key, value) -> None:
    drop = lambda r: self._drop((r, key))
    ref = self._owner_key(owner, drop)
    if ref is False or self.maxsize <= 0:
      return
    with self._lock:
      self._entries[(ref, key)] = value
      self._entries.move_to_end((ref, key))
      while len(self._entries) > self.maxsize:
        self._entries.popitem(last=False)

  def _drop(self, entry) -> None:
    with self._lock:
      self._entries.pop(entry, None)

  def __len__(self) -> int:
    return len(self._entries)

  def clear(self) -> None:
    with self._lock:
      self._entries.clear()


SHARED = SharedCache(SHARED_MAXSIZE)


class Executables:
  """One wrapper's executables (dropped at ``close()``), backed by :data:`SHARED`
  under ``owner`` (its step function; None for programs of no function)."""

  def __init__(self):
    self._own: dict = {}

  def get(self, owner, key):
    value = self._own.get(key)
    if value is None:
      value = SHARED.get(owner, key)
      if value is not None:
        self._own[key] = value
    return value

  def put(self, owner, key, value) -> None:
    self._own[key] = value
    SHARED.put(owner, key, value)

  def clear(self) -> None:
    self._own.clear()
