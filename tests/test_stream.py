"""The streamed jnp update (``update/stream.py``): same numbers, bounded temporaries.

* Streaming is invisible: a leaf cut into chunks (a loop, then a tail) gives
  the numbers of the per-block update on the whole leaf, bit for bit when
  both run op by op (``jax.disable_jit``: no fusion, so no FMA contraction
  that XLA:CPU applies differently in and out of a loop), for 2-D leaves
  sliced by rows, leaves whose rows are not whole blocks, 1-D and 3-D leaves,
  a float32 moment beside a quantized one, and stochastic rounding (whose
  counter must follow the chunk's position in the leaf).
  CI runs each geometry with one rounding; ``STQUANT_SLOW=1`` with both.
* Compiled on this CPU, the optimizer step's temporaries are a few chunk-sized
  buffers per leaf, whatever the leaves' size, and under 5% of the parameter
  bytes of a model of some size (the whole-leaf update took ~50%, growing with
  the leaves) when the gradient's buffer may hold the update, as in a train step.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stquant_jax as sq
from stquant_jax._src.update import stream
from stquant_jax._src.update.adam import adam_blocks, adam_leaf

from _hlo import step_temp_bytes
from _policies import MixedBits

HP = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=0.5, bc2=0.01, step=7, leaf=3)


def _moments(shape, bits, block_size, seed=0):
  rng = np.random.default_rng(seed)
  m0 = jnp.asarray(rng.normal(size=shape).astype(np.float32)) * 0.1
  v0 = jnp.asarray(rng.random(size=shape).astype(np.float32)) * 0.01
  mb, vb = bits
  mu = sq.quantize(m0, mb, block_size=block_size) if mb else m0
  nu = sq.quantize(v0, vb, signed=False, block_size=block_size) if vb else v0
  g = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  return g, mu, nu


def _leaves(x):
  return [np.asarray(a) for a in jax.tree.leaves(x)]


FULL = os.environ.get("STQUANT_SLOW", "") not in ("", "0")
_GEOMETRIES = [
    ((32, 64), (8, 4), 32, 512),         # rows of whole blocks: 8 rows a chunk, no tail
    ((70, 100), (4, 3), 32, 3200),       # 100-value rows: 32 rows make 100 blocks; a tail
    ((400,), (5, 6), 32, 128),           # 1-D, flat slices, partial last block
    ((2, 8, 40), (3, 2), 64, 320),       # 3-D, rows of the last axis
    ((24, 96), (8, None), 32, 768),      # float32 v beside quantized m
    ((24, 96), (None, 4), 96, 768),      # float32 m beside quantized v, odd block size
]
# Op by op, every primitive compiles once per shape (~15 s a geometry on CI's CPU), so
# the short form runs each geometry once: stochastic rounding (its counter must follow
# the chunk's position) on four, nearest on two (whole-block rows; float32 v beside m).
# STQUANT_SLOW=1 runs both roundings on every geometry.
_SHORT_ROUNDING = ["nearest", "stochastic", "stochastic", "stochastic", "nearest", "stochastic"]
_CASES = ([(*c, r) for c in _GEOMETRIES for r in ("nearest", "stochastic")] if FULL else
          [(*c, r) for c, r in zip(_GEOMETRIES, _SHORT_ROUNDING)])


@pytest.mark.parametrize("shape,bits,block_size,chunk,rounding", _CASES)
def test_streaming_matches_the_whole_leaf_bit_for_bit(shape, bits, block_size, chunk, rounding):
  g, mu, nu = _moments(shape, bits, block_size)
  hp = dict(HP, rounding=(rounding, rounding))
  view, lead = stream.chunking(shape, block_size, chunk)
  assert view[0] // lead >= 2, "the case must run the loop"
  with jax.disable_jit():
    got = stream.stream_leaf(adam_blocks, g, mu, nu, chunk_values=chunk, **hp)
    want = stream.stream_leaf(adam_blocks, g, mu, nu, chunk_values=10**9, **hp)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(_leaves(got), _leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_chunks_are_whole_blocks_and_whole_tiles():
  for shape in [(4096, 768), (50257, 768), (768, 50257), (50257, 100), (3, 5, 7, 96)]:
    for bs in (32, 64, 96, 128, 256):
      view, lead = stream.chunking(shape, bs)
      per_chunk = lead * int(np.prod(view[1:]))
      assert per_chunk % bs == 0, (shape, bs)
      if len(view) == 2:
        assert lead % 8 == 0, (shape, bs)      # TPU tiles are 8 rows
      assert per_chunk <= 4 * stream.CHUNK_VALUES + 8 * view[-1], (shape, bs)


def test_jitted_stream_is_deterministic_and_close_to_the_whole_leaf():
  """Under jit the two programs may contract multiply-adds differently: the update
  within a few float32 ulps, the codes within one level of each other."""
  g, mu, nu = _moments((96, 1000), (8, 8), 128)
  hp = dict(HP, rounding=("stochastic", "stochastic"))
  f = jax.jit(functools.partial(adam_leaf, **hp))
  a, b = f(g, mu, nu), f(g, mu, nu)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)
  with jax.disable_jit():
    want = stream.stream_leaf(adam_blocks, g, mu, nu, chunk_values=10**9, **hp)
  np.testing.assert_allclose(a[0], want[0], rtol=2e-6, atol=1e-7)
  for new, ref in ((a[1], want[1]), (a[2], want[2])):
    got_v, want_v = np.asarray(sq.dequantize(new)), np.asarray(sq.dequantize(ref))
    step = np.repeat(np.asarray(ref.scales), 128)[:got_v.size].reshape(got_v.shape)
    assert np.all(np.abs(got_v - want_v) <= step / 8 + 1e-30)


def _param_bytes(shapes):
  return sum(int(np.prod(s)) * 4 for s in shapes)


def _step_temp_bytes(tx, shapes):
  return step_temp_bytes(tx, {f"w{i}": jax.ShapeDtypeStruct(s, jnp.float32)
                              for i, s in enumerate(shapes)})


SHAPES = [(8192, 768), (3072, 3072), (12564, 96), (3000, 100), (1_000_000,)]
BIGGER = [(4 * s[0],) + s[1:] for s in SHAPES]  # every leaf 4x larger


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_step_temporaries_do_not_grow_with_the_leaves(bits):
  """A few chunk-sized buffers per leaf: 4x larger leaves add nothing (the whole-leaf
  update's temporaries were ~50% of the parameter bytes and grew with them)."""
  tx = sq.adamw(1e-3, policy=sq.FixedBits(bits, bits), backend="jnp")
  small, big = _step_temp_bytes(tx, SHAPES), _step_temp_bytes(tx, BIGGER)
  assert big <= small + 2**19, (small, big)
  assert big <= 0.05 * _param_bytes(BIGGER), (big, _param_bytes(BIGGER))


def test_compiled_mixed_layout_temporaries_are_a_few_chunks():
  tx = sq.adamw(1e-3, policy=MixedBits(), backend="jnp")
  assert _step_temp_bytes(tx, BIGGER) <= 0.05 * _param_bytes(BIGGER)


def test_adaptive_policy_statistics_temporaries_are_bounded():
  """STQuantPolicy decodes a rotating 1/K of each adaptive leaf's blocks every step.
  Decoded and reduced in one pass, that sample's float32 arrays were ~7% of the
  parameter bytes here (K = 100, growing with the model); in ordered groups of about
  2048 blocks they are a few MB (``policy.scores.leaves_sums``)."""
  tx = sq.adamw(1e-3, policy=sq.STQuantPolicy(target_bits=4.5), backend="jnp")
  assert _step_temp_bytes(tx, BIGGER) <= 0.05 * _param_bytes(BIGGER)
