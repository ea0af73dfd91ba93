"""Importable training loop for GPT-2 (stdlib text) and ViT (MNIST-5k).

Example:
  >>> log = train(TrainConfig(model="gpt2", tokenizer="bytes", steps=20,
  ...                         batch_size=4, seq_len=64, max_bytes=100_000,
  ...                         progress=False))
  >>> log["eval"][-1]["loss"] < log["train_loss"][0]
  True

CLI::

  python -m experiments.train --model gpt2 --preset tiny --optimizer adamw \
      --steps 200 --log runs/gpt2_tiny_adamw.json

On several devices the batch is split over them (data parallel, params and
optimizer state replicated); ``--fsdp`` splits params, gradients and optimizer
state too (``experiments/fsdp.py``).
"""

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from flax.nnx.training.optimizer import to_opt_state
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import data, fsdp, models, optimizers


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a run; stored verbatim in the JSON log."""
  model: str = "gpt2"  # "gpt2" or "vit"
  preset: str = "tiny"
  model_overrides: dict = dataclasses.field(default_factory=dict)
  optimizer: str = "adamw"  # see optimizers.OPTIMIZERS
  optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
  steps: int = 200
  batch_size: int = 16
  seq_len: int | None = None  # gpt2 only; None = model context length.
  tokenizer: str = "gpt2"  # gpt2 only: "gpt2" (BPE) or "bytes".
  max_bytes: int | None = None  # gpt2 only: source bytes per split.
  learning_rate: float = 1e-3
  warmup_steps: int = 20
  min_lr_ratio: float = 0.1  # cosine decays to learning_rate * this.
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float | None = 1.0
  compute_dtype: str = "float32"
  seed: int = 0
  eval_interval: int = 50
  eval_batches: int = 4
  log_path: str | None = None
  progress: bool = True
  fsdp: bool = False  # several devices: params, grads, opt state split (experiments.fsdp)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup then cosine decay to ``min_lr_ratio * learning_rate``."""
  warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


_TX_FIELDS = ("optimizer", "optimizer_kwargs", "steps", "learning_rate",
              "warmup_steps", "min_lr_ratio", "weight_decay", "b1", "b2",
              "grad_clip")


def make_tx(cfg: TrainConfig) -> optax.GradientTransformation:
  """Gradient clipping (optional) chained with the named optimizer.

  The same transformation object is returned for configs that differ only in
  fields it does not depend on (e.g. the seed), so jitted steps compiled for
  one seed are reused by the next.
  """
  key = json.dumps({f: getattr(cfg, f) for f in _TX_FIELDS}, sort_keys=True)
  return _make_tx_cached(key)


@functools.lru_cache(maxsize=64)
def _make_tx_cached(key: str) -> optax.GradientTransformation:
  cfg = TrainConfig(**json.loads(key))
  tx = optimizers.make_optimizer(
      cfg.optimizer, lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
      weight_decay=cfg.weight_decay, mask=_decay_mask, **cfg.optimizer_kwargs)
  if cfg.grad_clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx


def make_data(cfg: TrainConfig, context_len: int | None):
  """Returns ``(train_iterator, eval_batches, overrides)`` for the model."""
  if cfg.model == "gpt2":
    seq_len = cfg.seq_len or context_len
    train_T = data.load_text_tokens("train", cfg.tokenizer, cfg.max_bytes)
    val_T = data.load_text_tokens("validation", cfg.tokenizer, cfg.max_bytes)
    vocab = data.VOCAB_SIZES[cfg.tokenizer]
    return (data.text_batches(train_T, cfg.batch_size, seq_len, cfg.seed),
            data.text_eval_batches(val_T, cfg.batch_size, seq_len,
                                   cfg.eval_batches),
            {"vocab_size": vocab, "context_len": max(context_len, seq_len)})
  if cfg.model == "vit":
    train_ds, val_ds = data.load_mnist5k()  # Same split for every seed.
    if cfg.batch_size > len(val_ds.y_N):
      raise ValueError(f"{cfg.batch_size=} exceeds the {len(val_ds.y_N)} "
                       "validation images")
    return (data.image_batches(train_ds, cfg.batch_size, cfg.seed),
            data.image_eval_batches(val_ds, cfg.batch_size)[:cfg.eval_batches],
            {})
  raise ValueError(f"{cfg.model=} must be 'gpt2' or 'vit'")


def model_config(cfg: TrainConfig):
  """The model config a run builds: preset, data vocabulary/context, overrides."""
  base = dataclasses.replace(models.MODELS[cfg.model][1][cfg.preset],
                             **cfg.model_overrides)
  extra = {"dtype": cfg.compute_dtype}
  if cfg.model == "gpt2":
    extra["vocab_size"] = data.VOCAB_SIZES[cfg.tokenizer]
    extra["context_len"] = max(base.context_len, cfg.seq_len or 0)
  return dataclasses.replace(base, **{**extra, **cfg.model_overrides})


def abstract_params(cfg: TrainConfig):
  """The run's parameters as ``jax.ShapeDtypeStruct`` leaves (no allocation)."""
  cls = models.MODELS[cfg.model][0]
  mcfg = model_config(cfg)
  return nnx.state(nnx.eval_shape(lambda: cls(mcfg, rngs=nnx.Rngs(0))),
                   nnx.Param)


def data_sharding(batch_size: int):
  """Batch sharding over a 'data' mesh axis; None on a single device.

  Uses the largest device count that divides ``batch_size``.
  """
  n = math.gcd(batch_size, jax.device_count())
  if n <= 1:
    return None, None
  mesh = jax.make_mesh((n,), ("data",), (jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])
  return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def settle_opt_state(optimizer: nnx.Optimizer) -> None:
  """Gives ``opt_state`` the structure ``Optimizer.update`` leaves behind.

  ``update`` stores ``nnx.state(new_opt_state)``, which turns custom pytree
  nodes (e.g. ``stquant_jax.QuantizedArray``) into ``nnx.State`` dicts; doing
  it once up front avoids a second trace and compile of the train step.
  """
  nnx.update(optimizer.opt_state, nnx.state(nnx.as_pure(optimizer.opt_state)))


def abstract_opt_state(tx: optax.GradientTransformation, model: nnx.Module):
  """``tx.init(params)`` as ``jax.ShapeDtypeStruct`` leaves, for accounting.

  The state's structure and dtypes never change between steps, so its size at
  init is its size throughout; ``nnx.Optimizer`` would hide its pytree types.
  """
  return jax.eval_shape(tx.init, nnx.state(model, nnx.Param))


def typed_opt_state(optimizer: nnx.Optimizer, template):
  """``optimizer.opt_state``'s arrays in ``template``'s pytree types."""
  leaves = jax.tree.leaves(optimizer.opt_state)
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


def relayout(optimizer: nnx.Optimizer, template, policy):
  """Applies an adaptive stquant policy's proposed bit-widths (outside jit).

  Returns:
    ``(template, changed)``: the abstract state of the (new) layout, and
    whether it changed (then the train step retraces once).
  """
  import stquant_jax
  typed = typed_opt_state(optimizer, template)
  new = stquant_jax.relayout(typed, policy=policy)
  if new is typed:
    return template, False
  optimizer.opt_state = nnx.data(to_opt_state(new))
  settle_opt_state(optimizer)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), new), True


def _memory(opt_state, cfg: TrainConfig) -> dict[str, Any]:
  quantized = cfg.optimizer.startswith("stquant")
  return {"opt_state_bytes": optimizers.state_bytes(opt_state),
          "average_bits": (optimizers.average_bits(opt_state) if quantized
                           else None)}


def bit_record(optimizer: nnx.Optimizer, template, step: int,
               cfg: TrainConfig) -> dict[str, Any]:
  """``stquant_jax.bit_widths`` of the current layout (and the policy's
  proposals and zones, when it keeps them), with the step and memory.

  Leaf names drop nnx's trailing ``/value``.
  """
  import stquant_jax
  typed = typed_opt_state(optimizer, template)
  record = {"step": step, **_memory(typed, cfg)}
  for key, value in stquant_jax.bit_widths(typed).items():
    if isinstance(value, dict):
      value = {k.removesuffix("/value"): v for k, v in value.items()}
    record[key] = value
  return record


@functools.cache
def make_steps(loss_fn):
  """Jitted ``train_step(model, optimizer, batch)`` and ``eval_step``.

  Cached per loss function: runs with the same model config and optimizer
  (same :func:`make_tx` object) reuse the compiled steps.
  """

  @nnx.jit
  def train_step(model, optimizer, batch):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(model, *batch)
    optimizer.update(model, grads)
    return metrics

  @nnx.jit
  def eval_step(model, batch):
    return loss_fn(model, *batch)[1]

  return train_step, eval_step


def evaluate(eval_step, model, batches) -> dict[str, float]:
  """Mean of each metric over the fixed evaluation batches."""
  metrics = [jax.device_get(eval_step(model, b)) for b in batches]
  return {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}


def train(cfg: TrainConfig,
          on_step: Callable[[int, dict], None] | None = None,
          on_end: Callable[[nnx.Module, Any], None] | None = None,
          ) -> dict[str, Any]:
  """Trains one model; returns (and optionally writes) the JSON-able log.

  Args:
    cfg: The run's configuration.
    on_step: Optional ``on_step(step, log)`` called after every step (e.g. to
      drive an outer progress bar).
    on_end: Optional ``on_end(model, opt_state)`` called once after the last
      step with the trained model and the optax state in its own pytree types
      (e.g. ``stquant_jax.QuantizedArray`` moments), to inspect the final state.

  Returns:
    The log: config, per-step train loss and step time, evaluations,
    optimizer-state bytes and average bits, relayout events and, for stquant
    optimizers, ``bit_history`` (per-leaf bit-widths at step 0, at each
    policy decision and at the end).
  """
  t_start = time.perf_counter()
  model_cfg = dataclasses.replace(models.MODELS[cfg.model][1][cfg.preset],
                                  **cfg.model_overrides)
  context_len = getattr(model_cfg, "context_len", None)
  train_it, eval_batches, overrides = make_data(cfg, context_len)
  model = models.make_model(
      cfg.model, cfg.preset, cfg.seed,
      **{"dtype": cfg.compute_dtype, **overrides, **cfg.model_overrides})
  tx = make_tx(cfg)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  settle_opt_state(optimizer)
  policy = optimizers.make_policy(cfg.optimizer, **cfg.optimizer_kwargs)
  every = getattr(policy, "every", None)  # Adaptive policies re-decide bits.
  batch_sh, replicated = data_sharding(cfg.batch_size)
  train_step, eval_step = make_steps(models.LOSSES[cfg.model])
  template = abstract_opt_state(tx, model)
  sharded = None  # FSDP: params, gradients and optimizer state split over "data"
  if replicated is not None and cfg.fsdp:
    sharded = fsdp.FSDP(batch_sh.mesh, model, optimizer, models.LOSSES[cfg.model], template)
    train_step = sharded.train_step
  elif replicated is not None:  # Data parallel: replicate state, shard batch.
    for obj in (model, optimizer):
      nnx.update(obj, jax.device_put(nnx.state(obj), replicated))
  if replicated is not None:
    put = lambda b: jax.device_put(b, batch_sh)
    eval_batches = [put(b) for b in eval_batches]
  else:
    put = jax.device_put
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  memory = _memory(template, cfg)
  log = {
      "config": dataclasses.asdict(cfg),
      "model_config": dataclasses.asdict(model.cfg),
      "param_count": int(n_params),
      "opt_state_bytes": memory["opt_state_bytes"],
      "opt_state_average_bits": memory["average_bits"],
      "devices": [str(d) for d in jax.devices()],
      "data_parallel": 1 if batch_sh is None else batch_sh.mesh.size,
      "fsdp": sharded is not None,
      "versions": {"jax": jax.__version__, "python": platform.python_version()},
      "train_loss": [], "step_time_s": [], "eval": [], "relayouts": [],
      "bit_history": [],  # stquant only: layout (and proposals) over steps.
  }
  quantized = cfg.optimizer.startswith("stquant")
  if quantized:
    log["bit_history"].append(bit_record(optimizer, template, 0, cfg))
  compile_steps = {1}  # Steps that (re)traced the train step.
  bar = _progress(cfg)
  for step in range(1, cfg.steps + 1):
    batch = put(next(train_it))
    t0 = time.perf_counter()
    metrics = jax.device_get(train_step(model, optimizer, batch))
    log["step_time_s"].append(time.perf_counter() - t0)
    log["train_loss"].append(float(metrics["loss"]))
    if step % cfg.eval_interval == 0 or step == cfg.steps:
      log["eval"].append({"step": step,
                          **evaluate(eval_step, model, eval_batches)})
    if every and step % every == 0:
      t0 = time.perf_counter()
      template, changed = relayout(optimizer, template, policy)
      if changed:
        if sharded is not None:
          sharded.place(optimizer, template)
        elif replicated is not None:
          nnx.update(optimizer, jax.device_put(nnx.state(optimizer), replicated))
        log["relayouts"].append({
            "step": step, "relayout_time_s": time.perf_counter() - t0,
            **_memory(typed_opt_state(optimizer, template), cfg)})
        if step < cfg.steps:
          compile_steps.add(step + 1)
      log["bit_history"].append(bit_record(optimizer, template, step, cfg))
    bar.set_postfix(loss=f"{log['train_loss'][-1]:.3f}",
                    val=f"{log['eval'][-1]['loss']:.3f}" if log["eval"] else "-",
                    refresh=False)
    bar.update()
    if on_step is not None:
      on_step(step, log)
  bar.close()
  times = [t for i, t in enumerate(log["step_time_s"], 1)
           if i not in compile_steps] or log["step_time_s"]
  log["compile_steps"] = sorted(compile_steps)
  log["median_step_time_s"] = float(np.median(times)) if times else None
  log["total_time_s"] = time.perf_counter() - t_start
  log["final_memory"] = _memory(template, cfg)
  if quantized and (not log["bit_history"]
                    or log["bit_history"][-1]["step"] != cfg.steps):
    log["bit_history"].append(bit_record(optimizer, template, cfg.steps, cfg))
  if on_end is not None:
    on_end(model, typed_opt_state(optimizer, template))
  if cfg.log_path:
    path = pathlib.Path(cfg.log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log, indent=1))
  return log


def _progress(cfg: TrainConfig):
  from tqdm.auto import tqdm
  return tqdm(total=cfg.steps, disable=not cfg.progress,
              desc=f"{cfg.model}-{cfg.preset} {cfg.optimizer}")


def main(argv=None) -> dict[str, Any]:
  """Parses flags named like the :class:`TrainConfig` fields and trains."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for f in dataclasses.fields(TrainConfig):
    flag = "--" + f.name.replace("_", "-")
    if f.name in ("optimizer_kwargs", "model_overrides"):
      parser.add_argument(flag, type=json.loads, default={},
                          help="JSON dict, e.g. '{\"num_layers\": 2}'")
    elif f.name == "progress":
      parser.add_argument("--no-progress", dest="progress",
                          action="store_false")
    elif f.type is bool:
      parser.add_argument(flag, action="store_true")
    else:
      kind = {"int | None": int, "float | None": float,
              "str | None": str}.get(str(f.type), f.type)
      parser.add_argument(flag, type=kind, default=f.default)
  log = train(TrainConfig(**vars(parser.parse_args(argv))))
  print(json.dumps({k: log[k] for k in ("param_count", "opt_state_bytes",
                                        "median_step_time_s", "eval")}))
  return log


if __name__ == "__main__":
  main()
