"""Properties of the analytic code maps (``stquant_jax._src.codec.maps``).

Every test runs over every map the constructor accepts: kinds ``"power"``
(p in 1, 2, 4, 8) and ``"float"`` (every mantissa width), bits 2..8, both modes.

Rounding rule (module docstring of _maps): signed maps and "float" maps pick
the level nearest in value; unsigned "power" maps pick the level nearest in the
root domain ``x ** (1 / p)``.

Reachable codes: a signed map uses codes ``0 .. 2**b - 2`` (magnitude levels
``0..half`` either side of ``half = 2**(b-1) - 1``); code ``2**b - 1`` is never
produced by :func:`encode` and decodes to a value above 1. Unsigned maps use all
``2**b`` codes.

Float maps whose range would leave float32's normal range (float-m0-u7,
float-m0-u8, float-m1-u8, float-m0-s8) are rejected by the constructor
(``test_float_maps_beyond_float32_range_are_rejected``).
"""

import chex
import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stquant_jax import CodeMap, default_map
from stquant_jax._src.codec.maps import decode, encode

ALL_BITS = tuple(range(2, 9))
F32_EPS = float(np.finfo(np.float32).eps)
F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32


def _accepted_maps():
  """Every (kind, bits, signed, param) the constructor accepts (a fix that rejects more is fine)."""
  out = []
  for bits in ALL_BITS:
    for signed in (True, False):
      mag_bits = bits - 1 if signed else bits
      cands = [("power", p) for p in (1, 2, 4, 8)] + [("float", m) for m in range(mag_bits)]
      for kind, param in cands:
        try:
          out.append(CodeMap(kind, bits, signed, param))
        except ValueError:
          pass
  return out


ACCEPTED = _accepted_maps()
# Float maps whose exponent range would leave float32's normal range; rejected.
OUT_OF_RANGE = {("float", 7, False, 0), ("float", 8, False, 0), ("float", 8, False, 1),
                ("float", 8, True, 0)}
HEALTHY = ACCEPTED
SIGNED = [c for c in HEALTHY if c.signed]
UNSIGNED = [c for c in HEALTHY if not c.signed]
FLOATS = [c for c in HEALTHY if c.kind == "float"]
POWERS = [c for c in HEALTHY if c.kind == "power"]


def _ids(maps):
  return [c.name for c in maps]


# Eager jnp ops compile once per input shape (~2 s for all maps), so every
# encode/decode call below goes through one padded length.
PAD = 4096


def enc(x, cmap):
  """encode() of a 1-D input, evaluated on a zero-padded array of length PAD."""
  x = np.asarray(x, np.float32).ravel()
  xp = np.zeros(PAD, np.float32)
  xp[: x.size] = x
  return np.asarray(encode(jnp.asarray(xp), cmap))[: x.size]


def dec(codes, cmap):
  """decode() of 1-D codes, evaluated on a zero-padded array of length PAD."""
  codes = np.asarray(codes, np.uint32).ravel()
  cp = np.zeros(PAD, np.uint32)
  cp[: codes.size] = codes
  return np.asarray(decode(jnp.asarray(cp), cmap))[: codes.size]


def all_levels(cmap):
  return dec(np.arange(2**cmap.bits), cmap)


def reachable_levels(cmap):
  """Decoded values of the codes encode can produce, indexed by code (float64)."""
  levels = all_levels(cmap).astype(np.float64)
  return levels[: 2**cmap.bits - 1] if cmap.signed else levels


def roundtrip(x, cmap):
  return dec(enc(x, cmap), cmap).astype(np.float64)


def rounding_domain(cmap):
  """The domain in which encode() rounds to the nearest level (documented in _maps).

  Unsigned (v) power maps round in the root domain ``x ** (1 / p)``; every
  other map (signed power maps, all float maps) rounds in the value domain.
  """
  if cmap.kind == "power" and not cmap.signed:
    return lambda v: np.asarray(v, np.float64) ** (1.0 / cmap.param)
  return lambda v: np.asarray(v, np.float64)


def nearest_excess(x, cmap):
  """How much farther decode(encode(x)) is from x than the nearest level, in the rounding domain.

  >= 0, and 0 when encode() picked a nearest level (ties either way).
  """
  x = np.asarray(x, np.float32)
  r = rounding_domain(cmap)
  lv = reachable_levels(cmap)
  lo = -1.0 if cmap.signed else 0.0
  xc = np.clip(x.astype(np.float64), lo, 1.0)  # documented clamping of out-of-range input
  best = np.min(np.abs(r(lv)[None, :] - r(xc)[:, None]), axis=1)
  return np.abs(r(roundtrip(x, cmap)) - r(xc)) - best, xc


def nearest_tolerance(cmap, xc):
  """Float maps round exactly (0); power maps may miss a tie by a few float32 ulps.

  Value domain: a few ulps of x. Root domain: the float32 root of x is good to
  a few ulps of a number <= 1, so an absolute 1e-6.
  """
  if cmap.kind == "float":
    return 0.0
  return 4 * F32_EPS * np.abs(xc) if cmap.signed else 1e-6


def decision_points(cmap):
  """Where encode() switches between adjacent levels (midpoints in the rounding domain)."""
  lv = reachable_levels(cmap)
  if cmap.kind == "power" and not cmap.signed:
    p = cmap.param
    return ((lv[1:] ** (1.0 / p) + lv[:-1] ** (1.0 / p)) / 2) ** p
  return (lv[1:] + lv[:-1]) / 2


def test_map_enumeration_is_complete():
  """Sanity check of the tables above: 7 widths x 2 modes x 4 powers + every float width."""
  n_float = sum(b - 1 for b in ALL_BITS) + sum(b for b in ALL_BITS)
  assert len(ACCEPTED) == 7 * 2 * 4 + n_float - len(OUT_OF_RANGE)


@pytest.mark.parametrize("kind, bits, signed, param", sorted(OUT_OF_RANGE))
def test_float_maps_beyond_float32_range_are_rejected(kind, bits, signed, param):
  """A float map spanning more octaves than float32's normal range raises ValueError."""
  with pytest.raises(ValueError, match="octaves"):
    CodeMap(kind, bits, signed, param)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_levels_method_decodes_every_code(bits):
  """CodeMap.levels() is decode(0 .. 2**b - 1) as float32 (default maps, one float map per width).

  (Not every map: levels() runs at its own shape, and each new shape recompiles.)
  """
  for cmap in (default_map(bits, True), default_map(bits, False), CodeMap("float", bits, False, 2 if bits == 8 else 1)):
    lv = cmap.levels()
    assert isinstance(lv, np.ndarray) and lv.dtype == np.float32 and lv.shape == (2**bits,)
    np.testing.assert_array_equal(lv, all_levels(cmap))


@pytest.mark.parametrize("cmap", HEALTHY, ids=_ids(HEALTHY))
def test_every_level_is_a_fixed_point(cmap):
  """decode(encode(level)) == level for every reachable level, and encode(level) is its own code."""
  lv = reachable_levels(cmap).astype(np.float32)
  np.testing.assert_array_equal(enc(lv, cmap), np.arange(lv.size))
  np.testing.assert_array_equal(roundtrip(lv, cmap), lv.astype(np.float64))


@pytest.mark.parametrize("cmap", HEALTHY, ids=_ids(HEALTHY))
def test_levels_are_monotone_in_code(cmap):
  """Levels of reachable codes strictly increase with the code (monotone, no wasted duplicate)."""
  lv = reachable_levels(cmap)
  assert np.all(np.isfinite(lv))
  assert np.all(np.diff(lv) > 0), lv


@pytest.mark.parametrize("cmap", HEALTHY, ids=_ids(HEALTHY))
def test_encode_only_produces_reachable_codes(cmap):
  """encode() of any input (out of range too) gives a reachable code (signed: not 2**b - 1)."""
  x = np.array([-5.0, -1.0, -0.5, 0.0, 0.3, 1.0, 1.0000001, 7.0], np.float32)
  codes = enc(x, cmap)
  assert codes.dtype == np.uint32
  assert codes.max() < reachable_levels(cmap).size


@pytest.mark.parametrize("cmap", SIGNED, ids=_ids(SIGNED))
def test_signed_map_has_exact_zero_and_is_symmetric(cmap):
  """Signed: level(half) == 0 exactly, level(half + k) == -level(half - k), endpoints are -1, 1."""
  lv = reachable_levels(cmap)
  half = 2 ** (cmap.bits - 1) - 1
  assert lv[half] == 0.0
  np.testing.assert_array_equal(lv[half:], -lv[half::-1])
  assert lv[0] == -1.0 and lv[-1] == 1.0
  # Zero encodes to the zero code, whatever its sign.
  np.testing.assert_array_equal(enc([0.0, -0.0], cmap), [half, half])


@pytest.mark.parametrize("cmap", UNSIGNED, ids=_ids(UNSIGNED))
def test_unsigned_map_is_zero_free_and_tops_at_one(cmap):
  """Unsigned: the smallest level is > 0 (a normal float32) and the top level is exactly 1.0."""
  lv = reachable_levels(cmap)
  assert lv[0] > 0.0
  assert lv[0] >= F32_TINY  # not flushed to zero by subnormal-unaware hardware
  assert lv[-1] == 1.0
  # Zero and anything below the smallest level (and negatives, clamped) go to code 0.
  np.testing.assert_array_equal(enc([0.0, -1.0, lv[0] / 2, lv[0]], cmap), [0, 0, 0, 0])


@pytest.mark.parametrize("cmap", HEALTHY, ids=_ids(HEALTHY))
def test_encode_picks_nearest_level_dense(cmap):
  """encode() returns the nearest level (ties either way) on dense random and tie-adjacent inputs.

  Nearest in value for signed maps and "float" maps; nearest in the root
  domain x ** (1/p) for unsigned "power" maps (see rounding_domain). Exact for
  "float" maps (rounding on the float32 bit pattern is nearest in value inside
  an octave and carries into the next octave); "power" maps compute in float32
  and may miss a tie by a few ulps.
  """
  rng = np.random.default_rng(cmap.bits)
  lo = -1.0 if cmap.signed else 0.0
  mids = decision_points(cmap).astype(np.float32)
  x = np.concatenate([
      rng.uniform(lo, 1.0, 2048).astype(np.float32),
      # log-uniform magnitudes: most levels of the steep maps are far below 1e-2
      (np.sign(rng.uniform(lo, 1.0, 1024)) * 10.0 ** rng.uniform(-20, 0, 1024)).astype(np.float32),
      mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2)),
      np.array([lo, 0.0, 1.0, -3.0, 3.0], np.float32),  # out-of-range values are clamped
  ])
  excess, xc = nearest_excess(x, cmap)
  bad = excess > nearest_tolerance(cmap, xc)
  assert not bad.any(), (x[bad][:5], excess[bad][:5])


@st.composite
def map_and_inputs(draw):
  cmap = draw(st.sampled_from(HEALTHY))
  lo = -1.0 if cmap.signed else 0.0
  x = draw(hnp.arrays(np.float32, 32, elements=st.floats(lo, 1.0, width=32)))
  return cmap, x


@settings(max_examples=50, deadline=None)
@given(map_and_inputs())
def test_encode_picks_nearest_level_hypothesis(mx):
  """Same nearest-level property as above; hypothesis picks the map and inputs (subnormals too)."""
  cmap, x = mx
  excess, xc = nearest_excess(x, cmap)
  bad = excess > nearest_tolerance(cmap, xc)
  assert not bad.any(), (cmap.name, x[bad], excess[bad])


UNSIGNED_STEEP = [c for c in UNSIGNED if c.kind == "power" and c.param > 1]


@pytest.mark.parametrize("cmap", UNSIGNED_STEEP, ids=_ids(UNSIGNED_STEEP))
def test_unsigned_power_map_rounds_in_root_domain_not_value_domain(cmap):
  """Unsigned p > 1 maps: between the root-domain and the value-domain midpoint of two levels,
  encode() already picks the upper level (so value-nearest does NOT hold there, by design)."""
  lv = reachable_levels(cmap)
  p = cmap.param
  root_mid = ((lv[-2] ** (1.0 / p) + 1.0) / 2) ** p  # top gap: widest in value
  value_mid = (lv[-2] + 1.0) / 2
  assert root_mid < value_mid  # convexity of x ** p
  x = np.float32((root_mid + value_mid) / 2)
  assert enc([x], cmap)[0] == 2**cmap.bits - 1


@pytest.mark.parametrize("cmap", FLOATS, ids=_ids(FLOATS))
def test_float_map_levels_form_octaves_of_equal_steps(cmap):
  """"float" maps: every non-zero magnitude is 2**e * (1 + i / 2**m); each octave has 2**m levels.

  So levels double every 2**m codes, and inside an octave they are evenly
  spaced: rounding to the nearest level inside an octave is rounding the
  float32 mantissa to m bits.
  """
  lv = reachable_levels(cmap)
  mags = lv[lv > 0]
  m = cmap.param
  frac, _ = np.frexp(mags)  # mags = frac * 2**e, frac in [0.5, 1)
  steps = (2 * frac - 1) * 2**m
  np.testing.assert_array_equal(steps, np.round(steps))  # m-bit mantissa
  np.testing.assert_array_equal(mags[2**m:], 2 * mags[: -2**m])  # octaves
  assert mags[-1] == 1.0


@pytest.mark.parametrize("cmap", POWERS, ids=_ids(POWERS))
def test_power_map_levels_follow_formula(cmap):
  """"power" maps: signed levels sign(k) (|k| / half)**p; unsigned (j / 2**b)**p, j = 1..2**b."""
  lv = reachable_levels(cmap)
  p = cmap.param
  if cmap.signed:
    half = 2 ** (cmap.bits - 1) - 1
    k = np.arange(-half, half + 1)
    want = np.sign(k) * (np.abs(k) / half) ** p
  else:
    n = 2**cmap.bits
    want = (np.arange(1, n + 1) / n) ** p
  np.testing.assert_allclose(lv, want, rtol=4e-6 * p, atol=0)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_default_map_is_a_healthy_map_for_its_mode(bits, signed):
  """default_map(b, signed) is an accepted, healthy map of that width and mode."""
  cmap = default_map(bits, signed)
  assert isinstance(cmap, CodeMap)
  assert (cmap.bits, cmap.signed) == (bits, signed)
  assert cmap in HEALTHY
  assert cmap.name.endswith(f"{'s' if signed else 'u'}{bits}")


def test_default_map_checks_bits():
  """default_map validates bits like everything else: ValueError out of range, TypeError non-int."""
  with pytest.raises(ValueError, match="bits"):
    default_map(9, True)
  with pytest.raises(TypeError, match="bits"):
    default_map(4.0, True)


def test_code_map_is_hashable_and_frozen():
  """CodeMap is usable as static pytree metadata: equal maps hash equal; fields are immutable."""
  a, b = CodeMap("power", 4, True, 2), CodeMap("power", 4, True, 2)
  assert a == b and hash(a) == hash(b)
  assert a != CodeMap("power", 4, True, 4)
  with pytest.raises(AttributeError):
    a.bits = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "args, match",
    [
        (("log", 4, True, 1), "kind"),
        (("Power", 4, True, 1), "kind"),
        (("power", 4, True, 3), "param=3"),
        (("power", 4, False, 0), "param=0"),
        (("power", 4, True, 16), "param=16"),
        (("float", 4, True, 3), "param=3"),   # signed 4-bit: 3 magnitude bits -> mantissa 0..2
        (("float", 4, False, 4), "param=4"),  # unsigned 4-bit: mantissa 0..3
        (("float", 4, False, -1), "param=-1"),
        (("power", 1, True, 1), "bits=1"),
        (("power", 9, False, 2), "bits=9"),
        (("float", 0, False, 0), "bits=0"),
    ],
)
def test_invalid_code_map_raises_value_error(args, match):
  """Bad kind, bad param for the kind/width, or bits outside 2..8 -> ValueError naming the value."""
  with pytest.raises(ValueError, match=match):
    CodeMap(*args)


def test_non_int_bits_in_code_map_raise_type_error():
  """CodeMap(bits=4.0) -> TypeError."""
  with pytest.raises(TypeError, match="bits"):
    CodeMap("power", 4.0, True, 1)


def test_encode_decode_keep_shape_and_dtypes():
  """encode: float array -> uint32 codes of the same shape; decode: -> float32 of the same shape."""
  cmap = CodeMap("float", 5, True, 1)
  x = jnp.zeros((2, 3, 5), jnp.bfloat16)
  codes = encode(x, cmap)
  chex.assert_shape(codes, (2, 3, 5))
  chex.assert_type(codes, jnp.uint32)
  y = decode(codes, cmap)
  chex.assert_shape(y, (2, 3, 5))
  chex.assert_type(y, jnp.float32)


# ----------------------------------------------------------------------------
# Regression tests for bugs found by these tests (fixed).
# ----------------------------------------------------------------------------


def test_every_accepted_float_map_has_finite_normal_levels():
  """Every float map the constructor accepts has finite, normal (>= f32 tiny), increasing levels."""
  bad = []
  for cmap in ACCEPTED:
    if cmap.kind != "float":
      continue
    lv = reachable_levels(cmap)
    nonzero = lv[lv != 0]
    ok = (np.all(np.isfinite(lv)) and np.all(np.diff(lv) > 0)
          and np.all(np.abs(nonzero) >= F32_TINY) and (cmap.signed or lv[0] > 0))
    if not ok:
      bad.append(cmap.name)
  assert not bad, f"float maps with invalid levels: {bad}"


def test_zero_is_a_fixed_point_of_every_accepted_signed_map():
  """For every accepted signed map, encode(0) is the zero code and decodes to exactly 0."""
  bad = []
  for cmap in ACCEPTED:
    if not cmap.signed:
      continue
    half = 2 ** (cmap.bits - 1) - 1
    code = int(enc([0.0], cmap)[0])
    if code != half or roundtrip(np.zeros(1), cmap)[0] != 0.0:
      bad.append(cmap.name)
  assert not bad, f"signed maps where 0 is not a fixed point: {bad}"
