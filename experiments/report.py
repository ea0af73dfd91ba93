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
* ``frontier.png``: paired final validation loss difference to fp32 AdamW vs.
  average bits: fixed widths (the uniform curve) against the adaptive policy,
  with the control's noise floor shaded (:mod:`experiments.quality`).

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

from experiments import naming, optimizers, plots, quality
from experiments.naming import MODEL_TITLES, label

REFERENCE = quality.REFERENCE
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
  """``key`` of the layouts a run trained with, weighted by the steps each trained for.

  The layout changes at the logged policy decisions (``bit_history``) and at every
  switch (``relayouts``, which with ``adaptive_jit`` come some steps after the
  decision that proposed them); a value logged at step s holds from s+1 until the
  next change.

  Example:
    >>> log = {"bit_history": [{"step": 0, "b": 8.0}, {"step": 100, "b": 8.0},
    ...                        {"step": 200, "b": 4.0}],
    ...        "relayouts": [{"step": 110, "b": 4.0}]}
    >>> _trained_mean(log, "b", 4.0)  # 8 bits for 110 steps, 4 for 90
    6.2
  """
  hist = log.get("bit_history") or []
  if len(hist) < 2:
    return final
  events = sorted([(h["step"], 0, h[key]) for h in hist]
                  + [(r["step"], 1, r[key]) for r in log.get("relayouts") or []
                     if key in r and r["step"] <= hist[-1]["step"]])
  steps = events[-1][0] - events[0][0]
  weighted = sum(a[2] * (b[0] - a[0]) for a, b in zip(events, events[1:]))
  return weighted / steps if steps else final


def summarize(logs: list[dict[str, Any]]) -> dict[str, Any]:
  """Per model and optimizer: final validation loss per seed, its paired difference
  to float32 AdamW with the control's noise floor (:mod:`experiments.quality`),
  memory and average bits; per model the noise floor and the frontier."""
  by = {}
  for log in logs:
    c = log["config"]
    by.setdefault(c["model"], {}).setdefault(c["optimizer"], {})[c["seed"]] = log
  models = {}
  for model, opts in by.items():
    stats = quality.paired(opts)
    floor = quality.noise_floor(stats)
    rows = {}
    for name in naming.order(opts):
      runs = opts[name]
      seeds = sorted(runs)
      st = stats[name]
      acc = [(runs[s].get("final_eval") or runs[s]["eval"][-1]).get("accuracy")
             for s in seeds]
      mem = [runs[s].get("final_memory") or {
          "opt_state_bytes": runs[s]["opt_state_bytes"],
          "average_bits": runs[s]["opt_state_average_bits"]} for s in seeds]
      peak = [max([runs[s]["opt_state_bytes"]]
                  + [e["opt_state_bytes"] for e in runs[s]["relayouts"]])
              for s in seeds]
      first = runs[seeds[0]]
      mean, std = _mean_std(st["final_loss"].values())
      target = first["config"]["optimizer_kwargs"].get("target_bits")
      if target is None and name.startswith("stquant_t"):
        target = float(quality.name_parts(name)[0].removeprefix("stquant_t"))
      rows[name] = {
          "label": label(name, {"target_bits": target}),
          "kind": st["kind"],
          "seeds": seeds,
          "steps": first["config"]["steps"],
          "target_bits": target,
          "final_val_loss": [st["final_loss"][s] for s in seeds],
          "val_loss_mean": mean, "val_loss_std": std,
          "delta_pct": {str(s): d for s, d in st["delta_pct"].items()},
          "delta_pct_mean": st["delta_mean"] if st["delta_pct"] else None,
          "delta_pct_std": st["delta_std"],
          "delta_pct_ci95": st["delta_ci95"] if st["delta_pct"] else None,
          "verdict": quality.verdict(st, floor),
          "within_1pct": quality.within(st, quality.WITHIN_PCT, floor),
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
          "relayouts_mean": float(np.mean([len(runs[s]["relayouts"])
                                           for s in seeds])),
          "total_time_s": float(sum(runs[s].get("total_time_s", 0)
                                    for s in seeds)),
      }
    first = next(iter(next(iter(opts.values())).values()))
    bits = {n: r["average_bits"] for n, r in rows.items()}
    models[model] = {
        "param_count": first["param_count"],
        "model_config": first["model_config"],
        "train_config": {k: v for k, v in first["config"].items()
                         if k not in ("optimizer", "optimizer_kwargs", "seed",
                                      "log_path")},
        "final_eval_batches": (first.get("final_eval") or {}).get("batches"),
        "optimizers": rows,
        "noise_floor_pct": floor,
        "frontier": quality.frontier(stats, bits, floor),
    }
  return {"models": models, "reference": REFERENCE, "control": quality.CONTROL}


# ---------------------------------------------------------------- text


def _fmt(x, spec, none="—"):
  return none if x is None or (isinstance(x, float) and math.isnan(x)) else (
      format(x, spec))


def _pct(x, spec="+.2f"):
  return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pm(mean, half) -> str:
  """``+1.23 ± 0.45``; one seed has no interval."""
  return f"{mean:+.2f}" + ("" if math.isinf(half) else f" ± {half:.2f}")


MARGINAL = 2.0  # a resolved interval whose end nearest 0 lies within this many floors


def _marginal(mean: float, half: float, floor: float | None) -> float | None:
  """The end of ``mean ± half`` nearest 0 when the interval is resolved beyond ± ``floor``
  (it excludes the floor band) but that end lies within ``MARGINAL`` floors of 0: a
  verdict that a slightly larger floor would undo. None otherwise.

  Example:
    >>> round(_marginal(-1.44, 1.32, 0.095), 2)  # ends at -0.12, floor 0.095
    -0.12
    >>> _marginal(-1.39, 1.11, 0.095) is None    # ends at -0.28: 3 floors away
    True
  """
  if not floor or math.isinf(half):
    return None
  edge = mean + half if mean < 0 else mean - half
  resolved = (mean + half < -floor) or (mean - half > floor)
  return edge if resolved and abs(edge) < MARGINAL * floor else None


def _verdict_cell(verdict: str, mean, half, floor) -> str:
  """A verdict, flagged ``(marginal: ends at X%)`` when :func:`_marginal` says so."""
  edge = None if mean is None else _marginal(mean, half, floor)
  return verdict if edge is None else f"{verdict} (marginal: ends at {edge:+.3f}%)"


def _above(c: dict[str, Any], rows: dict[str, dict[str, Any]], floor=None) -> str:
  """The last two cells: the adaptive run against the cheapest fixed run above it."""
  if "above" not in c:
    return "none | — |"
  return (f"{rows[c['above']]['label']} ({c['above_bits']:.2f}) "
          f"| {_pm(c['above_vs_mean'], c['above_vs_ci95'])}, "
          f"{_verdict_cell(c['above_vs_verdict'], c['above_vs_mean'], c['above_vs_ci95'], floor)} |")


def _frontier_summary(comparisons: list[dict[str, Any]],
                      rows: dict[str, dict[str, Any]], floor) -> list[str]:
  """The list under the adaptive-vs-uniform table: every resolved paired verdict, with
  how many bits fewer (or more) the fixed run uses, and the count of the others."""
  out = ["Every resolved paired verdict of the table above (a *lower* loss against a "
         "fixed run with fewer bits does not separate the policy from its extra bits):", ""]
  for key, other, other_bits, what in (
      ("vs_", "uniform", "uniform_bits", "the best fixed run at no more bits"),
      ("above_vs_", "above", "above_bits", "the cheapest fixed run using more bits")):
    found = {"lower": [], "higher": []}
    rest = 0
    for c in comparisons:
      if other not in c:
        continue
      v = c[f"{key}verdict"]
      if v not in found:
        rest += 1
        continue
      gap = c["bits"] - c[other_bits]
      edge = _marginal(c[f"{key}mean"], c[f"{key}ci95"], floor)
      found[v].append(
          f"{rows[c['adaptive']]['label']} ({c['bits']:.2f} bits) vs "
          f"{rows[c[other]]['label']} ({c[other_bits]:.2f} bits: "
          + (f"{gap:.2f} fewer" if gap > 0.005 else f"{-gap:.2f} more"
             if gap < -0.005 else "the same")
          + f") {_pm(c[f'{key}mean'], c[f'{key}ci95'])}%"
          + (f", marginal (ends at {edge:+.3f}%)" if edge is not None else ""))
    for v in ("lower", "higher"):
      out.append(f"- Against {what}, adaptive loss **{v}**: "
                 + ("; ".join(found[v]) if found[v] else "none") + ".")
    out.append(f"- Against {what}, indistinguishable: {rest} run(s).")
  return out + [""]


def _variants(rows: dict[str, dict[str, Any]], size_of) -> list[tuple[float, dict]]:
  """``[(size, row)]`` of the fp32 AdamW variants that ``size_of`` recognises
  (``optimizers.lr_scale`` / ``jitter_size``) and that have paired deltas, by size."""
  found = ((size_of(n), r) for n, r in rows.items() if r["delta_pct"])
  return sorted(((x, r) for x, r in found if x is not None), key=lambda xr: xr[0])


def _lr_check(rows: dict[str, dict[str, Any]]) -> list[str]:
  """The paragraph on ``adamw_lr<F>`` runs: is fp32 AdamW's learning rate tuned?"""
  lr = _variants(rows, optimizers.lr_scale)
  if not lr:
    return []
  parts = ", ".join(f"× {f:g}: {_pm(r['delta_pct_mean'], r['delta_pct_ci95'])}% "
                    f"({r['verdict']})" for f, r in lr)
  better = [f for f, r in lr if r["verdict"] == "better"]
  if better:
    end = (f"fp32 AdamW does better at × {', '.join(f'{f:g}' for f in better)}: the "
           "reference is not at its best learning rate, and a quantized optimizer's "
           "negative Δ may be a step-size effect, not a property of its moments.")
  else:
    end = ("none is resolved better than the reference, so there is no evidence that "
           "a quantized optimizer's negative Δ comes from an untuned reference (within "
           "the factors tried).")
  return [f"**Is the reference's learning rate tuned?** fp32 AdamW with the learning "
          f"rate scaled (Δ mean ± 95% CI against the reference): {parts}; {end}", ""]


def _noise_check(rows: dict[str, dict[str, Any]]) -> list[str]:
  """The paragraph on ``adamw_jitter<X>`` runs: does noise in m, alone, help?"""
  jit = _variants({n: r for n, r in rows.items() if n != "adamw_jitter"},  # bf16-sized
                  optimizers.jitter_size)
  if not jit:
    return []
  parts = ", ".join(f"± {x:g}: {_pm(r['delta_pct_mean'], r['delta_pct_ci95'])}% "
                    f"({r['verdict']}; per seed "
                    + ", ".join(f"{d:+.2f}" for d in r["delta_pct"].values()) + ")"
                    for x, r in jit)
  better = [x for x, r in jit if r["verdict"] == "better"]
  end = (f"noise alone (± {', '.join(f'{x:g}' for x in better)}) makes fp32 AdamW "
         "better on this task, so a quantized optimizer's gain over fp32 AdamW here may "
         "be the same effect (its stochastic rounding adds noise of that order to m, "
         "docs/rounding.md), not an advantage of its moments."
         if better else "noise alone is not resolved better than the reference.")
  return [f"**Does noise in m, alone, help?** fp32 AdamW with m multiplied by 1 ± X u "
          f"each step (u uniform in [-1, 1]): {parts}; {end}", ""]


def _marginal_list(rows: dict[str, dict[str, Any]], reference: str, floor) -> str:
  """`` (here: <label>, ends at X%; ...)`` for the rows whose verdict is marginal."""
  found = [f"{r['label']}, ends at {_marginal(r['delta_pct_mean'], r['delta_pct_ci95'], floor):+.3f}%"
           for n, r in rows.items() if n != reference and r["delta_pct_mean"] is not None
           and _marginal(r["delta_pct_mean"], r["delta_pct_ci95"], floor) is not None]
  return f" (here: {'; '.join(found)}; the floor is {floor:.3f}%)" if found else ""


def markdown_table(summary: dict[str, Any]) -> str:
  """The results (GitHub markdown): per model the paired table with its noise floor,
  the frontier, and the setup."""
  meta = summary.get("meta", {})
  lines = ["# Optimizer comparison: GPT-2 and ViT", ""]
  if meta.get("suite"):
    suite = meta["suite"]
    args = " ".join(["python -m experiments.compare", *meta.get("argv", [])])
    if meta.get("partial"):  # some rows rerun into an existing comparison
      lines += [f"Rows last rerun by `{args}` ({meta.get('wall_time_s', 0) / 60:.1f} min of "
                f"training summed over those runs, on {meta.get('machine', 'this machine')}); "
                "the other rows are earlier runs of the same suite (`runs/`). Re-render "
                "with `python -m experiments.report <dir>`. Protocol: `docs/quality.md`.", ""]
    else:
      lines += [f"Generated by `{args}` (suite `{suite.get('name', '?')}`, "
                f"{meta.get('wall_time_s', 0) / 60:.1f} min on "
                f"{meta.get('machine', 'this machine')}); re-render with "
                "`python -m experiments.report <dir>`. Protocol: `docs/quality.md`.", ""]
  for model, m in summary["models"].items():
    floor = m["noise_floor_pct"]
    vit = any(r["val_accuracy_mean"] is not None for r in m["optimizers"].values())
    lines += [f"## {MODEL_TITLES.get(model, model)}", ""]
    head = ("| Optimizer | Avg bits | Δ final val loss per seed (%) | Δ mean ± 95% CI (%) "
            "| vs fp32 AdamW | ≤ +1%? |" + (" Val accuracy |" if vit else "") + " Opt-state MB |")
    lines += [head, "|" + "---|" * (8 if vit else 7)]
    for name, r in m["optimizers"].items():
      seeds = "reference (L = " + ", ".join(f"{x:.4f}" for x in r["final_val_loss"]) + ")" \
          if name == summary["reference"] else ", ".join(
              f"{float(d):+.2f}" for d in r["delta_pct"].values())
      ci = "—" if r["delta_pct_mean"] is None or name == summary["reference"] else (
          f"{r['delta_pct_mean']:+.2f} ± {r['delta_pct_ci95']:.2f}")
      bits = f"{r['average_bits']:.2f}"
      if abs(r["initial_average_bits"] - r["final_average_bits"]) > 0.005:
        bits += f" ({r['initial_average_bits']:.2f} → {r['final_average_bits']:.2f})"
      mb = f"{r['opt_state_mb']:.3f}"
      if r["peak_opt_state_mb"] > r["opt_state_mb"] * 1.0005:
        mb += f" (peak {r['peak_opt_state_mb']:.3f})"
      acc = (f" {100 * r['val_accuracy_mean']:.2f} ± {100 * r['val_accuracy_std']:.2f} % |"
             if vit and r["val_accuracy_mean"] is not None else " — |" if vit else "")
      ok = "—" if name == summary["reference"] else "yes" if r["within_1pct"] else "no"
      verdict = r["verdict"]
      if name != summary["reference"] and r["delta_pct_mean"] is not None:
        verdict = ("better (marginal)" if verdict == "better" else "worse (marginal)"
                   if verdict == "worse" else verdict) if _marginal(
                       r["delta_pct_mean"], r["delta_pct_ci95"], floor) is not None else verdict
      lines.append(f"| {r['label']} | {bits} | {seeds} | {ci} | {verdict} | {ok} |{acc} "
                   f"{mb} |")
    n = max(len(r["seeds"]) for r in m["optimizers"].values())
    if floor is None:
      lines += ["", "No control run: the noise floor is unknown, so no difference is "
                "claimed.", ""]
    else:
      lines += ["", f"**Noise floor: {floor:.2f}%** — the largest change of the final "
                "validation loss that the control (fp32 AdamW with m multiplied by 1 ± 1e-6 "
                f"each step) caused on any of the {n} seeds. *matches*: the 95% interval "
                "of the mean Δ lies within ± the floor; *worse* / *better*: it lies "
                "entirely beyond it; *unresolved*: neither (more seeds, or a lower floor, "
                f"would be needed); *(marginal)*: resolved, but the interval's end nearest 0 "
                f"lies within {MARGINAL:g}× the floor, so a slightly larger floor would undo "
                "the verdict" + _marginal_list(m["optimizers"], summary["reference"], floor)
                + ".", ""]
      jit = m["optimizers"].get("adamw_jitter")
      if jit and jit["delta_pct"]:
        d = ", ".join(f"{v:+.2f}" for v in jit["delta_pct"].values())
        lines += [f"A perturbation of m as large as bfloat16's rounding (`adamw_jitter`, "
                  f"1 ± 2⁻⁸ u each step) moved the final loss by {d}% on the same seeds: "
                  "any change of that size sends a run on another trajectory, so a "
                  "low-bit optimizer's per-seed Δ scatters at least that much and only its "
                  "mean over seeds (the 95% interval) carries information.", ""]
      lines += _lr_check(m["optimizers"]) + _noise_check(m["optimizers"])
    fr = m["frontier"]
    if fr["comparisons"]:
      lines += ["**Adaptive vs uniform bits at equal memory** (each adaptive run against "
                "the fixed-width run with the lowest mean Δ among those using no more "
                "bits, a choice that favours the uniform side; the two *paired* columns "
                "compare runs directly, seed by seed: 100 (L_adaptive / L_fixed − 1), "
                "its 95% interval, and whether it lies beyond ± the noise floor, first "
                "against that run, then against the cheapest fixed-width run that uses "
                "more memory):", "",
                "| Adaptive | Avg bits | Δ mean (%) | Best fixed at ≤ those bits | Its bits "
                "| Its Δ mean (%) | Adaptive vs it, paired (%) | Adaptive's loss "
                "| Cheapest fixed using more bits | Adaptive vs that, paired (%) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
      rows = m["optimizers"]
      for c in fr["comparisons"]:
        if "uniform" in c:
          lines.append(
              f"| {rows[c['adaptive']]['label']} | {c['bits']:.2f} | {c['delta']:+.2f} "
              f"| {rows[c['uniform']]['label']} | {c['uniform_bits']:.2f} "
              f"| {c['uniform_delta']:+.2f} | {_pm(c['vs_mean'], c['vs_ci95'])} "
              f"| {_verdict_cell(c['vs_verdict'], c['vs_mean'], c['vs_ci95'], floor)} "
              f"| {_above(c, rows, floor)}")
        else:
          lines.append(f"| {rows[c['adaptive']]['label']} | {c['bits']:.2f} "
                       f"| {c['delta']:+.2f} | none (every fixed run uses more) "
                       f"| — | — | — | — | {_above(c, rows, floor)}")
      lines.append("")
      if floor is not None:
        lines += _frontier_summary(fr["comparisons"], rows, floor)
    for key, what in (("lowest_matching", "match fp32 AdamW (within the noise floor)"),
                      ("lowest_better", "are better than fp32 AdamW (lower final loss, "
                       "the 95% interval entirely below minus the floor)"),
                      ("lowest_within_1pct", "are at most +1% worse than fp32 AdamW at 95% "
                       "confidence (an upper bound; the difference itself may be "
                       "unresolved, i.e. indistinguishable from 0)")):
      best = fr[key]
      lines += [f"**Fewest average bits that {what}**: " + (
          f"{best['average_bits']:.2f} ({m['optimizers'][best['optimizer']]['label']})."
          if best else "none of the quantized optimizers."), ""]
  lines += ["## Setup", ""]
  for model, m in summary["models"].items():
    tc, mc = m["train_config"], m["model_config"]
    shape = ", ".join(f"{k}={mc[k]}" for k in (
        "vocab_size", "context_len", "image_size", "patch_size", "d_model",
        "num_layers", "num_heads") if k in mc)
    data = (f"{tc['tokenizer']} tokens, seq_len {tc['seq_len']}"
            if model == "gpt2" else
            f"MNIST-5k, stratified split {tc.get('data_options') or 'default'}")
    final = m.get("final_eval_batches")
    lines.append(
        f"- **{model}**: {m['param_count']:,} parameters ({shape}); {data}; "
        f"{tc['steps']} steps, batch {tc['batch_size']}, lr {tc['learning_rate']:g} "
        f"(warmup {tc['warmup_steps']}, cosine to ×{tc['min_lr_ratio']:g}), "
        f"b1 {tc['b1']}, b2 {tc['b2']}, weight decay {tc['weight_decay']}, "
        f"clip {tc['grad_clip']}; curves on {tc['eval_batches']} fixed validation "
        f"batches, final loss on {final if final else tc['eval_batches']} batches "
        f"({'the whole validation split' if tc.get('final_eval_batches') == 0 else 'fixed'}).")
  lines += [
      "",
      "Notes: Δ is paired by seed (same initialisation and data order as the fp32 "
      "AdamW run). Avg bits = stored bits per moment value, scales, float32 moments of "
      "small leaves and policy state included (`stquant_jax.average_bits`; for optax "
      "states all state bytes over 2 values per parameter); for adaptive policies the "
      "mean over training steps of the layouts trained with (start → last decided "
      "layout in brackets). Opt-state MB = 10^6 bytes of the whole optimizer state "
      "(`stquant_jax.state_nbytes`), for adaptive policies the same mean over training "
      "steps (peak in brackets). Speed is not compared here (whole steps of tiny models "
      "on a shared CPU measure the model, not the optimizer): see "
      "`python -m benchmarks.update_speed`.",
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
    out.append(f"  {'optimizer':<34} {'val loss':>9} {'Δ mean':>9} {'verdict':>11} "
               f"{'state MB':>9} {'avg bits':>9}")
    for name, r in rows.items():
      d = ("—" if name == summary["reference"] or r["delta_pct_mean"] is None
           else f"{r['delta_pct_mean']:+.2f}%")
      out.append(f"  {r['label']:<34} {r['val_loss_mean']:>9.4f} {d:>9} "
                 f"{r['verdict']:>11} {r['opt_state_mb']:>9.3f} "
                 f"{r['average_bits']:>9.2f}")
    floor = m["noise_floor_pct"]
    out.append(f"  noise floor (control): {floor:.2f}%" if floor is not None else
               "  no control run: noise floor unknown")
  return "\n".join(out)


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
  out.mkdir(parents=True, exist_ok=True)
  written = []
  for model in summary["models"]:
    plots.plot_val_loss(by[model], model, out / f"val_loss_{model}.png",
                        summary["models"][model]["noise_floor_pct"])
    written.append(f"val_loss_{model}.png")
    if plots.plot_bits(by[model], model, out / f"bits_{model}.png"):
      written.append(f"bits_{model}.png")
  plots.plot_memory(summary, out / "memory.png")
  plots.plot_frontier(summary, out / "frontier.png")
  written += ["memory.png", "frontier.png"]
  summary["plots"] = written
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
