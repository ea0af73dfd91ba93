"""adaptive_jit's executable cache keys on where the arguments live.

An executable is compiled for its arguments' devices: one built for arguments on
device 0 must not be served for the same shapes on device 1 (it would run there on
the wrong device, or fail). 2 forced CPU devices, in a subprocess.
"""

import textwrap

from _subprocess import run_json

_SCRIPT = textwrap.dedent(r"""
  import json
  import jax, jax.numpy as jnp, optax
  import stquant_jax as sq
  from stquant_jax._src.stepping.cache import signature

  d0, d1 = jax.devices()[:2]
  x0 = jax.device_put(jnp.ones((4,)), d0)
  x1 = jax.device_put(jnp.ones((4,)), d1)
  out = {"same_device_same_key": signature("f", args=(x0,)) == signature("f", args=(x0 + 1,)),
         "other_device_other_key": signature("f", args=(x0,)) != signature("f", args=(x1,))}

  tx = sq.adamw(1e-2, policy=sq.FixedBits(8, 8, min_size=1))
  def step(p, s):
    g = jax.tree.map(jnp.ones_like, p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  f = sq.adaptive_jit(step)
  runs = {}
  for name, dev in (("d0", d0), ("d1", d1)):
    p = jax.device_put({"w": jnp.zeros((64, 64))}, dev)
    p, s = f(p, tx.init(p))
    runs[name] = str(next(iter(p["w"].devices())))
  f.close()
  out["ran_on"] = runs
  print("RESULT" + json.dumps(out))
""")


def test_cache_key_includes_the_arguments_device():
  r = run_json(_SCRIPT, devices=2)
  assert r["same_device_same_key"] and r["other_device_other_key"], r
  # The second call got its own executable: its results are on the device it was given.
  assert r["ran_on"]["d0"] != r["ran_on"]["d1"], r
