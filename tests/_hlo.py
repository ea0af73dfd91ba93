"""Compiled-program facts shared by tests and benchmarks: the collectives read from
HLO text (the sharding tests' subprocess scripts import it as ``tests._hlo``: they
run from the repository root), and a step's compiled temporaries.

Example:
  >>> collectives("%x = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %p), dimensions={0}")
  [('all-gather', 32)]
"""

import math
import re

MOVING = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")  # move data
ALL = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(text: str, ops=ALL, start_results_only: bool = False):
  """``(op, elements)`` of every collective in ``ops`` found in ``text``.

  The elements are those of every shape left of the op (a tuple result counts
  each array). An async ``-start`` op's tuple holds (operands, results); with
  ``start_results_only`` only its results count.
  """
  pattern = re.compile(r"=\s*(.*?)\s(" + "|".join(map(re.escape, ops)) + r")(-start)?\(")
  res = []
  for line in text.splitlines():
    mt = pattern.search(line)
    if mt:
      shapes = re.findall(r"\w+\[([\d,]*)\]", mt.group(1))
      if start_results_only and mt.group(3):
        shapes = shapes[len(shapes) // 2:]
      res.append((mt.group(2), sum(math.prod(int(d) for d in sh.split(",") if d)
                                   for sh in shapes)))
  return res


def step_temp_bytes(tx, params) -> int:
  """Temporary bytes of ``step(params, state, grads)`` (``tx.update`` then
  ``optax.apply_updates``) compiled for abstract ``params`` with the state and the
  gradients donated, as in a train step (the gradient a temporary the update may
  overwrite)."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  state = jax.eval_shape(tx.init, params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  compiled = jax.jit(step, donate_argnums=(1, 2)).lower(params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes
