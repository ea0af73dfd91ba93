"""Display names, colors and ordering of the optimizers in tables and plots."""

import re

from experiments import optimizers, quality

REFERENCE = quality.REFERENCE
LABELS = {
    "adamw": "optax.adamw (fp32)",
    "adamw_control": "fp32, m × (1 ± 1e-6) (control)",
    "adamw_jitter": "fp32, m × (1 ± 2⁻⁸) (bf16-sized jitter)",
    "adamw_bf16": "optax.adamw (bf16 m)",
    "stquant_adaptive": "STQuant adaptive (default)",
    "stquant_budget": "STQuant budget",
}
COLORS = {"adamw": "black", "adamw_control": "tab:gray", "adamw_bf16": "tab:brown",
          "adamw_jitter": "tab:olive",
          "stquant_adaptive": "tab:green", "stquant_budget": "tab:red"}
_KIND_ORDER = {"reference": 0, "control": 1, "baseline": 2, "fixed": 3, "adaptive": 4}
MODEL_TITLES = {"gpt2": "GPT-2 on CPython stdlib (bytes)",
                "vit": "ViT on MNIST-5k"}


def fixed_bits(name: str) -> tuple[int, int] | None:
  """``(m, v)`` bits of a fixed-width name (any block size or rounding), else None."""
  m = re.fullmatch(r"stquant(\d)(?:v(\d))?", quality.name_parts(name)[0])
  return (int(m.group(1)), int(m.group(2) or m.group(1))) if m else None


def order(names) -> list[str]:
  """Reference, control, other baselines, fixed widths (most bits first), adaptive."""
  def key(n):
    fb = fixed_bits(n)
    _, block, nearest = quality.name_parts(n)
    return (_KIND_ORDER[quality.kind(n)], -(fb[0] + fb[1]) if fb else 0,
            nearest, -(block or 128), n)
  return sorted(names, key=key)


def label(name: str, stats: dict | None = None) -> str:
  """Display name: fixed widths show m/v bits, budgets their target."""
  base, block, nearest = quality.name_parts(name)
  suffix = (f", block {block}" if block else "") + (", nearest rounding" if nearest else "")
  fb = fixed_bits(name)
  if fb:
    text = (f"stquant {fb[0]}-bit" if fb[0] == fb[1] else f"stquant m{fb[0]}/v{fb[1]}")
    return text + suffix
  target = (stats or {}).get("target_bits")
  if target is None and base.startswith("stquant_t"):  # the name says it: stquant_t4.5
    target = float(base.removeprefix("stquant_t"))
  if target is not None and (base.startswith("stquant_t") or base == "stquant_budget"):
    return f"STQuant budget ≤ {target:g} bits" + suffix
  if base in LABELS:
    return LABELS[base] + suffix
  if (size := optimizers.jitter_size(name)) is not None:
    return f"fp32, m × (1 ± {size:g})"
  if (scale := optimizers.lr_scale(name)) is not None:
    return f"optax.adamw (fp32), lr × {scale:g}"
  return name + suffix


def color(name: str) -> str:
  if name in COLORS:
    return COLORS[name]
  fb = fixed_bits(name)
  cmap = {"fixed": "Blues", "adaptive": "Greens"}.get(quality.kind(name), "Purples")
  import matplotlib
  shade = 0.35 + 0.08 * (sum(fb) if fb else 6)
  return matplotlib.colormaps[cmap](min(shade, 0.95))
