"""Re-packing at new widths: exact results, bounded memory, one source of truth, abstract states.

* ``relayout`` re-packs block by block: its result is exactly ``quantize(dequantize(q))``
  (padding of a ragged last block included), and the compiled program's scratch
  (``memory_analysis().temp_size_in_bytes``) stays a small constant instead of a float32
  copy of the moment (8 MiB for 2M values).
* The maps and block size come from the state: the ``mu_map`` given to the transform is
  the one ``relayout`` uses.
* ``abstract_state(tx, params, bits=...)`` is exactly the structure, shapes and dtypes the
  concrete relayout produces, and serves as a checkpoint restore target.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import stquant_jax as sq
from stquant_jax._src.layout import relayout as rl
from stquant_jax._src.layout import repack

_is_q = lambda x: isinstance(x, sq.QuantizedArray)


def propose(state, bits):
  """``state`` (a ``tx.init`` of adamw) with the policy's proposal set to ``bits`` ([L, 2])."""
  ps = state[0].policy_state._replace(proposed=jnp.asarray(np.asarray(bits, np.int32)))
  return (state[0]._replace(policy_state=ps),) + tuple(state[1:])


def trained(params, tx, steps=3):
  state = tx.init(params)
  for i in range(steps):
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i), p.shape), params)
    _, state = jax.jit(tx.update)(g, state, params)
  return state


def test_repacked_moments_equal_requantizing_the_decoded_values():
  """q -> q, q -> float32 and float32 -> q, on a ragged leaf (7 * 50 values: the last
  block is padded) and a large one; every code and scale equals the whole-array path."""
  params = {"r": jnp.ones((7, 50)), "w": jnp.ones((300, 700))}
  tx = sq.adamw(1e-3, policy=sq.STQuantPolicy(min_size=100))
  state = trained(params, tx)
  st = state[0]
  for bits in ([[3, 32], [5, 4]], [[32, 6], [4, 32]]):
    new = sq.relayout(propose(state, bits))[0]
    for name, (mb, vb) in zip(("r", "w"), bits):
      for old, got, b, signed in ((st.mu[name], new.mu[name], mb, True),
                                  (st.nu[name], new.nu[name], vb, False)):
        values = sq.dequantize(old)
        if b == 32:
          np.testing.assert_array_equal(np.asarray(got), np.asarray(values))
          continue
        want = sq.quantize(values, b, signed=signed)
        assert got.code_map == want.code_map
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
        np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(want.scales))
    back = sq.relayout(propose((new,) + tuple(state[1:]), [[8, 8], [8, 8]]))[0]
    f32 = [x for x in jax.tree.leaves(new.mu) + jax.tree.leaves(new.nu) if not _is_q(x)]
    assert f32  # the float32 -> quantized direction ran too
    for name in ("r", "w"):
      assert back.mu[name].bits == 8 and back.nu[name].bits == 8


def test_repack_scratch_is_a_small_constant_not_a_float32_copy():
  """2M values at 8 bits -> 4 bits: the re-pack program's scratch is < 1 MiB, where
  decoding the whole moment (``quantize(dequantize(q))``, measured here the same way)
  needs the 8 MiB float32 copy. With donation the old scales' buffer is reused."""
  q = sq.quantize(jax.random.normal(jax.random.key(0), (2048, 1024)), 8)
  st = sq.adamw(1e-3).init({"w": jnp.zeros((2048, 1024))})[0]
  st = st._replace(mu={"w": q})
  _, changes, inputs = rl.plan(st, np.array([[4, 8]], np.int32))
  whole = jax.jit(lambda c, s: tuple(jax.tree.leaves(sq.quantize(sq.dequantize(
      sq.QuantizedArray(c, s, q.code_map, 128, q.shape, q.dtype)), 4))))
  whole_temp = whole.lower(q.codes, q.scales).compile().memory_analysis().temp_size_in_bytes
  assert whole_temp >= 4 * 2048 * 1024  # the float32 copy
  for donate in (False, True):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      mem = repack.program(tuple(changes), donate).lower(inputs).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 1 << 20, (donate, mem)
    assert mem.output_size_in_bytes < mem.argument_size_in_bytes  # 4-bit codes: half
    if donate:
      assert mem.alias_size_in_bytes == q.scales.nbytes  # scales rewritten in place


def test_relayout_donate_frees_the_replaced_moments():
  params = {"w": jnp.ones((256, 128))}
  state = sq.adamw(1e-3, policy=sq.STQuantPolicy()).init(params)
  old = state[0].mu["w"].codes
  new = sq.relayout(propose(state, [[4, 8]]), donate=True)
  assert old.is_deleted() and new[0].mu["w"].bits == 4
  kept = sq.adamw(1e-3, policy=sq.STQuantPolicy()).init(params)
  sq.relayout(propose(kept, [[4, 8]]))
  assert not kept[0].mu["w"].codes.is_deleted()  # default: the old state stays valid


def test_relayout_uses_the_transforms_maps():
  """The mu_map given to the transform is the one relayout uses (the state carries it)."""
  p1 = lambda b: sq.CodeMap("power", b, True, 1)
  tx = sq.adamw(1e-3, policy=sq.STQuantPolicy(), mu_map=p1)
  state = propose(tx.init({"w": jnp.ones((256, 128))}), [[4, 5]])
  new = sq.relayout(state)
  assert new[0].mu["w"].code_map == sq.CodeMap("power", 4, True, 1)
  assert new[0].nu["w"].code_map == sq.default_map(5, signed=False)


def test_a_state_from_another_transform_is_refused_naming_both():
  """One source of truth at update time too: a state built with other settings."""
  params = {"w": jnp.ones((256, 128))}
  state = sq.adamw(1e-3, block_size=64).init(params)
  with pytest.raises(ValueError, match="block_size=128.*block_size=64"):
    sq.adamw(1e-3).update(params, state, params)
  state = sq.adamw(1e-3, mu_map=lambda b: sq.CodeMap("power", b, True, 1)).init(params)
  with pytest.raises(ValueError, match="mu_map gives power-p2-s3 at 3 bits, the state was built with power-p1-s3"):
    sq.adamw(1e-3).update(params, state, params)


def _shapes(tree):
  return [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def test_abstract_state_is_what_relayout_produces():
  params = {"w": jnp.ones((300, 128)), "b": jnp.zeros((128,)), "n": 3}
  tx = sq.adamw(1e-3, policy=sq.STQuantPolicy(min_size=1000))
  bits = [[32, 32], [0, 0], [5, 3]]  # leaves: b, n, w
  concrete = sq.relayout(propose(tx.init(params), bits))
  for given in (concrete, bits, np.asarray(bits),
                {"mu_bits": {"w": 5}, "nu_bits": {"w": 3}}):
    abstract = sq.abstract_state(tx, params, bits=given)
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    assert _shapes(abstract) == _shapes(concrete)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  assert sq.state_nbytes(sq.abstract_state(tx, params, bits=bits)) == sq.state_nbytes(concrete)
  with pytest.raises(ValueError, match="does not have"):
    sq.abstract_state(tx, params, bits={"mu_bits": {"nope": 4}})


def test_abstract_state_is_a_restore_target(tmp_path):
  """Restoring a re-laid-out checkpoint into ``abstract_state`` (nothing allocated
  first) gives the saved layout and values."""
  params = {"w": jnp.ones((256, 128))}
  tx = sq.adamw(1e-3, policy=sq.STQuantPolicy())
  state = sq.relayout(propose(trained(params, tx), [[4, 6]]))
  path = sq.save_state(tmp_path / "ckpt", state)
  restored = sq.restore_state(path, sq.abstract_state(tx, params))
  assert restored[0].mu["w"].bits == 4 and restored[0].nu["w"].bits == 6
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  restored = sq.restore_state(path, sq.abstract_state(tx, params, bits=state))
  assert restored[0].mu["w"].bits == 4
