"""Fused Adam step on quantized moments: one kernel pass per leaf.

Per quantization block the kernel reads the gradient, the packed m and v codes
and their scales (and the parameter, for fused AdamW), dequantizes, applies
Adam in float32 with the same operations as ``stquant_jax``'s per-leaf update
(IEEE-rounded division and sqrt on the GPU, see ``exact_math``), writes the update
and requantizes m and v with fresh block scales into the same buffers
(``input_output_aliases``; truly in place when the caller donates the state).
The update is written into the gradient's buffer: inside a train step the
gradient is a temporary, so no parameter-sized update buffer is allocated
(XLA copies the gradient first only when something reads it afterwards).

.. math::
  m = \\beta_1 \\hat m + (1 - \\beta_1) g,\\quad
  v = \\beta_2 \\hat v + (1 - \\beta_2) g^2,\\quad
  u = \\frac{m / bc_1}{\\sqrt{v / bc_2 + \\epsilon_{root}} + \\epsilon}

Hyperparameters travel as one small float32 vector input, so traced values
(``inject_hyperparams``, schedules, the step count) never recompile. Entries
``1 - b1`` and ``1 - b2`` are computed outside the kernel with the same Python
or jnp arithmetic as the reference, so a Python ``b1=0.9`` gives the same
float32 ``1 - b1`` on both paths.

The gradient and update stay 1-D (``[size]``, no padding copy): each program
takes a ``rows * block_size`` slice, the tail beyond ``size`` is masked, and m
and v are zeroed there before their block scales are taken, exactly as the
reference pads the new moments with zeros.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import jax.experimental.pallas as pl

from stquant_jax._src.codec.maps import CodeMap
from stquant_jax._src.codec.quantized import QuantizedArray, is_quantized
from stquant_jax._src.codec.rounding import uniform_noise
from stquant_jax._src.kernels import exact_math
from stquant_jax._src.kernels.dequantize import load_and_decode
from stquant_jax._src.kernels.quantize import encode_and_store
from stquant_jax._src.kernels.tiling import DEFAULT_TILING, Tiling, check_block_size, out_like
from stquant_jax._src.update.adam import NEAREST, adam_leaf

_B1, _C1, _B2, _C2, _EPS, _EPS_ROOT, _BC1, _BC2, _WD, _NEG_LR = range(10)
_N_HPARAMS = 16  # padded to a power of two


def _adam_kernel(hp_ref, ctr_ref, g_ref, mc_ref, ms_ref, vc_ref, vs_ref, *refs,
                 mu_map: CodeMap, nu_map: CodeMap, block: int, rows: int,
                 size: int, adamw: bool, rounding: tuple[str, str], ieee: bool):
  p_ref = refs[0] if adamw else None
  u_ref, mc_out, ms_out, vc_out, vs_out = refs[1:] if adamw else refs
  hp = lambda k: hp_ref[k]
  div = functools.partial(exact_math.div, ieee=ieee)
  start = pl.program_id(0) * (rows * block)
  idx = (start + jax.lax.broadcasted_iota(jnp.int32, (rows, block), 0) * block
         + jax.lax.broadcasted_iota(jnp.int32, (rows, block), 1))
  valid = idx < size
  g = jnp.where(valid, g_ref[...].astype(jnp.float32).reshape(rows, block), 0.0)
  m = hp(_B1) * load_and_decode(mc_ref, ms_ref, mu_map, block, ieee=ieee) + hp(_C1) * g
  v = hp(_B2) * load_and_decode(vc_ref, vs_ref, nu_map, block, ieee=ieee) + hp(_C2) * (g * g)
  u = div(div(m, hp(_BC1)),
          exact_math.sqrt(div(v, hp(_BC2)) + hp(_EPS_ROOT), ieee=ieee) + hp(_EPS))
  dt = u_ref.dtype
  if adamw:  # optax: u.astype(dt); u + wd * p; -lr * that, each rounded to dt.
    rnd = lambda x: x.astype(dt).astype(jnp.float32)
    p = p_ref[...].astype(jnp.float32).reshape(rows, block)
    u = rnd(hp(_NEG_LR) * rnd(rnd(u) + rnd(hp(_WD) * p)))
  u_ref[...] = u.astype(dt).reshape(rows * block)
  # Where m or v is not finite both are stored as 0 (update.adam.finite_moments).
  keep = valid & jnp.isfinite(m) & jnp.isfinite(v)
  # Stochastic rounding numbers of (step, leaf, global element index), as
  # update.adam.moment_noise; ctr_ref[2] offsets the index of a shard's first element.
  gidx = idx.astype(jnp.uint32) + ctr_ref[2]
  noise = [None if r == "nearest" else uniform_noise(gidx, ctr_ref[0], 2 * ctr_ref[1] + k)
           for k, r in enumerate(rounding)]
  encode_and_store(jnp.where(keep, m, 0.0), mc_out, ms_out, mu_map, noise[0], ieee=ieee)
  encode_and_store(jnp.where(keep, v, 0.0), vc_out, vs_out, nu_map, noise[1], ieee=ieee)


@functools.partial(jax.jit, static_argnames=(
    "mu_map", "nu_map", "block_size", "rounding", "interpret", "tiling"))
def adam_update_blocks_pallas(hparams, counter, g, m_codes, m_scales, v_codes, v_scales,
                              param=None, *, mu_map: CodeMap, nu_map: CodeMap,
                              block_size: int, rounding: tuple[str, str] = NEAREST,
                              interpret: bool = False, tiling: Tiling | None = None):
  """Launches the fused kernel on flat arrays (the layer under :func:`adam_update_leaf`).

  Args:
    hparams: float32 ``[16]`` from :func:`adam_hparams`.
    counter: uint32 ``[4]`` from :func:`counter`: the stochastic rounding counter.
    g: gradient ``[size]``, any float dtype; the update has its dtype and is
      written into its buffer.
    m_codes, m_scales, v_codes, v_scales: the packed moments
      (``[n_blocks, words]`` and ``[n_blocks]``), updated in place.
    param: optional parameter ``[size]``: fuses AdamW's decoupled weight decay
      and the learning rate, so the output is the final update.
    mu_map, nu_map: static code maps of m and v (widths may differ).
    block_size: values per quantization block (power of two >= 32).
    interpret: Pallas interpret mode (CPU).
    rounding: ``(m, v)`` rounding, ``"nearest"`` or ``"stochastic"``.
    tiling: launch configuration.

  Returns:
    ``(u, m_codes, m_scales, v_codes, v_scales)``.
  """
  tiling = tiling or DEFAULT_TILING
  check_block_size(block_size)
  (size,) = g.shape
  n_blocks = m_scales.shape[0]
  if size > n_blocks * block_size or n_blocks * block_size - size >= block_size:
    raise ValueError(f"{size=} does not fit {n_blocks} blocks of {block_size}")
  if n_blocks * block_size + tiling.blocks_per_program * block_size >= 2**31:
    raise ValueError(f"{size=} too large for the kernel's int32 element indices")
  rows = tiling.rows(n_blocks)
  adamw = param is not None
  flat = pl.BlockSpec((rows * block_size,), lambda i: (i,))
  row_spec = pl.BlockSpec((rows,), lambda i: (i,))
  words = lambda c: pl.BlockSpec((rows, c.shape[1]), lambda i: (i, 0))
  state_specs = [words(m_codes), row_spec, words(v_codes), row_spec]
  in_specs = [pl.BlockSpec((_N_HPARAMS,), lambda i: (0,)), pl.BlockSpec((4,), lambda i: (0,)),
              flat, *state_specs] + [flat] * adamw
  args = (hparams, counter, g, m_codes, m_scales, v_codes, v_scales) + (param,) * adamw
  out_shape = [out_like(*args, shape=a.shape, dtype=a.dtype) for a in args[2:7]]
  kernel = functools.partial(
      _adam_kernel, mu_map=mu_map, nu_map=nu_map, block=block_size, rows=rows,
      size=size, adamw=adamw, rounding=rounding, ieee=not interpret)
  return tuple(pl.pallas_call(
      kernel,
      grid=tiling.grid(n_blocks),
      in_specs=in_specs,
      out_specs=[flat, *state_specs],
      out_shape=out_shape,
      input_output_aliases={2: 0, 3: 1, 4: 2, 5: 3, 6: 4},
      compiler_params=tiling.compiler_params(),
      interpret=interpret,
      name=f"stquant_adam_{mu_map.name}_{nu_map.name}" + (
          "" if rounding == NEAREST else f"_{rounding[0][0]}{rounding[1][0]}"),
  )(*args))


def adam_hparams(b1, b2, eps, eps_root, bc1, bc2, weight_decay=0.0, learning_rate=0.0):
  """Packs the scalars into the kernel's float32 ``[16]`` input.

  ``1 - b1`` and ``1 - b2`` are computed here with the caller's types (Python
  floats stay double until the float32 cast), matching ``update_fn``'s
  ``(1 - b1) * g``; ``-learning_rate`` matches optax's ``scale(-1 * lr)``.
  """
  vals = [b1, 1 - b1, b2, 1 - b2, eps, eps_root, bc1, bc2, weight_decay,
          -1 * learning_rate]
  vals += [0.0] * (_N_HPARAMS - len(vals))
  return jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in vals])


def _check_leaf(g, mu, nu, param):
  for name, q in (("mu", mu), ("nu", nu)):
    if not is_quantized(q):
      raise TypeError(f"{name} must be a QuantizedArray, got {type(q).__name__}")
    if tuple(q.shape) != tuple(g.shape):
      raise ValueError(f"{name}.shape={q.shape} does not match gradient shape {g.shape}")
  if mu.block_size != nu.block_size:
    raise ValueError(f"mu.block_size={mu.block_size} != nu.block_size={nu.block_size}")
  if not jnp.issubdtype(g.dtype, jnp.floating):
    raise TypeError(f"gradient must be floating, got {g.dtype}")
  if param is not None and (tuple(param.shape), param.dtype) != (tuple(g.shape), g.dtype):
    raise ValueError(f"param {param.shape} {param.dtype} must match the gradient's "
                     f"shape and dtype {g.shape} {g.dtype}")


def supports(mu, nu, *, tiling: Tiling | None = None) -> bool:
  """Whether :func:`adam_update_leaf` can update these moments (else use the jnp path).

  Both must be :class:`~stquant_jax.QuantizedArray` with the same power-of-two
  block size >= 32 in the plain layout (the per-shard layout of a leaf sharded
  on a later axis streams through the jnp path), and the leaf must fit the
  kernel's int32 element indices.
  """
  if not (is_quantized(mu) and is_quantized(nu)) or mu.shards or nu.shards:
    return False
  block = mu.block_size
  if block != nu.block_size or block < 32 or block & (block - 1):
    return False
  rows = (tiling or DEFAULT_TILING).blocks_per_program
  return (mu.scales.shape[0] + rows) * block < 2**31


def counter(step, leaf, offset=0):
  """The kernel's uint32 ``[4]`` stochastic rounding counter: ``(step, leaf, offset, 0)``.

  ``offset`` is the global flat index of the first element the kernel sees (0 for a
  whole leaf; a shard's start when the kernel runs on one shard), so the numbers
  match :func:`stquant_jax._src.update.adam.moment_noise` on the whole leaf.
  """
  u32 = lambda x: jnp.asarray(x).astype(jnp.uint32).reshape(())
  return jnp.stack([u32(step), u32(leaf), u32(offset), jnp.uint32(0)])


def adam_update_leaf(g, mu: QuantizedArray, nu: QuantizedArray, *, b1, b2, eps,
                     eps_root, bc1, bc2, rounding=NEAREST, step=0, leaf: int = 0,
                     param=None, weight_decay=None, learning_rate=None,
                     interpret: bool = False, tiling: Tiling | None = None):
  """One fused Adam step for one leaf with quantized moments (Pallas/Triton).

  Same operations as ``stquant_jax.scale_by_stquant``'s per-leaf update. Results
  match the jitted jnp path bit for bit in most steps; the one difference is
  where the compiler contracts ``b1 * m + (1 - b1) * g`` into an FMA, which can
  move m or v by 1 ulp, hence u by ~1 ulp, a block scale by 1 ulp, or a rare
  element by one code (``tests/test_pallas_adam.py`` states the contract).

  Args:
    g: gradient of any shape and float dtype (computed in float32).
    mu, nu: the quantized first and second moments (same shape and block size
      as ``g``; bit-widths and maps may differ).
    b1, b2, eps, eps_root: Adam hyperparameters (Python floats or traced).
    bc1, bc2: bias corrections ``1 - b1**t`` and ``1 - b2**t`` (traced ok).
    rounding, step, leaf: ``(m, v)`` rounding and the stochastic rounding
      counter, as :func:`stquant_jax._src.update.adam.adam_leaf`.
    param: optional parameter: fuses optax's ``add_decayed_weights`` and
      ``scale_by_learning_rate``; then ``weight_decay`` and ``learning_rate``
      are required and the returned update is ``-lr * (u + wd * param)``.
    weight_decay, learning_rate: scalars for the fused AdamW form.
    interpret: Pallas interpret mode (CPU).
    tiling: launch configuration; default :data:`~pallas_kernels.DEFAULT_TILING`.

  Returns:
    ``(u, new_mu, new_nu)``; ``u`` has ``g``'s shape and dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> import stquant_jax as sq
    >>> from pallas_kernels import adam_update_leaf
    >>> g = jnp.ones((3, 50))
    >>> mu = sq.quantize(jnp.zeros((3, 50)), 4)
    >>> nu = sq.quantize(jnp.zeros((3, 50)), 4, signed=False)
    >>> u, mu, nu = adam_update_leaf(g, mu, nu, b1=0.9, b2=0.999, eps=1e-8,
    ...     eps_root=0.0, bc1=0.1, bc2=0.001, interpret=True)
    >>> u.shape, round(float(u[0, 0]), 4), mu.bits
    ((3, 50), 1.0, 4)
  """
  _check_leaf(g, mu, nu, param)
  if (param is None) != (weight_decay is None) or (param is None) != (learning_rate is None):
    raise ValueError("param, weight_decay and learning_rate go together (fused AdamW)")
  if g.size == 0:
    return jnp.zeros_like(g), mu, nu
  hp = adam_hparams(b1, b2, eps, eps_root, bc1, bc2,
                    0.0 if weight_decay is None else weight_decay,
                    0.0 if learning_rate is None else learning_rate)
  flat_p = None if param is None else param.reshape(-1)
  u, mc, ms, vc, vs = adam_update_blocks_pallas(
      hp, counter(step, leaf), g.reshape(-1), mu.codes, mu.scales, nu.codes, nu.scales,
      flat_p, mu_map=mu.code_map, nu_map=nu.code_map, block_size=mu.block_size,
      rounding=tuple(rounding), interpret=interpret, tiling=tiling)
  return (u.reshape(g.shape), dataclasses.replace(mu, codes=mc, scales=ms),
          dataclasses.replace(nu, codes=vc, scales=vs))


def adam_update_reference(g, mu: QuantizedArray, nu: QuantizedArray, *, b1, b2,
                          eps, eps_root, bc1, bc2, rounding=NEAREST, step=0, leaf: int = 0,
                          param=None, weight_decay=None, learning_rate=None):
  """The jnp reference: :func:`stquant_jax._src.update.adam.adam_leaf` (+ optax's AdamW tail).

  Exactly the per-leaf update of ``scale_by_stquant``'s jnp path; with
  ``param`` also optax's ``add_decayed_weights`` and ``scale_by_learning_rate``
  (``-lr * (u + wd * param)``). Compare against it under ``jax.jit``: XLA
  contracts ``a * b + c`` into an FMA inside fusions, so eager op-by-op results
  can differ from jitted ones (and from the kernel) in the last bit.
  """
  _check_leaf(g, mu, nu, param)
  u, new_mu, new_nu = adam_leaf(g, mu, nu, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                                bc1=bc1, bc2=bc2, rounding=rounding, step=step, leaf=leaf)
  if param is not None:
    u = (-1 * learning_rate) * (u + weight_decay * param)
  return u, new_mu, new_nu
