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
  tokenizer: str = "bytes"  # gpt2 only: "bytes" (256 tokens) or "gpt2" (BPE, 50257).
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
  data_options: dict = dataclasses.field(default_factory=dict)  # vit: load_mnist5k kwargs
  eval_interval: int = 50
  eval_batches: int = 4
  final_eval_batches: int | None = None  # None: eval_batches; 0: the whole split.
  log_path: str | None = None
  progress: bool = True
  fsdp: bool = False  # several devices: params, grads, opt state split (experiments.fsdp)
  # Adaptive policies (stquant_jax.adaptive_jit): steps between a proposal and its
  # layout switch. None: as soon as the new layout's step is compiled in the background
  # (no stall; the step depends on compile speed); an int: that many steps later
  # (reproducible; waits for the compile if it is not done).
  switch_delay: int | None = None
  compile_cache_dir: str | None = None  # JAX's persistent compilation cache
  # "adaptive_jit" (above), or "relayout": stquant_jax.relayout at each decision and
  # nnx.jit retracing for the new layout (the stalling way; benchmarks compare them).
  layout_switch: str = "adaptive_jit"


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
  """Returns ``(train_iterator, eval_batches, final_eval_batches, overrides)``.

  ``final_eval_batches`` (the last evaluation's data) is ``cfg.final_eval_batches``
  batches, or the whole validation split when that is 0 (every image for ViT;
  non-overlapping windows covering the text for GPT-2).
  """
  final = cfg.eval_batches if cfg.final_eval_batches is None else cfg.final_eval_batches
  if cfg.model == "gpt2":
    seq_len = cfg.seq_len or context_len
    train_T = data.load_text_tokens("train", cfg.tokenizer, cfg.max_bytes)
    val_T = data.load_text_tokens("validation", cfg.tokenizer, cfg.max_bytes)
    vocab = data.VOCAB_SIZES[cfg.tokenizer]
    whole = (len(val_T) - 1) // (seq_len * cfg.batch_size)
    evals = lambda n: data.text_eval_batches(val_T, cfg.batch_size, seq_len, n)
    return (data.text_batches(train_T, cfg.batch_size, seq_len, cfg.seed),
            evals(cfg.eval_batches), evals(min(final, whole) if final else whole),
            {"vocab_size": vocab, "context_len": max(context_len, seq_len)})
  if cfg.model == "vit":
    train_ds, val_ds = data.load_mnist5k(**cfg.data_options)  # same split every seed
    if cfg.batch_size > len(val_ds.y_N):
      raise ValueError(f"{cfg.batch_size=} exceeds the {len(val_ds.y_N)} "
                       "validation images")
    val = data.image_eval_batches(val_ds, cfg.batch_size)
    whole = data.image_eval_batches(val_ds, cfg.batch_size, remainder=True)
    return (data.image_batches(train_ds, cfg.batch_size, cfg.seed),
            val[:cfg.eval_batches], val[:final] if final else whole, {})
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


def _memory(optimizer: nnx.Optimizer, cfg: TrainConfig) -> dict[str, Any]:
  """Optimizer-state bytes and, for stquant optimizers, average bits (both read
  the ``nnx.Optimizer`` directly)."""
  quantized = cfg.optimizer.startswith("stquant")
  return {"opt_state_bytes": optimizers.state_bytes(optimizer),
          "average_bits": (optimizers.average_bits(optimizer) if quantized
                           else None)}


def bit_record(optimizer: nnx.Optimizer, step: int,
               cfg: TrainConfig) -> dict[str, Any]:
  """``stquant_jax.bit_widths`` of the current layout (and the policy's
  proposals and zones, when it keeps them), with the step and memory."""
  import stquant_jax
  return {"step": step, **_memory(optimizer, cfg), **stquant_jax.bit_widths(optimizer)}


@functools.cache
def train_step_fn(loss_fn):
  """The (unjitted) ``train_step(model, optimizer, batch) -> metrics``; one function
  per loss, so ``adaptive_jit`` reuses its compiled layouts across runs (seeds)."""
  def train_step(model, optimizer, batch):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(model, *batch)
    optimizer.update(model, grads)
    return metrics
  return train_step


@functools.cache
def make_steps(loss_fn):
  """Jitted ``train_step(model, optimizer, batch)`` and ``eval_step``.

  Cached per loss function: runs with the same model config and optimizer
  (same :func:`make_tx` object) reuse the compiled steps.
  """

  @nnx.jit
  def eval_step(model, batch):
    return loss_fn(model, *batch)[1]

  return nnx.jit(train_step_fn(loss_fn)), eval_step


def adaptive_train_step(loss_fn, cfg: TrainConfig):
  """The train step of an adaptive stquant policy: ``stquant_jax.adaptive_jit``
  compiles each proposed layout in the background and switches without a stall
  (no ``relayout`` call in the loop)."""
  import stquant_jax
  return stquant_jax.adaptive_jit(train_step_fn(loss_fn), delay=cfg.switch_delay,
                                  cache_dir=cfg.compile_cache_dir)


def evaluate(eval_step, model, batches) -> dict[str, float]:
  """Mean of each metric over the evaluation batches, weighted by their sizes (a
  smaller last batch counts for its examples)."""
  metrics = [jax.device_get(eval_step(model, b)) for b in batches]
  sizes = [len(b[0]) for b in batches]
  return {k: float(np.average([m[k] for m in metrics], weights=sizes)) for k in metrics[0]}


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
    optimizer-state bytes and average bits, relayout events (the first step
    at each new layout, seconds waited for its compile and to re-pack, and
    the memory after) and, for stquant optimizers, ``bit_history`` (per-leaf
    bit-widths at step 0, at each policy decision and at the end), and
    ``compiles`` (every compile of the train step, background or not).
  """
  t_start = time.perf_counter()
  model_cfg = dataclasses.replace(models.MODELS[cfg.model][1][cfg.preset],
                                  **cfg.model_overrides)
  context_len = getattr(model_cfg, "context_len", None)
  train_it, eval_batches, final_batches, overrides = make_data(cfg, context_len)
  model = models.make_model(
      cfg.model, cfg.preset, cfg.seed,
      **{"dtype": cfg.compute_dtype, **overrides, **cfg.model_overrides})
  tx = make_tx(cfg)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  policy = optimizers.make_policy(cfg.optimizer, **cfg.optimizer_kwargs)
  every = getattr(policy, "every", None)  # Adaptive policies re-decide bits.
  batch_sh, replicated = data_sharding(cfg.batch_size)
  train_step, eval_step = make_steps(models.LOSSES[cfg.model])
  sharded = None  # FSDP: params, gradients and optimizer state split over "data"
  if replicated is not None and cfg.fsdp:
    template = jax.eval_shape(tx.init, nnx.state(model, nnx.Param))  # typed moments
    sharded = fsdp.FSDP(batch_sh.mesh, model, optimizer, models.LOSSES[cfg.model], template)
    train_step = sharded.train_step
  elif replicated is not None:  # Data parallel: replicate state, shard batch.
    for obj in (model, optimizer):
      nnx.update(obj, jax.device_put(nnx.state(obj), replicated))
  if replicated is not None:
    put = lambda b: jax.device_put(b, batch_sh)
    eval_batches = [put(b) for b in eval_batches]
    final_batches = [put(b) for b in final_batches]
  else:
    put = jax.device_put
  if cfg.layout_switch not in ("adaptive_jit", "relayout"):
    raise ValueError(f"{cfg.layout_switch=} must be 'adaptive_jit' or 'relayout'")
  # FSDP owns its jitted step (shardings in and out), so an adaptive policy's layout
  # changes go through relayout + re-placement there, not adaptive_jit.
  helper = bool(every) and cfg.layout_switch == "adaptive_jit" and sharded is None
  if helper:
    train_step = adaptive_train_step(models.LOSSES[cfg.model], cfg)
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  memory = _memory(optimizer, cfg)
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
    log["bit_history"].append(bit_record(optimizer, 0, cfg))
  compile_steps = {1}  # Steps that compiled the train step in the loop.
  switches_seen = 0
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
    if step == cfg.steps:
      log["final_eval"] = {"step": step, "batches": len(final_batches),
                           **evaluate(eval_step, model, final_batches)}
    if helper:
      for sw in train_step.stats["switches"][switches_seen:]:  # this step switched
        log["relayouts"].append({
            "step": step, "proposal_step": sw["asked"], "waited_s": sw["waited_s"],
            "repack_s": sw["repack_s"], **_memory(optimizer, cfg)})
      switches_seen = len(train_step.stats["switches"])
    elif every and step % every == 0:  # layout_switch="relayout"
      import stquant_jax
      before = stquant_jax.bit_widths(optimizer)
      t0 = time.perf_counter()
      stquant_jax.relayout(optimizer)
      after = stquant_jax.bit_widths(optimizer)
      if (before["mu_bits"], before["nu_bits"]) != (after["mu_bits"], after["nu_bits"]):
        log["relayouts"].append({"step": step + 1, "proposal_step": step,
                                 "repack_s": time.perf_counter() - t0,
                                 **_memory(optimizer, cfg)})
        if sharded is not None:  # re-place the new layout, rebuild the jitted step
          sharded.place(optimizer, stquant_jax.plain_state(optimizer))
        if step < cfg.steps:
          compile_steps.add(step + 1)  # nnx.jit retraces for the new layout
    if every and step % every == 0:
      log["bit_history"].append(bit_record(optimizer, step, cfg))
    bar.set_postfix(loss=f"{log['train_loss'][-1]:.3f}",
                    val=f"{log['eval'][-1]['loss']:.3f}" if log["eval"] else "-",
                    refresh=False)
    bar.update()
    if on_step is not None:
      on_step(step, log)
  bar.close()
  if helper:
    train_step.close()
    log["compiles"] = train_step.stats["compiles"]
    log["fallback_compiles"] = train_step.stats["fallback_compiles"]
    # Proposals still waiting for their switch (e.g. a decision at the last step) are
    # applied now, so the final state is the policy's last decision (no step follows,
    # so nothing compiles).
    import stquant_jax
    before = stquant_jax.bit_widths(optimizer)
    t0 = time.perf_counter()
    stquant_jax.relayout(optimizer)
    after = stquant_jax.bit_widths(optimizer)
    if (before["mu_bits"], before["nu_bits"]) != (after["mu_bits"], after["nu_bits"]):
      log["relayouts"].append({"step": cfg.steps, "after_last_step": True,
                               "repack_s": time.perf_counter() - t0,
                               **_memory(optimizer, cfg)})
  times = [t for i, t in enumerate(log["step_time_s"], 1)
           if i not in compile_steps] or log["step_time_s"]
  log["compile_steps"] = sorted(compile_steps)
  log["median_step_time_s"] = float(np.median(times)) if times else None
  log["total_time_s"] = time.perf_counter() - t_start
  log["final_memory"] = _memory(optimizer, cfg)
  if quantized and (not log["bit_history"]
                    or log["bit_history"][-1]["step"] != cfg.steps):
    log["bit_history"].append(bit_record(optimizer, cfg.steps, cfg))
  if on_end is not None:
    import stquant_jax
    on_end(model, stquant_jax.plain_state(optimizer) if quantized
           else nnx.as_pure(optimizer.opt_state))
  if cfg.log_path:
    path = pathlib.Path(cfg.log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log, indent=1))
  return log


def _progress(cfg: TrainConfig):
  from tqdm.auto import tqdm
  return tqdm(total=cfg.steps, disable=not cfg.progress,
              desc=f"{cfg.model}-{cfg.preset} {cfg.optimizer}")


_HELP = {
    "model": "which model to train",
    "preset": "model size preset: " + "; ".join(
        f"{m}: {', '.join(presets)}" for m, (_, presets) in models.MODELS.items()),
    "model_overrides": "JSON dict of model config fields, e.g. '{\"num_layers\": 2}'",
    "optimizer": ("optimizer name: " + ", ".join(optimizers.OPTIMIZERS)
                  + "; or " + optimizers.GRAMMAR),
    "optimizer_kwargs": ("JSON dict of stquant policy arguments, e.g. "
                         "'{\"every\": 50, \"target_bits\": 4.5}'"),
    "data_options": "JSON dict of data options (vit: load_mnist5k kwargs, e.g. "
                    "'{\"val_per_class\": 100}')",
    "steps": "training steps",
    "batch_size": "examples per step",
    "seq_len": "gpt2: tokens per example (None: the model's context length)",
    "tokenizer": "gpt2: byte-level (fast on a CPU) or GPT-2 BPE",
    "max_bytes": "gpt2: bound on source bytes read per split",
    "final_eval_batches": "batches of the last evaluation (0: the whole validation split)",
    "log_path": "write the JSON log here",
    "switch_delay": ("adaptive policies: steps from a proposal to its layout switch "
                     "(None: when compiled in the background; an int: reproducible)"),
    "compile_cache_dir": "JAX's persistent compilation cache directory",
    "fsdp": ("several devices: shard params, gradients and optimizer state over the "
             "data axis (default: data parallel, replicated state)"),
    "layout_switch": ("adaptive policies: adaptive_jit (no stall) or relayout (retrace "
                      "at each change)"),
}
_CHOICES = {"model": ("gpt2", "vit"), "tokenizer": ("bytes", "gpt2"),
            "compute_dtype": ("float32", "bfloat16"),
            "layout_switch": ("adaptive_jit", "relayout")}


def _positive(kind):
  def parse(text):
    value = kind(text)
    if value <= 0:
      raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
  return parse


def parser() -> argparse.ArgumentParser:
  """The CLI: one flag per :class:`TrainConfig` field, with defaults and choices."""
  ap = argparse.ArgumentParser(
      prog="python -m experiments.train", description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  for f in dataclasses.fields(TrainConfig):
    flag = "--" + f.name.replace("_", "-")
    help_ = _HELP.get(f.name, f.name.replace("_", " "))
    if f.name in ("optimizer_kwargs", "model_overrides", "data_options"):
      ap.add_argument(flag, type=json.loads, default={}, help=help_)
    elif f.name == "progress":
      ap.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bar")
    elif f.type is bool:
      ap.add_argument(flag, action="store_true", help=help_)
    else:
      kind = {"int | None": int, "float | None": float,
              "str | None": str}.get(str(f.type), f.type)
      if f.name in ("steps", "batch_size", "eval_interval", "eval_batches",
                    "learning_rate", "seq_len"):
        kind = _positive(kind)
      ap.add_argument(flag, type=kind, default=f.default, help=help_,
                      choices=_CHOICES.get(f.name))
  return ap


def main(argv=None) -> dict[str, Any]:
  """Parses flags named like the :class:`TrainConfig` fields and trains."""
  ap = parser()
  args = ap.parse_args(argv)
  presets = models.MODELS[args.model][1]
  if args.preset not in presets:
    ap.error(f"argument --preset: invalid choice for --model {args.model}: "
             f"{args.preset!r} (choose from {', '.join(map(repr, presets))})")
  if not optimizers.is_known(args.optimizer):
    ap.error(f"argument --optimizer: invalid choice {args.optimizer!r} (choose from "
             f"{', '.join(optimizers.OPTIMIZERS)}; or {optimizers.GRAMMAR})")
  try:
    log = train(TrainConfig(**vars(args)))
  except (ValueError, TypeError) as e:  # a bad combination of valid values
    ap.exit(2, f"{ap.prog}: error: {e}\n")
  print(json.dumps({k: log[k] for k in ("param_count", "opt_state_bytes",
                                        "median_step_time_s", "eval")}))
  return log


if __name__ == "__main__":
  main()
