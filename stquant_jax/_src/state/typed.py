"""Typed moments back from the containers wrappers hand them over in.

``flax.nnx.Optimizer`` returns the optimizer state as ``nnx.State``: each
:class:`~stquant_jax.QuantizedArray` becomes a bare ``{codes, scales}``
mapping and its static metadata is gone. Everything is recoverable: the
bit-width from the codes' shape (``words per block * 32 / block_size``), the
map from the transform's configuration, the shape from the gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from stquant_jax._src.codec.quantized import QuantizedArray, is_quantized


def is_moment_mapping(x) -> bool:
  """A quantized moment stripped to a ``{codes, scales}`` mapping (e.g. ``nnx.State``)."""
  return isinstance(x, Mapping) and set(x.keys()) == {"codes", "scales"}


def typed_moment(moment, shape, signed: bool, block_size, maps):
  """Rebuilds a :class:`QuantizedArray` from a bare ``{codes, scales}`` mapping.

  Other moments (quantized arrays, float32 arrays, placeholders, None) come
  back as they are.

  Args:
    moment: one moment leaf of the state.
    shape: the parameter's shape.
    signed: True for m, False for v.
    block_size: the transform's static block size (None when traced).
    maps: ``maps(bits, signed) -> CodeMap``, the transform's map choice.
  """
  if is_quantized(moment) or not isinstance(moment, Mapping):
    return moment
  if not is_moment_mapping(moment):
    raise TypeError(f"unrecognised moment state with keys {sorted(moment.keys())}")
  if block_size is None:
    raise TypeError("rebuilding quantized moments needs a static block_size (with "
                    "optax.inject_hyperparams pass static_args=('block_size',))")
  codes, scales = moment["codes"], moment["scales"]
  bits, rem = divmod(codes.shape[-1] * 32, block_size)
  if rem or codes.ndim != 2:
    raise ValueError(f"codes of shape {codes.shape} do not fit block_size={block_size}")
  return QuantizedArray(codes, scales, maps(bits, signed), block_size, tuple(shape),
                        jnp.dtype(jnp.float32))
