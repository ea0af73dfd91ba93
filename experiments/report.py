"""Table and plots of a comparison, rendered from its JSON run logs only.

Usage::

  python -m experiments.report results/        # after experiments.compare

Reads ``<dir>/runs/*.json`` (written by :mod:`experiments.train`), writes
``<dir>/summary.json``, ``<dir>/results.md`` and the PNGs:

* ``val_loss_<model>.png``: validation loss over steps per optimizer (mean
  over seeds, band = min..max), and its difference to float32 AdamW (%).
* ``memory.png``: optimizer-state megabytes per optimizer and model.
* ``bits_<model>.png``: per-layer bit-widths of m and v over steps (from the
  logged ``bit_history``) for the adaptive policies, or the fixed layouts.
* ``tradeoff.png``: final validation loss vs. average bits.

Example:
  >>> summary = render("results")             # doctest: +SKIP
  >>> print(short_table(summary))             # doctest: +SKIP
"""

import argparse
import json
import math
import pathlib
from typing import Any

import numpy as np

REFERENCE = "adamw"
LABELS = {
    "adamw": "optax.adamw (fp32)",
    "adamw_bf16": "optax.adamw (bf16 m)",
    "stquant8": "stquant 8-bit",
    "stquant4": "stquant 4-bit",
    "stquant_adaptive": "STQuant adaptive",
    "stquant_budget": "STQuant budget",
}
COLORS = {
    "adamw": "black", "adamw_bf16": "tab:gray", "stquant8": "tab:blue",
    "stquant4": "tab:orange", "stquant_adaptive": "tab:green",
    "stquant_budget": "tab:red",
}
STYLES = {  # Fixed widths dashed, so the adaptive curves they start from show.
    "adamw": "-", "adamw_bf16": ":", "stquant8": "--", "stquant4": "--",
    "stquant_adaptive": "-", "stquant_budget": "-",
}
MODEL_TITLES = {"gpt2": "GPT-2 on CPython stdlib (bytes)",
                "vit": "ViT on MNIST-5k"}
WITHIN_PCT = 1.0  # "matches fp32 AdamW" = final val loss within this many %.


def _order(names) -> list[str]:
  known = [n for n in LABELS if n in names]
  return known + sorted(set(names) - set(known))


def label(name: str, stats: dict | None = None) -> str:
  """Display name; the budget policy shows its target bits."""
  text = LABELS.get(name, name)
  target = (stats or {}).get("target_bits")
  return f"{text} (≤ {target:.2f} bits)" if target else text


def load_logs(out) -> list[dict[str, Any]]:
  """Every run log under ``<out>/runs``, sorted by model, optimizer, seed."""
  paths = sorted(pathlib.Path(out, "runs").glob("*.json"))
  if not paths:
    raise FileNotFoundError(f"no run logs in {pathlib.Path(out, 'runs')}; "
                            "run python -m experiments.compare first")
  logs = [json.loads(p.read_text()) for p in paths]
  return sorted(logs, key=lambda l: (l["config"]["model"],
                                     l["config"]["optimizer"],
                                     l["config"]["seed"]))


def _mean_std(xs) -> tuple[float, float]:
  xs = [x for x in xs if x is not None]
  if not xs:
    return math.nan, math.nan
  return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def _average_bits(log, memory) -> float:
  """Stored bits per moment value, metadata included; plain optax states are
  measured the same way (all state bytes over 2 values per parameter)."""
  if memory.get("average_bits") is not None:
    return memory["average_bits"]
  return 8.0 * memory["opt_state_bytes"] / (2 * log["param_count"])


def _trained_mean(log, key: str, final: float) -> float:
  """``key`` of the logged layouts weighted by the steps each trained for: a
  layout logged at step s (after that step's relayout) trains s+1 .. next."""
  hist = log.get("bit_history") or []
  if len(hist) < 2:
    return final
  steps = hist[-1]["step"] - hist[0]["step"]
  weighted = sum(a[key] * (b["step"] - a["step"])
                 for a, b in zip(hist, hist[1:]))
  return weighted / steps if steps else final


def summarize(logs: list[dict[str, Any]]) -> dict[str, Any]:
  """Per model and optimizer: final validation loss over seeds, its paired
  difference to float32 AdamW, memory, average bits and relative step time."""
  by = {}
  for log in logs:
    c = log["config"]
    by.setdefault(c["model"], {}).setdefault(c["optimizer"], {})[c["seed"]] = log
  models = {}
  for model, opts in by.items():
    ref = opts.get(REFERENCE, {})
    rows = {}
    for name in _order(opts):
      runs = opts[name]
      seeds = sorted(runs)
      final = {s: runs[s]["eval"][-1]["loss"] for s in seeds}
      paired = [s for s in seeds if s in ref]
      delta = [100 * (final[s] / ref[s]["eval"][-1]["loss"] - 1) for s in paired]
      ratio = [runs[s]["median_step_time_s"] / ref[s]["median_step_time_s"]
               for s in paired if ref[s]["median_step_time_s"]]
      acc = [runs[s]["eval"][-1].get("accuracy") for s in seeds]
      mem = [runs[s].get("final_memory") or {
          "opt_state_bytes": runs[s]["opt_state_bytes"],
          "average_bits": runs[s]["opt_state_average_bits"]} for s in seeds]
      peak = [max([runs[s]["opt_state_bytes"]]
                  + [e["opt_state_bytes"] for e in runs[s]["relayouts"]])
              for s in seeds]
      first = runs[seeds[0]]
      mean, std = _mean_std(final.values())
      rows[name] = {
          "label": LABELS.get(name, name),
          "seeds": seeds,
          "steps": first["config"]["steps"],
          "target_bits": first["config"]["optimizer_kwargs"].get("target_bits"),
          "final_val_loss": [final[s] for s in seeds],
          "val_loss_mean": mean, "val_loss_std": std,
          "delta_pct_mean": _mean_std(delta)[0] if delta else None,
          "delta_pct_std": _mean_std(delta)[1] if delta else None,
          "val_accuracy_mean": _mean_std(acc)[0] if any(
              a is not None for a in acc) else None,
          "val_accuracy_std": _mean_std(acc)[1] if any(
              a is not None for a in acc) else None,
          "average_bits": float(np.mean([
              _trained_mean(runs[s], "average_bits", _average_bits(runs[s], m))
              for s, m in zip(seeds, mem)])),
          "final_average_bits": float(np.mean([_average_bits(runs[s], m)
                                               for s, m in zip(seeds, mem)])),
          "initial_average_bits": float(np.mean([_average_bits(runs[s], {
              "opt_state_bytes": runs[s]["opt_state_bytes"],
              "average_bits": runs[s]["opt_state_average_bits"]})
                                                 for s in seeds])),
          "opt_state_mb": float(np.mean([
              _trained_mean(runs[s], "opt_state_bytes", m["opt_state_bytes"])
              for s, m in zip(seeds, mem)])) / 1e6,
          "final_opt_state_mb": float(np.mean(
              [m["opt_state_bytes"] for m in mem])) / 1e6,
          "peak_opt_state_mb": float(np.mean(peak)) / 1e6,
          "median_step_time_s": float(np.mean(
              [runs[s]["median_step_time_s"] for s in seeds])),
          "step_time_ratio_mean": _mean_std(ratio)[0] if ratio else None,
          "step_time_ratio_std": _mean_std(ratio)[1] if ratio else None,
          "relayouts_mean": float(np.mean([len(runs[s]["relayouts"])
                                           for s in seeds])),
          "total_time_s": float(sum(runs[s].get("total_time_s", 0)
                                    for s in seeds)),
      }
    within = [(r["average_bits"], n) for n, r in rows.items()
              if n.startswith("stquant") and r["delta_pct_mean"] is not None
              and r["delta_pct_mean"] <= WITHIN_PCT]
    first = next(iter(next(iter(opts.values())).values()))
    models[model] = {
        "param_count": first["param_count"],
        "model_config": first["model_config"],
        "train_config": {k: v for k, v in first["config"].items()
                         if k not in ("optimizer", "optimizer_kwargs", "seed",
                                      "log_path")},
        "optimizers": rows,
        "lowest_bits_within_1pct": (
            {"optimizer": min(within)[1], "average_bits": min(within)[0]}
            if within else None),
    }
  return {"models": models, "within_pct": WITHIN_PCT, "reference": REFERENCE}


# ---------------------------------------------------------------- text


def _fmt(x, spec, none="—"):
  return none if x is None or (isinstance(x, float) and math.isnan(x)) else (
      format(x, spec))


def markdown_table(summary: dict[str, Any]) -> str:
  """The results table (GitHub markdown) with its footnotes."""
  meta = summary.get("meta", {})
  lines = ["# Optimizer comparison: GPT-2 and ViT", ""]
  if meta.get("suite"):
    suite = meta["suite"]
    args = " ".join(["python -m experiments.compare", *meta.get("argv", [])])
    lines += [f"Generated by `{args}` (suite `{suite.get('name', '?')}`, "
              f"{meta.get('wall_time_s', 0) / 60:.1f} min on "
              f"{meta.get('machine', 'this machine')}); re-render with "
              "`python -m experiments.report <dir>`.", ""]
  header = ("| Model | Optimizer | Final val loss (mean ± std) | Δ vs fp32 AdamW "
            "| Val accuracy | Avg bits (with metadata) | Opt-state MB "
            "| Step time vs optax.adamw |")
  lines += [header, "|" + "---|" * 8]
  for model, m in summary["models"].items():
    for name, r in m["optimizers"].items():
      n = len(r["seeds"])
      delta = ("reference" if name == summary["reference"] else
               f"{r['delta_pct_mean']:+.2f} ± {r['delta_pct_std']:.2f} %"
               if r["delta_pct_mean"] is not None else "—")
      acc = (f"{100 * r['val_accuracy_mean']:.1f} ± "
             f"{100 * r['val_accuracy_std']:.1f} %"
             if r["val_accuracy_mean"] is not None else "—")
      bits = f"{r['average_bits']:.2f}"
      if abs(r["initial_average_bits"] - r["final_average_bits"]) > 0.005:
        bits += (f" ({r['initial_average_bits']:.2f} → "
                 f"{r['final_average_bits']:.2f})")
      mb = f"{r['opt_state_mb']:.3f}"
      if r["peak_opt_state_mb"] > r["opt_state_mb"] * 1.0005:
        mb += f" (peak {r['peak_opt_state_mb']:.3f})"
      speed = (f"{r['step_time_ratio_mean']:.2f}×"
               if r["step_time_ratio_mean"] is not None else "—")
      lines.append(
          f"| {model} | {label(name, r)} | {r['val_loss_mean']:.4f} ± "
          f"{r['val_loss_std']:.4f} (n={n}) | {delta} | {acc} | {bits} "
          f"| {mb} | {speed} |")
  lines += ["", "## Lowest average bits within "
            f"{summary['within_pct']:g}% of fp32 AdamW", "",
            "Among the stquant optimizers, the fewest average bits whose mean "
            f"final validation loss is at most {summary['within_pct']:g}% above "
            "fp32 AdamW's (lower is fine).", ""]
  for model, m in summary["models"].items():
    best = m["lowest_bits_within_1pct"]
    rows = m["optimizers"]
    fixed = "; ".join(
        f"{label(n)}: {rows[n]['average_bits']:.2f} bits, "
        f"{_fmt(rows[n]['delta_pct_mean'], '+.2f')} %"
        for n in ("stquant8", "stquant4") if n in rows)
    lines.append(
        f"- **{model}**: " + (
            f"{best['average_bits']:.2f} bits ({label(best['optimizer'], rows[best['optimizer']])})"
            if best else "no stquant optimizer within "
            f"{summary['within_pct']:g}%") + (f". Fixed: {fixed}." if fixed else "."))
  lines += ["", "## Setup", ""]
  for model, m in summary["models"].items():
    tc, mc = m["train_config"], m["model_config"]
    shape = ", ".join(f"{k}={mc[k]}" for k in (
        "vocab_size", "context_len", "image_size", "patch_size", "d_model",
        "num_layers", "num_heads") if k in mc)
    data = (f"{tc['tokenizer']} tokens, seq_len {tc['seq_len']}"
            if model == "gpt2" else "MNIST-5k 4500/500 split")
    lines.append(
        f"- **{model}**: {m['param_count']:,} parameters ({shape}); {data}; "
        f"{tc['steps']} steps, batch {tc['batch_size']}, lr {tc['learning_rate']:g} "
        f"(warmup {tc['warmup_steps']}, cosine to ×{tc['min_lr_ratio']:g}), "
        f"b1 {tc['b1']}, b2 {tc['b2']}, weight decay {tc['weight_decay']}, "
        f"clip {tc['grad_clip']}; validation on {tc['eval_batches']} fixed batches.")
  lines += [
      "",
      "Notes: Δ is paired by seed (same init and data order as the fp32 "
      "AdamW run), mean ± std over seeds. Avg bits = stored bits per moment "
      "value, scales, float32 moments of small leaves and policy state "
      "included (`stquant_jax.average_bits`; for optax states all state bytes "
      "over 2 values per parameter); for adaptive policies the mean over "
      "training steps of the layouts trained with (start → last decided "
      "layout in brackets). Opt-state MB = 10^6 bytes of the whole optimizer "
      "state (`stquant_jax.state_nbytes`), for adaptive policies the same "
      "mean over training steps (peak in brackets). Step time = median of the steps that did not compile, "
      "as a ratio to optax.adamw of the same seed, on a shared CPU: treat "
      "differences below ~20% as noise.",
      ""]
  return "\n".join(lines)


def short_table(summary: dict[str, Any]) -> str:
  """A compact stdout table: loss and state memory next to optax.adamw's."""
  out = []
  for model, m in summary["models"].items():
    rows = m["optimizers"]
    any_row = next(iter(rows.values()))
    out.append(f"{model}: {m['param_count'] / 1e6:.2f}M params, "
               f"{any_row['steps']} steps, {len(any_row['seeds'])} seed(s)")
    out.append(f"  {'optimizer':<30} {'val loss':>9} {'vs adamw':>9} "
               f"{'state MB':>9} {'vs adamw':>9} {'avg bits':>9}")
    ref = rows.get(summary["reference"])
    for name, r in rows.items():
      d = ("—" if name == summary["reference"] or r["delta_pct_mean"] is None
           else f"{r['delta_pct_mean']:+.2f}%")
      mem = (f"{r['opt_state_mb'] / ref['opt_state_mb']:.2f}x" if ref else "—")
      out.append(f"  {label(name, r):<30} {r['val_loss_mean']:>9.4f} {d:>9} "
                 f"{r['opt_state_mb']:>9.3f} {mem:>9} "
                 f"{r['average_bits']:>9.2f}")
  return "\n".join(out)


# ---------------------------------------------------------------- plots


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _curves(runs: dict[int, dict], key="loss"):
  steps = [e["step"] for e in next(iter(runs.values()))["eval"]]
  values = np.array([[e[key] for e in runs[s]["eval"]] for s in sorted(runs)])
  return np.array(steps), values


def plot_val_loss(by, model: str, path: pathlib.Path) -> None:
  """Validation loss (left) and its paired % difference to fp32 AdamW (right)."""
  plt = _plt()
  fig, (ax, axd) = plt.subplots(1, 2, figsize=(12, 4.6))
  ref = by.get(REFERENCE)
  for name in _order(by):
    runs = by[name]
    steps, v = _curves(runs)
    c = COLORS.get(name)
    lbl = label(name, {"target_bits": next(iter(runs.values()))["config"][
        "optimizer_kwargs"].get("target_bits")})
    ls = STYLES.get(name, "-")
    ax.plot(steps, v.mean(0), color=c, ls=ls, label=lbl, lw=1.6)
    if len(v) > 1:
      ax.fill_between(steps, v.min(0), v.max(0), color=c, alpha=0.08)
    if ref is not None and name != REFERENCE:
      seeds = [s for s in sorted(runs) if s in ref]
      if seeds:
        _, r = _curves({s: ref[s] for s in seeds})
        _, o = _curves({s: runs[s] for s in seeds})
        d = 100 * (o / r - 1)
        axd.plot(steps, d.mean(0), color=c, ls=ls, label=lbl, lw=1.6)
        if len(d) > 1:
          axd.fill_between(steps, d.min(0), d.max(0), color=c, alpha=0.08)
  n_seeds = max(len(r) for r in by.values())
  band = f"mean of {n_seeds} seeds, band = min..max" if n_seeds > 1 else "1 seed"
  ax.set_title(f"{MODEL_TITLES.get(model, model)}: validation loss\n({band})",
               fontsize=10)
  ax.set(xlabel="training step", ylabel="validation cross-entropy (nats)")
  lo = min(v.min() for v in (_curves(r)[1] for r in by.values()))
  hi = max(np.percentile(_curves(r)[1][:, 0], 100) for r in by.values())
  ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  axd.axhline(0, color="black", lw=1, label="optax.adamw (fp32)")
  for y in (-WITHIN_PCT, WITHIN_PCT):
    axd.axhline(y, color="gray", lw=0.8, ls="--")
  axd.set_title("difference to fp32 AdamW of the same seed\n"
                f"(mean, band = min..max; dashed: ±{WITHIN_PCT:g}%)", fontsize=10)
  axd.set(xlabel="training step", ylabel="Δ validation loss (%)")
  axd.grid(alpha=0.3)
  axd.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _model_panels(plt, summary, width: float):
  """A figure with one panel per model, side by side: ``(fig, [(ax, model), ...])``."""
  models = list(summary["models"])
  fig, axes = plt.subplots(1, len(models), figsize=(width * len(models), 4.2),
                           squeeze=False)
  return fig, list(zip(axes[0], models))


def plot_memory(summary, path: pathlib.Path) -> None:
  """Optimizer-state MB per optimizer, one panel per model."""
  plt = _plt()
  fig, panels = _model_panels(plt, summary, width=6.5)
  for ax, model in panels:
    m = summary["models"][model]
    names = list(m["optimizers"])[::-1]
    rows = [m["optimizers"][n] for n in names]
    mb = [r["opt_state_mb"] for r in rows]
    ax.barh(range(len(names)), mb, color=[COLORS.get(n, "tab:purple")
                                          for n in names], alpha=0.85)
    for i, r in enumerate(rows):
      text = f"  {r['opt_state_mb']:.3f} MB, {r['average_bits']:.2f} bits"
      if r["peak_opt_state_mb"] > r["opt_state_mb"] * 1.0005:
        ax.plot([r["peak_opt_state_mb"]], [i], "k|", ms=14)
        text += f" (peak {r['peak_opt_state_mb']:.3f})"
      ax.text(max(r["opt_state_mb"], r["peak_opt_state_mb"]), i, text,
              va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [label(n, r) for n, r in zip(names, rows)])
    ax.set_xlim(0, max(mb) * 1.6)
    ax.set(title=f"{MODEL_TITLES.get(model, model)}\n"
                 f"{m['param_count'] / 1e6:.2f}M parameters: optimizer state",
           xlabel="optimizer-state MB (adaptive: mean over steps; | = peak)")
    ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _short(leaf: str) -> str:
  parts = [p for p in leaf.split("/") if p not in ("value", "blocks", "attn")]
  if len(parts) >= 2 and parts[-1] in ("kernel", "embedding"):
    parts = parts[:-1]
  return ".".join(parts)


def _bit_panels(by) -> list[tuple[str, dict]]:
  adaptive = [n for n in ("stquant_adaptive", "stquant_budget") if n in by]
  names = adaptive or [n for n in _order(by) if n.startswith("stquant")]
  panels = []
  for name in names:
    runs = by[name]
    log = runs[min(runs)]
    if log.get("bit_history"):
      panels.append((name, log))
  return panels


def plot_bits(by, model: str, path: pathlib.Path) -> bool:
  """Heatmap of per-leaf bits of m and v over steps (rows: leaves quantized
  at some step; columns: policy decisions). Returns False if nothing to plot."""
  panels = _bit_panels(by)
  if not panels:
    return False
  plt = _plt()
  from matplotlib import colors as mcolors
  cmap = mcolors.ListedColormap(
      plt.get_cmap("viridis")(np.linspace(0, 1, 7))).with_extremes(
          over="lightgray")
  norm = mcolors.BoundaryNorm(np.arange(1.5, 9.5), cmap.N)  # > 8: "over"
  hist0 = panels[0][1]["bit_history"]
  leaves = [k for k in hist0[0]["mu_bits"]
            if any(min(h["mu_bits"][k], h["nu_bits"][k]) <= 8
                   for _, log in panels for h in log["bit_history"])]
  n_cols = max(len(log["bit_history"]) for _, log in panels)
  fig, axes = plt.subplots(
      len(panels), 2, squeeze=False,
      figsize=(max(8, 1.2 + 0.55 * n_cols * 2), 1.2 + 0.28 * len(leaves) * len(panels)))
  im = None
  for row, (name, log) in enumerate(panels):
    hist = log["bit_history"]
    steps = [h["step"] for h in hist]
    for col, mom in enumerate(("mu", "nu")):
      ax = axes[row, col]
      grid = np.array([[h[f"{mom}_bits"][k] for h in hist] for k in leaves], float)
      im = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto",
                     interpolation="nearest")
      for (i, j), b in np.ndenumerate(grid):
        ax.text(j, i, "f32" if b > 8 else f"{int(b)}", ha="center",
                va="center", fontsize=6.5,
                color="white" if b < 5 else "black")
      ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
      ax.set_yticks(range(len(leaves)), [_short(k) for k in leaves]
                    if col == 0 else [""] * len(leaves), fontsize=7)
      target = log["config"]["optimizer_kwargs"].get("target_bits")
      moment = "m (first moment)" if mom == "mu" else "v (second moment)"
      ax.set_title(f"{label(name, {'target_bits': target})}, seed "
                   f"{log['config']['seed']}\n{moment}; avg bits (m, v, "
                   f"metadata) {hist[0]['average_bits']:.2f} → "
                   f"{hist[-1]['average_bits']:.2f}", fontsize=8.5)
      ax.set_xlabel("training step (policy decisions)", fontsize=8)
  fig.suptitle(f"{MODEL_TITLES.get(model, model)}: bits per layer over training\n"
               "(leaves under min_size stay float32, not shown; a layout decided "
               "at the last step is logged, not trained with)", fontsize=10)
  fig.tight_layout(rect=(0, 0, 0.93, 1))
  cax = fig.add_axes((0.945, 0.15, 0.012, 0.7))
  fig.colorbar(im, cax=cax, ticks=range(2, 9), label="bits")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def plot_tradeoff(summary, path: pathlib.Path) -> None:
  """Final validation loss difference (%) against average bits."""
  plt = _plt()
  fig, panels = _model_panels(plt, summary, width=6)
  for ax, model in panels:
    rows = summary["models"][model]["optimizers"]
    for name, r in rows.items():
      d = 0.0 if name == REFERENCE else r["delta_pct_mean"]
      if d is None:
        continue
      ax.errorbar(r["average_bits"], d, yerr=r["delta_pct_std"] or 0,
                  fmt="o", color=COLORS.get(name), capsize=3,
                  label=label(name, r))
    ax.axhspan(-WITHIN_PCT, WITHIN_PCT, color="gray", alpha=0.12,
               label=f"within ±{WITHIN_PCT:g}% of fp32")
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
    ax.set_title(f"{MODEL_TITLES.get(model, model)}: loss vs. memory\n"
                 "(mean over seeds, error bar = std of the paired Δ)",
                 fontsize=10)
    ax.set(xlabel="average bits per moment value (log scale, metadata included)",
           ylabel="Δ final val loss vs fp32 AdamW (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------- entry points


def render(out, logs: list[dict] | None = None,
           meta: dict | None = None) -> dict[str, Any]:
  """Writes ``summary.json``, ``results.md`` and the PNGs into ``out``.

  Args:
    out: The comparison's folder (logs in ``out/runs``).
    logs: Run logs; read from ``out/runs`` when None.
    meta: Extra information kept in the summary (suite, wall time); when
      None, the previous ``summary.json``'s is kept.

  Returns:
    The summary (also in ``summary.json``), with ``plots``: the PNG names.
  """
  out = pathlib.Path(out)
  if logs is None:
    logs = load_logs(out)
  summary_path = out / "summary.json"
  if meta is None and summary_path.exists():
    meta = json.loads(summary_path.read_text()).get("meta")
  summary = summarize(logs)
  meta = dict(meta or {})
  meta.setdefault("machine", _machine())
  summary["meta"] = meta
  by = {}
  for log in logs:
    c = log["config"]
    by.setdefault(c["model"], {}).setdefault(c["optimizer"], {})[c["seed"]] = log
  plots = []
  for model in summary["models"]:
    plot_val_loss(by[model], model, out / f"val_loss_{model}.png")
    plots.append(f"val_loss_{model}.png")
    if plot_bits(by[model], model, out / f"bits_{model}.png"):
      plots.append(f"bits_{model}.png")
  plot_memory(summary, out / "memory.png")
  plot_tradeoff(summary, out / "tradeoff.png")
  plots += ["memory.png", "tradeoff.png"]
  summary["plots"] = plots
  out.mkdir(parents=True, exist_ok=True)
  summary_path.write_text(json.dumps(summary, indent=1))
  (out / "results.md").write_text(markdown_table(summary))
  return summary


def _machine() -> str:
  import os
  import platform
  return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", nargs="?", default="results",
                      help="folder written by experiments.compare")
  args = parser.parse_args(argv)
  summary = render(args.out)
  print(short_table(summary))
  out = pathlib.Path(args.out)
  print(f"\nTable: {out / 'results.md'}")
  print(f"Plots: {', '.join(str(out / p) for p in summary['plots'])}")
  return summary


if __name__ == "__main__":
  main()
