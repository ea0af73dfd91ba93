"""Closed-form code maps: normalised value <-> b-bit integer code.

Every map here is *analytic*: encoding and decoding are a handful of
element-wise operations (shifts, bitcasts, square roots, comparisons), with no
look-up table and no search. That keeps the jnp reference fast on CPU and lets
the same functions run unchanged inside a Pallas/Triton kernel (no gathers).

Two modes, the paper's "dual-mode" engine:

* **signed** (for the first moment m): values in ``[-1, 1]`` after dividing by
  the block's absolute maximum. Zero is exactly representable.
* **unsigned, zero-free** (for the second moment v): values in ``[0, 1]``
  after dividing by the block maximum. The smallest code decodes to a strictly
  positive value, so a non-zero v is never turned into zero (the "zero-point
  problem" that makes ``m / sqrt(v)`` explode at low bit-widths).

Two families:

* ``"power"`` with exponent ``p`` in {1, 2, 4, 8}: levels are ``(k / L) ** p``
  (``p = 1`` is linear). Larger ``p`` puts more levels near zero. Signed
  encoding picks the nearest level in the value domain; unsigned (v) encoding
  rounds in the root domain ``x ** (1 / p)`` (nearer to relative rounding).
* ``"float"`` with ``param`` mantissa bits: a tiny floating-point format
  (exponent + mantissa, no sign for v) whose top level is exactly 1.0; equal
  relative precision over ``(2**b - 1) / 2**param`` octaves. Encoding and
  decoding are integer operations on the float32 bit pattern.

Which map each bit-width uses by default was chosen from measurements
(``benchmarks/map_errors.py``; the table is in ``docs/maps.md``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.packing import check_bits

_KINDS = ("power", "float")
_POWERS = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class CodeMap:
  """Static description of a b-bit code map (hashable; pytree metadata).

  Attributes:
    kind: ``"power"`` or ``"float"``.
    bits: code width, 2..8.
    signed: True for the signed map (m), False for the zero-free map (v).
    param: exponent ``p`` for ``"power"``; mantissa bits for ``"float"``.
  """

  kind: str
  bits: int
  signed: bool
  param: int

  def __post_init__(self):
    check_bits(self.bits)
    if self.kind not in _KINDS:
      raise ValueError(f"kind={self.kind!r} must be one of {_KINDS}")
    if self.kind == "power" and self.param not in _POWERS:
      raise ValueError(f"power map exponent param={self.param} must be in {_POWERS}")
    if self.kind == "float":
      mag_bits = self.bits - 1 if self.signed else self.bits
      if not 0 <= self.param < mag_bits:
        raise ValueError(
            f"float map mantissa bits param={self.param} must be in 0..{mag_bits - 1}"
            f" for bits={self.bits}, signed={self.signed}")
      n_levels = 2**mag_bits - 1 if self.signed else 2**mag_bits
      # Every level (and half the smallest, for the signed zero test) must be a
      # normal float32: the range spans (n_levels - 1) / 2**param octaves.
      if (127 << self.param) - (n_levels - 1) < (2 << self.param):
        raise ValueError(
            f"float map with param={self.param} mantissa bits spans "
            f"{(n_levels - 1) / 2**self.param:g} octaves at bits={self.bits}, more than "
            f"float32 can hold; use more mantissa bits")

  @property
  def name(self) -> str:
    mode = "s" if self.signed else "u"
    tag = f"p{self.param}" if self.kind == "power" else f"m{self.param}"
    return f"{self.kind}-{tag}-{mode}{self.bits}"

  def levels(self) -> np.ndarray:
    """All decoded values, indexed by code (float32 numpy; for tests and docs)."""
    codes = jnp.arange(2**self.bits, dtype=jnp.uint32)
    return np.asarray(decode(codes, self))


def _ipow(x, p: int):
  for _ in range(p.bit_length() - 1):  # p is a power of two
    x = x * x
  return x


def _iroot(x, p: int):
  for _ in range(p.bit_length() - 1):
    x = jnp.sqrt(x)
  return x


def _float_level_bits(k, n_levels: int, mant: int):
  """float32 bit pattern of minifloat level ``k`` (top level ``n_levels - 1`` is 1.0)."""
  reduced = k.astype(jnp.int32) + jnp.int32((127 << mant) - (n_levels - 1))
  return reduced.astype(jnp.uint32) << jnp.uint32(23 - mant)


def _float_encode_mag(a, n_levels: int, mant: int):
  """Nearest minifloat level index in [0, n_levels) for ``a`` in [0, 1]."""
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
  rounded = (bits + jnp.uint32(1 << (22 - mant))) >> jnp.uint32(23 - mant)
  k = rounded.astype(jnp.int32) - jnp.int32((127 << mant) - (n_levels - 1))
  return jnp.clip(k, 0, n_levels - 1)


def _float_floor_mag(a, n_levels: int, mant: int):
  """Index of the largest minifloat level ``<= a`` (may be ``< 0``: below the smallest)."""
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
  k = (bits >> jnp.uint32(23 - mant)).astype(jnp.int32)
  return k - jnp.int32((127 << mant) - (n_levels - 1))


def _float_level(k, n_levels: int, mant: int):
  return jax.lax.bitcast_convert_type(_float_level_bits(k, n_levels, mant), jnp.float32)


def _round_up(a, lo, hi, noise, *, signed: bool, zero=None):
  """Whether ``a`` in ``[lo, hi]`` goes to ``hi``: nearest (``noise`` None) or with
  probability ``(a - lo) / (hi - lo)`` (``noise`` uniform in [0, 1)).

  Stochastic rounding is unbiased, but where two levels are far apart (relative
  to the value) one unlucky draw stores a value many times off, and for Adam
  that is an update many times too large for that element. Two guards keep
  a stored value from making an element's update more than about twice too
  large, both where round-to-nearest would have done the same:

  * signed maps (m), ``zero`` marks where ``lo`` is the zero level: magnitudes
    under ``hi / 2`` round to zero instead of (rarely) up to the smallest
    nonzero level. A value decaying from that level still reaches zero
    (``0.9 * hi >= hi / 2`` goes down with probability 0.1 per step).
  * zero-free maps (v): never down to a level below ``a / 4`` (so ``1 /
    sqrt(v)`` is never more than twice too large); where the level below is
    further away, ``a`` rounds up. This only happens among the lowest levels
    of a power map (8 bits: below ``1e-14`` of the block's maximum; 4 bits,
    ``p = 4``: below ``2.4e-4``), where a decaying v therefore stops.
  """
  if noise is None:
    return a - lo > hi - a
  up = noise * (hi - lo) < a - lo
  if signed:
    return up & (~zero | (a >= 0.5 * hi))
  return up | (4.0 * lo < a)


def encode(x, cmap: CodeMap, noise=None):
  """Encodes normalised float32 values into uint32 codes in ``[0, 2**bits)``.

  ``x`` must be finite and in ``[-1, 1]`` (signed) or ``[0, 1]`` (unsigned);
  values slightly outside are clamped.

  Args:
    x: the values.
    cmap: the map.
    noise: None for round-to-nearest; or float32 uniform numbers in ``[0, 1)``
      of ``x``'s shape for unbiased stochastic rounding between the two
      levels around each value (:mod:`stquant_jax._src.codec.rounding`).
      Guards keep any element's update from becoming more than about twice
      too large (:func:`_round_up`), and zero-free maps store values below
      their smallest level as that level.
  """
  b = cmap.bits
  x = x.astype(jnp.float32)
  if cmap.signed:
    half = 2 ** (b - 1) - 1  # magnitude levels 0..half, code = half + signed level
    a = jnp.minimum(jnp.abs(x), 1.0)
    if cmap.kind == "power":
      p = cmap.param
      k = jnp.clip(jnp.floor(_iroot(a, p) * half), 0, half - 1)
      lo = _ipow(k / half, p)
      hi = _ipow((k + 1) / half, p)
      k = k + _round_up(a, lo, hi, noise, signed=True, zero=k == 0)
    elif noise is None:
      n = half  # nonzero magnitude levels; level index j -> magnitude code j + 1
      j = _float_encode_mag(a, n, cmap.param)
      smallest = _float_level(jnp.zeros((), jnp.int32), n, cmap.param)
      k = jnp.where(a < 0.5 * smallest, 0, j + 1).astype(jnp.float32)
    else:
      n = half
      j = jnp.clip(_float_floor_mag(a, n, cmap.param), -1, n - 1)  # -1: below the smallest
      lo = jnp.where(j < 0, 0.0, _float_level(jnp.maximum(j, 0), n, cmap.param))
      hi = _float_level(jnp.minimum(j + 1, n - 1), n, cmap.param)
      k = (j + 1 + _round_up(a, lo, hi, noise, signed=True, zero=j < 0)).astype(jnp.float32)
    k = k.astype(jnp.int32)
    code = jnp.where(x < 0, half - k, half + k)
    return code.astype(jnp.uint32)
  n = 2**b
  a = jnp.clip(x, 0.0, 1.0)
  if cmap.kind == "power":
    p = cmap.param
    if noise is None:
      # levels (j / n) ** p for j = 1..n; code = j - 1. Rounded to the nearest
      # level in the root domain a ** (1 / p), which for v is closer to relative
      # (log-domain) rounding and measured as good or better than value-domain
      # rounding on real moments (docs/maps.md), at a fraction of the cost.
      j = jnp.clip(jnp.floor(_iroot(a, p) * n + 0.5), 1, n)
      return (j - 1).astype(jnp.uint32)
    j = jnp.clip(jnp.floor(_iroot(a, p) * n), 1, n - 1)
    lo, hi = _ipow(j / n, p), _ipow((j + 1) / n, p)
    j = j + _round_up(a, lo, hi, noise, signed=False)  # below the smallest level: stays
    return (j - 1).astype(jnp.uint32)
  if noise is None:
    return _float_encode_mag(a, n, cmap.param).astype(jnp.uint32)
  j = jnp.clip(_float_floor_mag(a, n, cmap.param), 0, n - 1)
  lo = _float_level(j, n, cmap.param)
  hi = _float_level(jnp.minimum(j + 1, n - 1), n, cmap.param)
  return (j + _round_up(a, lo, hi, noise, signed=False)).astype(jnp.uint32)


def decode(codes, cmap: CodeMap):
  """Decodes uint32 codes into normalised float32 values (inverse of :func:`encode`)."""
  b = cmap.bits
  c = codes.astype(jnp.int32)
  if cmap.signed:
    half = 2 ** (b - 1) - 1
    k = c - half
    mag = jnp.abs(k)
    if cmap.kind == "power":
      val = _ipow(mag.astype(jnp.float32) * (1.0 / half), cmap.param)
    else:
      lvl = jax.lax.bitcast_convert_type(
          _float_level_bits(jnp.maximum(mag - 1, 0), half, cmap.param), jnp.float32)
      val = jnp.where(mag == 0, 0.0, lvl)
    return jnp.where(k < 0, -val, val)
  n = 2**b
  if cmap.kind == "power":
    return _ipow((c + 1).astype(jnp.float32) * (1.0 / n), cmap.param)
  return jax.lax.bitcast_convert_type(_float_level_bits(c, n, cmap.param), jnp.float32)


# Defaults per (bits, signed), chosen from benchmarks/map_errors.py (docs/maps.md).
_DEFAULTS = {
    # signed (m): the square-root-domain power map wins on real moments from 3 bits up.
    (2, True): ("power", 1), (3, True): ("power", 2), (4, True): ("power", 2),
    (5, True): ("power", 2), (6, True): ("power", 2), (7, True): ("power", 2),
    (8, True): ("power", 2),
    # unsigned zero-free (v): ranked by the Adam-update error on real moments.
    (2, False): ("power", 2), (3, False): ("float", 0), (4, False): ("power", 4),
    (5, False): ("power", 8), (6, False): ("power", 8), (7, False): ("power", 8),
    (8, False): ("power", 8),
}


def default_map(bits: int, signed: bool) -> CodeMap:
  """The library's default map for a bit-width and mode.

  Example:
    >>> from stquant_jax import default_map
    >>> default_map(4, signed=False).name
    'power-p4-u4'
  """
  check_bits(bits)
  kind, param = _DEFAULTS[(bits, bool(signed))]
  return CodeMap(kind, bits, bool(signed), param)


def check_map(cmap, bits: int, signed: bool, name: str = "code_map") -> CodeMap:
  """``cmap`` checked to be a :class:`CodeMap` for ``bits`` and ``signed``;
  :func:`default_map` when ``cmap`` is None."""
  if cmap is None:
    return default_map(bits, signed)
  if not isinstance(cmap, CodeMap):
    raise TypeError(f"{name} must be a CodeMap, got {type(cmap).__name__}")
  if cmap.bits != bits or cmap.signed != bool(signed):
    raise ValueError(f"{name} {cmap.name} does not match {bits=}, signed={bool(signed)}")
  return cmap


def resolve_map(fn, bits: int, signed: bool, name: str = "map") -> CodeMap:
  """``fn(bits)`` checked by :func:`check_map`; :func:`default_map` if ``fn`` is None."""
  return check_map(None if fn is None else fn(bits), bits, signed, f"{name}({bits})")
