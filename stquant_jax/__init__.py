"""stquant-jax: low-bit, block-wise quantized Adam states for optax.

Public API:

* :func:`quantize`, :func:`dequantize`, :class:`QuantizedArray`,
  :class:`CodeMap`, :func:`default_map`: the quantization engine.
* :func:`scale_by_stquant`, :func:`adam`, :func:`adamw`: optax transforms.
* :func:`quantized`: any optax transform with its parameter-shaped state
  quantized; :func:`lion`, :func:`sgd`, :func:`rmsprop`, :func:`ademamix` on it.
* :class:`Policy`, :class:`FixedBits`, :class:`STQuantPolicy`: bit allocation
  (fixed, or adaptive per layer, state and training phase).
* :func:`relayout`: applies an adaptive policy's proposed bit-widths (outside jit).
* :func:`abstract_state`: the abstract state (``ShapeDtypeStruct`` s) of a bit layout.
* :func:`adaptive_jit`: a jitted train step that compiles proposed layouts ahead of
  time and switches without a compile stall (plain jit, flax.nnx, sharded, pmap).
* :class:`BitHistory`, :func:`bit_widths`: bit-width telemetry.
* :func:`state_nbytes`, :func:`average_bits`: memory accounting; :func:`summary`: a
  per-leaf table (shape, bits, zone, bytes) of a state.
* :func:`plain_state`: a ``flax.nnx.Optimizer``'s state in optax's own form (typed
  :class:`QuantizedArray` moments, no ``nnx.Variable`` wrappers).
* :func:`state_shardings`: shardings of the optimizer state for sharded
  params (FSDP), each quantized moment sharded like its parameter.
* :func:`save_state`, :func:`restore_state`, :func:`checkpoint_args`: orbax
  checkpoints of the full optimizer state, bit layout included.
"""

from stquant_jax._src.checkpoint.orbax_io import checkpoint_args, restore_state, save_state
from stquant_jax._src.codec.maps import CodeMap, default_map
from stquant_jax._src.codec.quantized import QuantizedArray, dequantize, quantize
from stquant_jax._src.distributed.state_shardings import state_shardings
from stquant_jax._src.layout.abstract import abstract_state
from stquant_jax._src.layout.accounting import average_bits, state_nbytes
from stquant_jax._src.layout.relayout import relayout
from stquant_jax._src.layout.summary import summary
from stquant_jax._src.layout.telemetry import BitHistory, bit_widths
from stquant_jax._src.policy.base import FixedBits, Policy
from stquant_jax._src.policy.stquant import STQuantPolicy, STQuantPolicyState
from stquant_jax._src.state.opt_state import ScaleByStquantState
from stquant_jax._src.state.typed import typed_tree as plain_state
from stquant_jax._src.stepping.adaptive_jit import AdaptiveJit, adaptive_jit
from stquant_jax._src.transform.alias import adam, adamw
from stquant_jax._src.transform.quantized import QuantizedState, quantized
from stquant_jax._src.transform.quantized_alias import ademamix, lion, rmsprop, sgd
from stquant_jax._src.transform.scale_by_stquant import scale_by_stquant

__version__ = "0.1.0"

__all__ = [
    "AdaptiveJit",
    "BitHistory",
    "CodeMap",
    "FixedBits",
    "Policy",
    "QuantizedArray",
    "QuantizedState",
    "STQuantPolicy",
    "STQuantPolicyState",
    "ScaleByStquantState",
    "adam",
    "ademamix",
    "abstract_state",
    "adamw",
    "adaptive_jit",
    "average_bits",
    "bit_widths",
    "checkpoint_args",
    "default_map",
    "lion",
    "dequantize",
    "plain_state",
    "quantized",
    "quantize",
    "relayout",
    "restore_state",
    "rmsprop",
    "save_state",
    "scale_by_stquant",
    "sgd",
    "state_nbytes",
    "state_shardings",
    "summary",
]
