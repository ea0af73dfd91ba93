"""The Adam step of one leaf on quantized moments: the math the jnp path and the kernels share.

``dequantize -> Adam in float32 -> requantize``. :func:`adam_leaf` is the jnp
path of :func:`~stquant_jax.scale_by_stquant` and the reference the fused
Pallas kernel (:mod:`stquant_jax._src.kernels.adam_update`) is tested against;
:func:`finite_moments` is the rule both apply to non-finite moments.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from stquant_jax._src.codec.blocks import decode_blocks, encode_blocks, finite_absmax
from stquant_jax._src.codec.packing import group_shape
from stquant_jax._src.codec.quantized import QuantizedArray, is_quantized
from stquant_jax._src.codec.rounding import uniform_noise

NEAREST = ("nearest", "nearest")


def finite_moments(m, v):
  """Zeroes both moments of every element where m or v is not finite.

  A NaN/Inf gradient makes both moments non-finite; a finite gradient above
  ~1.8e19 overflows ``g**2`` so only v is infinite. Keeping such an m while v
  is stored as (nearly) zero would turn the next steps' ``m / sqrt(v)`` into an
  absurd update, so the element restarts from zero moments instead, and block
  scales never see the bad values. The same rule holds for float32 moments,
  the quantized ones and the Pallas kernel.
  """
  ok = jnp.isfinite(m) & jnp.isfinite(v)
  return jnp.where(ok, m, 0.0), jnp.where(ok, v, 0.0)


def moment_noise(shape, step, leaf: int, moment: int):
  """The stochastic-rounding numbers of one moment (0: m, 1: v) of leaf ``leaf`` at
  ``step``, for values laid out row-major in ``shape`` (element ``i`` of the flat
  leaf gets number ``i``), as :func:`~stquant_jax._src.codec.rounding.uniform_noise`."""
  index = jnp.arange(math.prod(shape), dtype=jnp.int32).reshape(shape)
  return uniform_noise(index, step, 2 * leaf + moment)


def _first_moment_hat(m, g32, b1, bc1, bc1_next):
  """Bias-corrected m; with ``bc1_next`` (``1 - b1**(t+1)``) Nesterov's look-ahead
  ``b1 * m / bc1_next + (1 - b1) * g / bc1``, ``optax.scale_by_adam(nesterov=True)``'s formula."""
  if bc1_next is None:
    return m / bc1
  return b1 * (m / bc1_next) + (1 - b1) * (g32 / bc1)


def adam_leaf(g, mu, nu, *, b1, b2, eps, eps_root, bc1, bc2, bc1_next=None,
              rounding=NEAREST, step=0, leaf: int = 0):
  """One leaf of the update: dequantize -> Adam in float32 -> requantize.

  ``mu`` and ``nu`` are each a :class:`~stquant_jax.QuantizedArray` or a
  float32 array of ``g``'s shape. Returns ``(update, new_mu, new_nu)``; the
  update uses the fresh float32 moments. Elements whose new m or v is not
  finite store zero for both (:func:`finite_moments`). Quantized moments are
  handled in the packing-group view ``[n_blocks, B // gc, gc]`` so that XLA
  fuses unpacking, decoding, the Adam math, encoding and packing into a few
  loops: one variadic reduction for the block maxima of m and v, then one
  loop per output. ``bc1_next`` (``1 - b1**(t+1)``) turns on Nesterov momentum
  (:func:`_first_moment_hat`); the fused kernel has no such option.

  ``rounding`` is the ``(m, v)`` pair of ``"nearest"`` / ``"stochastic"``
  (:mod:`~stquant_jax._src.codec.rounding`); stochastic rounding draws its
  numbers from ``(step, leaf, element index)``.
  """
  g32 = g.astype(jnp.float32)
  quantized = [q for q in (mu, nu) if is_quantized(q)]
  if not quantized:
    m = b1 * mu + (1 - b1) * g32
    v = b2 * nu + (1 - b2) * jnp.square(g32)
    u = _first_moment_hat(m, g32, b1, bc1, bc1_next) / (jnp.sqrt(v / bc2 + eps_root) + eps)
    return (u.astype(g.dtype),) + finite_moments(m, v)
  ref = quantized[0]
  nb, bs = ref.scales.shape[0], ref.block_size
  gc, _ = group_shape(ref.bits)
  view = (nb, bs // gc, gc)
  n = g.size

  def to_view(x):
    flat = jnp.ravel(x).astype(jnp.float32)
    return jnp.pad(flat, (0, nb * bs - n)).reshape(view)

  # Regrouping goes through [nb, bs] (merge, then split the trailing axes):
  # a direct [nb, a, b] -> [nb, c, d] reshape is a sharding type error when the
  # block axis is sharded over Explicit mesh axes (m and v of different widths).
  def read(q):
    if is_quantized(q):
      return decode_blocks(q.codes, q.scales, q.code_map).reshape(nb, bs).reshape(view)
    return to_view(q)

  g3 = to_view(g32)
  m = b1 * read(mu) + (1 - b1) * g3
  v = b2 * read(nu) + (1 - b2) * jnp.square(g3)
  u3 = _first_moment_hat(m, g3, b1, bc1, bc1_next) / (jnp.sqrt(v / bc2 + eps_root) + eps)
  u = u3.reshape(-1)[:n].reshape(g.shape).astype(g.dtype)
  m, v = finite_moments(m, v)
  pairs = [(x, q) for x, q in ((m, mu), (v, nu)) if is_quantized(q)]
  scales = finite_absmax(*(x for x, _ in pairs))

  def write(x, q, scale, k):
    if not is_quantized(q):
      return x.reshape(-1)[:n].reshape(g.shape)
    qc = group_shape(q.bits)[0]
    x = x.reshape(nb, bs).reshape(nb, bs // qc, qc)
    noise = None if rounding[k] == "nearest" else moment_noise(x.shape, step, leaf, k)
    codes = encode_blocks(x, scale, q.code_map, noise)
    return QuantizedArray(codes, scale, q.code_map, q.block_size, q.shape, q.dtype)

  it = iter(scales)
  new = [write(x, q, next(it) if is_quantized(q) else None, k)
         for k, (x, q) in enumerate(((m, mu), (v, nu)))]
  return u, new[0], new[1]
