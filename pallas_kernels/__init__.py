"""Pallas (Triton backend) GPU kernels for stquant-jax (public names).

The code lives in ``stquant_jax/_src/kernels/`` (one module per kernel, each
beside its jnp reference); this package is their public face.

* :func:`quantize_blocks_pallas` / :func:`dequantize_blocks_pallas`: block-wise
  (de)quantization of the library's ``[n_blocks, block_size]`` layout,
  bit-exact twins of ``stquant_jax._src.codec.blocks.quantize_blocks`` /
  ``dequantize_blocks``.
* :func:`adam_update_leaf`: the fused Adam step on one leaf's quantized m and
  v (read codes, dequantize, Adam in float32, requantize in place, write the
  update), optionally with AdamW's weight decay and learning rate fused.
* :func:`adam_hparams` / :func:`adam_counter`: the fused kernel's scalar inputs
  (hyperparameters; the stochastic rounding counter).
* ``*_reference``: the plain-jnp twins the tests compare against.
* :class:`Tiling`: launch configuration.
* :func:`lower_for_cuda`: lower a function for CUDA on a CPU-only machine.
* :func:`compile_for_target` / :func:`lower_for_target`, :data:`H100`,
  :func:`memory_summary`: compile a function for an H100 on a CPU-only machine
  (deviceless ahead-of-time; needs the ``cuda-compile`` extra) and read its
  memory use.
* :func:`kernel_failures`: kernel configurations that failed their first-use
  check on this process' GPU (they run the jnp path).

Every kernel takes ``interpret=True`` to run on CPU (tests); on a GPU it lowers
through the Triton backend. Block sizes must be powers of two >= 32.
"""

from stquant_jax._src.kernels.aot import (
    H100, H100_HBM_BYTES_PER_S, SPILL_FLAG, CudaTarget, compile_for_target, lower_for_target,
    memory_summary)
from stquant_jax._src.kernels.adam_update import (
    adam_hparams, adam_update_blocks_pallas, adam_update_leaf, adam_update_reference,
    supports)
from stquant_jax._src.kernels.adam_update import counter as adam_counter
from stquant_jax._src.kernels.dequantize import (
    dequantize_blocks_pallas, dequantize_blocks_reference)
from stquant_jax._src.kernels.lowering import TRITON_CALL, lower_for_cuda
from stquant_jax._src.kernels.quantize import quantize_blocks_pallas, quantize_blocks_reference
from stquant_jax._src.kernels.self_test import kernel_failures
from stquant_jax._src.kernels.tiling import DEFAULT_TILING, Tiling

__all__ = [
    "CudaTarget",
    "DEFAULT_TILING",
    "H100",
    "H100_HBM_BYTES_PER_S",
    "SPILL_FLAG",
    "TRITON_CALL",
    "Tiling",
    "adam_counter",
    "adam_hparams",
    "adam_update_blocks_pallas",
    "adam_update_leaf",
    "adam_update_reference",
    "compile_for_target",
    "dequantize_blocks_pallas",
    "dequantize_blocks_reference",
    "kernel_failures",
    "lower_for_cuda",
    "lower_for_target",
    "memory_summary",
    "quantize_blocks_pallas",
    "quantize_blocks_reference",
    "supports",
]
