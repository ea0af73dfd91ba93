"""Stored moments vs float32 moments over a long run, on the same real gradients.

A byte-level MLP language model (``benchmarks/_real_moments.py``) trains with
``optax.adamw`` (float32 moments). At every step its gradients are also fed to
``scale_by_stquant`` variants (each with its own quantized state; they do not
move the parameters), so stored moments and float32 moments see exactly the
same gradient sequence. Reported per variant, at checkpoints through the run:

* ``v_sum_drift``: ``sum(stored v) / sum(float32 v) - 1`` (a bias of the stored v);
* ``v_median_drift``: median over elements of ``stored v / float32 v`` minus 1;
* ``m_error``: ``||stored m - m|| / ||m||``;
* ``update_error``: ``||u_q - u|| / ||u||`` for the step's update (each variant's
  update comes from its own state and the shared gradient);
* ``update_rms_ratio``: ``rms(u_q) / rms(u)``: the effective step size of the
  stored moments relative to float32 Adam's (above 1: quantization lengthens
  the step, as a larger learning rate would);
* ``update_blowup``: the largest ``|u_q| / max(|u|, rms(u))`` over elements: how far
  an element's update overshoots (1 or less: never above the float32 update);
* ``quiet_update``: the update of elements whose gradient is zero from
  ``--quiet-from`` on (a masked slice of the embedding), relative to its size
  at that step; float32 Adam decays it as ``0.9 ** t``.

Usage: ``python -m benchmarks.moment_drift [--steps 1000] [--b2 0.999] [--json out.json]``
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import stquant_jax as sq
from benchmarks import _real_moments as rm
from benchmarks._io import write_json

VARIANTS = {
    # name: (bits m, bits v, rounding (m, v))
    "8bit nearest": (8, 8, ("nearest", "nearest")),
    "8bit stochastic": (8, 8, ("stochastic", "stochastic")),
    "8bit stochastic m": (8, 8, ("stochastic", "nearest")),
    "4bit nearest": (4, 4, ("nearest", "nearest")),
    "4bit stochastic": (4, 4, ("stochastic", "stochastic")),
    "4bit stochastic m": (4, 4, ("stochastic", "nearest")),
    "3bit stochastic": (3, 3, ("stochastic", "stochastic")),
}


def _variant_tx(bits_m, bits_v, rounding, b1, b2):
  return sq.scale_by_stquant(b1, b2, policy=sq.FixedBits(bits_m, bits_v), rounding=rounding,
                             backend="jnp")


def _moments(state, params):
  mu = {k: np.asarray(sq.dequantize(x)) if isinstance(x, sq.QuantizedArray) else np.asarray(x)
        for k, x in state.mu.items()}
  nu = {k: np.asarray(sq.dequantize(x)) if isinstance(x, sq.QuantizedArray) else np.asarray(x)
        for k, x in state.nu.items()}
  return mu, nu


def run(steps: int = 1000, b1: float = 0.9, b2: float = 0.999, quiet_from: int = 300,
        every: int = 100, seed: int = 0, variants=None, progress: bool = True) -> dict:
  variants = variants or list(VARIANTS)
  data = rm.stdlib_bytes()
  params = rm.init_mlp(jax.random.key(seed))
  big = [k for k in params if params[k].size >= 4096]
  ref_tx = optax.scale_by_adam(b1, b2)
  train_tx = optax.chain(ref_tx, optax.scale(-1e-3))
  train_state = train_tx.init(params)
  # Half of every embedding row (so half of every 128-value block: the other half keeps
  # the block's scale up) gets no gradient from quiet_from on.
  quiet = jnp.zeros(params["emb"].shape, bool).at[:, 32:].set(True)

  @jax.jit
  def train_step(params, state, x, y, t):
    g = jax.grad(rm.mlp_loss)(params, x, y)
    g = dict(g, emb=jnp.where(quiet & (t >= quiet_from), 0.0, g["emb"]))
    u, state = train_tx.update(g, state, params)
    return optax.apply_updates(params, u), state, g, -u["emb"] / 1e-3

  txs = {n: _variant_tx(*VARIANTS[n], b1, b2) for n in variants}
  states = {n: tx.init(params) for n, tx in txs.items()}
  updates = {n: jax.jit(tx.update) for n, tx in txs.items()}
  rows = {n: [] for n in variants}
  quiet0 = {}
  it = rm.batches(data, 64, 16, seed)
  bar = tqdm.trange(steps, desc="moment drift", disable=not progress)
  for t in bar:
    x, y = next(it)
    params, train_state, g, u_ref_emb = train_step(params, train_state, x, y, t)
    for n in variants:
      u, states[n] = updates[n](g, states[n])
      if (t + 1) % every == 0 or t == quiet_from:
        if t == quiet_from:
          quiet0[n] = float(jnp.abs(jnp.where(quiet, u["emb"], 0)).sum())
          continue
        mu, nu = _moments(states[n], params)
        ref = train_state[0]
        rec = {"step": t + 1}
        vq = np.concatenate([nu[k].ravel() for k in big])
        vf = np.concatenate([np.asarray(ref.nu[k]).ravel() for k in big])
        mq = np.concatenate([mu[k].ravel() for k in big])
        mf = np.concatenate([np.asarray(ref.mu[k]).ravel() for k in big])
        pos = vf > 0
        rec["v_sum_drift"] = float(vq[pos].sum() / vf[pos].sum() - 1)
        rec["v_median_drift"] = float(np.median(vq[pos] / vf[pos]) - 1)
        rec["m_error"] = float(np.linalg.norm(mq - mf) / np.linalg.norm(mf))
        # the reference update of this step: float32 Adam on the same gradient
        bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        uf = np.concatenate([(np.asarray(ref.mu[k]) / bc1 / (np.sqrt(np.asarray(ref.nu[k]) / bc2)
                                                              + 1e-8)).ravel() for k in big])
        uq = np.concatenate([np.asarray(u[k]).ravel() for k in big])
        rec["update_error"] = float(np.linalg.norm(uq - uf) / np.linalg.norm(uf))
        rms = np.sqrt(np.mean(uf ** 2))
        rec["update_rms_ratio"] = float(np.sqrt(np.mean(uq ** 2)) / rms)
        over = np.abs(uq) / np.maximum(np.abs(uf), rms)
        rec["update_blowup"] = float(np.max(over))
        rec["update_over_2x"] = float(np.mean(over > 2))
        if t > quiet_from:
          q = float(jnp.abs(jnp.where(quiet, u["emb"], 0)).sum())
          rec["quiet_update"] = q / max(quiet0[n], 1e-30)
          rec["quiet_update_fp32"] = b1 ** (t - quiet_from)
        rows[n].append(rec)
  return {"steps": steps, "b1": b1, "b2": b2, "quiet_from": quiet_from, "variants": {
      n: {"bits": VARIANTS[n][:2], "rounding": VARIANTS[n][2], "trace": rows[n]}
      for n in variants}}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--b1", type=float, default=0.9)
  ap.add_argument("--b2", type=float, default=0.999)
  ap.add_argument("--quiet-from", type=int, default=300)
  ap.add_argument("--every", type=int, default=100)
  ap.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS))
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  t0 = time.time()
  out = run(args.steps, args.b1, args.b2, args.quiet_from, args.every, variants=args.variants)
  out["seconds"] = round(time.time() - t0, 1)
  print(f"{'variant':22s} {'v sum':>8s} {'v median':>9s} {'m err':>7s} {'u err':>7s} "
        f"{'u rms':>6s} {'u blowup':>9s} {'u > 2x':>8s} {'quiet u':>9s}")
  for n, r in out["variants"].items():
    last = r["trace"][-1]
    print(f"{n:22s} {last['v_sum_drift']:+8.3f} {last['v_median_drift']:+9.3f} "
          f"{last['m_error']:7.3f} {last['update_error']:7.3f} {last['update_rms_ratio']:6.3f} "
          f"{last['update_blowup']:9.2f} "
          f"{last['update_over_2x']:8.1e} "
          f"{last.get('quiet_update', float('nan')):9.2e}")
  if args.json:
    write_json(out, args.json)


if __name__ == "__main__":
  main()
