"""A switch of :class:`~stquant_jax.AdaptiveJit` to a new bit layout.

A :class:`Switch` is a proposed layout on its way: the abstract arguments at
that layout (what its step is compiled for), the re-packs it needs
(:func:`plan_repacks`) and the future of their compiles. At the switch,
:func:`repack_states` re-packs each state of the arguments with the
precompiled program (compiling here only when the arguments are placed
otherwise than planned), deleting the replaced moments only where the caller
donated them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses

import numpy as np

from stquant_jax._src.layout.abstract import to_abstract, with_layouts
from stquant_jax._src.layout.access import replace_states
from stquant_jax._src.layout.relayout import as_moment, is_stacked, plan, rebuild, release, run_plan
from stquant_jax._src.state.opt_state import FLOAT32, find_states
from stquant_jax._src.state.typed import opt_state_of, typed_state
from stquant_jax._src.stepping.compiler import repack_build


def same_layouts(a, b) -> bool:
  """Whether two per-state lists of ``[L, 2]`` layouts are equal."""
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def describe_changes(old, new) -> str:
  """The moments a new layout changes.

  Example:
    >>> import numpy as np
    >>> describe_changes([np.array([[8, 8], [8, 32]])], [np.array([[4, 8], [5, 32]])])
    '2 moments: 8->4 x1, 8->5 x1'
  """
  name = lambda b: "f32" if b == FLOAT32 else str(b)
  moved = collections.Counter(
      (int(a), int(b)) for o, n in zip(old, new) for a, b in zip(o.ravel(), n.ravel())
      if a != b)
  return f"{sum(moved.values())} moments: " + ", ".join(
      f"{name(a)}->{name(b)} x{k}" for (a, b), k in sorted(moved.items()))


@dataclasses.dataclass
class Switch:
  target: list           # per state, int32 [L, 2]
  at: int | None         # call to switch before (delay mode); None: once compiled
  asked: int             # call whose input state showed the proposal
  future: concurrent.futures.Future  # -> (step executable, [(changes, repack exe) per state])
  abstract: list         # the abstract arguments at ``target``


def abstract_at(base, positions, layouts, param_shardings=None):
  """Abstract arguments with the states (in ``base[positions]``) at ``layouts``, from
  ``base`` (arguments at the current layout, concrete or abstract)."""
  abstract = list(to_abstract(base))
  it = iter(layouts)
  for i in positions:
    n = len(find_states(opt_state_of(abstract[i])))
    abstract[i] = with_layouts(abstract[i], [next(it) for _ in range(n)],
                               param_shardings=param_shardings)
  return abstract


def plan_repacks(src_args, positions, targets, donate, param_shardings=None):
  """Per state of ``src_args`` (abstract, at the current layout): ``(changes, Build of
  its re-pack program or None)`` to reach ``targets``."""
  repacks, it = [], iter(targets)
  for i in positions:
    for st in find_states(opt_state_of(src_args[i])):
      typed = typed_state(st)
      _, changes, inputs = plan(typed, next(it), param_shardings=param_shardings,
                                stacked=is_stacked(typed))
      repacks.append((changes, repack_build(changes, inputs, i in donate)
                      if changes else None))
  return repacks


def repack_states(args, positions, target, programs, donate, param_shardings, stats):
  """``args`` with every state at ``target``, re-packed by the precompiled ``programs``
  (``(changes, program or None)`` per state) where their plan is unchanged, else by a
  compile here (counted in ``stats["fallback_compiles"]``). Only the states of
  arguments in ``donate`` have their replaced moments deleted."""
  args, it, progs = list(args), iter(target), iter(programs)
  for i in positions:
    donated = i in donate  # the caller's arrays are deleted only if donated
    new = {}
    for st in find_states(opt_state_of(args[i])):
      typed = typed_state(st)
      bits, (pre_changes, prog) = next(it), next(progs)
      stacked = is_stacked(typed)
      moved, changes, inputs = plan(typed, bits, param_shardings=param_shardings,
                                    stacked=stacked)
      if not moved:
        continue
      outs = None
      if prog is not None and tuple(changes) == tuple(pre_changes):
        try:
          raw = prog(list(inputs))
        except (TypeError, ValueError):  # placed otherwise than planned (checked first)
          raw = None
        if raw is not None:
          if donated:
            release(inputs, raw)
          outs = [as_moment(o, ch) for o, ch in zip(raw, changes)]
      if outs is None:  # compile here
        stats["fallback_compiles"] += 1
        outs = run_plan(changes, inputs, donate=donated)
      new[id(st)] = rebuild(typed, bits, moved, outs, stacked)
    args[i] = replace_states(args[i], new)
  return tuple(args)
