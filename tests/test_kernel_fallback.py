"""A GPU user's first step never crashes: a kernel that fails its first-use check on the
local GPU is replaced by the jnp path, with one warning.

There is no GPU here, so the GPU is simulated: ``self_test.local_cuda_device`` returns
a stand-in and the check's compile-and-run (``self_test._run_both``) is replaced by a
failure, a wrong result or a pass; the step is then lowered for CUDA and inspected.
(The check's own kernel compiles for an H100: ``tests/test_cuda_compile.py``.)
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pallas_kernels as pk
import stquant_jax as sq
from stquant_jax._src.kernels import self_test
from stquant_jax._src.update.adam import adam_leaf

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

CFG = self_test.KernelConfig(sq.default_map(4, True), sq.default_map(4, False), 128,
                             ("stochastic", "stochastic"), "float32")


@pytest.fixture
def fake_gpu(monkeypatch):
  monkeypatch.setattr(self_test, "_RESULTS", {})
  monkeypatch.setattr(self_test, "_WARNED", [False])
  monkeypatch.setattr(self_test, "local_cuda_device", lambda: "FakeGPU(sm_120)")
  return monkeypatch


def _lower_step():
  params = {"a": jnp.ones((128, 64)), "b": jnp.ones((64, 128)), "c": jnp.zeros((8,))}
  tx = sq.adamw(1e-3, policy=sq.FixedBits(8, 4))
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return pk.lower_for_cuda(step, params, state, params)


def _jnp_pair(config, du=0.0):
  """``(got, want)`` as ``_run_both`` returns them, both from the jnp path (``du`` is
  added to the 'kernel' update)."""
  g, mu, nu = self_test._example(config, jax.devices("cpu")[0])
  hp = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=0.1, bc2=1e-3,
            rounding=config.rounding, step=3, leaf=1)
  want = jax.device_get(jax.jit(lambda g, m, v: adam_leaf(g, m, v, **hp))(g, mu, nu))
  return (want[0] + np.float32(du),) + tuple(want[1:]), want


def test_failing_kernel_falls_back_to_jnp_with_one_warning(fake_gpu):
  def fail(config, device):
    raise RuntimeError("Triton: unsupported target sm_120")
  fake_gpu.setattr(self_test, "_run_both", fail)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    text = _lower_step() + _lower_step()  # two quantized leaves, traced twice
  assert pk.TRITON_CALL not in text
  ours = [str(w.message) for w in caught if "first-use check" in str(w.message)]
  assert len(ours) == 1, ours
  assert "FakeGPU" in ours[0] and "jnp path" in ours[0]
  failures = pk.kernel_failures()
  assert len(failures) == 1 and "sm_120" in next(iter(failures.values()))


def test_wrong_results_also_fall_back(fake_gpu):
  wrong = _jnp_pair(CFG, 1.0)  # computed here: lowering for CUDA runs under an abstract mesh
  fake_gpu.setattr(self_test, "_run_both", lambda config, device: wrong)
  with pytest.warns(RuntimeWarning, match="differs from the jnp path"):
    text = _lower_step()
  assert pk.TRITON_CALL not in text


def test_passing_check_keeps_the_kernel_and_is_cached(fake_gpu):
  calls, same = [], _jnp_pair(CFG)

  def ok(config, device):
    calls.append(config)
    return same
  fake_gpu.setattr(self_test, "_run_both", ok)
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    text = _lower_step() + _lower_step()
  assert text.count(pk.TRITON_CALL) >= 2
  assert len(calls) == 1  # one configuration (8/4 bits, float32), checked once


def test_check_runs_eagerly_while_a_step_is_traced(fake_gpu):
  """The real check (compile, run, compare) inside ``jax.jit(...).lower``: on this CPU,
  with the kernel in interpret mode standing in for the GPU build. It must run eagerly
  (not into the step's trace) and pass."""
  import functools
  cpu = jax.devices("cpu")[0]
  fake_gpu.setattr(self_test, "local_cuda_device", lambda: cpu)
  fake_gpu.setattr(self_test, "adam_update_leaf",
                   functools.partial(pk.adam_update_leaf, interpret=True))
  params = {"a": jnp.ones((128, 64))}
  tx = sq.adamw(1e-3, policy=sq.FixedBits(8, 4))
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    jax.jit(tx.update).lower(params, tx.init(params), params)
  assert self_test._RESULTS and all(v is None for v in self_test._RESULTS.values())


def test_no_gpu_means_no_check():
  """A CPU host (or a deviceless compile for an H100) has nothing to run the check on:
  the kernel is kept for CUDA lowering, and the compile tests vouch for it."""
  assert self_test.local_cuda_device() is None
  assert self_test.kernel_works(CFG)


def test_example_covers_a_partial_program_and_a_ragged_tail():
  g, mu, nu = self_test._example(CFG, jax.devices("cpu")[0])
  rows = CFG.tiling.blocks_per_program
  assert mu.scales.shape == (rows + 1,) and g.shape == ((rows + 1) * 128 - 3,)
  self_test._check(*_jnp_pair(CFG))
  with pytest.raises(AssertionError):
    self_test._check(*_jnp_pair(CFG, 1e-2))
