"""FSDP for the experiments: params, gradients and optimizer state sharded over ``data``.

Data parallelism (``experiments.train``'s default on several devices) keeps a
full copy of the params and the optimizer state on every device, which is
where quantized states help least. With ``--fsdp`` each parameter is split
along its first axis that the device count divides (the leading axis when
possible, so a quantized moment's blocks line up with the parameter's shard
and its update needs no communication, ``docs/sharding.md``), the optimizer
state is placed by ``stquant_jax.state_shardings`` (for ``optax`` states too:
param-shaped subtrees follow the params), gradients come out of the backward
pass with the params' shardings, and the batch is split over the same axis.

Example:
  >>> import jax, jax.numpy as jnp
  >>> param_spec((1024, 768), 8), param_spec((50257, 768), 8), param_spec((7,), 8)
  (P('data',), P(None, 'data'), P())
"""

import functools

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import stquant_jax
from stquant_jax._src.layout.access import settle  # nnx moments in their post-step form


def param_spec(shape, n: int, axis: str = "data") -> P:
  """Split the first dimension that ``n`` divides (the leading one when it can)."""
  for d, size in enumerate(shape):
    if size % n == 0 and size >= n:
      return P(*([None] * d), axis)
  return P()


def mesh_for(n: int, axis: str = "data"):
  """A 1-D ``Auto`` mesh over the first ``n`` devices."""
  return jax.make_mesh((n,), (axis,), (jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def param_shardings(params, mesh, axis: str = "data"):
  """``NamedSharding`` per parameter leaf (a pytree like ``params``)."""
  n = mesh.shape[axis]
  return jax.tree.map(lambda p: NamedSharding(mesh, param_spec(p.shape, n, axis)), params)


def state_shardings(opt_state, pshard):
  """The optimizer state's shardings: quantized moments by the FSDP rule, optax moments
  like their params, everything else replicated."""
  return stquant_jax.state_shardings(opt_state, pshard)



def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of ``tree`` (arrays or ``ShapeDtypeStruct``) under ``shardings``."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(
      shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))):
    shape = s.shard_shape(tuple(x.shape))
    total += int(functools.reduce(lambda a, b: a * b, shape, 1)) * jax.numpy.dtype(
        x.dtype).itemsize
  return total


class FSDP:
  """Places a model and its ``nnx.Optimizer`` on ``mesh`` (FSDP) and runs their train step.

  The step is a pure function of the model's and the optimizer's states, jitted
  with ``in_shardings`` / ``out_shardings`` (params, gradients and optimizer
  state stay split over ``axis``; donated) and rebuilt when the optimizer's
  layout changes (an adaptive policy's ``relayout``).

  Args:
    mesh: a mesh with the ``axis`` axis.
    model: the ``nnx`` model (its ``nnx.Param`` state is sharded).
    optimizer: its ``nnx.Optimizer``.
    loss_fn: ``loss_fn(model, *batch) -> (loss, metrics)``.
    template: the optimizer state in its own pytree types (``QuantizedArray``
      moments), e.g. ``jax.eval_shape(tx.init, params)``.
    axis: the mesh axis that splits params and the batch.
  """

  def __init__(self, mesh, model, optimizer, loss_fn, template, axis: str = "data"):
    self.mesh, self.axis, self.loss_fn = mesh, axis, loss_fn
    self.batch = NamedSharding(mesh, P(axis))
    self.rep = NamedSharding(mesh, P())
    self.pshard = param_shardings(nnx.state(model, nnx.Param), mesh, axis)
    self.m_def, m_state = nnx.split(model)
    if len(jax.tree.leaves(m_state)) != len(jax.tree.leaves(self.pshard)):
      raise ValueError("FSDP expects a model whose state is all nnx.Param (GPT-2, ViT)")
    self.m_shard = param_shardings(m_state, mesh, axis)
    nnx.update(model, jax.device_put(m_state, self.m_shard))
    self.place(optimizer, template)

  def place(self, optimizer, template):
    """Puts the optimizer state on the mesh for the layout of ``template``; (re)builds
    the jitted step for it."""
    settle(optimizer)  # one pytree form before and after a step (its shardings below)
    self.o_def, o_state = nnx.split(optimizer)
    typed = state_shardings(template, self.pshard)
    sh_leaves = jax.tree.leaves(typed, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    opt_leaves = jax.tree.leaves(o_state["opt_state"])
    if len(sh_leaves) != len(opt_leaves):
      raise ValueError(f"optimizer state has {len(opt_leaves)} arrays, its template "
                       f"{len(sh_leaves)}")
    o_shard = jax.tree.map(lambda _: self.rep, o_state)
    o_shard["opt_state"] = jax.tree.unflatten(jax.tree.structure(o_state["opt_state"]),
                                              sh_leaves)
    self.o_shard = o_shard
    nnx.update(optimizer, jax.device_put(o_state, o_shard))
    self._step = jax.jit(self._pure_step, in_shardings=(self.m_shard, o_shard, self.batch),
                         out_shardings=(self.m_shard, o_shard, self.rep),
                         donate_argnums=(0, 1))

  def _pure_step(self, m_state, o_state, batch):
    model = nnx.merge(self.m_def, m_state)
    optimizer = nnx.merge(self.o_def, o_state)
    grad_fn = nnx.value_and_grad(self.loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(model, *batch)
    grads = jax.lax.with_sharding_constraint(grads, self.pshard)  # split like the params
    optimizer.update(model, grads)
    return nnx.state(model), nnx.state(optimizer), metrics

  def put_batch(self, batch):
    return jax.device_put(batch, self.batch)

  def train_step(self, model, optimizer, batch):
    """One step, updating ``model`` and ``optimizer`` in place; returns the metrics."""
    m_state, o_state = nnx.state(model), nnx.state(optimizer)
    m_state, o_state, metrics = self._step(m_state, o_state, batch)
    nnx.update(model, m_state)
    nnx.update(optimizer, o_state)
    return metrics
