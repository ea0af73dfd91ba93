"""Backend dispatch: the Pallas kernel path (interpret mode on CPU) matches the jnp path."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import stquant_jax as sq

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")


def _steps(backend, bits, steps=3):
  params = {"w": jax.random.normal(jax.random.key(0), (40, 130)) * 0.1,  # 5200: padded
            "b": jnp.zeros((7,))}
  tx = sq.adamw(1e-2, policy=sq.FixedBits(bits[0], bits[1], min_size=1024), backend=backend)
  state = tx.init(params)
  upd = jax.jit(tx.update)
  for i in range(steps):
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(i + 1), p.shape), params)
    u, state = upd(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


@pytest.mark.parametrize("bits", [(8, 8), (4, 5), (3, 2)])
def test_pallas_backend_matches_jnp(bits):
  """backend='pallas' (interpret on CPU) gives the jnp path's codes, scales and params."""
  p_j, s_j = _steps("jnp", bits)
  p_p, s_p = _steps("pallas", bits)
  chex.assert_trees_all_close(p_p, p_j, atol=1e-6)
  q_j, q_p = s_j[0].mu["w"], s_p[0].mu["w"]
  assert q_p.bits == bits[0]
  # Codes may differ by a one-ulp rounding flip in rare elements; scales match closely.
  assert float(jnp.mean(q_p.codes != q_j.codes)) < 1e-3
  chex.assert_trees_all_close(q_p.scales, q_j.scales, rtol=1e-5)


def test_auto_backend_is_jnp_on_cpu():
  """On CPU 'auto' takes the jnp path: results are identical to backend='jnp'."""
  p_a, _ = _steps("auto", (8, 8), steps=2)
  p_j, _ = _steps("jnp", (8, 8), steps=2)
  chex.assert_trees_all_equal(p_a, p_j)


def test_forced_pallas_refuses_a_block_size_the_kernel_does_not_take():
  """Blocks of 96 (not a power of two): backend='pallas' ran the jnp path silently."""
  params = {"w": jnp.ones((96, 64))}
  tx = sq.adamw(1e-3, policy=sq.FixedBits(8, 8), block_size=96, backend="pallas")
  with pytest.raises(ValueError, match="backend='pallas' forces the fused kernel.*blocks of 96"):
    jax.jit(tx.update)(params, tx.init(params), params)


def test_unknown_backend_is_rejected():
  with pytest.raises(ValueError, match="backend"):
    sq.adamw(1e-3, backend="cuda")


# ------------------------------------------------- backend chosen by the lowering platform
def _step_fn(tx):
  def step(params, state, grads):
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state
  return step


def _problem(backend="auto"):
  params = {"w": jnp.ones((256, 64)) * 0.1, "b": jnp.zeros((64,))}
  tx = sq.adamw(1e-2, policy=sq.FixedBits(8, 4), backend=backend)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01), params)
  return tx, params, tx.init(params), grads


def test_auto_backend_follows_the_lowering_platform():
  """One traced step: lowered for CUDA it holds the Triton kernel, lowered for this CPU
  it does not (the choice is made at lowering, not from jax.default_backend())."""
  import pallas_kernels as pk
  tx, params, state, grads = _problem()
  cuda = pk.lower_for_cuda(_step_fn(tx), params, state, grads)
  assert cuda.count(pk.TRITON_CALL) >= 1
  cpu = jax.jit(_step_fn(tx)).lower(params, state, grads).as_text()
  assert pk.TRITON_CALL not in cpu


@pytest.mark.parametrize("backend", ["auto", "pallas"])
def test_pallas_lowers_under_an_explicit_abstract_mesh(backend):
  """Was a ShardingTypeError (dynamic_update_slice operand sharding) for backend='pallas'."""
  import pallas_kernels as pk
  tx, params, state, grads = _problem(backend)
  assert pk.TRITON_CALL in pk.lower_for_cuda(_step_fn(tx), params, state, grads)


def test_export_for_cuda_and_cpu_carries_both_paths():
  """A step exported for CUDA and CPU holds the kernel (CUDA) and runs the jnp path here,
  with the jnp path's results."""
  import pallas_kernels as pk
  from jax import export
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType
  tx, params, state, grads = _problem()
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice(
      device_kind="NVIDIA H100", num_cores=132, platform="gpu"))
  with jax.sharding.use_abstract_mesh(mesh):
    exp = export.export(jax.jit(_step_fn(tx)), platforms=("cuda", "cpu"), disabled_checks=[
        export.DisabledSafetyCheck.custom_call(pk.TRITON_CALL)])(params, state, grads)
  assert exp.platforms == ("cuda", "cpu")
  assert pk.TRITON_CALL in exp.mlir_module()
  got = exp.call(params, state, grads)
  jtx, _, jstate, _ = _problem("jnp")
  want = jax.jit(_step_fn(jtx))(params, jstate, grads)
  chex.assert_trees_all_equal(got[0], want[0])
  chex.assert_trees_all_equal(got[1][0].mu["w"].codes, want[1][0].mu["w"].codes)


def test_auto_backend_under_vmap():
  """The platform switch batches: vmap over a stack of gradients runs the jnp path here."""
  tx, params, state, grads = _problem()
  stacked = jax.tree.map(lambda g: jnp.stack([g, 2 * g]), grads)
  u, _ = jax.vmap(tx.update, in_axes=(0, None, None))(stacked, state, params)
  u0, _ = tx.update(grads, state, params)
  chex.assert_trees_all_close(u["w"][0], u0["w"], rtol=1e-6)
