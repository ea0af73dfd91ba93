"""The per-shard block layout (one device): pieces blocked on their own, everywhere.

A moment of a parameter sharded on a later axis keeps each device's piece as
its own run of blocks (``QuantizedArray.shards``). These tests check, on one
device, that every code path that maps values to blocks agrees with quantizing
each piece alone: the layout maps, ``quantize`` / ``dequantize``, the Adam step
and a re-pack at another width. The 8-device behaviour (no communication, state
bytes) is in ``tests/test_fsdp_any_axis.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stquant_jax as sq
from stquant_jax._src.codec.shards import from_blocks, num_layout_blocks, to_blocks
from stquant_jax._src.layout.repack import rewidth
from stquant_jax._src.update.adam import adam_leaf

CASES = [((50, 24), (1, 2)), ((50, 24), (2, 3)), ((8, 6, 10), (2, 1, 5)), ((96,), (3,))]


def _pieces(x, shards):
  """The pieces of ``x`` in row-major order of their grid position."""
  out = [x]
  for axis, c in enumerate(shards):
    out = [p for q in out for p in jnp.split(q, c, axis=axis)]
  return out


@pytest.mark.parametrize("shape,shards", CASES)
def test_blocks_round_trip_and_pieces_are_blocked_alone(shape, shards):
  x = jax.random.normal(jax.random.key(0), shape)
  b = to_blocks(x, shards, 32)
  assert b.shape == (num_layout_blocks(shape, shards, 32), 32)
  np.testing.assert_array_equal(from_blocks(b, shape, shards), x)
  want = jnp.concatenate([to_blocks(p, None, 32) for p in _pieces(x, shards)])
  np.testing.assert_array_equal(b, want)


@pytest.mark.parametrize("shape,shards", CASES)
def test_quantize_codes_are_the_pieces_codes(shape, shards):
  x = jax.random.normal(jax.random.key(1), shape)
  q = sq.quantize(x, 4, block_size=32, shards=shards)
  parts = [sq.quantize(p, 4, block_size=32) for p in _pieces(x, shards)]
  np.testing.assert_array_equal(q.codes, jnp.concatenate([p.codes for p in parts]))
  y = sq.dequantize(q)
  assert y.shape == x.shape
  for got, p in zip(_pieces(y, shards), parts):
    np.testing.assert_array_equal(got, sq.dequantize(p))


def test_bad_shards_are_refused():
  with pytest.raises(ValueError, match="shards"):
    sq.quantize(jnp.zeros((10, 6)), 8, shards=(1, 4))
  with pytest.raises(ValueError, match="shards"):
    sq.quantize(jnp.zeros((10, 6)), 8, shards=(2,))


@pytest.mark.parametrize("shape,shards", [((300, 80), (1, 4)), ((64, 90), (2, 3))])
@pytest.mark.parametrize("chunk", [None, 1024])   # whole leaf, or streamed in chunks
def test_adam_step_equals_each_piece_alone(shape, shards, chunk):
  """With nearest rounding, the step of a per-shard leaf is each piece's step (up to
  where XLA contracts a multiply-add into an FMA: 4 float32 ulps of the largest value)."""
  g = jax.random.normal(jax.random.key(2), shape)
  m0 = jax.random.normal(jax.random.key(3), shape) * 0.1
  v0 = jnp.abs(jax.random.normal(jax.random.key(4), shape)) * 0.01
  hp = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=0.5, bc2=0.3)
  mu = sq.quantize(m0, 8, block_size=64, shards=shards)
  nu = sq.quantize(v0, 4, signed=False, block_size=64, shards=shards)
  if chunk:
    from stquant_jax._src.update import stream
    from stquant_jax._src.update.adam import adam_blocks
    u, m, v = stream.stream_leaf(adam_blocks, g, mu, nu, chunk_values=chunk, materialize=True,
                                 reads_once=True, **hp)
  else:
    u, m, v = adam_leaf(g, mu, nu, **hp)
  assert m.shards == tuple(shards) and v.shards == tuple(shards) and u.shape == shape
  got_u, got_m, got_v = _pieces(u, shards), _pieces(sq.dequantize(m), shards), _pieces(
      sq.dequantize(v), shards)
  for i, (gp, mp, vp) in enumerate(zip(_pieces(g, shards), _pieces(m0, shards),
                                        _pieces(v0, shards))):
    uq, mq, vq = adam_leaf(gp, sq.quantize(mp, 8, block_size=64),
                           sq.quantize(vp, 4, signed=False, block_size=64), **hp)
    for got, want in ((got_u[i], uq), (got_m[i], sq.dequantize(mq)),
                      (got_v[i], sq.dequantize(vq))):
      ulps = 4 * np.spacing(np.float32(np.abs(want).max()))
      np.testing.assert_allclose(got, want, rtol=0, atol=ulps)


def test_rewidth_keeps_the_layout_and_zeroes_every_pieces_padding():
  v = jnp.abs(jax.random.normal(jax.random.key(5), (50, 24)))
  q = sq.quantize(v, 8, signed=False, block_size=32, shards=(2, 3))
  q4 = sq.quantize(sq.dequantize(q), 4, signed=False, block_size=32, shards=(2, 3))
  codes, scales = rewidth(q.codes, q.scales, q.code_map, q4.code_map, 32, q.shape, q.shards)
  np.testing.assert_array_equal(codes, q4.codes)
  np.testing.assert_array_equal(scales, q4.scales)
