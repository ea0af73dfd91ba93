"""``scale_by_stquant``: Adam scaling with block-wise quantized, bit-packed moments."""

from __future__ import annotations

from typing import Any, NamedTuple

import collections.abc
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stquant_jax import _sharding
from stquant_jax._maps import resolve_map
from stquant_jax._policy import FixedBits, Policy
from stquant_jax._packing import group_shape
from stquant_jax._quantize import (
    DEFAULT_BLOCK_SIZE, QuantizedArray, check_block_size, decode_blocks,
    encode_blocks, finite_absmax, num_blocks)
from stquant_jax._update_checks import moments_for_updates


class ScaleByStquantState(NamedTuple):
  """State of :func:`scale_by_stquant`.

  ``mu`` and ``nu`` mirror the params tree. Each leaf is a
  :class:`~stquant_jax.QuantizedArray` (quantized moment), a float32 array of
  the parameter's shape (a moment the policy keeps in full precision), or a
  float32 ``[0]`` placeholder (integer leaves, which get no moments).
  """

  count: jax.Array  # int32 []
  mu: optax.Updates
  nu: optax.Updates
  policy_state: Any


def _check_hparam(name, value, lo, hi, hi_open=True):
  """Checks a concrete hyperparameter; traced values (inject_hyperparams) pass."""
  if isinstance(value, (jax.Array, np.ndarray)) or isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f"{name} must be a number, got {type(value).__name__}")
  if not (lo <= value and (value < hi if hi_open else value <= hi)):
    bracket = ")" if hi_open else "]"
    raise ValueError(f"{name}={value} must be in [{lo}, {hi}{bracket}")


def static_block_size(block_size):
  """``block_size`` as a Python int; None when traced (inject_hyperparams' update).

  The block size only shapes the state at ``init``; ``update`` reads the layout
  from the state's static metadata, so a traced value there is harmless.
  """
  if isinstance(block_size, jax.core.Tracer):
    return None
  if isinstance(block_size, (jax.Array, np.ndarray)) and block_size.ndim == 0 \
      and jnp.issubdtype(block_size.dtype, jnp.integer):
    block_size = int(block_size)  # inject_hyperparams hands ints over as arrays
  check_block_size(block_size)
  return block_size


BACKENDS = ("auto", "jnp", "pallas")


def _leaf_update_fn(backend: str, mu, nu):
  """The per-leaf update for this backend: jnp reference or the Pallas kernel."""
  platform = jax.default_backend()
  use_pallas = backend == "pallas" or (backend == "auto" and platform == "gpu")
  if not use_pallas:
    return adam_leaf
  import pallas_kernels  # pylint: disable=import-outside-toplevel
  if not pallas_kernels.supports(mu, nu):  # e.g. float32 moments, block size not 2**k
    return adam_leaf
  return functools.partial(pallas_kernels.adam_update_leaf, interpret=platform != "gpu")


def _placeholder():
  return jnp.zeros((0,), jnp.float32)


def _zeros_state(param, bits, signed, block_size, maps):
  """Initial moment for one leaf: zero codes with zero scales decode to zeros."""
  if param is None:
    return None
  shape, dtype = tuple(param.shape), param.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    return _placeholder()
  # A concrete param sharded over several devices (FSDP): its moments are
  # created sharded like it (see stquant_jax.state_shardings); otherwise
  # (single device, or traced params under jit) default placement.
  sharding = _sharding.concrete_sharding(param)
  if bits is None:
    fs = sharding if sharding is not None and _sharding.fits(sharding, shape) else None
    return _sharding.zeros(shape, jnp.float32, fs)
  cmap = maps(bits, signed)
  nb = num_blocks(int(np.prod(shape, dtype=np.int64)), block_size)
  cs, ss = (None, None) if sharding is None else _sharding.quantized_shardings(sharding, shape, nb)
  return QuantizedArray(
      codes=_sharding.zeros((nb, block_size * bits // 32), jnp.uint32, cs),
      scales=_sharding.zeros((nb,), jnp.float32, ss),
      code_map=cmap, block_size=block_size, shape=shape, dtype=jnp.dtype(jnp.float32))


def _is_q(x) -> bool:
  return isinstance(x, QuantizedArray)


def _coerce(moment, shape, signed, block_size, maps):
  """Rebuilds a QuantizedArray from a bare ``{codes, scales}`` mapping.

  Wrappers may hand the state back with our pytree nodes replaced by plain
  mappings (``flax.nnx.Optimizer`` returns ``nnx.State``), dropping the static
  metadata. Everything is recoverable: the bit-width from the codes' shape
  (``words per block * 32 / block_size``), the map from the transform's
  configuration, the shape from the gradient.
  """
  if _is_q(moment) or not isinstance(moment, collections.abc.Mapping):
    return moment
  if set(moment.keys()) != {"codes", "scales"}:
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


def _param_leaves(treedef, params, n):
  """Params aligned with the update leaves, or Nones when absent or unaligned."""
  if params is None:
    return [None] * n
  try:
    return treedef.flatten_up_to(params)
  except (ValueError, TypeError):
    return [None] * n


def adam_leaf(g, mu, nu, *, b1, b2, eps, eps_root, bc1, bc2):
  """One leaf of the update: dequantize -> Adam in float32 -> requantize.

  Returns ``(update, new_mu, new_nu)``; the update uses the fresh float32
  moments. Elements whose new m or v is not finite store zero for both
  (:func:`finite_moments`). Quantized moments are handled in the packing-group view
  ``[n_blocks, B // gc, gc]`` so that XLA fuses unpacking, decoding, the Adam
  math, encoding and packing into a few loops: one variadic reduction for the
  block maxima of m and v, then one loop per output. This is the jnp
  reference for the fused Pallas kernel.
  """
  g32 = g.astype(jnp.float32)
  quantized = [q for q in (mu, nu) if _is_q(q)]
  if not quantized:
    m = b1 * mu + (1 - b1) * g32
    v = b2 * nu + (1 - b2) * jnp.square(g32)
    u = (m / bc1) / (jnp.sqrt(v / bc2 + eps_root) + eps)
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
    if _is_q(q):
      return decode_blocks(q.codes, q.scales, q.code_map).reshape(nb, bs).reshape(view)
    return to_view(q)

  g3 = to_view(g32)
  m = b1 * read(mu) + (1 - b1) * g3
  v = b2 * read(nu) + (1 - b2) * jnp.square(g3)
  u3 = (m / bc1) / (jnp.sqrt(v / bc2 + eps_root) + eps)
  u = u3.reshape(-1)[:n].reshape(g.shape).astype(g.dtype)
  m, v = finite_moments(m, v)
  pairs = [(x, q) for x, q in ((m, mu), (v, nu)) if _is_q(q)]
  scales = finite_absmax(*(x for x, _ in pairs))

  def write(x, q, scale):
    if not _is_q(q):
      return x.reshape(-1)[:n].reshape(g.shape)
    qc = group_shape(q.bits)[0]
    codes = encode_blocks(x.reshape(nb, bs).reshape(nb, bs // qc, qc), scale, q.code_map)
    return QuantizedArray(codes, scale, q.code_map, q.block_size, q.shape, q.dtype)

  it = iter(scales)
  new = [write(x, q, next(it) if _is_q(q) else None) for x, q in ((m, mu), (v, nu))]
  return u, new[0], new[1]


def _replicated_leaf_update(leaf_fn, g, mu, nu, kw):
  """``leaf_fn`` on replicated copies of an Explicit-sharded leaf; outputs resharded back."""
  def scatter(new, old):
    if _is_q(new):
      return dataclasses.replace(new, codes=_sharding.reshard_like(new.codes, old.codes),
                                 scales=_sharding.reshard_like(new.scales, old.scales))
    return new if new is None or new.size == 0 else _sharding.reshard_like(new, old)

  u, new_mu, new_nu = leaf_fn(_sharding.replicated(g), _replicated_moment(mu),
                              _replicated_moment(nu), **kw)
  return (_sharding.reshard_like(u, g), scatter(new_mu, mu), scatter(new_nu, nu))


def _replicated_moment(x):
  """A moment with its arrays resharded to replicated (for the policy's statistics)."""
  rep = _sharding.replicated
  if _is_q(x):
    return dataclasses.replace(x, codes=rep(x.codes), scales=rep(x.scales))
  return x if x is None or x.size == 0 else rep(x)


def scale_by_stquant(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    policy: Policy | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    mu_map=None,
    nu_map=None,
    backend: str = "auto",
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam's rule, keeping m and v as quantized low-bit codes.

  Each step dequantizes the moments to float32, applies Adam in float32, uses
  the fresh float32 moments for this step's update, and requantizes them with
  new block scales:

  .. math::
    m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t,\quad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2,\quad
    u_t = \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t) + \epsilon_{root}} + \epsilon}

  The policy (default :class:`~stquant_jax.FixedBits`) decides per leaf, from
  its global shape and dtype at ``init``, how many bits m and v get. Bit-widths,
  maps, block size and shapes are static metadata of the state, so the update
  compiles once.

  Hostile input (``docs/reliability.md`` lists every case and its test):

  * Where an element's new m or v is not finite (a NaN/Inf gradient, or
    ``|g| > ~1.8e19`` so that ``g**2`` overflows float32), this step's update is
    float32 Adam's (NaN for NaN/Inf, visible in the parameters; 0 for an
    overflowing ``g**2``), and both of its stored moments restart from zero;
    block scales ignore it, so no other element's state changes. This holds for
    quantized and float32 moments alike. Wrap in :func:`optax.apply_if_finite`
    to skip NaN/Inf steps and keep the previous state intact.
  * A finite outlier sets its block's scales: the other elements of that block
    get damped (never amplified) updates until the outlier's moments decay.
  * Integer leaves get zero updates of their own dtype and no moments; float0
    gradients become zeros of the param's dtype when ``params`` are passed.
  * An updates tree whose structure, leaf shapes or dtype kinds (floating vs
    not) differ from the state built by ``init`` raises a ``ValueError`` naming
    the offending leaves (static checks, free under ``jit``).

  Args:
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the second moment inside the square root.
    policy: a :class:`~stquant_jax.Policy`; default ``FixedBits()`` (8-bit m
      and v for leaves with >= 4096 values).
    block_size: values per quantization block (a multiple of 32). Static:
      declare it in ``static_args`` when using :func:`optax.inject_hyperparams`.
    mu_map: optional ``callable(bits) -> CodeMap`` overriding the m map.
    nu_map: optional ``callable(bits) -> CodeMap`` overriding the v map.
    backend: ``"auto"`` (the fused Pallas kernel on GPU, the jnp path
      elsewhere), ``"jnp"``, or ``"pallas"`` (forced; interpret mode on CPU,
      for tests). Leaves whose m and v are not both quantized always use jnp.

  Returns:
    An :class:`optax.GradientTransformation`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import stquant_jax as sq
    >>> params = {"w": jnp.ones((128, 64)), "b": jnp.zeros((64,))}
    >>> tx = optax.chain(sq.scale_by_stquant(policy=sq.FixedBits(4, 4)), optax.scale(-1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> round(float(updates["w"][0, 0]), 4), state[0].mu["w"].bits
    (-0.01, 4)
  """
  _check_hparam("b1", b1, 0.0, 1.0)
  _check_hparam("b2", b2, 0.0, 1.0)
  _check_hparam("eps", eps, 0.0, float("inf"))
  _check_hparam("eps_root", eps_root, 0.0, float("inf"))
  block_size = static_block_size(block_size)
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
  if policy is None:
    policy = FixedBits()
  if not isinstance(policy, Policy):
    raise TypeError(f"policy must be a stquant_jax.Policy (e.g. FixedBits()), "
                    f"got {type(policy).__name__}")
  for name, fn in (("mu_map", mu_map), ("nu_map", nu_map)):
    if fn is not None and not callable(fn):
      raise TypeError(f"{name} must be a callable bits -> CodeMap, got {type(fn).__name__}")

  def maps(bits, signed):
    return resolve_map(mu_map if signed else nu_map, bits, signed,
                       "mu_map" if signed else "nu_map")

  def init_fn(params):
    if block_size is None:
      raise TypeError("block_size is traced; it sets the state's shapes and must be "
                      "static (with optax.inject_hyperparams pass static_args=('block_size',))")

    def leaf(p, which):
      if p is None:
        return None
      mu_bits, nu_bits = policy.leaf_bits(tuple(p.shape), p.dtype)
      bits, signed = (mu_bits, True) if which == 0 else (nu_bits, False)
      return _zeros_state(p, bits, signed, block_size, maps)
    is_none = lambda x: x is None
    mu = jax.tree.map(lambda p: leaf(p, 0), params, is_leaf=is_none)
    nu = jax.tree.map(lambda p: leaf(p, 1), params, is_leaf=is_none)
    count, policy_state = jnp.zeros([], jnp.int32), policy.init_state(params)
    # Concrete params sharded over a mesh: the small leaves go replicated on
    # that mesh, so the whole state lives where the params do.
    rep = _sharding.replicated_on_params_mesh(params)
    if rep is not None:
      count, policy_state = jax.device_put((count, policy_state), rep)
    return ScaleByStquantState(count=count, mu=mu, nu=nu, policy_state=policy_state)

  def update_fn(updates, state, params=None):
    count_inc = optax.safe_increment(state.count)
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    paths = [jax.tree_util.keystr(path) for path, _ in flat]
    leaves = [g for _, g in flat]
    mu_leaves, nu_leaves = moments_for_updates(updates, treedef, paths, leaves, state.mu,
                                               state.nu, block_size)
    # float32 arrays whether given as Python floats or traced by
    # inject_hyperparams, so both paths round identically.
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    b1_, b2_, eps_, eps_root_ = f32(b1), f32(b2), f32(eps), f32(eps_root)
    bc1 = 1 - b1_ ** count_inc
    bc2 = 1 - b2_ ** count_inc
    out_u, out_mu, out_nu = [], [], []
    policy_leaves = list(leaves)  # what the policy's statistics read
    policy_mu, policy_nu = {}, {}  # replicated moments of leaves updated replicated
    param_leaves = None
    for i, (g, mu, nu) in enumerate(zip(leaves, mu_leaves, nu_leaves)):
      if not jnp.issubdtype(g.dtype, jnp.floating):
        # Integer / float0 leaves: no moments, zero update. A float0 gradient
        # (jax.grad(..., allow_int=True)) becomes zeros of the param's dtype
        # when params are given, so optax.apply_updates can add it.
        if g.dtype == jax.dtypes.float0:
          if param_leaves is None:
            param_leaves = _param_leaves(treedef, params, len(leaves))
          p = param_leaves[i]
          out_u.append(g if p is None else jnp.zeros(g.shape, jnp.asarray(p).dtype))
        else:
          out_u.append(jnp.zeros_like(g))
        out_mu.append(mu)
        out_nu.append(nu)
        continue
      mu = _coerce(mu, g.shape, True, block_size, maps)
      nu = _coerce(nu, g.shape, False, block_size, maps)
      leaf_fn = _leaf_update_fn(backend, mu, nu)
      kw = dict(b1=b1_, b2=b2_, eps=eps_, eps_root=eps_root_, bc1=bc1, bc2=bc2)
      moments = [x for x in (mu, nu) if x is not None]
      bs = next((x.block_size for x in moments if _is_q(x)), None)
      if _sharding.explicit_leaf_is_local(g, moments, bs):
        u, mu, nu = leaf_fn(g, mu, nu, **kw)
      else:
        # Explicit mesh axes, and the leaf's shards do not line up with whole
        # blocks (a param sharded along a later axis, ragged shards): run the
        # leaf replicated and put every output back on its input's sharding.
        u, mu, nu = _replicated_leaf_update(leaf_fn, g, mu, nu, kw)
        policy_leaves[i] = _sharding.replicated(g)
        policy_mu[i], policy_nu[i] = _replicated_moment(mu), _replicated_moment(nu)
      out_u.append(u)
      out_mu.append(mu)
      out_nu.append(nu)
    new_mu = treedef.unflatten(out_mu)
    new_nu = treedef.unflatten(out_nu)
    new_state = ScaleByStquantState(
        count=count_inc, mu=new_mu, nu=new_nu,
        policy_state=policy.update_state(
            state.policy_state, treedef.unflatten(policy_leaves),
            treedef.unflatten([policy_mu.get(i, x) for i, x in enumerate(out_mu)]),
            treedef.unflatten([policy_nu.get(i, x) for i, x in enumerate(out_nu)]),
            count_inc))
    return treedef.unflatten(out_u), new_state

  return optax.GradientTransformation(init_fn, update_fn)
