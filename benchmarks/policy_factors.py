"""Factor selection on real moments: which statistics predict quantization damage.

Trains the byte-level MLP LM (benchmarks/_real_moments.py) with float32
``optax.adamw``; at a few checkpoints takes each large leaf's gradient, m and v,
cuts them into 4096-value chunks, and measures per chunk (a) every candidate
factor of the score engine and (b) the Fisher-weighted update damage of
quantizing m alone or v alone at 2/3/4/6 bits, both absolute and relative to
the chunk's ``sum v u^2``. Then, separately for m and v, greedy facility-location
selection (``benchmarks/factor_selection.py``) picks 2 factors, unconstrained
and with "one magnitude + one structure" (the policy's N and R), and reports
the exact optimum beside it.

Usage: ``python -m benchmarks.policy_factors [--steps 600] [--json docs/policy_factors.json]``
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import optax

from benchmarks._io import write_json
from benchmarks._real_moments import batches, init_mlp, make_step, stdlib_bytes
from benchmarks.factor_selection import chunk_samples, select_factors
from stquant_jax._src.policy.scores import FACTORS, MAGNITUDE_FACTORS


def collect(steps: int, checkpoints, seed: int = 0, lr: float = 3e-3):
  data = stdlib_bytes()
  params = init_mlp(jax.random.key(seed))
  tx = optax.adamw(lr, weight_decay=1e-4)
  state = tx.init(params)

  step = make_step(tx, return_grads=True)

  feats, dmg = {}, {}
  it = batches(data, 64, 16, seed)
  for i in range(1, steps + 1):
    params, state, g = step(params, state, *next(it))
    if i in checkpoints:
      adam = state[0]
      for k in params:
        if params[k].size < 4096:
          continue
        f, d = chunk_samples(g[k], adam.mu[k], adam.nu[k])
        u2 = None
        for name, x in f.items():
          feats.setdefault(name, []).extend(x.tolist())
        # Relative damage: divide by the chunk's Fisher-weighted update energy.
        mm, vv = np.asarray(adam.mu[k]).reshape(-1), np.asarray(adam.nu[k]).reshape(-1)
        n = (mm.size // 4096) * 4096
        u2 = (mm[:n] ** 2 * vv[:n] / (np.sqrt(vv[:n]) + 1e-8) ** 2).reshape(-1, 4096).sum(1)
        for name, x in d.items():
          dmg.setdefault(name, []).extend(x.tolist())
          dmg.setdefault(name + " rel", []).extend((x / np.maximum(u2, 1e-30)).tolist())
  return feats, dmg


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  cps = sorted({args.steps // 6, args.steps // 2, args.steps})
  feats, dmg = collect(args.steps, cps)
  out = {"steps": args.steps, "checkpoints": cps, "samples": len(next(iter(dmg.values())))}
  for mom in "mv":
    f = {name: feats[f"{mom}:{name}"] for name in FACTORS}
    d = {k: v for k, v in dmg.items() if k.startswith(mom + "@")}
    groups = {n: ("magnitude" if n in MAGNITUDE_FACTORS else "structure") for n in FACTORS}
    free = select_factors(f, d, k=2)
    part = select_factors(f, d, k=2, groups=groups, per_group=1)
    out[mom] = {"unconstrained": {"names": free.names, "value": free.value, "optimum": free.optimum},
                "one_per_family": {"names": part.names, "value": part.value,
                                   "optimum": part.optimum},
                "scores": part.scores}
    print(f"{mom}: greedy {free.names} F={free.value:.3f} (opt {free.optimum:.3f}); "
          f"one per family {part.names} F={part.value:.3f} (opt {part.optimum:.3f})")
    targets = list(d)
    print("  factor        " + " ".join(f"{t:>10s}" for t in targets))
    for n in FACTORS:
      print(f"  {n:12s}  " + " ".join(f"{part.scores[n][t]:10.3f}" for t in targets))
  print(json.dumps({k: out[k] for k in ("steps", "checkpoints", "samples")}))
  write_json(out, args.json)


if __name__ == "__main__":
  main()
