"""Plots of a comparison, from its run logs and summary (see :mod:`experiments.report`).

* ``val_loss_<model>.png``: validation loss over steps and its paired difference
  to fp32 AdamW, with the control's noise floor.
* ``memory.png``: optimizer-state megabytes per optimizer and model.
* ``bits_<model>.png``: per-layer bit-widths of m and v over steps.
* ``frontier.png``: paired Δ final loss vs. average bits, uniform against adaptive.
"""

import pathlib

import numpy as np

from experiments import quality
from experiments.naming import MODEL_TITLES, color, label, order

REFERENCE = quality.REFERENCE



def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _curves(runs: dict[int, dict], key="loss"):
  steps = [e["step"] for e in next(iter(runs.values()))["eval"]]
  values = np.array([[e[key] for e in runs[s]["eval"]] for s in sorted(runs)])
  return np.array(steps), values


_CURVES = ("adamw", "adamw_control", "adamw_bf16", "stquant8", "stquant4",
           "stquant_adaptive")


def plot_val_loss(by, model: str, path: pathlib.Path, floor: float | None = None) -> None:
  """Validation loss (left) and its paired % difference to fp32 AdamW (right), for
  the baselines, 8- and 4-bit, and the adaptive runs (other fixed widths: frontier.png)."""
  plt = _plt()
  fig, (ax, axd) = plt.subplots(1, 2, figsize=(12, 4.6))
  ref = by.get(REFERENCE)
  names = [n for n in order(by) if n in _CURVES or quality.kind(n) == "adaptive"]
  for name in names:
    runs = by[name]
    steps, v = _curves(runs)
    c = color(name)
    lbl = label(name, {"target_bits": next(iter(runs.values()))["config"][
        "optimizer_kwargs"].get("target_bits")})
    ls = "--" if quality.kind(name) == "fixed" else ":" if name == "adamw_control" else "-"
    ax.plot(steps, v.mean(0), color=c, ls=ls, label=lbl, lw=1.4)
    if len(v) > 1:
      ax.fill_between(steps, v.min(0), v.max(0), color=c, alpha=0.06)
    if ref is not None and name != REFERENCE:
      seeds = [s for s in sorted(runs) if s in ref]
      if seeds:
        _, r = _curves({s: ref[s] for s in seeds})
        _, o = _curves({s: runs[s] for s in seeds})
        d = 100 * (o / r - 1)
        axd.plot(steps, d.mean(0), color=c, ls=ls, label=lbl, lw=1.4)
  n_seeds = max(len(r) for r in by.values())
  band = f"mean of {n_seeds} seeds, band = min..max" if n_seeds > 1 else "1 seed"
  ax.set_title(f"{MODEL_TITLES.get(model, model)}: validation loss\n({band}; fixed "
               "validation batches)", fontsize=10)
  ax.set(xlabel="training step", ylabel="validation cross-entropy (nats)")
  lo = min(v.min() for v in (_curves(r)[1] for r in by.values()))
  hi = max(np.percentile(_curves(r)[1][:, 0], 100) for r in by.values())
  ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  axd.axhline(0, color="black", lw=1)
  if floor is not None:
    axd.axhspan(-floor, floor, color="gray", alpha=0.15,
                label=f"noise floor ±{floor:.2f}% (final loss, control)")
  axd.set_title("mean paired difference to fp32 AdamW of the same seed", fontsize=10)
  axd.set(xlabel="training step", ylabel="Δ validation loss (%)")
  axd.grid(alpha=0.3)
  axd.legend(fontsize=7)
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
    ax.barh(range(len(names)), mb, color=[color(n) for n in names], alpha=0.85)
    for i, r in enumerate(rows):
      text = f"  {r['opt_state_mb']:.3f} MB, {r['average_bits']:.2f} bits"
      if r["peak_opt_state_mb"] > r["opt_state_mb"] * 1.0005:
        ax.plot([r["peak_opt_state_mb"]], [i], "k|", ms=14)
        text += f" (peak {r['peak_opt_state_mb']:.3f})"
      ax.text(max(r["opt_state_mb"], r["peak_opt_state_mb"]), i, text,
              va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [r["label"] for r in rows], fontsize=7)
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
  """The default adaptive policy and the smallest and largest budgets (else the fixed
  widths): at most three panels."""
  adaptive = [n for n in order(by) if quality.kind(n) == "adaptive"
              and not n.endswith("_nearest")]
  if len(adaptive) > 3:
    budgets = [n for n in adaptive if n != "stquant_adaptive"]
    adaptive = [n for n in adaptive if n == "stquant_adaptive"] + [budgets[0], budgets[-1]]
  names = adaptive or [n for n in order(by) if n in ("stquant8", "stquant4")]
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


def plot_frontier(summary, path: pathlib.Path) -> None:
  """Δ final validation loss (mean ± 95% CI) against average bits: fixed widths (the
  uniform curve: its lower envelope drawn) and the adaptive policy, the control's
  noise floor shaded; runs with another block size than 128 are hollow markers."""
  plt = _plt()
  fig, panels = _model_panels(plt, summary, width=6.5)
  for ax, model in panels:
    m = summary["models"][model]
    rows, floor = m["optimizers"], m["noise_floor_pct"]
    if floor is not None:
      ax.axhspan(-floor, floor, color="gray", alpha=0.18,
                 label=f"noise floor ±{floor:.2f}% (control)")
    ax.axhline(0, color="black", lw=1, label="fp32 AdamW (32 bits)")
    for kind, mk, c, name in (("fixed", "s", "tab:blue", "uniform bits (fixed widths)"),
                              ("adaptive", "o", "tab:green", "adaptive (STQuantPolicy)")):
      pts = sorted((r["average_bits"], r["delta_pct_mean"], r["delta_pct_ci95"], n)
                   for n, r in rows.items() if r["kind"] == kind
                   and r["delta_pct_mean"] is not None and not n.endswith("_nearest"))
      if not pts:
        continue
      b, d, e, names = zip(*pts)
      e = [0 if not np.isfinite(x) else x for x in e]
      # Blocks of 128 (the default) filled; other block sizes hollow, off the line.
      blocks = [quality.name_parts(n)[1] for n in names]
      for default, face, text in ((True, c, name), (False, "white", f"{name}, other block sizes")):
        idx = [i for i, blk in enumerate(blocks) if (blk is None) == default]
        if idx:
          ax.errorbar([b[i] for i in idx], [d[i] for i in idx], yerr=[e[i] for i in idx],
                      fmt=mk, color=c, mfc=face, capsize=3, label=text, ms=5)
      if kind == "fixed":  # lower envelope: best delta at no more bits, any block size
        env = [min(dd for bb, dd in zip(b, d) if bb <= x) for x in b]
        ax.step(b, env, where="post", color=c, lw=1, alpha=0.7)
      else:  # the default block size's curve
        idx = [i for i, blk in enumerate(blocks) if blk is None]
        ax.plot([b[i] for i in idx], [d[i] for i in idx], color=c, lw=1, alpha=0.7)
      for x, y, n in zip(b, d, names):
        ax.annotate(rows[n]["label"].replace("stquant ", "").replace("STQuant ", ""),
                    (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_title(f"{MODEL_TITLES.get(model, model)}: quality vs. memory\n"
                 "(paired Δ vs fp32 AdamW, mean ± 95% CI over seeds)", fontsize=10)
    ax.set(xlabel="average bits per moment value (metadata included)",
           ylabel="Δ final validation loss (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
