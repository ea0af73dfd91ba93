"""stquant-jax: low-bit, block-wise quantized Adam states for optax.

Public API:

* :func:`quantize`, :func:`dequantize`, :class:`QuantizedArray`,
  :class:`CodeMap`, :func:`default_map`: the quantization engine.
* :func:`scale_by_stquant`, :func:`adam`, :func:`adamw`: optax transforms.
* :class:`Policy`, :class:`FixedBits`: bit allocation.
* :func:`state_nbytes`, :func:`average_bits`: memory accounting.
"""

from stquant_jax._accounting import average_bits, state_nbytes
from stquant_jax._alias import adam, adamw
from stquant_jax._maps import CodeMap, default_map
from stquant_jax._policy import FixedBits, Policy
from stquant_jax._quantize import QuantizedArray, dequantize, quantize
from stquant_jax._transform import ScaleByStquantState, scale_by_stquant
from stquant_jax._stquant_policy import STQuantPolicy, STQuantPolicyState
from stquant_jax._relayout import relayout
from stquant_jax._telemetry import BitHistory, bit_widths
from stquant_jax._factor_selection import select_factors

__version__ = "0.1.0"

__all__ = [
    "BitHistory",
    "STQuantPolicy",
    "STQuantPolicyState",
    "bit_widths",
    "relayout",
    "select_factors",
    "CodeMap",
    "FixedBits",
    "Policy",
    "QuantizedArray",
    "ScaleByStquantState",
    "adam",
    "adamw",
    "average_bits",
    "default_map",
    "dequantize",
    "quantize",
    "scale_by_stquant",
    "state_nbytes",
]
