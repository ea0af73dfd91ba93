"""Properties of the dense bit packer (``stquant_jax._src.codec.packing``).

Checked against a slow, obviously-correct pure-Python packer that follows the
module docstring literally: the codes are split into bit planes whose widths
are the powers of two in ``b`` (widest first); plane ``(w, o)`` holds bits
``o .. o + w - 1`` of every code, code ``i`` at bit ``(i % (32 / w)) * w`` of
the plane's word ``i // (32 / w)``; the planes' words follow each other.
"""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stquant_jax._src.codec.packing import pack, unpack

ALL_BITS = tuple(range(2, 9))
# Eager ops compile once per shape, so the random tests use one shape: a leading batch dim and three 32-code groups.
# The hand-computed layout tests below cover a flat 32-code array.
SHAPES = ((2, 96),)


def reference_planes(bits):
  out, offset = [], 0
  for width in (8, 4, 2, 1):
    if bits & width:
      out.append((width, offset))
      offset += width
  return out


def reference_pack(codes, bits):
  """Pure-Python bit-plane packer, one bit at a time."""
  codes = np.asarray(codes, dtype=np.int64)
  *lead, n = codes.shape
  flat = codes.reshape(-1, n)
  out = np.zeros((flat.shape[0], n * bits // 32), dtype=np.uint32)
  for r, row in enumerate(flat):
    words = []
    for width, offset in reference_planes(bits):
      plane = [0] * (n * width // 32)
      for i, c in enumerate(row.tolist()):
        for t in range(width):
          k = i * width + t  # bit k of this plane's stream
          plane[k // 32] |= ((c >> (offset + t)) & 1) << (k % 32)
      words += plane
    out[r] = words
  return out.reshape(*lead, n * bits // 32)


@st.composite
def codes_and_bits(draw):
  bits = draw(st.sampled_from(ALL_BITS))
  shape = draw(st.sampled_from(SHAPES))
  codes = draw(hnp.arrays(np.uint32, shape,
                          elements=st.integers(0, 2**bits - 1)))
  return codes, bits


@settings(max_examples=50, deadline=None)
@given(codes_and_bits())
def test_unpack_inverts_pack_for_every_width(cb):
  """unpack(pack(c, b), b) == c exactly, for b in 2..8, codes in [0, 2**b), any leading dims."""
  codes, bits = cb
  words = pack(jnp.asarray(codes), bits)
  chex.assert_type(words, jnp.uint32)
  back = unpack(words, bits)
  chex.assert_type(back, jnp.uint32)
  chex.assert_shape(back, codes.shape)
  np.testing.assert_array_equal(np.asarray(back), codes)


@settings(max_examples=30, deadline=None)
@given(codes_and_bits())
def test_pack_matches_the_reference_bit_planes(cb):
  """pack() produces exactly the documented bit-plane layout (vs. a bit-by-bit packer)."""
  codes, bits = cb
  np.testing.assert_array_equal(np.asarray(pack(jnp.asarray(codes), bits)),
                                reference_pack(codes, bits))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_unpack_reads_the_reference_bit_planes(bits):
  """unpack() decodes words written by the reference packer (layout agrees on the read side too)."""
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 2**bits, size=(2, 96), dtype=np.uint32)
  words = reference_pack(codes, bits)
  np.testing.assert_array_equal(np.asarray(unpack(jnp.asarray(words), bits)), codes)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [32, 64, 128, 256])
def test_packed_size_is_exactly_n_times_bits_over_32(bits, n):
  """n codes of b bits take exactly n*b/32 words: no padding, no rounding up to bytes."""
  words = jax.eval_shape(functools.partial(pack, bits=bits),
                         jax.ShapeDtypeStruct((5, n), jnp.uint32))
  assert words.shape == (5, n * bits // 32) and words.dtype == jnp.uint32
  assert words.shape[-1] * 32 == n * bits  # exactly b bits per code
  back = jax.eval_shape(functools.partial(unpack, bits=bits), words)
  assert back.shape == (5, n)


def test_hand_computed_layout_for_3_bit_codes():
  """3 bits = a 2-bit plane (2 words: low bits) then a 1-bit plane (1 word: bit 2)."""
  codes = np.zeros(32, np.uint32)
  codes[0] = 0b101   # low bits 01 -> bits 0..1 of word 0; high bit -> bit 0 of word 2
  codes[17] = 0b110  # low bits 10 -> bits 2..3 of word 1; high bit -> bit 17 of word 2
  codes[31] = 0b011  # low bits 11 -> bits 30..31 of word 1; high bit 0
  words = np.asarray(pack(jnp.asarray(codes), 3))
  np.testing.assert_array_equal(
      words, np.array([0b01, (0b10 << 2) | (0b11 << 30), 1 | (1 << 17)], dtype=np.uint32))


def test_hand_computed_layout_for_4_bit_codes():
  """4-bit codes: code i is nibble i % 8 of word i // 8, lowest nibble first."""
  codes = np.arange(32, dtype=np.uint32) % 16
  words = np.asarray(pack(jnp.asarray(codes), 4))
  np.testing.assert_array_equal(
      words, np.array([0x76543210, 0xFEDCBA98, 0x76543210, 0xFEDCBA98], np.uint32))


@pytest.mark.parametrize("bits", [3, 4])
def test_pack_and_unpack_work_under_jit(bits):
  """pack/unpack with static bits trace under jax.jit and agree with eager execution."""
  codes = jnp.asarray(np.random.default_rng(0).integers(0, 2**bits, (2, 96)), jnp.uint32)
  jpack = jax.jit(functools.partial(pack, bits=bits))
  junpack = jax.jit(functools.partial(unpack, bits=bits))
  words = jpack(codes)
  chex.assert_trees_all_equal(words, pack(codes, bits))
  chex.assert_trees_all_equal(junpack(words), codes)


@pytest.mark.parametrize("fn", [pack, unpack], ids=["pack", "unpack"])
@pytest.mark.parametrize("bits", [1, 9, 0, -3])
def test_bits_out_of_range_raise_value_error_naming_bits(fn, bits):
  """bits outside 2..8 -> ValueError whose message names `bits` and its value."""
  with pytest.raises(ValueError, match=rf"bits={bits}\b"):
    fn(jnp.zeros((64,), jnp.uint32), bits)


@pytest.mark.parametrize("fn", [pack, unpack], ids=["pack", "unpack"])
@pytest.mark.parametrize("bits", [4.0, "4", True, np.float32(4)])
def test_non_int_bits_raise_type_error(fn, bits):
  """bits that is not a Python int (float, str, bool) -> TypeError naming bits."""
  with pytest.raises(TypeError, match="bits"):
    fn(jnp.zeros((64,), jnp.uint32), bits)


@pytest.mark.parametrize("n", [1, 16, 33, 100])
def test_pack_rejects_last_axis_not_multiple_of_32(n):
  """pack of a last axis that is not a multiple of 32 -> ValueError."""
  with pytest.raises(ValueError, match="multiple of 32"):
    pack(jnp.zeros((2, n), jnp.uint32), 3)


def test_unpack_rejects_partial_groups_and_non_uint32():
  """unpack needs whole 32-code groups (last axis % bits == 0) and uint32 words."""
  with pytest.raises(ValueError, match="multiple of"):
    unpack(jnp.zeros((4,), jnp.uint32), 3)
  with pytest.raises(TypeError, match="uint32"):
    unpack(jnp.zeros((3,), jnp.int32), 3)
