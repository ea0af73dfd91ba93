"""Real Adam moments for measurements: a byte-level MLP language model on CPython sources.

Trains a small next-byte model with ``optax.adamw`` (fp32 states) on the standard
library's own ``.py`` files (always present, no download) and returns the
optimizer's m and v for every tensor with at least 4096 values.
"""

from __future__ import annotations

import pathlib
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import optax


def stdlib_bytes(limit: int = 2_000_000) -> np.ndarray:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  chunks, total = [], 0
  for f in sorted(root.glob("*.py")):
    b = f.read_bytes()
    chunks.append(b)
    total += len(b)
    if total >= limit:
      break
  return np.frombuffer(b"".join(chunks)[:limit], dtype=np.uint8)


def init_mlp(key, ctx=16, emb=64, hidden=512):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "emb": jax.random.normal(k1, (256, emb)) * 0.02,
      "w1": jax.random.normal(k2, (ctx * emb, hidden)) / np.sqrt(ctx * emb),
      "b1": jnp.zeros((hidden,)),
      "w2": jax.random.normal(k3, (hidden, 256)) / np.sqrt(hidden),
      "b2": jnp.zeros((256,)),
  }


def mlp_loss(params, x_BxC, y_B):
  h = params["emb"][x_BxC].reshape(x_BxC.shape[0], -1)
  h = jax.nn.gelu(h @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y_B).mean()


def batches(data: np.ndarray, batch: int, ctx: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    idx = rng.integers(0, len(data) - ctx - 1, size=batch)
    x = np.stack([data[i:i + ctx] for i in idx]).astype(np.int32)
    y = data[idx + ctx].astype(np.int32)
    yield x, y


def make_step(tx, return_grads: bool = False):
  """The jitted MLP training step with ``tx``: ``(params, state, x, y) ->
  (params, state, loss)``, or ``(params, state, grads)`` with ``return_grads``."""

  @jax.jit
  def step(params, state, x, y):
    loss, g = jax.value_and_grad(mlp_loss)(params, x, y)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, g if return_grads else loss

  return step


def adam_moments(steps: int = 300, seed: int = 0, min_size: int = 4096):
  """Returns ``{name: (m, v)}`` float32 numpy arrays after ``steps`` AdamW steps."""
  data = stdlib_bytes()
  params = init_mlp(jax.random.key(seed))
  tx = optax.adamw(1e-3)
  state = tx.init(params)
  step = make_step(tx)

  it = batches(data, 64, 16, seed)
  for _ in range(steps):
    params, state, loss = step(params, state, *next(it))
  adam = state[0]
  return {k: (np.asarray(adam.mu[k]), np.asarray(adam.nu[k]))
          for k in params if params[k].size >= min_size}, float(loss)
