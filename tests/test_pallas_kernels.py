"""Quantize/dequantize Pallas kernels (interpret mode) vs the jnp reference: bit-exact."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from stquant_jax._src.kernels import maps as _codec
from stquant_jax._src.codec.maps import CodeMap, decode, default_map, encode

BITS = range(2, 9)
INTERPRET = True


def all_maps(bits, signed):
  """Every valid map: power p in {1, 2, 4, 8} and every float mantissa count the library accepts."""
  mag_bits = bits - 1 if signed else bits
  out = [CodeMap("power", bits, signed, p) for p in (1, 2, 4, 8)]
  for m in range(mag_bits):
    try:
      out.append(CodeMap("float", bits, signed, m))
    except ValueError:  # spans more octaves than float32 holds
      pass
  return out


def kernel_maps(bits, signed):
  """The default map plus one map of the other family (power p / float mantissa vary with bits)."""
  d = default_map(bits, signed)
  mag_bits = bits - 1 if signed else bits
  other = (CodeMap("float", bits, signed, (mag_bits - 1) // 2) if d.kind == "power"
           else CodeMap("power", bits, signed, (1, 2, 4, 8)[bits % 4]))
  return [d, other]


def probe_values(cmap):
  """Every level, every midpoint between neighbours and its float32 neighbours, randoms."""
  lv = np.sort(cmap.levels().astype(np.float32))
  mid = ((lv[1:].astype(np.float64) + lv[:-1]) / 2).astype(np.float32)
  near = np.concatenate([np.nextafter(mid, np.float32(-2)), np.nextafter(mid, np.float32(2))])
  rnd = np.random.default_rng(cmap.bits).uniform(-1 if cmap.signed else 0, 1, 4096)
  edge = [0.0, 1.0, -1.0, 1e-30, -1e-30, 1.5, -1.5]
  return np.concatenate([lv, mid, near, rnd.astype(np.float32), np.float32(edge)])


def block_data(n_blocks, block, signed, seed=0):
  """Normal data with a NaN, +-Inf, an all-zero block and a block of tiny values."""
  x = np.array(jax.random.normal(jax.random.key(seed), (n_blocks, block)))
  x[0, 3], x[0, 5], x[-1, 7] = np.nan, np.inf, -np.inf
  if n_blocks > 2:
    x[1] = 0.0
    x[2] *= 1e-30
  return jnp.asarray(x if signed else np.abs(x) ** 2)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_codec_matches_maps_for_every_map(bits, signed):
  """The kernels' encode/decode (the library's, re-evaluated) reproduce the library's."""
  maps = all_maps(bits, signed)
  xs = [jnp.asarray(probe_values(m)) for m in maps]
  codes = jnp.arange(2**bits, dtype=jnp.uint32)
  kernel_side = jax.jit(lambda xs: [
      (_codec.encode(x, m, ieee=False), _codec.decode(codes, m, ieee=False))
      for x, m in zip(xs, maps)])
  library_side = jax.jit(lambda xs: [(encode(x, m), decode(codes, m)) for x, m in zip(xs, maps)])
  for m, got, want in zip(maps, kernel_side(xs), library_side(xs)):
    np.testing.assert_array_equal(got[0], want[0], err_msg=m.name)
    np.testing.assert_array_equal(got[1], want[1], err_msg=m.name)


def test_codec_substitutes_ieee_ops_on_gpu_path():
  """With ieee=True every float32 div/sqrt of the library's power maps becomes inline PTX."""
  for m in (CodeMap("power", 4, True, 8), CodeMap("power", 6, False, 4)):
    x = jnp.linspace(0.0, 1.0, 64)
    jaxpr = str(jax.make_jaxpr(lambda x: _codec.encode(x, m, ieee=True))(x))
    assert "sqrt.rn.f32" in jaxpr and " sqrt " not in jaxpr and " div " not in jaxpr


def _assert_same(got, want):
  for a, b in zip(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_quantize_dequantize_bit_exact(bits, signed):
  x = block_data(5, 128, signed, seed=bits)  # 5 rows, 4 per program: a partial program
  tiling = pk.Tiling(blocks_per_program=4)
  maps = kernel_maps(bits, signed)

  @jax.jit  # one compile for all kernels of the test, one for all references
  def kernels(x, refs):
    q = [pk.quantize_blocks_pallas(x, m, interpret=INTERPRET, tiling=tiling) for m in maps]
    dq = [pk.dequantize_blocks_pallas(*r, m, interpret=INTERPRET, tiling=tiling)
          for r, m in zip(refs, maps)]
    return q, dq

  @jax.jit
  def references(x):
    q = [pk.quantize_blocks_reference(x, m) for m in maps]
    return q, [pk.dequantize_blocks_reference(*r, m) for r, m in zip(q, maps)]

  want_q, want_dq = references(x)
  got_q, got_dq = kernels(x, want_q)
  for m, gq, wq, gd, wd in zip(maps, got_q, want_q, got_dq, want_dq):
    _assert_same(gq, wq)
    _assert_same((gd,), (wd,))


@pytest.mark.parametrize("block,rows,bits", [(32, 16, 7), (64, 2, 5), (256, 1, 6)])
def test_block_sizes_and_tilings(block, rows, bits):
  x = block_data(11, block, True, seed=block)
  cmap = default_map(bits, True)
  tiling = pk.Tiling(blocks_per_program=rows)
  got = pk.quantize_blocks_pallas(x, cmap, interpret=INTERPRET, tiling=tiling)
  _assert_same(got, pk.quantize_blocks_reference(x, cmap))
  y = pk.dequantize_blocks_pallas(*got, cmap, interpret=INTERPRET, tiling=tiling)
  _assert_same((y,), (pk.dequantize_blocks_reference(*got, cmap),))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input(dtype):
  x = block_data(3, 128, True).astype(dtype)
  cmap = default_map(4, True)
  got = pk.quantize_blocks_pallas(x, cmap, interpret=INTERPRET)
  _assert_same(got, pk.quantize_blocks_reference(x, cmap))


def test_zero_blocks():
  cmap = default_map(5, False)
  codes, scales = pk.quantize_blocks_pallas(jnp.zeros((0, 128)), cmap, interpret=INTERPRET)
  assert codes.shape == (0, 20) and codes.dtype == jnp.uint32 and scales.shape == (0,)
  y = pk.dequantize_blocks_pallas(codes, scales, cmap, interpret=INTERPRET)
  assert y.shape == (0, 128) and y.dtype == jnp.float32


def test_rejects_bad_layouts():
  with pytest.raises(ValueError, match="power-of-two block size"):
    pk.quantize_blocks_pallas(jnp.zeros((2, 96)), default_map(8, True), interpret=True)
  with pytest.raises(ValueError, match="do not hold"):
    pk.dequantize_blocks_pallas(jnp.zeros((2, 12), jnp.uint32), jnp.zeros((2,)),
                                default_map(4, True), block_size=128, interpret=True)
  with pytest.raises(ValueError, match="blocks_per_program=3"):
    pk.Tiling(blocks_per_program=3)
