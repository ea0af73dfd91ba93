"""Every optimizer side by side, with a measured noise floor: GPT-2 on stdlib text, ViT on MNIST-5k.

Trains each model with each optimizer for several seeds: ``optax.adamw`` in
float32 (the reference), its control (m perturbed by 1e-6 each step: the noise
floor), with a bfloat16 first moment; ``stquant_jax.adamw`` at fixed widths
(the uniform curve: 8, 6, 5, 4, m4/v3, 3 and m3/v2 bits; 8 and 4 bits also with
round-to-nearest moments), the default adaptive ``STQuantPolicy`` and the
adaptive policy held to memory budgets of 5, 4.5, 4 and 3.5 bits. Writes every
run's JSON log, then the paired table, the frontier and the plots with
:mod:`experiments.report` (protocol: ``docs/quality.md``).

Usage::

  python -m experiments.compare --quick   # the demo: a few minutes on a CPU
  python -m experiments.compare           # the protocol: 21 optimizers x 2 models x 5 seeds
  python -m experiments.compare --models gpt2 --optimizers stquant_t4,stquant4
  python -m experiments.report results/   # re-render table and plots only

Runs are ordered seed by seed, and within a seed model by model, so the
optimizers of one seed run back to back (step times compare under the same
machine load). Runs with the same model and optimizer reuse compiled steps.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax

from experiments import optimizers, quality, report, train

# Per model: the TrainConfig fields of the comparison, sized for a 2-core CPU
# (about 15 min for the full suite): byte-level GPT-2 and a 7x7-patch ViT,
# 2 layers each. Depth costs twice here: step time, and the compile time of
# every new bit layout of the adaptive policies (it grows with the number of
# quantized leaves).
# The final loss is evaluated on the whole validation split: 1.27M byte tokens
# (1236 batches) for GPT-2; the 1000 images (100 per class, MNIST-5k split
# 4000/1000) for ViT (7 batches of 128 and one of 104). Curves use the first 8
# batches.
MODEL_RUNS: dict[str, dict[str, Any]] = {
    "gpt2": dict(model="gpt2", preset="tiny", tokenizer="bytes",
                 model_overrides={"d_model": 128, "num_layers": 2,
                                  "num_heads": 4, "context_len": 64},
                 seq_len=64, batch_size=16, learning_rate=3e-3,
                 eval_batches=8, final_eval_batches=0),
    # lr 5e-4, batch 128, decay to 1% of lr: at 2e-3 / batch 64 the run was chaotic
    # (the control moved the final loss by up to 10-19%); here by < 0.001%.
    "vit": dict(model="vit", preset="tiny",
                model_overrides={"d_model": 96, "num_layers": 2,
                                 "num_heads": 4},
                data_options={"val_per_class": 100},
                batch_size=128, learning_rate=5e-4, min_lr_ratio=0.01,
                eval_batches=8, final_eval_batches=0),
}
BASELINES = ("adamw", "adamw_control", "adamw_jitter", "adamw_bf16")
FIXED = ("stquant8", "stquant6", "stquant5", "stquant4", "stquant4v3", "stquant3", "stquant3v2")
ROUNDING = ("stquant8_nearest", "stquant4_nearest")
# The block-size axis of the frontier: 3-bit moments with more scales (32 / B bits
# of float32 scale per value). On ViT, 3-bit m is what low budgets cost, and
# smaller blocks were the lever a probe found (docs/quality.md).
BLOCKS = ("stquant3_b64", "stquant3_b32")
# Budgets at those block sizes: the code bits a budget leaves after the scales
# (32 / B bits per value) and the float32 small leaves.
ADAPTIVE_BLOCKS = ("stquant_t4.5_b64", "stquant_t5_b64", "stquant_t5_b32")
ADAPTIVE = ("stquant_adaptive", "stquant_t5", "stquant_t4.5", "stquant_t4", "stquant_t3.5")
# Is the reference tuned? fp32 AdamW at 0.7x and 1.4x its learning rate: if either
# does better, a quantized optimizer's gain over the reference may be a step-size
# effect (docs/quality.md, "Why low bits can end below fp32 AdamW").
LR_CHECK = ("adamw_lr0.7", "adamw_lr1.4")
# Does noise in m alone help? fp32 AdamW with m scaled by 1 ± 0.5 u each step: on
# GPT-2 it gains as much as 3- and 4-bit moments do (docs/quality.md).
NOISE_CHECK = ("adamw_jitter0.5",)


SWITCH_DELAY = 10  # adaptive runs: steps from a policy decision to its new layout


@dataclasses.dataclass(frozen=True)
class Suite:
  """What one ``compare`` invocation runs."""
  name: str
  optimizers: tuple[str, ...]
  seeds: tuple[int, ...]
  steps: dict[str, int]  # model -> training steps
  evals: int = 10  # evaluations per run (evenly spaced)
  out: str = "results"
  models: tuple[str, ...] = ("gpt2", "vit")


SUITES = {
    "full": Suite("full", BASELINES + LR_CHECK + NOISE_CHECK + FIXED + BLOCKS + ROUNDING
                  + ADAPTIVE + ADAPTIVE_BLOCKS, (0, 1, 2, 3, 4),
                  {"gpt2": 1000, "vit": 600}),
    "quick": Suite("quick", ("adamw", "adamw_control", "stquant8", "stquant4",
                             "stquant_adaptive"), (0,),
                   {"gpt2": 200, "vit": 200}, evals=4, out="results/quick"),
}


def adaptive_kwargs(steps: int) -> dict[str, int]:
  """``STQuantPolicy`` timing for a run of ``steps``: the library defaults (decide
  every 100 steps, at most one change per moment per 300 steps, anneal with a
  50-step time constant) from 1000 steps on; scaled down for the short demo runs,
  where every new bit layout recompiles the train step (on this 2-core CPU, 5-25 s
  for a mixed layout): 4 decisions (the last one, at the final step, is logged,
  not trained with), a moment changes at most once per two decisions, and the
  annealing boost, at the library's ratio (time constant half the decision
  interval), is gone at the first decision (for runs of 8 steps or more; below
  that the time constant is 1 step and one boost bit stays to the first
  change).
  """
  if steps >= 1000:
    return {}
  every = max(steps // 4, 1)
  return {"every": every, "min_interval": 2 * every, "anneal_steps": max(every // 2, 1)}


def budget_bits(cfg: train.TrainConfig, match: str = "stquant4") -> float:
  """Average bits (metadata included) of ``match`` on this run's model.

  The budgeted policy gets the memory of fixed 4-bit moments, so the two
  compare at equal optimizer-state size.
  """
  params = train.abstract_params(cfg)
  state = jax.eval_shape(optimizers.make_optimizer(match, 1e-3).init, params)
  return round(optimizers.average_bits(state), 4)


def reachable(cfg: train.TrainConfig, name: str, kw: dict) -> dict:
  """The lowest bits a budget needs on this model: ``{}`` when ``min_bits=3`` can
  reach it; else ``{"min_bits": (3, 2)}`` (e.g. 3.5 bits: the policy's state and
  float32 small leaves cost a little over 3.5 at 3 bits everywhere), so that the
  allocator may put the v moments its damage model finds cheapest at 2 bits
  (2-bit m stalls training, 2-bit v does not: docs/reliability.md); ``{"min_bits": 2}``
  only when even that does not fit."""
  policy = optimizers.make_policy(name, **kw)
  target = getattr(policy, "target_bits", None)
  if target is None:
    return {}
  params = train.abstract_params(cfg)
  block = optimizers.parse_stquant(name)[2].get("block_size", policy.block_size)
  for extra in ({}, {"min_bits": (3, 2)}):
    bound = optimizers.make_policy(name, **{**kw, **extra})
    if block is not None:
      bound = bound.bind(block)  # the transform's block size (scales: 32 / block bits)
    if target >= bound.min_average_bits(params):
      return extra
  return {"min_bits": 2}


def run_configs(suite: Suite, out: pathlib.Path) -> list[train.TrainConfig]:
  """The suite's runs, seed-major, each with its log path under ``out/runs``."""
  configs = []
  budgets = {}
  for seed in suite.seeds:
    for model in suite.models:
      fields = MODEL_RUNS[model]
      steps = suite.steps[model]
      for name in suite.optimizers:
        cfg = train.TrainConfig(
            **fields, optimizer=name, steps=steps, seed=seed,
            eval_interval=max(steps // suite.evals, 1), progress=False,
            log_path=str(out / "runs" / f"{model}__{name}__s{seed}.json"))
        if quality.kind(name) == "adaptive":
          kw = adaptive_kwargs(steps)
          if name == "stquant_budget":  # the memory of fixed 4-bit moments
            if model not in budgets:
              budgets[model] = budget_bits(cfg)
            kw["target_bits"] = budgets[model]
          kw.update(reachable(cfg, name, kw))
          # A fixed delay from proposal to layout switch makes the run reproducible
          # (the default switches when the background compile is done).
          cfg = dataclasses.replace(cfg, optimizer_kwargs=kw, switch_delay=SWITCH_DELAY)
        configs.append(cfg)
  return configs


def suite_config(model: str, optimizer: str, seed: int, out: pathlib.Path) -> train.TrainConfig:
  """The full suite's config of one run (``model``, ``optimizer``, ``seed``), its
  log at ``out/<model>__<optimizer>__s<seed>.json``: what the benchmarks that
  probe a suite run start from."""
  suite = dataclasses.replace(SUITES["full"], seeds=(seed,), models=(model,),
                              optimizers=(optimizer,))
  (cfg,) = run_configs(suite, out)
  return dataclasses.replace(cfg, log_path=str(out / f"{model}__{optimizer}__s{seed}.json"))


# Fields that do not change what a run computes: a log moved or copied to another
# folder (as the suite's are, into results/runs) is still a finished run of its config.
_NOT_THE_RUN = ("log_path", "progress")


def same_config(path: pathlib.Path, cfg: train.TrainConfig) -> bool:
  """Whether ``path`` holds a finished run of ``cfg``: its log has the same config
  up to where the log was written and whether a progress bar was shown (a
  field the log predates counts as the same when ``cfg`` leaves it at its
  default), and the final evaluation."""
  try:
    log = json.loads(path.read_text())
    old = log["config"]
  except (OSError, ValueError, KeyError):
    return False
  new = json.loads(json.dumps(dataclasses.asdict(cfg)))
  defaults = json.loads(json.dumps(dataclasses.asdict(train.TrainConfig())))
  return "final_eval" in log and all(
      old[k] == v if k in old else v == defaults[k]
      for k, v in new.items() if k not in _NOT_THE_RUN)


def earlier_runs(suite: Suite, out: pathlib.Path,
                 skip: set[tuple[str, str, int]]) -> tuple[list[dict[str, Any]], list[str]]:
  """Finished runs already in ``out/runs`` that ``suite`` did not (re)run but would
  have run the same way (same model settings, steps, evaluations and, for the
  policies, the same policy settings): the rest of the comparison a partial rerun
  (``--optimizers``, ``--models`` or ``--seeds`` over an existing folder) renders
  next to its own rows.

  Args:
    suite: The suite this invocation ran.
    out: Its output folder.
    skip: ``(model, optimizer, seed)`` of the runs this invocation trained or
      resumed.

  Returns:
    The kept logs, and the names of the logs left out (another config, e.g. other
    steps, or not a log of a known model and optimizer).
  """
  kept, left_out = [], []
  for path in sorted((out / "runs").glob("*.json")):
    model, name, seed = (path.stem.split("__") + ["", "", ""])[:3]
    ok = (model in MODEL_RUNS and model in suite.steps and optimizers.is_known(name)
          and seed[:1] == "s" and seed[1:].isdigit())
    if ok and (model, name, int(seed[1:])) in skip:
      continue
    if ok:
      one = dataclasses.replace(suite, seeds=(int(seed[1:]),), models=(model,),
                                optimizers=(name,))
      ok = same_config(path, run_configs(one, out)[0])
    if ok:
      kept.append(json.loads(path.read_text()))
    else:
      left_out.append(path.name)
  return kept, left_out


def enable_compilation_cache() -> None:
  """Persistent XLA cache under ``~/.cache/stquant_jax/jax`` (reruns start
  faster); ``STQUANT_NO_JAX_CACHE=1`` turns it off."""
  if os.environ.get("STQUANT_NO_JAX_CACHE"):
    return
  from experiments import data
  jax.config.update("jax_compilation_cache_dir", str(data.cache_dir() / "jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_suite(suite: Suite, out: pathlib.Path, *, resume: bool = False,
              progress: bool = True, resumed: list[str] | None = None) -> list[dict[str, Any]]:
  """Trains every run of ``suite``; returns the logs (also written to disk).
  With ``resume``, finished runs are read back, and their log paths appended to
  ``resumed`` (when given)."""
  from tqdm.auto import tqdm
  configs = run_configs(suite, out)
  total = sum(c.steps for c in configs)
  logs, failed = [], []
  bar = tqdm(total=total, disable=not progress, unit="step", mininterval=0.5,
             desc=f"{suite.name}: {len(configs)} runs", dynamic_ncols=True)
  for i, cfg in enumerate(configs, 1):
    path = pathlib.Path(cfg.log_path)
    if resume and path.exists() and same_config(path, cfg):
      logs.append(json.loads(path.read_text()))
      if resumed is not None:
        resumed.append(str(path))
      bar.update(cfg.steps)
      continue
    bar.set_description(f"[{i}/{len(configs)}] {cfg.model} {cfg.optimizer} "
                        f"seed {cfg.seed}")

    def on_step(step, log, bar=bar):
      ev = f"{log['eval'][-1]['loss']:.3f}" if log["eval"] else "-"
      bar.set_postfix(loss=f"{log['train_loss'][-1]:.3f}", val=ev, refresh=False)
      bar.update()

    try:
      logs.append(train.train(cfg, on_step=on_step))
    except Exception as e:  # pylint: disable=broad-except  (one bad run keeps the rest)
      failed.append(f"{cfg.model} {cfg.optimizer} seed {cfg.seed}: "
                    f"{type(e).__name__}: {e}")
      print(f"\nFAILED {failed[-1]}", file=sys.stderr, flush=True)
  bar.close()
  if failed:
    raise RuntimeError(f"{len(failed)} of {len(configs)} runs failed (the others are "
                       "logged; rerun with --resume):\n" + "\n".join(failed))
  return logs


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.compare", description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="the demo: 1 seed, 5 optimizers, 200 steps (a few minutes)")
  parser.add_argument("--out", default=None,
                      help="output folder (default: results/ or results/quick/)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="number of seeds (default: 5, or 1 with --quick)")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per run, both models (default: 1000, 200 "
                           "with --quick)")
  parser.add_argument("--models", default=None,
                      help="comma-separated subset of " + ",".join(MODEL_RUNS))
  parser.add_argument("--optimizers", default=None,
                      help="comma-separated optimizers (default: the suite's "
                           f"{len(SUITES['full'].optimizers)}); names: "
                           f"{', '.join(optimizers.OPTIMIZERS)}, or {optimizers.GRAMMAR}")
  parser.add_argument("--resume", action="store_true",
                      help="keep finished runs whose log has the same config")
  parser.add_argument("--no-progress", dest="progress", action="store_false")
  args = parser.parse_args(argv)

  suite = SUITES["quick" if args.quick else "full"]
  changes = {}
  if args.out:
    changes["out"] = args.out
  if args.seeds:
    changes["seeds"] = tuple(range(args.seeds))
  if args.steps:
    changes["steps"] = {m: args.steps for m in suite.steps}
  if args.models:
    models = tuple(args.models.split(","))
    unknown = sorted(set(models) - set(MODEL_RUNS))
    if unknown:
      parser.error(f"unknown models {unknown}; choose from {', '.join(MODEL_RUNS)}")
    changes["models"] = models
  if args.optimizers:
    names = tuple(args.optimizers.split(","))
    unknown = sorted(n for n in names if not optimizers.is_known(n))
    if unknown:
      parser.error(f"unknown optimizers {unknown}; choose from "
                   f"{', '.join(optimizers.OPTIMIZERS)}, or {optimizers.GRAMMAR}")
    # The reference every delta is taken against, and the control that gives the
    # noise floor: always run.
    names = tuple(n for n in ("adamw", "adamw_control") if n not in names) + names
    changes["optimizers"] = names
  suite = dataclasses.replace(suite, **changes)
  out = pathlib.Path(suite.out)

  enable_compilation_cache()
  t0 = time.perf_counter()
  resumed = []
  logs = run_suite(suite, out, resume=args.resume, progress=args.progress, resumed=resumed)
  wall = time.perf_counter() - t0
  # The folder's other finished runs of the same settings stay in the table (a
  # partial rerun updates its rows; it does not drop the others).
  earlier, left_out = earlier_runs(suite, out, {
      (l["config"]["model"], l["config"]["optimizer"], l["config"]["seed"]) for l in logs})
  meta = {"suite": dataclasses.asdict(suite), "wall_time_s": wall,
          "argv": sys.argv[1:] if argv is None else list(argv)}
  if earlier:
    meta["partial"] = True
  summary = report.render(out, logs + earlier, meta=meta)
  print()
  print(report.short_table(summary))
  print(f"\nTrained {len(logs) - len(resumed)} runs in {wall / 60:.1f} min"
        + (f" ({len(resumed)} more read back from finished logs)." if resumed else "."))
  if earlier:
    print(f"Kept {len(earlier)} earlier runs of the same settings from {out / 'runs'} "
          "in the table.")
  if left_out:
    print(f"Left out {len(left_out)} logs in {out / 'runs'} with other settings "
          f"(e.g. {left_out[0]}).")
  print(f"Table:   {out / 'results.md'}")
  print(f"Plots:   {', '.join(str(out / p) for p in summary['plots'])}")
  print(f"Logs:    {out / 'runs'}/*.json, summary {out / 'summary.json'}")
  print(f"Re-render without training: python -m experiments.report {out}")
  return summary


if __name__ == "__main__":
  main()
