"""``STQuantPolicy``: adaptive bit-widths per leaf, per moment and over training.

This module is the policy's configuration: its knobs and their checks, the
static first layout (with a memory budget: :mod:`.first_layout`) and the
:class:`~stquant_jax.Policy` interface. What runs inside the jitted update, the
statistics and the decision, is :mod:`.decision`; the design and the evidence
behind the defaults are in docs/policy.md.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.blocks import DEFAULT_BLOCK_SIZE, check_block_size
from stquant_jax._src.codec.packing import MAX_BITS, check_bits
from stquant_jax._src.core.checks import check_choice, check_int, check_number, check_pair
from stquant_jax._src.core.trees import field
from stquant_jax._src.distributed.mesh import host_value
from stquant_jax._src.policy import decision, first_layout
from stquant_jax._src.policy.allocation import relative_error_table
from stquant_jax._src.policy.base import Policy, is_float, place_like
from stquant_jax._src.policy.decision import NEVER, STQuantPolicyState
from stquant_jax._src.policy.scores import (
    MAGNITUDE_FACTORS, STRUCTURE_FACTORS, SUMS, needed_sums)
from stquant_jax._src.state.opt_state import NO_MOMENT, bits_code

ZONES = ("critical", "magnitude", "structure", "redundant")
BUDGET_STARTS = ("v_first", "even")


def _pair(v) -> tuple:
  """An int or ``(mu, nu)`` field as a ``(mu, nu)`` tuple."""
  return tuple(v) if isinstance(v, tuple) else (v, v)


@dataclasses.dataclass(frozen=True)
class STQuantPolicy(Policy):
  """Adaptive bit allocation along leaves, moments (m, v) and training steps.

  Leaves with fewer than ``min_size`` values and non-float leaves are not
  adaptive (float32 moments / no moments, as in :class:`FixedBits`); every
  other leaf starts at the critical zone's bits (plus the annealing boost) and
  is re-decided every ``every`` steps. Zone bits are ``(mu_bits, nu_bits)``
  pairs; ``None`` keeps that moment in float32.

  A decision only *proposes* bits (in the policy state): the moments change
  width when the state is re-laid out, by :func:`~stquant_jax.adaptive_jit`
  (no call needed) or by :func:`~stquant_jax.relayout` outside the step (as in
  the example). A plain ``jax.jit`` step alone never changes a bit;
  :func:`~stquant_jax.summary` lists the proposals not applied.

  Args:
    every: K, steps between decisions; each step samples 1/K of every adaptive
      leaf's blocks for the statistics, so a decision sees each block once.
    critical, magnitude, structure, redundant: ``(mu_bits, nu_bits)`` of each zone,
      non-increasing from critical to redundant (defaults: about 5 bits with
      metadata once the annealing boost is gone).
    n_thresholds, r_thresholds: ``(exit, enter)`` hysteresis band of the
      magnitude / structure factor, relative to the geometric mean over the
      adaptive leaves (1.0 = a typical leaf); ``0 < exit <= enter``.
    ema: EMA decay of the log2 factors across decisions, in [0, 1).
    anneal_steps: time constant of the early-training boost (0: none).
    anneal_bits: extra bits at full annealing (tau = 1), an int or a
      ``(mu, nu)`` pair. The defaults (3 bits, 50 steps) start every adaptive
      moment at 8 bits and give it its zone's bits at the first decision. With
      ``anneal_steps=0`` there is no boost, whatever the drift.
    instability: mean change of relative log2 N + log2 R between decisions
      that counts as fully unstable (tau = 1); moments the previous decision
      re-packed are left out of the drift. The default (2.0) lets only a large
      shift hold the boost.
    rearm: whether drift may raise tau above the previous decision's value.
      The default (False) anneals monotonically; set True to re-raise precision
      on a late shift (a new task or data mix in the same run).
    min_bits, max_bits: allowed quantized bit-widths (default 3..8; 2 bits is
      opt-in). ``min_bits`` may be an ``(mu, nu)`` pair: ``(3, 2)`` lets a
      tight budget take v, not m, down to 2 bits.
    target_bits: optional memory budget, average stored bits per moment value,
      metadata and policy state included (as :func:`stquant_jax.average_bits`),
      below 32. Met from the first step on: the first layout (:meth:`layout`)
      fits it over the whole tree, and every decision's allocation fits it;
      ``init`` warns when it is above what the layout can use (never binds).
    budget_start: how a budget's first layout (the steps before the first
      decision) splits each adaptive leaf's bits between m and v.
      ``"v_first"`` (default): m at 3 bits (``min_bits`` if higher), v at the
      most bits that fit (at most its critical-zone bits plus the boost), any
      rest back to m; at ``target_bits=4.5`` that is m 3 / v 5 bits.
      ``"even"``: both moments at the same bits (m 4 / v 4).
    min_interval: minimum steps between two changes of one moment's bits.
    max_changes: maximum changes of one moment's bits per run (None: no limit).
    mu_factors, nu_factors: ``(magnitude, structure)`` factor names for m and v
      (:mod:`stquant_jax._src.policy.scores`).
    probe_bits: bit-width of the ``probe_err`` statistic.
    axis_name: collective axis (pmap / shard_map) over which statistics are
      summed, so every replica decides the same; None under plain ``jit``.
    block_size: leave None: the transform binds its own block size (used for
      the budget's cost model and the statistics' blocks). A value that
      differs from the transform's is an error naming both.
    min_size: leaves with fewer values are not adaptive (float32 moments).

  Why each default is what it is (the measurements behind them): docs/policy.md,
  "Why the defaults".

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import stquant_jax as sq
    >>> params = {"w1": jnp.ones((128, 64)) * 0.1, "w2": jnp.ones((64, 256)) * 0.1}
    >>> policy = sq.STQuantPolicy(every=10, min_interval=10)
    >>> tx = sq.adamw(1e-3, policy=policy)
    >>> state = tx.init(params)
    >>> loss = lambda p, x: jnp.mean((x @ p["w1"] @ p["w2"]) ** 2)
    >>> @jax.jit
    ... def step(params, state, x):
    ...   g = jax.grad(loss)(params, x)
    ...   u, state = tx.update(g, state, params)
    ...   return optax.apply_updates(params, u), state
    >>> history = sq.BitHistory()
    >>> for i in range(30):
    ...   x = jax.random.normal(jax.random.key(i), (8, 128))
    ...   params, state = step(params, state, x)
    ...   if (i + 1) % policy.every == 0:
    ...     state = sq.relayout(state)   # re-packs changed leaves; step retraces once per layout
    ...     history.record(i + 1, state)
    >>> len(history.records), sorted(history.records[-1]["mu_bits"])
    (3, ['w1', 'w2'])
  """

  every: int = 100
  critical: tuple = (5, 6)
  magnitude: tuple = (5, 5)
  structure: tuple = (4, 5)
  redundant: tuple = (4, 4)
  n_thresholds: tuple = (0.8, 1.25)
  r_thresholds: tuple = (0.8, 1.25)
  ema: float = 0.5
  anneal_steps: int = 50
  anneal_bits: Any = 3  # int or (mu, nu)
  instability: float = 2.0
  rearm: bool = False
  min_bits: Any = 3  # int or (mu, nu); the 2-bit signed map is {-1, 0, 1}: opt in explicitly
  max_bits: int = MAX_BITS
  target_bits: float | None = None
  budget_start: str = "v_first"
  min_interval: int = 300
  max_changes: int | None = None
  mu_factors: tuple = ("moment_rms", "probe_err")
  nu_factors: tuple = ("moment_rms", "crest")
  probe_bits: int = 4
  axis_name: Any = None
  block_size: int | None = None  # None: the transform's (bound by scale_by_stquant)
  min_size: int = 4096

  def __post_init__(self):
    check_int("every", self.every, 1)
    self._int_or_pair("min_bits", lambda b: check_bits(b, "min_bits"))
    check_bits(self.max_bits, "max_bits")
    if max(self._floors) > self.max_bits:
      raise ValueError(f"min_bits={self.min_bits} > max_bits={self.max_bits}; "
                       "swap them or widen the range")
    for z in ZONES:
      pair = check_pair(z, getattr(self, z), "(mu_bits, nu_bits)")
      for b, lo in zip(pair, self._floors):
        if b is None:
          continue
        check_int(f"{z} bits", b)
        if not lo <= b <= self.max_bits:
          raise ValueError(f"{z}={pair}: bits {b} outside min_bits..max_bits = "
                           f"{lo}..{self.max_bits}; change the zone or the range")
    table = self.zone_table()
    for k, mom in enumerate(("mu", "nu")):
      c, m, s, r = (int(table[z, k]) for z in range(4))
      if not (c >= m >= r and c >= s >= r):
        raise ValueError(
            f"zone bits for {mom} out of order: critical={c}, magnitude={m}, structure={s}, "
            f"redundant={r} (32 = float32); need critical >= magnitude, structure >= redundant")
    for name in ("n_thresholds", "r_thresholds"):
      band = check_pair(name, getattr(self, name), "(exit, enter)")
      for x in band:
        check_number(name, x, 0.0, math.inf, lo_open=True, hi_open=True)
      if band[0] > band[1]:
        raise ValueError(f"{name}={band} out of order: exit {band[0]} must be <= "
                         f"enter {band[1]} (swap them)")
    check_number("ema", self.ema, 0.0, 1.0, hi_open=True)
    check_int("anneal_steps", self.anneal_steps, 0)
    self._int_or_pair("anneal_bits", lambda b: check_int("anneal_bits", b, 0))
    check_number("instability", self.instability, 0.0, math.inf, lo_open=True, hi_open=True)
    if not isinstance(self.rearm, bool):
      raise TypeError(f"rearm={self.rearm!r} must be True or False")
    check_int("min_interval", self.min_interval, 0)
    check_int("max_changes", self.max_changes, 0, allow_none=True)
    check_bits(self.probe_bits, "probe_bits")
    if self.block_size is not None:
      check_block_size(self.block_size)
    check_int("min_size", self.min_size, 0)
    for name, fac in (("mu_factors", self.mu_factors), ("nu_factors", self.nu_factors)):
      fac = check_pair(name, fac, "(magnitude, structure) factor-name")
      check_choice(f"{name}[0]", fac[0], MAGNITUDE_FACTORS)
      check_choice(f"{name}[1]", fac[1], STRUCTURE_FACTORS)
    ax = self.axis_name
    if ax is not None and not isinstance(ax, str) and not (
        isinstance(ax, tuple) and all(isinstance(a, str) for a in ax)):
      raise TypeError(f"axis_name={ax!r} must be None, a str or a tuple of str")
    check_choice("budget_start", self.budget_start, BUDGET_STARTS)
    if self.target_bits is not None:
      check_number("target_bits", self.target_bits, 0.0, math.inf, lo_open=True, hi_open=True)
      if self.target_bits >= 32:
        raise ValueError(f"target_bits={self.target_bits} must be below 32: it is the average "
                         "stored bits per moment value (float32 Adam stores 32), e.g. 4.5")
      relative_error_table(self._lowest, self.max_bits)  # measured once, outside jit
      floor = sum(self._floors) / 2 + 32.0 / self._block
      if self.target_bits < floor:
        raise ValueError(
            f"target_bits={self.target_bits} is below {floor:g}, the fewest bits per value "
            f"a quantized moment can use (min_bits={self.min_bits}, averaged over m and v, + scales 32/"
            f"block_size={self._block}); raise target_bits, lower min_bits or raise "
            "block_size")

  def _int_or_pair(self, name: str, check) -> None:
    """Checks field ``name``, an int or an ``(mu, nu)`` pair (a JSON list becomes a
    tuple), with ``check`` on each int."""
    value = getattr(self, name)
    if isinstance(value, (tuple, list)):
      value = check_pair(name, value, "(mu, nu)")
      object.__setattr__(self, name, value)
    for b in _pair(value):
      check(b)

  @property
  def _floors(self) -> tuple[int, int]:
    """(m, v) lowest bits."""
    return _pair(self.min_bits)

  @property
  def _boosts(self) -> tuple[int, int]:
    """(m, v) extra bits at full annealing (0, 0 without annealing)."""
    return _pair(self.anneal_bits) if self.anneal_steps else (0, 0)

  @property
  def _lowest(self) -> int:
    return min(self._floors)

  @property
  def _block(self) -> int:
    """The block size in use: the bound one, else the library default."""
    return DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size

  def bind(self, block_size: int) -> "STQuantPolicy":
    """This policy with the transform's ``block_size`` (an error if it set another)."""
    if self.block_size == block_size:
      return self
    if self.block_size is not None:
      raise ValueError(f"STQuantPolicy(block_size={self.block_size}) does not match the "
                       f"transform's block_size={block_size}; leave the policy's block_size "
                       "unset (the transform binds its own)")
    return dataclasses.replace(self, block_size=block_size)

  # ---- static layout -------------------------------------------------------

  def zone_table(self) -> np.ndarray:
    """int32 ``[4, 2]``: bits of (m, v) per zone (32 = float32)."""
    return np.array([[bits_code(b) for b in getattr(self, z)] for z in ZONES], np.int32)

  def _adaptive(self, shape, dtype) -> bool:
    return is_float(dtype) and math.prod(shape) >= self.min_size

  def _caps(self) -> list[int | None]:
    """Bits of the critical zone plus the full annealing boost (None: float32)."""
    return [None if b is None else min(b + boost, self.max_bits)
            for b, boost in zip(self.critical, self._boosts)]

  def _split(self, total: int) -> tuple[int, int]:
    """A budget's (m, v) bits for ``total`` bits per value (:func:`first_layout.split`)."""
    caps = [self.max_bits if b is None else b for b in self._caps()]
    return first_layout.split(total, floors=self._floors, caps=caps, start=self.budget_start)

  def initial_bits(self) -> tuple[int | None, int | None]:
    """Bits every adaptive leaf starts with: the critical zone plus the full
    annealing boost; with ``target_bits``, lowered to fit the budget per value
    as ``budget_start`` says (:meth:`layout` then lowers them further, if
    needed, so that the whole first layout fits)."""
    if self.target_bits is None:
      return tuple(self._caps())
    return self._split(int(math.floor(2 * (self.target_bits - 32.0 / self._block))))

  def leaf_bits(self, shape, dtype):
    """The per-leaf rule (:meth:`initial_bits` for adaptive leaves); ``init``
    uses :meth:`layout`, which also fits a budget over the whole tree."""
    if not self._adaptive(tuple(shape), dtype):
      return None, None
    return self.initial_bits()

  def layout(self, params) -> list[tuple[int | None, int | None]]:
    """The first layout, per leaf of ``jax.tree.leaves(params)``. With
    ``target_bits`` it fits the budget from the first step, everything counted
    (float32 moments of small leaves, scales, the policy state): the adaptive
    leaves' bits are lowered together, as ``budget_start`` splits them, until
    :func:`stquant_jax.average_bits` of the state is at most ``target_bits``;
    then leaves, largest first, take one bit more where it still fits.

    Raises:
      ValueError: the budget cannot be met for these params (message: the floor).

    Example:
      >>> import jax.numpy as jnp
      >>> import stquant_jax as sq
      >>> params = {"b": jnp.zeros((4000,)), "w": jnp.zeros((512, 512))}
      >>> policy = sq.STQuantPolicy(target_bits=4.0)
      >>> policy.initial_bits()   # the per-value split: m 3, v 4 bits
      (3, 4)
      >>> policy.layout(params)   # "b" keeps float32 moments, so "w" gets less
      [(None, None), (3, 3)]
      >>> sq.average_bits(sq.adamw(1e-3, policy=policy).init(params)) <= 4.0
      True
    """
    leaves = jax.tree.leaves(params)
    pair = self.initial_bits()
    if self.target_bits is None:
      return [pair if self._adaptive(tuple(p.shape), p.dtype) else (None, None) for p in leaves]
    self._check_budget(leaves)
    floats = [i for i, p in enumerate(leaves) if is_float(p.dtype)]
    fitted = first_layout.fit(
        self._float_leaves(leaves), target_bits=self.target_bits, start=pair,
        to_pair=self._split, floors=self._floors, block_size=self._block,
        overhead=self._overhead(len(leaves)))
    out = [(None, None)] * len(leaves)
    for i, fitted_pair in zip(floats, fitted):
      out[i] = fitted_pair
    return out

  def sum_keys(self) -> tuple[str, ...]:
    """Names (in :data:`SUMS` order) of the statistics the policy accumulates."""
    need = needed_sums(self.mu_factors, self.nu_factors) | {"n", "blocks"}
    return tuple(k for k in SUMS if k in need)

  def _state_nbytes(self, num_leaves: int) -> int:
    return num_leaves * 2 * 4 * 7 + num_leaves * 4 * len(self.sum_keys()) + 4 + 4

  def _overhead(self, num_leaves: int) -> int:
    """A state's bytes outside the moments: the int32 step count and the policy state."""
    return 4 + self._state_nbytes(num_leaves)

  def init_state(self, params) -> STQuantPolicyState:
    leaves = jax.tree.leaves(params)
    n = len(leaves)
    init = [(NO_MOMENT, NO_MOMENT) if not is_float(p.dtype) else tuple(map(bits_code, b))
            for p, b in zip(leaves, self.layout(leaves))]
    bits = np.array(init, np.int32).reshape(n, 2)
    most = None if self.target_bits is None else self._average_bits(leaves, tuple(self._caps()))
    if most is not None and self.target_bits >= most:
      warnings.warn(f"STQuantPolicy(target_bits={self.target_bits}) never binds for these "
                    f"params: without a budget the state stores at most {most:.3f} bits per "
                    "moment value; lower target_bits or leave it None", stacklevel=2)
    # Distinct buffers per field, so a donating jitted step never sees one buffer twice.
    return STQuantPolicyState(
        n_ema=jnp.zeros((n, 2), jnp.float32), r_ema=jnp.zeros((n, 2), jnp.float32),
        zone=jnp.zeros((n, 2), jnp.int32), proposed=jnp.asarray(bits),
        actual=jnp.asarray(bits), last_change=jnp.full((n, 2), NEVER, jnp.int32),
        changes=jnp.zeros((n, 2), jnp.int32), decisions=jnp.zeros([], jnp.int32),
        anneal=jnp.ones([], jnp.float32),
        acc=jnp.zeros((n, len(self.sum_keys())), jnp.float32))

  def min_average_bits(self, params) -> float:
    """The fewest average bits (as :func:`stquant_jax.average_bits`) reachable for ``params``."""
    return self._average_bits(jax.tree.leaves(params), self._floors)

  def _float_leaves(self, leaves) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, adaptive) of each float leaf (the leaves with moments)."""
    return [(tuple(p.shape), self._adaptive(tuple(p.shape), p.dtype))
            for p in leaves if is_float(p.dtype)]

  def _average_bits(self, leaves, pair) -> float:
    """:func:`stquant_jax.average_bits` of a state whose adaptive leaves all have
    ``pair`` (m, v) bits (None: float32)."""
    floats = self._float_leaves(leaves)
    return first_layout.average_bits(floats, first_layout.uniform(floats, pair),
                                     block_size=self._block,
                                     overhead=self._overhead(len(leaves)))

  def _check_budget(self, leaves):
    floor = self.min_average_bits(leaves)
    if self.target_bits < floor:
      raise ValueError(
          f"target_bits={self.target_bits} cannot be met for these params: with every "
          f"adaptive moment at min_bits={self.min_bits} the average is {floor:.3f} bits "
          f"(scales, float32 moments of leaves under min_size={self.min_size} and the policy "
          f"state included); raise target_bits to >= {floor:.3f}, lower min_bits or min_size")

  # ---- the jitted decision -------------------------------------------------

  def update_state(self, state, updates, mu, nu, count):
    """Accumulates this step's statistics; decides every ``every`` steps
    (:func:`.decision.update_state`)."""
    return decision.update_state(self, state, updates, mu, nu, count)

  # ---- the Policy interface outside the update ------------------------------

  def proposed_bits(self, state) -> jax.Array:
    """int32 ``[L, 2]``: the bits codes the last decision proposed (``proposed``)."""
    return field(state, "proposed")

  def with_actual(self, state, bits):
    """``state`` with ``actual`` set to the layout ``bits``, placed like the old one
    (a ``pmap`` state's every replica row)."""
    actual = field(state, "actual", None)
    if not hasattr(state, "_fields") or actual is None or isinstance(actual,
                                                                       jax.ShapeDtypeStruct):
      return state
    bits = np.broadcast_to(np.asarray(bits, np.int32), actual.shape)
    return state._replace(actual=place_like(np.ascontiguousarray(bits), actual))

  def describe(self, state) -> dict[str, Any]:
    """Zones per leaf and moment (names from :data:`ZONES`), the annealing factor of
    the last decision and the number of decisions taken."""
    zone = np.asarray(host_value(field(state, "zone")))
    return {"zone": np.asarray(ZONES, object)[zone],
            "anneal": float(host_value(field(state, "anneal"))),
            "decisions": int(host_value(field(state, "decisions")))}
