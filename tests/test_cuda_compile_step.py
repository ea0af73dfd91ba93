"""The whole GPT-2 train step (forward, backward, optimizer) compiled for an H100 (no GPU).

The experiments' GPT-2 (``experiments/models.py``) with ``optax.adamw`` and
with stquant at several bit-widths and an adaptive (mixed per-leaf) layout,
params and optimizer state donated, compiled for the GPU on this CPU; none of
our kernels may spill registers (``ptxas``' report; XLA's own fusions may: an
8-byte spill in a multi-output reduction of the policy's sums was seen). Each program must
hold one fused kernel per quantized leaf (the backend is chosen by the
platform lowered for, not by this host), and its peak memory must be lower
than ``optax.adamw``'s by at least 95% of the state bytes saved (no float32
copy of a moment or update outlives a tile).

Slow marker: CI compiles a small GPT-2 (1 layer, byte vocabulary, batch 4 x 64)
for adamw, 8/8 and the adaptive layout (whose widths include 4, so 4/4 adds no
kind of leaf); ``STQUANT_SLOW=1`` compiles GPT-2 small (124M, batch 8 x 1024,
bf16 compute) with 4/4 as well, as ``python -m benchmarks.h100_memory`` does.
Compiled, not run.
"""

import os

import pytest

from _cuda_compile import assert_all_ok, needs_cuda_compile, run_cases
from benchmarks._compile_cases import OUR_KERNELS

FULL = os.environ.get("STQUANT_SLOW", "") not in ("", "0")
pytestmark = needs_cuda_compile

SCRIPT = r"""
import json, os
import jax, jax.numpy as jnp, optax
import pallas_kernels as pk
import stquant_jax as sq
from benchmarks import _gpt2_step as gs
from experiments import optimizers

FULL = os.environ.get("STQUANT_SLOW", "") not in ("", "0")
if FULL:
  CFG = gs.gpt2_config("small", dtype="bfloat16")
  BATCH, SEQ = 8, 1024
else:
  CFG = gs.gpt2_config("tiny", vocab_size=256, context_len=64, num_layers=1)
  BATCH, SEQ = 4, 64
WIDTHS = (3, 8, 5, 4, 6, 7)  # the adaptive layout cycles through these per leaf

def layout_bits(name, signed, _seen={}):
  i = _seen.setdefault((name, signed), len(_seen))
  return WIDTHS[i % len(WIDTHS)]

def tx_for(name):
  mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  if name == "adamw":
    return optax.adamw(1e-3, weight_decay=0.1, mask=mask)
  policy = {"8/8": sq.FixedBits(8, 8), "4/4": sq.FixedBits(4, 4),
            "adaptive": sq.STQuantPolicy(every=100)}[name]
  return sq.adamw(1e-3, weight_decay=0.1, mask=mask, policy=policy)

def run(name):
  tx = tx_for(name)
  step, args = gs.abstract_args(CFG, tx, BATCH, SEQ)
  if name == "adaptive":
    args = (args[0], gs.with_layout(args[1], layout_bits), args[2])
  compiled = pk.compile_for_target(step, *args, donate_argnums=(0, 1))
  hlo = compiled.as_text()
  states = [x for x in jax.tree.leaves(args[1], is_leaf=lambda x: isinstance(x, sq.ScaleByStquantState))
            if isinstance(x, sq.ScaleByStquantState)]
  quantized = sum(isinstance(q, sq.QuantizedArray) for s in states for q in jax.tree.leaves(
      s.mu, is_leaf=lambda x: isinstance(x, sq.QuantizedArray)))
  widths = sorted({q.bits for s in states for t in (s.mu, s.nu) for q in jax.tree.leaves(
      t, is_leaf=lambda x: isinstance(x, sq.QuantizedArray)) if isinstance(q, sq.QuantizedArray)})
  return {"kernels": hlo.count('custom_call_target="' + pk.TRITON_CALL), "quantized_leaves": quantized,
          "widths": widths, "state_bytes": optimizers.state_bytes(args[1]),
          **pk.memory_summary(compiled)}

NAMES = ("adamw", "8/8", "4/4", "adaptive")
CASES = {n: (lambda n=n: run(n)) for n in NAMES}
"""
NAMES = ("adamw", "8/8", "4/4", "adaptive") if FULL else ("adamw", "8/8", "adaptive")


@pytest.mark.slow
def test_train_step_compiles_with_kernels_and_saves_peak_memory():
  """One subprocess compiles every case (one test, so xdist workers do not repeat it).

  * each stquant program holds one fused kernel per quantized leaf (adamw none), and
    the adaptive layout has at least four different widths;
  * peak (arguments + temporaries, outputs aliased) falls by >= 95% of the state
    bytes saved against optax.adamw.
  """
  res = run_cases(SCRIPT, NAMES, case_timeout=1800 if FULL else 600, fail_on_spill=False)
  assert_all_ok(res)
  for name, r in res.items():
    assert not [s for s in r["spills"] if s[0].startswith(OUR_KERNELS)], (name, r["spills"])
  base = res["adamw"]
  assert base["kernels"] == 0
  for name in NAMES[1:]:
    r = res[name]
    assert r["quantized_leaves"] > 0
    assert r["kernels"] == r["quantized_leaves"], (name, r)
    saved = base["state_bytes"] - r["state_bytes"]
    drop = base["peak_bytes"] - r["peak_bytes"]
    assert saved > 0 and drop >= 0.95 * saved, (name, drop, saved, base, r)
  assert len(res["adaptive"]["widths"]) >= 4, res["adaptive"]["widths"]


FSDP_SCRIPT = r"""
import jax, jax.numpy as jnp, optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import pallas_kernels as pk
import stquant_jax as sq
from stquant_jax._src.policy.scores import NUM_SUMS
from tests._hlo import collectives

SHAPES = {"w1": ((1024, 256), P("d")), "w2": ((512, 128), P("d")), "b": ((256,), P())}
params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in SHAPES.items()}
pspecs = {k: s for k, (_, s) in SHAPES.items()}
cpu_mesh = jax.make_mesh((8,), ("d",))  # only to derive the state's specs (FSDP rule)

def run(policy, axis_type):
  tx = sq.adamw(1e-2, policy=policy)
  state = jax.eval_shape(tx.init, params)
  sshard = sq.state_shardings(state, {k: NamedSharding(cpu_mesh, s) for k, s in pspecs.items()})
  sspecs = jax.tree.map(lambda s: s.spec, sshard)
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  c = pk.compile_for_target(step, params, state, params, specs=(pspecs, sspecs, pspecs),
                            mesh_shape=(8,), mesh_axes=("d",), axis_types=(axis_type,),
                            donate_argnums=(0, 1), out_specs=(pspecs, sspecs))
  hlo = c.as_text()
  moved = collectives(hlo, start_results_only=True)
  return {"kernels": hlo.count('custom_call_target="' + pk.TRITON_CALL), "collectives": moved,
          "limit": len(SHAPES) * NUM_SUMS, **pk.memory_summary(c)}

CASES = {f"{p}-{t}": (lambda p=p, t=t: run(
            sq.FixedBits(8, 4, min_size=1024) if p == "fixed" else
            sq.STQuantPolicy(every=100, min_size=1024), getattr(AxisType, t)))
         for p in ("fixed", "adaptive") for t in ("Auto", "Explicit")}
"""


@pytest.fixture(scope="module")
def fsdp_results():
  """Every FSDP case in one 8-device subprocess (one Python and jax start for both
  axis types)."""
  names = [f"{p}-{t}" for t in ("Auto", "Explicit") for p in ("fixed", "adaptive")]
  return run_cases(FSDP_SCRIPT, names, case_timeout=600, devices=8, fail_on_spill=False)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_fsdp_step_compiles_for_8_h100s_and_stays_sharded(fsdp_results, axis_type):
  """The FSDP update compiled for 8 H100s (a deviceless 1x1x8 topology): one kernel per
  quantized leaf, run on each device's blocks, and no collective but the adaptive
  policy's sums (leaves x NUM_SUMS elements)."""
  names = [f"fixed-{axis_type}", f"adaptive-{axis_type}"]
  res = {n: fsdp_results[n] for n in names}
  assert_all_ok(res)
  for name in names:
    r = res[name]
    assert not [s for s in r["spills"] if s[0].startswith(OUR_KERNELS)], r["spills"]
    assert r["kernels"] == 2, r
    if name.startswith("fixed"):
      assert r["collectives"] == [], r["collectives"]
    else:
      assert all(op == "all-reduce" and n <= r["limit"] for op, n in r["collectives"]), r
