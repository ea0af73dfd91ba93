"""The experiments' GPT-2 train step (forward, backward, optimizer) as one pure function.

``experiments.train`` drives the same model through ``nnx.Optimizer``; here the
step is functional so it can be compiled ahead of time with donated params and
optimizer state: ``step(params, opt_state, tokens) -> (params, opt_state, loss)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import stquant_jax as sq
from experiments import models


def gpt2_config(preset: str, **overrides) -> models.GPT2Config:
  """A GPT-2 preset from ``experiments.models`` with overrides (e.g. ``dtype``)."""
  return dataclasses.replace(models.GPT2_PRESETS[preset], **overrides)


def abstract_params(cfg: models.GPT2Config):
  """``(graphdef, params)``: the model's structure and its parameters as
  ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
  model = nnx.eval_shape(lambda: models.GPT2(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def make_train_step(graphdef, tx: optax.GradientTransformation):
  """``step(params, opt_state, tokens_BxL1)``: LM loss on ``tokens[:, :-1] -> tokens[:, 1:]``,
  gradients, ``tx.update`` and ``optax.apply_updates``."""

  def step(params, opt_state, tokens_BxL1):
    def loss_fn(p):
      model = nnx.merge(graphdef, p)
      return models.lm_loss(model, tokens_BxL1[:, :-1], tokens_BxL1[:, 1:])[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def abstract_args(cfg: models.GPT2Config, tx: optax.GradientTransformation, batch: int,
                  seq_len: int):
  """``(step, (params, opt_state, tokens))`` with abstract arguments."""
  graphdef, params = abstract_params(cfg)
  opt_state = jax.eval_shape(tx.init, params)
  tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
  return make_train_step(graphdef, tx), (params, opt_state, tokens)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def with_layout(opt_state, bits_of):
  """``opt_state`` (abstract) with each quantized moment re-laid at ``bits_of(name, signed)``
  bits (``name`` like ``"blocks/0/fc/kernel"``; None keeps the moment as it is).

  Builds an adaptive policy's layout without training: the step's program
  depends only on the layout (static metadata), not on the moments' values.
  """
  def relay(signed):
    def leaf(path, q):
      if not isinstance(q, sq.QuantizedArray):
        return q
      bits = bits_of(_path_name(path), signed)
      if bits is None or bits == q.bits:
        return q
      return jax.eval_shape(lambda: sq.quantize(
          jnp.zeros(q.shape, jnp.float32), bits, signed=signed, block_size=q.block_size))
    return leaf

  def fix(st):
    if not isinstance(st, sq.ScaleByStquantState):
      return st
    is_q = lambda x: isinstance(x, sq.QuantizedArray)
    return st._replace(
        mu=jax.tree_util.tree_map_with_path(relay(True), st.mu, is_leaf=is_q),
        nu=jax.tree_util.tree_map_with_path(relay(False), st.nu, is_leaf=is_q))

  return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, sq.ScaleByStquantState))
