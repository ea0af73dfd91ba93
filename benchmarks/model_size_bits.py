"""Where a budget's bits go as models grow: float32 small leaves against the matrices.

Leaves with fewer than ``min_size`` (4096) values (biases, norms, the ViT head)
keep float32 moments; their bytes count in :func:`stquant_jax.average_bits`, so
on a small model they eat into a budget. For each model (the quality suite's
GPT-2 and ViT, then the presets GPT-2 small/medium/large and ViT-B/16), the
state of ``stquant_jax.adamw`` is built abstractly (``jax.eval_shape``; nothing
is allocated, nothing trained) and counted:

* ``small_share``: the fraction of parameters in float32 leaves;
* ``small_bits``: the bits their moments add to the state's average;
* ``uniform``: the average bits of fixed 3-, 4- and 5-bit moments;
* ``budgets``: for each ``STQuantPolicy(target_bits=...)``, the first layout's
  average code bits of m and of v over the quantized (adaptive) values, and the
  state's average bits (with ``min_bits=(3, 2)`` where 3 bits everywhere do not
  fit, as ``experiments.compare`` runs it; marked * in the table).

Usage: ``python -m benchmarks.model_size_bits [--json out.json] [--md out.md]``
(about a minute; the GPT-2 presets use the 50257-token vocabulary).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import tempfile

import jax

import stquant_jax as sq
from benchmarks._io import write_json

TARGETS = (3.5, 4.0, 4.5, 5.0)
UNIFORM = (3, 4, 5)
PRESETS = (("gpt2", "small"), ("gpt2", "medium"), ("gpt2", "large"), ("vit", "base"))


def models() -> list[tuple[str, object]]:
  """(name, abstract params) of every model measured."""
  from experiments import compare, train
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    for model in ("gpt2", "vit"):
      cfg = compare.suite_config(model, "adamw", 0, pathlib.Path(tmp))
      out.append((f"{model} (quality suite)", train.abstract_params(cfg)))
  for model, preset in PRESETS:
    cfg = dataclasses.replace(train.TrainConfig(), model=model, preset=preset,
                              tokenizer="gpt2", model_overrides={})
    out.append((f"{model} {preset}", train.abstract_params(cfg)))
  return out


def _state(params, policy):
  return jax.eval_shape(sq.adamw(1e-3, policy=policy).init, params)


def measure(params, min_size: int = 4096) -> dict:
  """The numbers of the module docstring for one model's ``params``."""
  leaves = jax.tree.leaves(params)
  sizes = [math.prod(p.shape) for p in leaves]
  total = sum(sizes)
  small = sum(n for n in sizes if n < min_size)
  # Two float32 moments per small parameter, over two moment values per parameter.
  row = {"params": total, "small_share": small / total, "small_bits": 32.0 * small / total}
  row["uniform"] = {str(b): sq.average_bits(_state(params, sq.FixedBits(b, b, min_size=min_size)))
                    for b in UNIFORM}
  row["budgets"] = {}
  for target in TARGETS:
    policy = sq.STQuantPolicy(target_bits=target, min_size=min_size)
    if policy.min_average_bits(params) > target:  # as experiments.compare: v may go to 2
      policy = dataclasses.replace(policy, min_bits=(3, 2))
    layout = policy.layout(params)
    code = [0.0, 0.0]
    quantized = 0
    for n, pair in zip(sizes, layout):
      if None not in pair:
        quantized += n
        for k in (0, 1):
          code[k] += n * pair[k]
    row["budgets"][str(target)] = {
        "mu_code_bits": code[0] / max(quantized, 1), "nu_code_bits": code[1] / max(quantized, 1),
        "min_bits": policy.min_bits,
        "average_bits": sq.average_bits(_state(params, policy))}
  return row


def markdown(rows: dict) -> str:
  """The table of ``rows`` (name -> :func:`measure`)."""
  head = ("| model | params | float32 small leaves | their bits | uniform 3 / 4 / 5-bit | "
          + " | ".join(f"budget {t:g}: m / v code bits" for t in TARGETS) + " |")
  lines = [head, "|" + "---|" * (5 + len(TARGETS))]
  for name, r in rows.items():
    uni = " / ".join(f"{r['uniform'][str(b)]:.2f}" for b in UNIFORM)
    budgets = " | ".join(
        f"{r['budgets'][str(t)]['mu_code_bits']:.2f} / {r['budgets'][str(t)]['nu_code_bits']:.2f}"
        + ("*" if r["budgets"][str(t)]["min_bits"] != 3 else "") for t in TARGETS)
    lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {100 * r['small_share']:.2f}% | "
                 f"{r['small_bits']:.3f} | {uni} | {budgets} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.model_size_bits",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="", help="write the numbers here")
  parser.add_argument("--md", default="", help="write the table here")
  args = parser.parse_args(argv)
  from tqdm.auto import tqdm
  rows = {}
  for name, params in tqdm(models(), desc="models", unit="model"):
    rows[name] = measure(params)
  table = markdown(rows)
  print(table)
  write_json({"min_size": 4096, "targets": TARGETS, "models": rows}, args.json)
  if args.md:
    pathlib.Path(args.md).write_text(table + "\n")
  return rows


if __name__ == "__main__":
  main()
