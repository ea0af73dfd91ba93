"""``experiments.train`` with ``fsdp=True`` (``--fsdp``) on 8 CPU devices against one device.

Tiny GPT-2 (one layer, byte tokens), a few steps, for ``optax.adamw``, stquant 8-bit
and the adaptive policy (deciding every 2 steps, so a relayout happens under FSDP).
The sharded runs must train like the single-device run (same losses up to
reduction order) and keep params and optimizer state split: each device holds
1/8 of a split leaf's params and moments. Subprocesses: the device count is set
before jax is imported.
"""

import textwrap

import numpy as np
import pytest

from _subprocess import run_json

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

_SCRIPT = textwrap.dedent(r"""
  import json, sys, warnings
  import jax, numpy as np
  import stquant_jax as sq
  from experiments import train
  warnings.filterwarnings("ignore")
  fsdp = sys.argv[1] == "fsdp"
  base = dict(model="gpt2", preset="tiny", tokenizer="bytes", steps=4, batch_size=8,
              seq_len=32, max_bytes=50_000, eval_interval=4, eval_batches=1, warmup_steps=1,
              progress=False, model_overrides={"num_layers": 1}, fsdp=fsdp)
  runs = {"adamw": {}, "stquant8": {},
          "stquant_adaptive": {"every": 2, "min_interval": 0, "anneal_steps": 0}}
  out = {"devices": jax.device_count()}
  for name, kw in runs.items():
    seen = {}
    def on_end(model, opt_state, seen=seen):
      p = model.blocks[0].fc.kernel[...]
      seen["param_rows_per_device"] = sorted({s.data.shape[0] for s in p.addressable_shards})
      st = opt_state[1][0]  # (clip, (adam state, ...))
      mu = st.mu["blocks"][0]["fc"]["kernel"]
      mu = getattr(mu, "value", mu)  # an nnx.Param wrapping the moment
      arr = mu.codes if isinstance(mu, sq.QuantizedArray) else mu
      seen["moment_rows_per_device"] = sorted({s.data.shape[0] for s in arr.addressable_shards})
      seen["moment_rows"] = int(arr.shape[0])
    log = train.train(train.TrainConfig(optimizer=name, optimizer_kwargs=kw, **base),
                      on_end=on_end)
    out[name] = {"train_loss": log["train_loss"], "eval": log["eval"][-1]["loss"],
                 "fsdp": log["fsdp"], "relayouts": len(log["relayouts"]), **seen}
  print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def runs():
  return {"one": run_json(_SCRIPT, "single", devices=1, timeout=900),
          "fsdp": run_json(_SCRIPT, "fsdp", devices=8, timeout=900)}


@pytest.mark.parametrize("name", ["adamw", "stquant8", "stquant_adaptive"])
def test_fsdp_trains_like_one_device(runs, name):
  one, fs = runs["one"][name], runs["fsdp"][name]
  assert fs["fsdp"] and not one["fsdp"]
  np.testing.assert_allclose(fs["train_loss"], one["train_loss"], rtol=2e-3)
  np.testing.assert_allclose(fs["eval"], one["eval"], rtol=2e-3)


@pytest.mark.parametrize("name", ["adamw", "stquant8", "stquant_adaptive"])
def test_fsdp_keeps_params_and_state_split(runs, name):
  fs = runs["fsdp"][name]
  assert runs["fsdp"]["devices"] == 8
  assert fs["param_rows_per_device"] == [128 // 8]  # fc kernel [128, 512], split by rows
  assert fs["moment_rows_per_device"] == [fs["moment_rows"] // 8]


def test_adaptive_relayout_happened_under_fsdp(runs):
  assert runs["fsdp"]["stquant_adaptive"]["relayouts"] >= 1
