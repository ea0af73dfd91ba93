"""GPT-2 and ViT in Flax NNX, with their losses.

Both share one pre-LN transformer :class:`Block`. Tensor names carry shapes:
B batch, L sequence, D model width, H heads, K head width, V vocabulary,
P patches, C classes.

Example:
  >>> cfg = GPT2_PRESETS["tiny"]
  >>> model = GPT2(cfg, rngs=nnx.Rngs(0))
  >>> logits_BxLxV = model(jnp.zeros((2, 16), jnp.int32))
  >>> round(param_count(GPT2, GPT2_PRESETS["small"]) / 1e6, 1)
  124.4
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """GPT-2 hyperparameters; ``dtype`` is the compute dtype (params are f32)."""
  vocab_size: int = 50257
  context_len: int = 1024
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_ratio: int = 4
  dtype: str = "float32"


GPT2_PRESETS = {
    "tiny": GPT2Config(context_len=128, d_model=128, num_layers=4, num_heads=4),
    "small": GPT2Config(),  # 124M
    "medium": GPT2Config(d_model=1024, num_layers=24, num_heads=16),  # 355M
    "large": GPT2Config(d_model=1280, num_layers=36, num_heads=20),  # 774M
    "xl": GPT2Config(d_model=1600, num_layers=48, num_heads=25),  # 1.56B
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT hyperparameters; images are ``image_size`` square."""
  image_size: int = 224
  patch_size: int = 16
  channels: int = 3
  num_classes: int = 1000
  d_model: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_ratio: int = 4
  dtype: str = "float32"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


VIT_PRESETS = {
    "tiny": ViTConfig(image_size=28, patch_size=7, channels=1, num_classes=10,
                      d_model=64, num_layers=4, num_heads=4),
    "base": ViTConfig(),  # ViT-B/16, 86M
}


def _dense(d_in: int, d_out: int, rngs: nnx.Rngs, dtype, std=_INIT_STD):
  return nnx.Linear(d_in, d_out, dtype=dtype, rngs=rngs,
                    kernel_init=nnx.initializers.normal(std))


class Attention(nnx.Module):
  """Multi-head self-attention with a fused QKV projection."""

  def __init__(self, d_model: int, num_heads: int, out_std: float,
               rngs: nnx.Rngs, dtype=jnp.float32):
    if d_model % num_heads:
      raise ValueError(f"{d_model=} must be divisible by {num_heads=}")
    self.num_heads = num_heads
    self.qkv = _dense(d_model, 3 * d_model, rngs, dtype)
    self.out = _dense(d_model, d_model, rngs, dtype, std=out_std)

  def __call__(self, x_BxLxD: jax.Array, causal: bool) -> jax.Array:
    b, l, d = x_BxLxD.shape
    qkv_BxLx3xHxK = self.qkv(x_BxLxD).reshape(b, l, 3, self.num_heads, -1)
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = jnp.unstack(qkv_BxLx3xHxK, axis=2)
    o_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=causal)
    return self.out(o_BxLxHxK.reshape(b, l, d))


class Block(nnx.Module):
  """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  def __init__(self, d_model: int, num_heads: int, mlp_ratio: int,
               num_layers: int, rngs: nnx.Rngs, dtype=jnp.float32):
    out_std = _INIT_STD / np.sqrt(2 * num_layers)  # GPT-2 residual scaling.
    self.ln1 = nnx.LayerNorm(d_model, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.attn = Attention(d_model, num_heads, out_std, rngs, dtype)
    self.ln2 = nnx.LayerNorm(d_model, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.fc = _dense(d_model, mlp_ratio * d_model, rngs, dtype)
    self.proj = _dense(mlp_ratio * d_model, d_model, rngs, dtype, std=out_std)

  def __call__(self, x_BxLxD: jax.Array, causal: bool) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.ln1(x_BxLxD), causal)
    h_BxLxF = jax.nn.gelu(self.fc(self.ln2(x_BxLxD)), approximate=True)
    return x_BxLxD + self.proj(h_BxLxF)


class GPT2(nnx.Module):
  """GPT-2: learned positions, pre-LN blocks, tied input/output embedding."""

  def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    self.wte = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, rngs=rngs,
                         embedding_init=nnx.initializers.normal(_INIT_STD))
    self.wpe = nnx.Embed(cfg.context_len, cfg.d_model, dtype=dtype, rngs=rngs,
                         embedding_init=nnx.initializers.normal(0.01))
    self.blocks = nnx.List([
        Block(cfg.d_model, cfg.num_heads, cfg.mlp_ratio, cfg.num_layers, rngs,
              dtype) for _ in range(cfg.num_layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=dtype, rngs=rngs)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    """Returns float32 next-token logits ``BxLxV``."""
    l = tokens_BxL.shape[1]
    if l > self.cfg.context_len:
      raise ValueError(f"sequence length {l} > {self.cfg.context_len=}")
    x_BxLxD = self.wte(tokens_BxL) + self.wpe(jnp.arange(l))[None]
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, causal=True)
    x_BxLxD = self.ln_f(x_BxLxD)
    return self.wte.attend(x_BxLxD).astype(jnp.float32)


class ViT(nnx.Module):
  """Vision transformer: linear patch embedding, class token, pre-LN blocks."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"{cfg.image_size=} not divisible by {cfg.patch_size=}")
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    patch_dim = cfg.patch_size ** 2 * cfg.channels
    self.patch = _dense(patch_dim, cfg.d_model, rngs, dtype)
    self.cls = nnx.Param(jnp.zeros((1, 1, cfg.d_model)))
    self.pos = nnx.Param(
        _INIT_STD * jax.random.normal(rngs.params(),
                                      (1, cfg.num_patches + 1, cfg.d_model)))
    self.blocks = nnx.List([
        Block(cfg.d_model, cfg.num_heads, cfg.mlp_ratio, cfg.num_layers, rngs,
              dtype) for _ in range(cfg.num_layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, epsilon=1e-6, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.num_classes, rngs=rngs,
                           kernel_init=nnx.initializers.normal(_INIT_STD))

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    """Returns float32 class logits ``BxC``."""
    b, h, w, c = x_BxHxWxC.shape
    p = self.cfg.patch_size
    x_BxPxF = (x_BxHxWxC.reshape(b, h // p, p, w // p, p, c)
               .transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), -1))
    x_BxPxD = self.patch(x_BxPxF)
    cls_Bx1xD = jnp.broadcast_to(self.cls[...], (b, 1, self.cfg.d_model))
    x_BxLxD = jnp.concatenate([cls_Bx1xD.astype(x_BxPxD.dtype), x_BxPxD], 1)
    x_BxLxD = x_BxLxD + self.pos[...].astype(x_BxPxD.dtype)
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, causal=False)
    return self.head(self.ln_f(x_BxLxD[:, 0])).astype(jnp.float32)


MODELS = {"gpt2": (GPT2, GPT2_PRESETS), "vit": (ViT, VIT_PRESETS)}


def make_model(name: str, preset: str, seed: int = 0, **overrides) -> nnx.Module:
  """Builds ``MODELS[name]`` from a preset with optional config overrides."""
  if name not in MODELS:
    raise ValueError(f"{name=} must be one of {sorted(MODELS)}")
  cls, presets = MODELS[name]
  if preset not in presets:
    raise ValueError(f"{preset=} must be one of {sorted(presets)}")
  cfg = dataclasses.replace(presets[preset], **overrides)
  return cls(cfg, rngs=nnx.Rngs(seed))


def param_count(cls, cfg) -> int:
  """Number of parameters of ``cls(cfg)``, without allocating them."""
  abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape))
             for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def lm_loss(model: GPT2, inputs_BxL: jax.Array, targets_BxL: jax.Array):
  """Mean next-token cross-entropy; returns ``(loss, {"loss": loss})``."""
  logits_BxLxV = model(inputs_BxL)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV, targets_BxL).mean()
  return loss, {"loss": loss}


def classification_loss(model: ViT, x_BxHxWxC: jax.Array, labels_B: jax.Array):
  """Cross-entropy and accuracy; returns ``(loss, {"loss", "accuracy"})``."""
  logits_BxC = model(x_BxHxWxC)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxC, labels_B).mean()
  accuracy = (logits_BxC.argmax(-1) == labels_B).mean()
  return loss, {"loss": loss, "accuracy": accuracy}


LOSSES = {"gpt2": lm_loss, "vit": classification_loss}
