"""The kernels inside ``jax.shard_map`` (check_vma=False) and ``jax.pmap`` on 8 CPU devices.

Runs in a subprocess so that ``--xla_force_host_platform_device_count=8`` is set
before jax is imported, whatever the rest of the test session did.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    import pallas_kernels as pk, stquant_jax as sq
    from stquant_jax._src.codec.packing import unpack

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("d",))
    shard = lambda *xs: [jax.device_put(a, jax.NamedSharding(mesh, P("d"))) for a in xs]
    HP = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bc1=jnp.float32(0.1),
              bc2=jnp.float32(1e-3))

    def close_u(u, ru):
      u, ru = np.asarray(u, np.float64), np.asarray(ru, np.float64)
      assert np.abs(u - ru).max() <= 4 * 2.0**-23 * np.abs(ru).max(), np.abs(u - ru).max()

    def close_q(codes, scales, rcodes, rscales, bits):
      np.testing.assert_allclose(scales, rscales, rtol=2.0**-23, atol=0)
      c, rc = (np.asarray(unpack(jnp.asarray(x), bits), np.int64) for x in (codes, rcodes))
      assert np.abs(c - rc).max() <= 1 and (c != rc).mean() <= 0.01

    # 1. quantize / dequantize, blocks sharded over 8 devices.
    cmap = sq.default_map(5, True)
    x = jax.random.normal(jax.random.key(0), (8 * 3, 128))
    q = jax.shard_map(functools.partial(pk.quantize_blocks_pallas, cmap=cmap, interpret=True),
                      mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P("d")), check_vma=False)
    codes, scales = jax.jit(q)(*shard(x))
    rcodes, rscales = pk.quantize_blocks_reference(x, cmap)
    np.testing.assert_array_equal(codes, rcodes)
    np.testing.assert_array_equal(scales, rscales)
    dq = jax.shard_map(functools.partial(pk.dequantize_blocks_pallas, cmap=cmap, interpret=True),
                       mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d"), check_vma=False)
    np.testing.assert_array_equal(jax.jit(dq)(*shard(codes, scales)),
                                  pk.dequantize_blocks_reference(rcodes, rscales, cmap))
    print("shard_map quantize/dequantize ok")

    # 2. fused update under shard_map: each device owns 3 whole blocks of a flat leaf.
    mmap, vmap_ = sq.default_map(4, True), sq.default_map(8, False)
    n = 8 * 3 * 128
    mu = sq.quantize(jax.random.normal(jax.random.key(1), (n,)) * 1e-2, 4, code_map=mmap)
    nu = sq.quantize(jax.random.uniform(jax.random.key(2), (n,)) * 1e-4, 8, signed=False,
                     code_map=vmap_)
    g = jax.random.normal(jax.random.key(3), (n,)) * 1e-2
    hp = pk.adam_hparams(HP["b1"], HP["b2"], HP["eps"], HP["eps_root"], HP["bc1"], HP["bc2"])
    body = functools.partial(pk.adam_update_blocks_pallas, mu_map=mmap, nu_map=vmap_,
                             block_size=128, interpret=True)
    f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P()) + (P("d"),) * 5,
                      out_specs=(P("d"),) * 5, check_vma=False)
    hp = jax.device_put(hp, jax.NamedSharding(mesh, P()))
    ctr = jax.device_put(pk.adam_counter(1, 0), jax.NamedSharding(mesh, P()))
    u, mc, ms, vc, vs = jax.jit(f)(hp, ctr, *shard(g, mu.codes, mu.scales, nu.codes, nu.scales))
    ru, rmu, rnu = jax.jit(functools.partial(pk.adam_update_reference, **HP))(g, mu, nu)
    close_u(u, ru)
    close_q(mc, ms, rmu.codes, rmu.scales, 4)
    close_q(vc, vs, rnu.codes, rnu.scales, 8)
    print("shard_map fused update ok")

    # 3. pmap over a leading device axis with per-device QuantizedArrays.
    shape = (3, 100)
    init = lambda k: (sq.quantize(jax.random.normal(k, shape) * 1e-2, 3),
                      sq.quantize(jax.random.uniform(k, shape) * 1e-4, 6, signed=False))
    keys = jax.random.split(jax.random.key(4), 8)
    mu8, nu8 = jax.vmap(init)(keys)
    g8 = jax.random.normal(jax.random.key(5), (8,) + shape) * 1e-2
    step = lambda g, mu, nu: pk.adam_update_leaf(g, mu, nu, **HP, interpret=True)
    u8, pmu, pnu = jax.pmap(step)(g8, mu8, nu8)
    ru8, rmu8, rnu8 = jax.vmap(jax.jit(functools.partial(pk.adam_update_reference, **HP)))(
        g8, mu8, nu8)
    close_u(u8, ru8)
    close_q(pmu.codes, pmu.scales, rmu8.codes, rmu8.scales, 3)
    close_q(pnu.codes, pnu.scales, rnu8.codes, rnu8.scales, 6)
    print("pmap fused update ok")
""")


def test_shard_map_and_pmap_on_8_cpu_devices():
  path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=path, PYTHONWARNINGS="ignore::DeprecationWarning")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  for line in ("shard_map quantize/dequantize ok", "shard_map fused update ok",
               "pmap fused update ok"):
    assert line in proc.stdout, proc.stdout
