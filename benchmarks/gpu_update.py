"""GPU benchmark: the fused Pallas update vs ``optax.adamw`` vs the jnp path, GPT-2 small.

One AdamW step (update + apply, buffers donated) on a GPT-2-small-shaped pytree
(124M parameters: wte, wpe, 12 blocks of attention/MLP/LayerNorm, ln_f):

* ``optax``: ``optax.adamw`` with float32 moments (the baseline);
* ``jnp``: quantized moments through the library's per-leaf jnp update
  (``stquant_jax._src.update.adam.adam_leaf``), then weight decay and learning rate;
* ``pallas``: the same states through ``pallas_kernels.adam_update_leaf`` with
  AdamW fused (one kernel per leaf), then ``p + u``;
* ``stquant_jax.adamw``: the library as a user runs it (``FixedBits``, the
  default ``backend="auto"``: the kernel where the step is lowered for CUDA,
  after its first-use check), update + apply (8/8 and 4/4 only).

Leaves under 4096 values (biases, norms) keep float32 moments on both quantized
paths, as ``FixedBits`` does. Bit-width configs: 8/8, 4/4 and a mixed layout
(embeddings 8/8, attention 4/4, MLP m3/v5). For the pallas path the script also
times the kernels alone (no apply, no float32 leaves) and reports their bytes
moved, achieved bandwidth and the fraction of ``--peak-bw`` (default: H100 SXM,
3.35e12 B/s). It checks pallas against jnp after one step (update error in
ulps, share of differing codes). Prints a table and JSON (``--out`` to save).

GPU: ``python -m benchmarks.gpu_update``. CPU smoke test (tiny model, kernels
interpreted): ``python -m benchmarks.gpu_update --interpret --scale 0.02 --steps 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pallas_kernels as pk
import stquant_jax as sq
from stquant_jax._src.update.adam import adam_leaf

B1, B2, EPS, LR, WD, MIN_SIZE = 0.9, 0.999, 1e-8, 1e-3, 0.1, 4096
CONFIGS = {"8/8": None, "4/4": None, "mixed": None}


def gpt2_shapes(scale: float = 1.0):
  """GPT-2 small (d=768, 12 layers, vocab 50257, ctx 1024); ``scale`` shrinks every dim."""
  d, vocab, ctx = (max(32, int(x * scale)) for x in (768, 50257, 1024))
  shapes = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f.scale": (d,), "ln_f.bias": (d,)}
  for i in range(12):
    p = f"h{i}."
    shapes |= {p + "ln_1.scale": (d,), p + "ln_1.bias": (d,), p + "ln_2.scale": (d,),
               p + "ln_2.bias": (d,), p + "attn.c_attn.w": (d, 3 * d),
               p + "attn.c_attn.b": (3 * d,), p + "attn.c_proj.w": (d, d),
               p + "attn.c_proj.b": (d,), p + "mlp.c_fc.w": (d, 4 * d),
               p + "mlp.c_fc.b": (4 * d,), p + "mlp.c_proj.w": (4 * d, d),
               p + "mlp.c_proj.b": (d,)}
  return shapes


def leaf_bits(name: str, size: int, config: str):
  if size < MIN_SIZE:
    return None
  if config == "mixed":
    return (4, 4) if ".attn." in name else (3, 5) if ".mlp." in name else (8, 8)
  m, v = config.split("/")
  return int(m), int(v)


def init_states(params, config: str):
  """Per leaf: (mu, nu) QuantizedArrays, or float32 arrays for small leaves."""
  mu, nu = {}, {}
  for k, p in params.items():
    bits = leaf_bits(k, p.size, config)
    if bits is None:
      mu[k], nu[k] = jnp.zeros_like(p), jnp.zeros_like(p)
    else:
      mu[k] = sq.quantize(jnp.zeros_like(p), bits[0], signed=True)
      nu[k] = sq.quantize(jnp.zeros_like(p), bits[1], signed=False)
  return mu, nu


def make_step(method: str, interpret: bool, kernels_only: bool = False, tiling=None):
  """(params, mu, nu, count, grads) -> (params, mu, nu, count), one AdamW step."""
  jnp_leaf = adam_leaf

  def step(params, mu, nu, count, grads):
    count = count + 1
    bc1 = 1 - jnp.float32(B1) ** count
    bc2 = 1 - jnp.float32(B2) ** count
    hp = dict(b1=B1, b2=B2, eps=EPS, eps_root=0.0, bc1=bc1, bc2=bc2)
    new_p, new_mu, new_nu = {}, {}, {}
    for k, p in params.items():
      g, m, v = grads[k], mu[k], nu[k]
      if not isinstance(m, sq.QuantizedArray):  # float32 moments: plain AdamW
        if kernels_only:
          new_p[k], new_mu[k], new_nu[k] = p, m, v
          continue
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        u = (m / bc1) / (jnp.sqrt(v / bc2) + EPS)
        new_p[k], new_mu[k], new_nu[k] = p - LR * (u + WD * p), m, v
      elif method == "pallas":
        u, new_mu[k], new_nu[k] = pk.adam_update_leaf(
            g, m, v, **hp, param=p, weight_decay=WD, learning_rate=LR, interpret=interpret,
            tiling=tiling)
        new_p[k] = u if kernels_only else p + u
      else:
        u, new_mu[k], new_nu[k] = jnp_leaf(g, m, v, **hp)
        new_p[k] = p - LR * (u + WD * p)
    return new_p, new_mu, new_nu, count

  return jax.jit(step, donate_argnums=(0, 1, 2))


def make_optax_step(tx=None):
  tx = tx or optax.adamw(LR, B1, B2, EPS, weight_decay=WD)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx, jax.jit(step, donate_argnums=(0, 1))


def timed(fn, carry, grads, steps: int, warmup: int = 2):
  """Median seconds per call of ``carry = fn(*carry, grads)``."""
  for _ in range(warmup):
    carry = fn(*carry, grads)
  jax.block_until_ready(carry)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    carry = fn(*carry, grads)
    jax.block_until_ready(carry)
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), carry


def kernel_bytes(params, mu, nu):
  """HBM bytes the fused kernels move: read g, p, codes, scales; write u, codes, scales."""
  total = 0
  for k, p in params.items():
    if isinstance(mu[k], sq.QuantizedArray):
      state = sum(q.codes.size * 4 + q.scales.size * 4 for q in (mu[k], nu[k]))
      total += 3 * p.size * p.dtype.itemsize + 2 * state
  return total


def check(params, grads, config, interpret):
  """One step from the same state: pallas vs jnp (update ulps, share of differing codes)."""
  from stquant_jax._src.codec.packing import unpack
  out = {}
  for method in ("pallas", "jnp"):
    mu, nu = init_states(params, config)
    p = jax.tree.map(jnp.copy, params)
    out[method] = make_step(method, interpret)(p, mu, nu, jnp.int32(0), grads)
  worst_ulps, differ, total = 0.0, 0, 0
  for k in params:
    a, b = out["pallas"][0][k], out["jnp"][0][k]
    du = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
    worst_ulps = max(worst_ulps, du / (2.0**-23 * max(np.abs(np.asarray(b)).max(), 1e-30)))
    for i in (1, 2):
      qa, qb = out["pallas"][i][k], out["jnp"][i][k]
      if isinstance(qa, sq.QuantizedArray):
        ca, cb = unpack(qa.codes, qa.bits), unpack(qb.codes, qb.bits)
        differ += int((ca != cb).sum())
        total += int(ca.size)
  return {"param_max_diff_ulps": float(worst_ulps), "codes_differ": differ / max(total, 1)}


def run(args):
  tiling = pk.Tiling(args.blocks_per_program, args.num_warps, args.num_stages)
  shapes = gpt2_shapes(args.scale)
  keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
  params = {k: jax.random.normal(keys[2 * i], s) * 0.02 for i, (k, s) in enumerate(shapes.items())}
  grads = {k: jax.random.normal(keys[2 * i + 1], s) * 1e-3
           for i, (k, s) in enumerate(shapes.items())}
  n_params = int(sum(p.size for p in params.values()))
  results = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
             "interpret": args.interpret, "n_params": n_params, "steps": args.steps,
             "peak_bw": args.peak_bw, "tiling": dataclasses.asdict(tiling), "rows": []}
  tx, optax_step = make_optax_step()
  copy = lambda t: jax.tree.map(jnp.copy, t)
  t_optax, _ = timed(optax_step, (copy(params), tx.init(params)), grads, args.steps)
  results["rows"].append({"method": "optax.adamw fp32", "config": "32/32", "ms": t_optax * 1e3})
  for config in args.configs:
    for method in ("jnp", "pallas"):
      mu, nu = init_states(params, config)
      t, _ = timed(make_step(method, args.interpret, tiling=tiling),
                   (copy(params), mu, nu, jnp.int32(0)), grads, args.steps)
      row = {"method": method, "config": config, "ms": t * 1e3, "vs_optax": t / t_optax}
      if method == "pallas":
        mu, nu = init_states(params, config)
        t_k, _ = timed(make_step(method, args.interpret, kernels_only=True, tiling=tiling),
                       (copy(params), mu, nu, jnp.int32(0)), grads, args.steps)
        nbytes = kernel_bytes(params, mu, nu)
        row |= {"kernels_ms": t_k * 1e3, "kernel_bytes": nbytes,
                "kernel_bw": nbytes / t_k, "kernel_bw_frac_peak": nbytes / t_k / args.peak_bw,
                "roofline_ms": nbytes / args.peak_bw * 1e3}
        if not args.no_check:
          row |= check(params, grads, config, args.interpret)
      results["rows"].append(row)
    if config in ("8/8", "4/4"):
      bits = int(config.split("/")[0])
      tx = sq.adamw(LR, B1, B2, EPS, weight_decay=WD, policy=sq.FixedBits(bits, bits),
                    backend="pallas" if args.interpret else "auto")
      tx, lib_step = make_optax_step(tx)
      t, _ = timed(lib_step, (copy(params), tx.init(params)), grads, args.steps)
      results["rows"].append({"method": "stquant_jax.adamw", "config": config, "ms": t * 1e3,
                              "vs_optax": t / t_optax})
  return results


def print_table(results):
  print(f"{results['device']} ({results['backend']}), {results['n_params'] / 1e6:.1f}M params, "
        f"interpret={results['interpret']}, tiling={results['tiling']}")
  print(f"{'method':>18} {'bits m/v':>9} {'ms/step':>9} {'x optax':>8} {'kernels ms':>11} "
        f"{'GB/s':>8} {'% peak':>7} {'roofline ms':>12}")
  for r in results["rows"]:
    extra = ""
    if "kernels_ms" in r:
      extra = (f" {r['kernels_ms']:11.3f} {r['kernel_bw'] / 1e9:8.1f} "
               f"{100 * r['kernel_bw_frac_peak']:6.1f}% {r['roofline_ms']:12.3f}")
    print(f"{r['method']:>18} {r['config']:>9} {r['ms']:9.3f} {r.get('vs_optax', 1.0):8.2f}"
          + extra)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--scale", type=float, default=1.0, help="shrink every model dim")
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--peak-bw", type=float, default=3.35e12, help="HBM bytes/s")
  default = pk.DEFAULT_TILING
  parser.add_argument("--blocks-per-program", type=int, default=default.blocks_per_program)
  parser.add_argument("--num-warps", type=int, default=default.num_warps)
  parser.add_argument("--num-stages", type=int, default=default.num_stages)
  parser.add_argument("--interpret", action="store_true", help="CPU smoke test")
  parser.add_argument("--no-check", action="store_true", help="skip the pallas-vs-jnp check")
  parser.add_argument("--out", help="also write the JSON here")
  args = parser.parse_args(argv)
  if not args.interpret and jax.default_backend() != "gpu":
    parser.error("no GPU: pass --interpret (and a small --scale) for the CPU smoke test")
  results = run(args)
  print_table(results)
  text = json.dumps(results, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
