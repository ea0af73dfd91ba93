"""Every kernel configuration of ``test_pallas_lowering`` compiled for an H100 (no GPU here).

Lowering stops at Triton MLIR; these tests run the rest of a GPU build on the
CPU (Triton -> LLVM -> PTX -> ``ptxas`` for sm_90a) with register spilling made
a compile error, each case crash-contained in a subprocess with a timeout
(``tests/_cuda_compile.py``). The cases are the lowering tests' own functions
and shapes, imported from ``test_pallas_lowering``. Compiled, not run: launch
limits and numerics on a real GPU stay unchecked (``benchmarks/gpu_update.py``).
"""

import pytest

from _cuda_compile import assert_all_ok, needs_cuda_compile, run_cases

pytestmark = needs_cuda_compile

KERNEL_SCRIPT = r"""
import functools
import jax, jax.numpy as jnp
import pallas_kernels as pk
import stquant_jax as sq
import test_pallas_lowering as low

def compiled(kernels):
  # kernels: {label: (fn, args)}. One program holding them all (one XLA compile);
  # if it fails, each alone, so the error names the configuration.
  def together(*flat):
    it = iter(flat)
    return [fn(*[next(it) for _ in args]) for fn, args in kernels.values()]
  flat = [a for _, args in kernels.values() for a in args]
  try:
    c = pk.compile_for_target(together, *flat)
  except Exception:
    for label, (fn, args) in kernels.items():
      try:
        pk.compile_for_target(fn, *args)
      except Exception as e:
        raise RuntimeError(f"{label}: {type(e).__name__}: {e}") from None
    raise
  n = c.as_text().count('custom_call_target="' + pk.TRITON_CALL)
  assert n == len(kernels), f"{n} Triton kernels compiled, {len(kernels)} expected"
  return {"kernels": n}

CASES = {}
S = jax.ShapeDtypeStruct
state = lambda *a: jax.eval_shape(lambda: low._state(*a))  # abstract: no CPU work
for bits in low.BITS:
  ks = {}
  for signed in (True, False):
    for fam, cmap in (("default", sq.default_map(bits, signed)),
                      ("other", low.other_family(bits, signed))):
      ks[f"quantize {cmap.name}"] = (functools.partial(pk.quantize_blocks_pallas, cmap=cmap),
                                     [S((100, 128), jnp.float32)])
      ks[f"dequantize {cmap.name}"] = (
          functools.partial(pk.dequantize_blocks_pallas, cmap=cmap),
          [S((100, 4 * bits), jnp.uint32), S((100,), jnp.float32)])
  CASES[f"quantize-dequantize-{bits}"] = functools.partial(compiled, ks)

for bits in low.BITS:
  g = S((300, 70), jnp.float32)
  ks = {}
  for fam, mk in (("default", sq.default_map), ("other", low.other_family)):
    ks[fam] = (low._leaf_fn, [g, *state(g.shape, mk(bits, True), mk(bits, False))])
  ks["stochastic"] = (
      functools.partial(low._leaf_fn, rounding=("stochastic", "stochastic")),
      [g, *state(g.shape, sq.default_map(bits, True), sq.default_map(bits, False))])
  CASES[f"fused-{bits}"] = functools.partial(compiled, ks)

ks = {}
for i, (mb, nb, dtype, adamw, block) in enumerate([
    (8, 4, jnp.bfloat16, False, 128), (3, 5, jnp.float16, True, 64),
    (2, 7, jnp.float32, True, 256), (6, 8, jnp.bfloat16, True, 32)]):
  g = S((1000, 3), dtype)
  st = state(g.shape, sq.default_map(mb, True), sq.default_map(nb, False), block)
  ks[f"mixed {mb}/{nb} {dtype.__name__} adamw={adamw} block={block}"] = (
      low._leaf_fn, [g, *st, *((g,) if adamw else ())])
CASES["mixed"] = functools.partial(compiled, ks)

ks = {}
for tiling in (pk.Tiling(1, 1, 1), pk.Tiling(64, 8, 2), pk.DEFAULT_TILING):
  g = S((4097,), jnp.float32)
  mu, nu = state(g.shape, sq.default_map(5, True), sq.default_map(6, False))
  ks[str(tiling)] = (lambda g, mu, nu, t=tiling: pk.adam_update_leaf(
      g, mu, nu, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=0.1, bc2=0.001, tiling=t),
      [g, mu, nu])
# The first-use check's kernel (stquant_jax._src.kernels.self_test) compiles for the target.
from stquant_jax._src.kernels import self_test
cfg = self_test.KernelConfig(sq.default_map(4, True), sq.default_map(4, False), 128,
                             ("stochastic", "stochastic"), "float32")
ks["self-test example"] = (
    lambda g, m, v: pk.adam_update_leaf(g, m, v, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
                                        bc1=0.1, bc2=0.001, rounding=cfg.rounding),
    list(self_test._example(cfg, jax.devices("cpu")[0])))
CASES["tilings"] = functools.partial(compiled, ks)
"""

BITS = range(2, 9)
GROUPS = {
    "quantize_dequantize": [f"quantize-dequantize-{b}" for b in BITS],
    "fused_update": [f"fused-{b}" for b in BITS],
    "mixed_tilings": ["mixed", "tilings"],
}


@pytest.fixture(scope="module")
def compiled():
  """Every group's cases and the spilling case (SPILL_SCRIPT below) in one run: one
  Python, jax and Triton start instead of four; a crash still loses only its case."""
  names = [n for g in sorted(GROUPS) for n in GROUPS[g]] + ["spills"]
  return run_cases(SPILL_SCRIPT, names, case_timeout=300)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_kernels_compile_for_h100(compiled, group):
  """Each configuration compiles through ptxas for sm_90a without register spills,
  and the compiled program holds every Triton kernel."""
  results = {n: compiled[n] for n in GROUPS[group]}
  assert_all_ok(results)


def test_harness_reports_a_crash_and_continues():
  """A case that kills its process (like an LLVM fatal error) fails alone; the next
  case still runs in a new process."""
  script = "import os\nCASES = {'crash': lambda: os.abort(), 'ok': lambda: {'x': 1}}\n"
  results = run_cases(script, ["crash", "ok"], case_timeout=60)
  assert not results["crash"]["ok"] and "died" in results["crash"]["error"]
  assert results["ok"]["ok"] and results["ok"]["x"] == 1


SPILL_SCRIPT = KERNEL_SCRIPT + r"""
# 7-bit m and v with stochastic rounding on 4 warps: spilled on an H100 (the reason
# DEFAULT_TILING has 8 warps).
g = S((300, 70), jnp.float32)
st = state(g.shape, sq.default_map(7, True), sq.default_map(7, False))
CASES["spills"] = functools.partial(compiled, {"7-bit, 4 warps": (
    lambda g, mu, nu: pk.adam_update_leaf(
        g, mu, nu, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=0.1, bc2=0.001,
        rounding=("stochastic", "stochastic"), tiling=pk.Tiling(16, 4, 1)), [g, *st])})
"""


def test_register_spilling_fails_the_compile(compiled):
  """A launch configuration known to spill is a compile error here, so a spilling
  configuration in the cases above could not pass."""
  results = compiled
  assert not results["spills"]["ok"]
  assert "spill" in results["spills"]["error"].lower(), results["spills"]["error"]

