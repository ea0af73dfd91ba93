"""``scale_by_stquant``: Adam scaling with block-wise quantized, bit-packed moments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from stquant_jax._src.codec.blocks import DEFAULT_BLOCK_SIZE
from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.codec.rounding import check_rounding
from stquant_jax._src.core.trees import field
from stquant_jax._src.distributed.mesh import replicated_on_params_mesh
from stquant_jax._src.policy.base import FixedBits, Policy
from stquant_jax._src.state.config import make_config, resolve_maps
from stquant_jax._src.state.opt_state import ScaleByStquantState
from stquant_jax._src.transform.checks import (
    check_adam_hparams, check_config, check_mu_dtype, check_not_policy, check_options,
    moments_for_updates, static_block_size)
from stquant_jax._src.transform.leaves import init_moment, update_leaf


def _adam_scalars(b1, b2, eps, eps_root, count, nesterov: bool):
  """Hyperparameters and bias corrections as float32 scalars, whether given as Python
  floats or traced by inject_hyperparams, so both paths round identically."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  b1, b2 = f32(b1), f32(b2)
  out = dict(b1=b1, b2=b2, eps=f32(eps), eps_root=f32(eps_root),
             bc1=1 - b1 ** count, bc2=1 - b2 ** count, step=count)
  if nesterov:  # optax: bias_correction(mu, b1, safe_increment(count))
    out["bc1_next"] = 1 - b1 ** optax.safe_increment(count)
  return out


def _as_array(x):
  """A Python int / float leaf as jnp sees it (optax accepts ``{"n": 3}``)."""
  return x if x is None or hasattr(x, "dtype") else jnp.asarray(x)


def _aligned_params(treedef, params, n):
  """Params aligned with the update leaves, or Nones when absent or unaligned."""
  if params is None:
    return [None] * n
  try:
    return treedef.flatten_up_to(params)
  except (ValueError, TypeError):
    return [None] * n


def scale_by_stquant(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype=None,
    *,
    nesterov: bool = False,
    policy: Policy | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    mu_map=None,
    nu_map=None,
    rounding="stochastic",
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
  compiles once. The block size, the maps and the parameter shapes also travel
  with the state (``state.config``), so :func:`~stquant_jax.relayout` and the
  other tools need no settings; the policy gets the block size from here.

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
    mu_dtype: accepted for optax's signature; only None (or float32) is
      supported: m is stored as codes of the policy's width, or float32.
    nesterov: Nesterov momentum, ``optax.scale_by_adam(nesterov=True)``'s
      formula on the fresh float32 m (runs on the jnp path, never the fused
      kernel).
    policy: a :class:`~stquant_jax.Policy`; default ``FixedBits()`` (8-bit m
      and v for leaves with >= 4096 values).
    block_size: values per quantization block (a multiple of 32). It shapes
      the state at ``init``; ``update`` reads it from the state, so
      :func:`optax.inject_hyperparams` may trace it there (it must be concrete
      at ``init``: with ``jax.jit(tx.init)`` declare ``static_args=("block_size",)``).
    mu_map: optional ``callable(bits) -> CodeMap`` overriding the m map.
    nu_map: optional ``callable(bits) -> CodeMap`` overriding the v map.
    rounding: how new moments round to code levels: ``"stochastic"``
      (unbiased: a value between two levels goes up with probability
      ``(x - lo) / (hi - lo)``, so a decaying moment keeps decaying; the
      random numbers are a hash of (step, leaf, element), so runs are
      reproducible and checkpoints resume bit-identically), ``"nearest"``,
      or an ``(m, v)`` pair of them. See ``docs/rounding.md``.
    backend: ``"auto"`` (the fused Pallas kernel on GPU, the jnp path
      elsewhere), ``"jnp"``, or ``"pallas"`` (forced; interpret mode on CPU,
      for tests; a quantized leaf the kernel cannot take, e.g. a block size
      that is not a power of two, is a ``ValueError`` at the first update).
      Leaves whose m and v are not both quantized, and ``nesterov=True``,
      always use jnp.

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
  check_not_policy(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype)
  check_adam_hparams(b1, b2, eps, eps_root)
  check_mu_dtype(mu_dtype)
  block_size = static_block_size(block_size)
  policy = FixedBits() if policy is None else policy
  check_options(policy, backend, mu_map, nu_map)
  rounding = check_rounding(rounding)
  if not isinstance(nesterov, bool):
    raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
  if block_size is not None:
    policy = policy.bind(block_size)
  mu_maps = resolve_maps(mu_map, True, "mu_map")
  nu_maps = resolve_maps(nu_map, False, "nu_map")
  leaf_backend = "jnp" if nesterov else backend  # the fused kernel has no Nesterov form

  def init_fn(params):
    if block_size is None:
      raise TypeError("block_size is traced; it sets the state's shapes and must be "
                      "static (with optax.inject_hyperparams pass static_args=('block_size',))")
    params = jax.tree.map(_as_array, params)
    config = make_config(params, block_size, mu_maps, nu_maps, policy)

    leaves, treedef = jax.tree.flatten(params)
    layout = policy.layout(leaves)

    def moments(signed):
      return treedef.unflatten([
          init_moment(p, bits[0 if signed else 1], signed, block_size, config.code_map)
          for p, bits in zip(leaves, layout)])

    count, policy_state = jnp.zeros([], jnp.int32), policy.init_state(params)
    # Concrete params sharded over a mesh: the small leaves go replicated on
    # that mesh, so the whole state lives where the params do.
    rep = replicated_on_params_mesh(params)
    if rep is not None:
      count, policy_state = jax.device_put((count, policy_state), rep)
    mu, nu = moments(True), moments(False)
    # Each leaf's per-shard layout (FSDP on a later axis) goes in the config too: flax.nnx
    # hands quantized moments back without it.
    shards = [next((q.shards for q in pair if is_quantized(q)), None) for pair in
              zip(treedef.flatten_up_to(mu), treedef.flatten_up_to(nu))]
    config = make_config(params, block_size, mu_maps, nu_maps, policy, shards)
    return ScaleByStquantState(count=count, mu=mu, nu=nu, policy_state=policy_state,
                               config=config)

  def update_fn(updates, state, params=None):
    # The state's own config (block size, maps) describes its moments; it must be
    # this transform's (static check, free under jit).
    config = field(state, "config", None)
    check_config(config, block_size, mu_maps, nu_maps)
    bs = block_size if config is None else config.block_size
    code_map = (config or make_config((), bs, mu_maps, nu_maps)).code_map
    pol = policy if block_size is not None or bs is None else policy.bind(bs)
    count_inc = optax.safe_increment(field(state, "count"))
    updates = jax.tree.map(_as_array, updates)
    leaves, treedef = jax.tree.flatten(updates)
    shards = [None if config is None else config.leaf_shards(i) for i in range(len(leaves))]
    mu, nu = moments_for_updates(updates, treedef, leaves, field(state, "mu"),
                                 field(state, "nu"), bs, shards)
    hparams = _adam_scalars(b1, b2, eps, eps_root, count_inc, nesterov)
    params = _aligned_params(treedef, params, len(leaves))
    out = [update_leaf(g, m, v, p, hparams=dict(hparams, rounding=rounding, leaf=i),
                       backend=leaf_backend, block_size=bs, maps=code_map, shards=sh)
           for i, (g, m, v, p, sh) in enumerate(zip(leaves, mu, nu, params, shards))]
    tree = lambda xs: treedef.unflatten(list(xs))
    seen_g, seen_mu, seen_nu = zip(*(o.seen for o in out)) if out else ((), (), ())
    policy_state = pol.update_state(field(state, "policy_state"), tree(seen_g), tree(seen_mu),
                                    tree(seen_nu), count_inc)
    new_state = ScaleByStquantState(count=count_inc, mu=tree(o.mu for o in out),
                                    nu=tree(o.nu for o in out), policy_state=policy_state,
                                    config=config)
    return tree(o.update for o in out), new_state

  return optax.GradientTransformation(init_fn, update_fn)
