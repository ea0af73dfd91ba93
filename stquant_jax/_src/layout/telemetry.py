"""Bit-width telemetry: what every leaf's m and v use (and what the policy wants), over training.

The layout's bits are static metadata (read on the host for free); what the
policy proposes (:meth:`~stquant_jax.Policy.proposed_bits`) and reports of its
state (:meth:`~stquant_jax.Policy.describe`: ``STQuantPolicy``'s zones,
annealing factor and decisions) come from small arrays in its state (tiny
device-to-host copies). :class:`BitHistory` records both at each relayout or
evaluation, for plots of bit-width evolution.
"""

from __future__ import annotations

import collections
import json

import numpy as np

from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.core.trees import path_names
from stquant_jax._src.distributed.mesh import host_value
from stquant_jax._src.layout.accounting import average_bits
from stquant_jax._src.policy.base import is_concrete, policy_of
from stquant_jax._src.state.opt_state import NO_MOMENT, current_bits
from stquant_jax._src.state.typed import typed_states


def _names(state) -> list[str]:
  return path_names(state.mu, is_leaf=is_quantized)


def _bits_value(b: int):
  return None if b == NO_MOMENT else int(b)


def _plain(x):
  """A numpy scalar as the Python value it holds (JSON-friendly); anything else as is."""
  return x.item() if isinstance(x, np.generic) else x


def bit_widths(opt_state, index: int = 0) -> dict:
  """Bit-widths of one stquant state in ``opt_state`` (the ``index``-th found).

  ``opt_state`` may be any optax state, a ``flax.nnx.Optimizer`` or its
  ``opt_state`` (leaf names are the parameters' paths either way).

  Returns a JSON-friendly dict: ``mu_bits`` / ``nu_bits`` (``{leaf name: bits}``,
  32 = float32, leaves without moments left out) from the layout; when the
  policy can change the layout, ``mu_proposed`` / ``nu_proposed``
  (:meth:`~stquant_jax.Policy.proposed_bits`); and what the policy reports of its
  state (:meth:`~stquant_jax.Policy.describe`): a per-moment entry ``key`` as
  ``mu_key`` / ``nu_key``, a scalar as it is (``STQuantPolicy``: ``mu_zone`` /
  ``nu_zone``, ``anneal``, ``decisions``). Abstract states give the layout only.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> state = sq.adamw(1e-3).init({"w": jnp.zeros((128, 64)), "b": jnp.zeros((64,))})
    >>> sq.bit_widths(state)["mu_bits"]
    {'b': 32, 'w': 8}
  """
  states = typed_states(opt_state)
  if not states:
    raise ValueError("bit_widths found no stquant state in opt_state")
  if not -len(states) <= index < len(states):
    raise IndexError(f"bit_widths(index={index}): opt_state holds {len(states)} stquant "
                     "state(s)")
  st = states[index]
  names = _names(st)
  cur = current_bits(st)
  keep = [i for i in range(len(names)) if NO_MOMENT not in cur[i]]
  out = {
      "mu_bits": {names[i]: _bits_value(cur[i, 0]) for i in keep},
      "nu_bits": {names[i]: _bits_value(cur[i, 1]) for i in keep},
  }
  policy, ps = policy_of(st), st.policy_state
  if not is_concrete(ps):  # an abstract state: nothing to read
    return out
  prop = policy.proposed_bits(ps)
  if prop is not None:
    prop = np.asarray(host_value(prop))
    out["mu_proposed"] = {names[i]: _bits_value(prop[i, 0]) for i in keep}
    out["nu_proposed"] = {names[i]: _bits_value(prop[i, 1]) for i in keep}
  for key, value in policy.describe(ps).items():
    if isinstance(value, np.ndarray) and value.shape == cur.shape:  # per leaf and moment
      out[f"mu_{key}"] = {names[i]: _plain(value[i, 0]) for i in keep}
      out[f"nu_{key}"] = {names[i]: _plain(value[i, 1]) for i in keep}
    else:
      out[key] = _plain(value)
  return out


def unapplied(record: dict) -> dict[str, tuple]:
  """The leaves whose policy proposes other bits than they have, from a
  :func:`bit_widths` record: ``{leaf name: (m proposed, v proposed)}`` (32 = float32).
  A proposal takes effect at :func:`~stquant_jax.relayout` or in an
  :func:`~stquant_jax.adaptive_jit` step; under a plain ``jax.jit`` step it never does."""
  out = {}
  for name in record.get("mu_proposed", {}):
    want = (record["mu_proposed"][name], record["nu_proposed"][name])
    if None not in want and want != (record["mu_bits"][name], record["nu_bits"][name]):
      out[name] = want
  return out


class BitHistory:
  """Host-side log of bit-widths over training.

  Call :meth:`record` after each :func:`stquant_jax.relayout` (or at each
  evaluation); each record is :func:`bit_widths` plus ``step``,
  ``average_bits`` and any extra scalars you pass (e.g. ``loss=``).

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> state = sq.adamw(1e-3).init({"w": jnp.zeros((128, 64))})
    >>> h = sq.BitHistory()
    >>> h.record(0, state, loss=1.5)
    >>> h.series("w", "mu")
    ([0], [8])
  """

  def __init__(self):
    self.records: list[dict] = []

  def __repr__(self) -> str:
    if not self.records:
      return "BitHistory(0 records)"
    first, last = self.records[0], self.records[-1]
    count = lambda key: dict(sorted(collections.Counter(last[key].values()).items()))
    waiting = unapplied(last)
    return (f"BitHistory({len(self.records)} records, steps {first['step']}..{last['step']}, "
            f"average bits {first['average_bits']:.2f} -> {last['average_bits']:.2f}, "
            f"last m bits {count('mu_bits')}, v bits {count('nu_bits')} (leaves per width; "
            f"32: float32)" + (f", {len(waiting)} leaves proposed at other bits"
                               if waiting else "") + ")")

  def record(self, step: int, opt_state, **scalars) -> None:
    rec = {"step": int(step), **bit_widths(opt_state),
           "average_bits": average_bits(opt_state)}
    rec.update({k: float(v) for k, v in scalars.items()})
    self.records.append(rec)

  def series(self, leaf: str, moment: str = "mu", kind: str = "bits"):
    """(steps, values) of one leaf's ``mu``/``nu`` ``bits``/``proposed``/``zone``."""
    key = f"{moment}_{kind}"
    steps = [r["step"] for r in self.records if leaf in r.get(key, {})]
    return steps, [r[key][leaf] for r in self.records if leaf in r.get(key, {})]

  def to_json(self, path=None) -> str:
    text = json.dumps(self.records, indent=1)
    if path is not None:
      with open(path, "w") as f:
        f.write(text)
    return text
