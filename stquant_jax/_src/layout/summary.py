"""``summary``: a human-readable table of an optimizer state, leaf by leaf."""

from __future__ import annotations

import math

import jax
import numpy as np

from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.core.trees import path_names
from stquant_jax._src.layout.accounting import average_bits, state_nbytes
from stquant_jax._src.layout.telemetry import bit_widths, unapplied
from stquant_jax._src.state.opt_state import FLOAT32, NO_MOMENT, current_bits
from stquant_jax._src.state.typed import typed_states


def _nbytes(x) -> int:
  if x is None:
    return 0
  arrays = [x.codes, x.scales] if is_quantized(x) else [x]
  return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays)


def _bits(b: int) -> str:
  return {FLOAT32: "f32", NO_MOMENT: "-"}.get(int(b), str(int(b)))


def _described(record: dict) -> dict[str, dict[str, str]]:
  """The per-moment entries the policy reports (:meth:`~stquant_jax.Policy.describe`,
  e.g. ``zone``) from a :func:`bit_widths` record: ``{key: {leaf name: "m/v"}}``."""
  keys = [k[3:] for k in record if k.startswith("mu_") and k not in ("mu_bits", "mu_proposed")
          and f"nu_{k[3:]}" in record]
  return {key: {n: f"{record[f'mu_{key}'][n]}/{record[f'nu_{key}'][n]}"
                for n in record[f"mu_{key}"]} for key in keys}


def _table(rows: list[list[str]], right: set[int]) -> str:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  fmt = lambda r: "  ".join(c.rjust(w) if i in right else c.ljust(w)
                            for i, (c, w) in enumerate(zip(r, widths))).rstrip()
  return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def summary(opt_state) -> str:
  """A per-leaf table of the stquant states in ``opt_state``, with totals.

  One row per parameter leaf: its path, shape, the bits of m and v (``f32``: a
  float32 moment, ``-``: no moment), what the policy reports per moment
  (:meth:`~stquant_jax.Policy.describe`: ``STQuantPolicy``'s zones), the bits
  the policy proposes when they differ from the layout somewhere (a proposal not
  applied yet: :func:`~stquant_jax.relayout` or :func:`~stquant_jax.adaptive_jit`
  applies it, a plain ``jax.jit`` step never does), and the bytes its two moments take; then the totals: bytes of the
  whole optimizer state (counters and policy state included) and
  :func:`~stquant_jax.average_bits`. Works for concrete and abstract
  (:func:`~stquant_jax.abstract_state`) states, optax or nnx ones. Print it.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.zeros((256, 64)), "b": jnp.zeros((64,))}
    >>> print(sq.summary(sq.adamw(1e-3, policy=sq.FixedBits(8, 4)).init(params)))
    leaf  shape      m bits  v bits  moment bytes
    ----  ---------  ------  ------  ------------
    b     (64,)         f32     f32           512
    w     (256, 64)       8       4        25,600
    total: 26,116 bytes of optimizer state, 6.35 bits per moment value (2 leaves, 2 of 4 moments quantized)
  """
  states = typed_states(opt_state)
  if not states:
    raise ValueError("summary found no stquant state in opt_state")
  parts, waiting = [], 0
  for k, st in enumerate(states):
    mu = jax.tree.leaves(st.mu, is_leaf=is_quantized)
    nu = jax.tree.leaves(st.nu, is_leaf=is_quantized)
    names = path_names(st.mu, is_leaf=is_quantized)
    cfg = st.config
    shapes = list(cfg.shapes) if cfg is not None else [tuple(x.shape) for x in mu]
    bits = current_bits(st)
    record = bit_widths(opt_state, k)
    described = _described(record)
    proposed = unapplied(record)
    waiting += len(proposed)
    header = (["leaf", "shape", "m bits", "v bits"] + [f"{key} (m/v)" for key in described]
              + (["proposed (m/v)"] if proposed else []))
    rows = [header + ["moment bytes"]]
    for i, name in enumerate(names):
      row = [name, str(tuple(shapes[i])), _bits(bits[i, 0]), _bits(bits[i, 1])]
      row += [column.get(name, "-") for column in described.values()]
      if proposed:
        want = [record[f"{m}_proposed"].get(name) for m in ("mu", "nu")]
        row.append("-" if None in want else "/".join(map(_bits, want)))
      rows.append(row + [f"{_nbytes(mu[i]) + _nbytes(nu[i]):,}"])
    right = {2, 3, len(header)}
    title = f"stquant state {k}:\n" if len(states) > 1 else ""
    parts.append(title + _table(rows, right))
  quantized = sum(int(b) not in (FLOAT32, NO_MOMENT) for st in states
                  for b in current_bits(st).reshape(-1))
  moments = sum(int(b) != NO_MOMENT for st in states for b in current_bits(st).reshape(-1))
  leaves = sum(current_bits(st).shape[0] for st in states)
  parts.append(f"total: {state_nbytes(opt_state):,} bytes of optimizer state, "
               f"{average_bits(opt_state):.2f} bits per moment value ({leaves} leaves, "
               f"{quantized} of {moments} moments quantized)")
  if waiting:
    parts.append(f"{waiting} leaves have a proposal not applied yet (sq.relayout or "
                 "sq.adaptive_jit applies it; a plain jax.jit step never does)")
  return "\n".join(parts)
