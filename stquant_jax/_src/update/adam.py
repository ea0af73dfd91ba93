"""The Adam step of one leaf on quantized moments: the math the jnp path and the kernels share.

``dequantize -> Adam in float32 -> requantize``, on whole quantization blocks.
:func:`adam_blocks` is that math on a ``[k, block_size]`` slab of blocks;
:func:`adam_leaf` is the jnp path of :func:`~stquant_jax.scale_by_stquant`: it
streams a leaf through :func:`adam_blocks` a bounded chunk of blocks at a time
(:mod:`~stquant_jax._src.update.stream`), and it is the reference the fused Pallas
kernel (:mod:`stquant_jax._src.kernels.adam_update`) is tested against.
:func:`finite_moments` is the rule both apply to non-finite moments.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from stquant_jax._src.codec.blocks import decode_blocks, encode_blocks, finite_absmax
from stquant_jax._src.codec.packing import group_shape
from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.codec.rounding import uniform_noise
from stquant_jax._src.update.stream import stream_leaf

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


def moment_noise(shape, step, leaf: int, moment: int, first=0):
  """The stochastic-rounding numbers of one moment (0: m, 1: v) of leaf ``leaf`` at
  ``step``, for values laid out row-major in ``shape`` starting at flat element
  ``first`` of the leaf (element ``i`` of the flat leaf gets number ``i``), as
  :func:`~stquant_jax._src.codec.rounding.uniform_noise`."""
  # Built from iotas with ``first`` added to the leading one, so inside a loop nothing of
  # it is loop-invariant: XLA would hoist an invariant index array out of the loop and
  # read it from memory instead of computing it in the fused code.
  index = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + first // math.prod(shape[1:])
  for d in range(1, len(shape)):
    index = index * shape[d] + jax.lax.broadcasted_iota(jnp.int32, shape, d)
  return uniform_noise(index, step, 2 * leaf + moment)


def _first_moment_hat(m, g32, b1, bc1, bc1_next):
  """Bias-corrected m; with ``bc1_next`` (``1 - b1**(t+1)``) Nesterov's look-ahead
  ``b1 * m / bc1_next + (1 - b1) * g / bc1``, ``optax.scale_by_adam(nesterov=True)``'s formula."""
  if bc1_next is None:
    return m / bc1
  return b1 * (m / bc1_next) + (1 - b1) * (g32 / bc1)


def _dense_adam(g32, m, v, *, b1, b2, eps, eps_root, bc1, bc2, bc1_next):
  m = b1 * m + (1 - b1) * g32
  v = b2 * v + (1 - b2) * jnp.square(g32)
  u = _first_moment_hat(m, g32, b1, bc1, bc1_next) / (jnp.sqrt(v / bc2 + eps_root) + eps)
  return u, m, v


def _barrier(*xs):
  return jax.lax.optimization_barrier(xs)


def _identity(*xs):
  return xs


def _inputs_read_once(*xs):
  """On TPU, ``xs`` (a chunk's inputs) read into buffers before anything else: see
  :func:`_outputs_computed_once` for the other platforms."""
  return jax.lax.platform_dependent(*xs, tpu=_barrier, default=_identity)


def _outputs_computed_once(*xs):
  """``xs`` (a chunk's fresh m, v and update) computed once into buffers, except on TPU.

  Without it XLA recomputes the decode and the Adam math in every consumer (the
  update, the block maxima, each moment's codes). On a chunk that fits the CPU's
  and GPU's caches one pass and a re-read are cheaper (2.6x faster on XLA:CPU in
  the streaming loop); a TPU recomputes in registers rather than round-trip
  through HBM, and isolates the reads instead (:func:`_inputs_read_once`). Either
  way every read of the inputs happens before any output exists, which the
  streaming loop needs to update its buffers in place.
  """
  return jax.lax.platform_dependent(*xs, tpu=_identity, default=_barrier)


def adam_blocks(g_KxB, mu, nu, *, b1, b2, eps, eps_root, bc1, bc2, bc1_next=None,
                rounding=NEAREST, step=0, leaf: int = 0, first=0, materialize: bool = False):
  """Adam on ``k`` whole quantization blocks: the per-block math of :func:`adam_leaf`.

  Args:
    g_KxB: gradient blocks ``[k, block_size]``, any float dtype (padding: zeros).
    mu, nu: each a :class:`~stquant_jax.QuantizedArray` holding these ``k``
      blocks (``codes [k, words]``, ``scales [k]``), or float32 ``[k, block_size]``;
      at least one is quantized.
    first: flat index, in the leaf, of the first value of these blocks (may be
      traced; a multiple of ``block_size``): the stochastic rounding counter of
      element ``i`` is ``first + i``.
    materialize: read the inputs once, compute the fresh m, v and update once,
      into buffers (:func:`_outputs_computed_once`), so every input is read before
      any output exists; for callers that hold a bounded number of blocks (the
      streaming loop, ``reads_once``).
    Other arguments: as :func:`adam_leaf`.

  Returns:
    ``(u, new_mu, new_nu)``: float32 ``[k, block_size]`` and the moments in
    their input's kind. Quantized moments are handled in the packing-group view
    ``[k, B // gc, gc]`` so that XLA fuses unpacking, decoding, the Adam math,
    encoding and packing into a few loops.
  """
  if materialize:
    g_KxB, mu, nu = _inputs_read_once(g_KxB, mu, nu)
  ref = mu if is_quantized(mu) else nu
  k, bs = g_KxB.shape
  gc, _ = group_shape(ref.bits)
  view = (k, bs // gc, gc)

  # Regrouping goes through [k, bs] (merge, then split the trailing axes): a direct
  # [k, a, b] -> [k, c, d] reshape is a sharding type error when the block axis is
  # sharded over Explicit mesh axes (m and v of different widths).
  def read(q):
    if is_quantized(q):
      return decode_blocks(q.codes, q.scales, q.code_map).reshape(k, bs).reshape(view)
    return q.reshape(view)

  g3 = g_KxB.astype(jnp.float32).reshape(view)
  u3, m, v = _dense_adam(g3, read(mu), read(nu), b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                         bc1=bc1, bc2=bc2, bc1_next=bc1_next)
  m, v = finite_moments(m, v)
  if materialize:
    u3, m, v = _outputs_computed_once(u3, m, v)
  pairs = [(x, q) for x, q in ((m, mu), (v, nu)) if is_quantized(q)]
  scales = iter(finite_absmax(*(x for x, _ in pairs)))

  def write(x, q, j):
    if not is_quantized(q):
      return x.reshape(k, bs)
    qc = group_shape(q.bits)[0]
    x = x.reshape(k, bs).reshape(k, bs // qc, qc)
    noise = None if rounding[j] == "nearest" else moment_noise(x.shape, step, leaf, j, first)
    scale = next(scales)
    return dataclasses.replace(q, codes=encode_blocks(x, scale, q.code_map, noise),
                               scales=scale)

  return u3.reshape(k, bs), write(m, mu, 0), write(v, nu, 1)


def adam_leaf(g, mu, nu, *, b1, b2, eps, eps_root, bc1, bc2, bc1_next=None,
              rounding=NEAREST, step=0, leaf: int = 0):
  """One leaf of the update: dequantize -> Adam in float32 -> requantize.

  ``mu`` and ``nu`` are each a :class:`~stquant_jax.QuantizedArray` or a
  float32 array of ``g``'s shape. Returns ``(update, new_mu, new_nu)``; the
  update uses the fresh float32 moments. Elements whose new m or v is not
  finite store zero for both (:func:`finite_moments`). ``bc1_next``
  (``1 - b1**(t+1)``) turns on Nesterov momentum (:func:`_first_moment_hat`);
  the fused kernel has no such option.

  A leaf with a quantized moment is streamed
  (:func:`~stquant_jax._src.update.stream.stream_leaf`): a loop over chunks of
  blocks reads each chunk's gradient, codes and scales, runs :func:`adam_blocks`
  and writes the update and the new codes and scales back in place, so the
  compiled step holds a few chunk-sized float32 temporaries whatever the leaf's
  size (the update goes into the gradient's buffer when the caller donates it).
  Under FSDP each device streams its own blocks.

  ``rounding`` is the ``(m, v)`` pair of ``"nearest"`` / ``"stochastic"``
  (:mod:`~stquant_jax._src.codec.rounding`); stochastic rounding draws its
  numbers from ``(step, leaf, element index)``.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> g = jnp.ones((300, 1000))
    >>> mu, nu = sq.quantize(g * 0, 8), sq.quantize(g * 0, 4, signed=False)
    >>> u, mu, nu = adam_leaf(g, mu, nu, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
    ...                       bc1=0.1, bc2=0.001)
    >>> float(u[299, 999]), mu.bits, nu.codes.shape
    (1.0, 8, (2344, 16))
  """
  hp = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, bc1=bc1, bc2=bc2, bc1_next=bc1_next)
  if not (is_quantized(mu) or is_quantized(nu)):
    u, m, v = _dense_adam(g.astype(jnp.float32), mu, nu, **hp)
    return (u.astype(g.dtype),) + finite_moments(m, v)
  return stream_leaf(adam_blocks, g, mu, nu, rounding=tuple(rounding), step=step, leaf=leaf,
                     materialize=True, reads_once=True, **hp)
