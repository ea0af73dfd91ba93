"""``state_shardings``: shardings for a whole optimizer state, given the params' shardings."""

from __future__ import annotations

import dataclasses
import warnings

import jax
from jax.sharding import NamedSharding, Sharding

from stquant_jax._src.codec.quantized import is_quantized
from stquant_jax._src.core.trees import has_variables, unwrap_variables
from stquant_jax._src.distributed.mesh import fits, replicated_like
from stquant_jax._src.distributed.placement import (
    float_moment_sharding, quantized_shardings, shards_for)
from stquant_jax._src.state.opt_state import is_stquant_state
from stquant_jax._src.state.typed import opt_state_of, typed_tree


def _param_sharding(x):
  if x is None or isinstance(x, Sharding):
    return x
  s = getattr(x, "sharding", None)
  if isinstance(s, Sharding):
    return s
  raise TypeError(
      f"param_shardings leaves must be jax.sharding.Sharding objects or arrays with a "
      f"sharding, got {type(x).__name__}; inside jit pass the concrete shardings")


def _moment(m, ps: Sharding | None, rep: Sharding):
  if m is None:
    return None
  if is_quantized(m):
    if ps is None:
      return dataclasses.replace(m, codes=rep, scales=rep)
    want = shards_for(ps, tuple(m.shape), m.block_size)
    if want != m.shards:
      warnings.warn(
          f"state_shardings: a moment of shape {tuple(m.shape)} is in the "
          f"{'plain' if m.shards is None else f'shards={m.shards}'} block layout, but its "
          f"parameter's sharding {ps.spec if hasattr(ps, 'spec') else ps} needs "
          f"{'the plain one' if want is None else f'shards={want}'}: each device's "
          "blocks will not be its own parameter shard's, so the update moves data between "
          "devices (or keeps the moment replicated). Build the state with tx.init on the "
          "sharded params themselves (not under jit or eval_shape with Auto mesh axes, "
          "which hide the shardings), or re-create it for this sharding.", stacklevel=3)
    codes, scales = quantized_shardings(ps, m.shape, int(m.scales.shape[0]))
    return dataclasses.replace(m, codes=codes, scales=scales)
  shape = tuple(getattr(m, "shape", ()))
  if ps is None:
    return rep
  return float_moment_sharding(ps, shape) if shape else replicated_like(ps)


def state_shardings(opt_state, param_shardings):
  """Shardings for an optimizer state holding stquant states, given the params' shardings.

  Returns a pytree of the same structure as ``opt_state`` (usable as
  ``out_shardings`` / ``in_shardings`` of ``jax.jit``, or with
  ``jax.lax.with_sharding_constraint``) in which:

  * a quantized moment of a parameter sharded with ``NamedSharding(mesh, spec)``
    gets ``codes`` ``P(axes, None)`` and ``scales`` ``P(axes)``, where
    ``axes`` are the mesh axes that shard the parameter, when their size
    divides the number of blocks; otherwise it is replicated. ``tx.init`` on
    the sharded params lays each moment out so that every device's blocks are
    exactly its own parameter shard's, whatever axis the parameter is sharded
    on (the per-shard layout, :attr:`QuantizedArray.shards`, for a parameter
    sharded on a later axis such as ``P(None, "fsdp")``, or whose leading-axis
    shards are not whole blocks), and the update is communication-free. A
    state whose layout does not match the given shardings (e.g. built under
    ``jit`` / ``eval_shape``, where Auto-mode shardings are not visible) is
    still placed, with a warning: XLA then moves data in the update;
  * a float32 moment gets the parameter's sharding;
  * the step count, ``[0]`` placeholders and the policy state are replicated;
  * outside stquant states, a subtree with the structure of the params
    (e.g. ``optax.MultiSteps``' accumulated gradients) gets the parameter
    shardings where the shapes fit, and everything else is replicated.

  The result depends only on shapes and static metadata, so ``opt_state`` may
  be concrete, abstract (``jax.eval_shape(tx.init, params)``) or traced. A
  ``flax.nnx.Optimizer`` (or its ``opt_state``) gets shardings with the
  structure of its ``opt_state`` (``nnx.Variable`` nodes kept), ready for
  ``jax.device_put(optimizer.opt_state, ...)``. After
  :func:`~stquant_jax.relayout` changes a leaf between quantized and float32,
  the state's structure changes: call this again on the new state.

  Args:
    opt_state: the optimizer state (any optax state containing stquant states).
    param_shardings: a pytree like the params whose leaves are
      ``jax.sharding.Sharding`` objects, or the (sharded) params themselves.

  Returns:
    A pytree of ``jax.sharding.Sharding`` matching ``opt_state``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import stquant_jax as sq
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> params = {"w": jnp.zeros((256, 128)), "b": jnp.zeros((128,))}
    >>> shardings = {"w": NamedSharding(mesh, P("fsdp")), "b": NamedSharding(mesh, P())}
    >>> params = jax.device_put(params, shardings)
    >>> tx = sq.adamw(1e-3, policy=sq.FixedBits(4, 4))
    >>> out = sq.state_shardings(jax.eval_shape(tx.init, params), shardings)
    >>> state = jax.jit(tx.init, out_shardings=out)(params)
    >>> state[0].mu["w"].codes.sharding.spec, state[0].nu["b"].sharding.spec
    (P('fsdp', None), P())
  """
  target = opt_state_of(opt_state)
  if has_variables(target):  # flax.nnx: compute on the typed state, give nnx's structure
    out = state_shardings(typed_tree(target), param_shardings)
    leaves = jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, Sharding))
    return jax.tree.unflatten(jax.tree.structure(target), leaves)
  ps_leaves, p_treedef = jax.tree.flatten(unwrap_variables(param_shardings),
                                          is_leaf=lambda x: isinstance(x, Sharding))
  ps_leaves = [_param_sharding(x) for x in ps_leaves]
  if not ps_leaves:
    raise ValueError("param_shardings has no leaves")
  ref = next((s for s in ps_leaves if isinstance(s, NamedSharding)), ps_leaves[0])
  rep = replicated_like(ref)

  def stquant(st):
    try:
      mu = p_treedef.flatten_up_to(st.mu)
      nu = p_treedef.flatten_up_to(st.nu)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "state_shardings: param_shardings does not have the structure of the params "
          "the optimizer state was built for (a None in param_shardings is an empty "
          "subtree in JAX, not 'replicated': use NamedSharding(mesh, P()) for replicated "
          f"params): {e}") from e
    new_mu = [_moment(m, s, rep) for m, s in zip(mu, ps_leaves)]
    new_nu = [_moment(v, s, rep) for v, s in zip(nu, ps_leaves)]
    return st._replace(
        count=rep, mu=p_treedef.unflatten(new_mu), nu=p_treedef.unflatten(new_nu),
        policy_state=jax.tree.map(lambda _: rep, st.policy_state))

  def mirrors(x) -> bool:
    if is_stquant_state(x) or is_quantized(x):
      return False
    try:
      return jax.tree.structure(x) == p_treedef
    except Exception:  # pylint: disable=broad-except
      return False

  def like_params(x):
    leaves = p_treedef.flatten_up_to(x)
    out = [s if s is not None and fits(s, tuple(getattr(l, "shape", ()))) else rep
           for l, s in zip(leaves, ps_leaves)]
    return p_treedef.unflatten(out)

  def fix(x):
    if is_stquant_state(x):
      return stquant(x)
    if mirrors(x):
      return like_params(x)
    if is_quantized(x):  # a quantized array outside a stquant state: shard by its own shape
      return dataclasses.replace(x, codes=rep, scales=rep)
    return rep

  return jax.tree.map(fix, opt_state, is_leaf=lambda x: is_stquant_state(x) or is_quantized(x) or mirrors(x))


