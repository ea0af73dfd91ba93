"""A GPU user's first step never crashes: each kernel configuration is tried once.

The kernels are compiled for an H100 in CI without a GPU (deviceless, see
``aot``), but a user's GPU may have another architecture or their jax another
Triton. Before a step that would launch the fused kernel on a local CUDA GPU
is lowered, :func:`kernel_works` compiles the same configuration (code maps,
block size, rounding, dtype, tiling) on a few blocks, runs it on that GPU and
compares it with the jnp path (in a separate thread: the step being traced
stays untouched). If anything fails, that configuration takes the
jnp path, one warning says why (once per process), and
:func:`kernel_failures` lists every failed configuration. The result is
cached per configuration, so the check costs one small compile per layout.

It cannot catch a failure that kills the process (an LLVM fatal error aborts
the interpreter); the compile tests in CI exist for those.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from stquant_jax._src.codec.maps import CodeMap
from stquant_jax._src.codec.quantized import QuantizedArray
from stquant_jax._src.kernels.adam_update import adam_update_leaf
from stquant_jax._src.kernels.tiling import DEFAULT_TILING, Tiling
from stquant_jax._src.update.adam import adam_leaf

_RESULTS: dict[tuple, str | None] = {}
_WARNED = [False]


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """What makes two fused-kernel launches compile to the same Triton code."""

  mu_map: CodeMap
  nu_map: CodeMap
  block_size: int
  rounding: tuple[str, str]
  dtype: str
  tiling: Tiling = DEFAULT_TILING


def local_cuda_device():
  """This process' first CUDA device, or None (CPU hosts, deviceless compiles)."""
  try:
    devices = jax.devices("cuda")
  except RuntimeError:
    return None
  return devices[0] if devices else None


def _example(config: KernelConfig, device):
  """Inputs spanning two programs, the last one partial, with a ragged tail."""
  n_blocks = config.tiling.blocks_per_program + 1
  size = n_blocks * config.block_size - 3
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal(size) * 1e-3, jnp.dtype(config.dtype))
  moments = []
  for cmap in (config.mu_map, config.nu_map):
    words = config.block_size * cmap.bits // 32
    codes = rng.integers(0, 2**32, (n_blocks, words), dtype=np.uint32)
    scales = np.abs(rng.standard_normal(n_blocks)).astype(np.float32) * 1e-3
    moments.append(QuantizedArray(jnp.asarray(codes), jnp.asarray(scales), cmap,
                                  config.block_size, (size,), jnp.dtype(jnp.float32)))
  return jax.device_put((g, *moments), device)


def _run_both(config: KernelConfig, device):
  hp = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=jnp.float32(0.1),
            bc2=jnp.float32(1e-3), rounding=config.rounding, step=jnp.int32(3), leaf=1)
  args = _example(config, device)
  kernel = jax.jit(lambda g, m, v: adam_update_leaf(g, m, v, **hp, tiling=config.tiling))
  got = kernel.lower(*args).compile()(*args)
  want = jax.jit(lambda g, m, v: adam_leaf(g, m, v, **hp))(*args)
  return jax.device_get(got), jax.device_get(want)


def _check(got, want):
  (u, mu, nu), (ru, rmu, rnu) = got, want
  u, ru = np.asarray(u, np.float64), np.asarray(ru, np.float64)
  scale = max(float(np.abs(ru).max()), 1e-30)
  if not np.all(np.abs(u - ru) <= 1e-5 * scale):  # the contract: ~1 ulp (FMA contraction)
    raise AssertionError(f"update differs from the jnp path by {np.abs(u - ru).max():.3g}")
  for name, a, b in (("m", mu, rmu), ("v", nu, rnu)):
    if not np.allclose(np.asarray(a.scales), np.asarray(b.scales), rtol=1e-5, atol=0):
      raise AssertionError(f"{name} block scales differ from the jnp path")


def kernel_works(config: KernelConfig, device=None) -> bool:
  """Whether the fused kernel compiles, runs and agrees with the jnp path on ``device``.

  Args:
    config: the kernel configuration.
    device: a local CUDA device; default :func:`local_cuda_device`. With no CUDA
      device (nothing to run on) the answer is True: compile-time checks for an
      H100 run in CI instead.

  Returns:
    True when the kernel can be used; False (after one warning per process) when
    it failed, with the reason in :func:`kernel_failures`.
  """
  device = local_cuda_device() if device is None else device
  if device is None:
    return True
  key = (config, str(device))
  if key not in _RESULTS:
    try:
      # Called while a step is being traced: a fresh thread has a clean trace state and
      # no mesh context, so the check runs eagerly and apart from that step.
      with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: _check(*_run_both(config, device))).result()
      _RESULTS[key] = None
    except Exception as e:  # noqa: BLE001  (any failure means: do not use the kernel)
      _RESULTS[key] = f"{type(e).__name__}: {e}"
      _warn(config, device, _RESULTS[key])
  return _RESULTS[key] is None


def _warn(config: KernelConfig, device, reason: str):
  if _WARNED[0]:
    return
  _WARNED[0] = True
  warnings.warn(
      f"stquant_jax: the fused Pallas kernel failed its first-use check on {device} "
      f"({config.mu_map.name}/{config.nu_map.name}, block {config.block_size}, "
      f"{config.dtype}): {reason.splitlines()[0][:300]}. Using the jnp path for this "
      "configuration (same results, slower); pallas_kernels.kernel_failures() lists "
      "every failed configuration. Pass backend='jnp' to silence this.",
      RuntimeWarning, stacklevel=3)


def kernel_failures() -> dict:
  """``{(KernelConfig, device name): reason}`` for every configuration that failed."""
  return {k: v for k, v in _RESULTS.items() if v is not None}
