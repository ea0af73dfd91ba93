"""flax.nnx: every public function that takes a state accepts an ``nnx.Optimizer`` or its
``opt_state`` and gives the answer it gives for the plain optax state.

``nnx.Optimizer`` wraps every array of the state in an ``nnx.Variable`` and, after a
step, keeps each quantized moment as a ``{codes, scales}`` ``nnx.State`` without its
static metadata. Before this was handled, ``relayout(opt.opt_state)`` raised a shape
error, ``bit_widths`` reported ``{'l1/kernel/value/codes': 32}`` under FixedBits and
raised IndexError under STQuantPolicy, and ``average_bits`` needed ``params=``
(each case is a test below). The reference for every check is the same computation
on a plain optax state built from the same parameters (``plain_twin``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import stquant_jax as sq

_is_q = lambda x: isinstance(x, sq.QuantizedArray)


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(64, 128, rngs=rngs)
    self.l2 = nnx.Linear(128, 64, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def _policy():  # critical zone 8/8 spelled out: leaves start at 8 bits
  return sq.STQuantPolicy(every=2, min_interval=0, anneal_steps=0, critical=(8, 8),
                          magnitude=(6, 8), structure=(6, 6), redundant=(4, 5))


def batch(i):
  return jax.random.normal(jax.random.key(i), (8, 64))


def loss_fn(model, x):
  return jnp.mean((model(x) - 1.0) ** 2)


@nnx.jit
def nnx_step(model, opt, x):
  grads = nnx.grad(loss_fn)(model, x)
  opt.update(model, grads)


def make(policy, steps=2):
  """An nnx model and optimizer after ``steps`` steps (so the state is in nnx's
  settled form: moments as ``{codes, scales}``)."""
  model = MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, sq.adamw(1e-3, policy=policy), wrt=nnx.Param)
  for i in range(steps):
    nnx_step(model, opt, batch(i))
  return model, opt


def plain_twin(model, opt):
  """The same state as a plain optax state: ``tx.init`` of the model's params with the
  arrays of ``opt.opt_state`` (the reference every nnx answer is compared with)."""
  template = jax.eval_shape(opt.tx.init, nnx.as_pure(nnx.state(model, nnx.Param)))
  leaves = jax.tree.leaves(opt.opt_state)
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


def force_proposal(opt, bits):
  """Writes ``bits`` (per leaf, (m, v)) as the policy's proposal, as a decision would."""
  ps = opt.opt_state[0].policy_state
  prop = np.asarray(ps.proposed.get_value()).copy()
  for row, pair in bits.items():
    prop[row] = pair
  ps.proposed.set_value(jnp.asarray(prop))


@pytest.mark.parametrize("policy", [sq.FixedBits(8, 4, min_size=1024), _policy()],
                         ids=["fixed", "adaptive"])
def test_bit_widths_names_and_bits_match_the_plain_state(policy):
  """Was ``{'l1/kernel/value/codes': 32}`` (FixedBits) and IndexError (STQuantPolicy)."""
  model, opt = make(policy)
  want = sq.bit_widths(plain_twin(model, opt))
  assert sq.bit_widths(opt.opt_state) == want == sq.bit_widths(opt)
  assert set(want["mu_bits"]) == {"l1/kernel", "l1/bias", "l2/kernel", "l2/bias"}
  assert want["mu_bits"]["l1/kernel"] == policy.leaf_bits((64, 128), jnp.float32)[0]


def test_average_bits_and_nbytes_need_no_params():
  """``average_bits`` needed ``params=`` for nnx states; now the state says its shapes."""
  model, opt = make(_policy())
  plain = plain_twin(model, opt)
  assert sq.average_bits(opt.opt_state) == sq.average_bits(plain) == sq.average_bits(opt)
  assert sq.state_nbytes(opt.opt_state) == sq.state_nbytes(plain) == sq.state_nbytes(opt)
  assert sq.average_bits(opt, params=nnx.state(model, nnx.Param)) == pytest.approx(
      sq.average_bits(plain))


def test_relayout_of_the_optimizer_repacks_in_place_like_the_plain_state():
  """Was a shape error. The nnx optimizer's variables get exactly the moments relayout
  gives the plain state, and training continues from them."""
  model, opt = make(_policy())
  force_proposal(opt, {1: (5, 6), 3: (4, 3)})  # rows: l1/bias, l1/kernel, l2/bias, l2/kernel
  want = sq.relayout(plain_twin(model, opt))
  assert sq.relayout(opt) is opt                       # in place, nnx style
  assert sq.bit_widths(opt)["mu_bits"] == sq.bit_widths(want)["mu_bits"]
  assert sq.bit_widths(opt)["nu_bits"]["l2/kernel"] == 3
  for a, b in zip(jax.tree.leaves(opt.opt_state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert sq.relayout(opt.opt_state) is opt.opt_state   # nothing left to change
  before = nnx.state(model, nnx.Param)["l1"]["kernel"].get_value()
  nnx_step(model, opt, batch(5))
  assert not np.array_equal(before, nnx.state(model, nnx.Param)["l1"]["kernel"].get_value())
  assert sq.bit_widths(opt)["mu_bits"]["l1/kernel"] == 5


def test_bit_history_records_an_optimizer():
  model, opt = make(_policy())
  history = sq.BitHistory()
  history.record(2, opt, loss=1.0)
  assert history.series("l1/kernel", "mu") == ([2], [8])
  assert history.records[0]["average_bits"] == sq.average_bits(opt)


def test_checkpoint_round_trip_through_the_optimizer(tmp_path):
  """save_state takes the optimizer; restore_state writes into another optimizer's
  variables (a fresh one at another layout) and training continues identically."""
  model, opt = make(_policy())
  force_proposal(opt, {1: (5, 6)})
  sq.relayout(opt)
  path = sq.save_state(tmp_path / "ckpt", opt)
  assert sorted(sq.checkpoint_args(opt.opt_state)) == ["opt_state", "opt_state_layout"]
  model2, fresh = make(_policy(), steps=0)
  nnx.update(model2, nnx.state(model))
  assert sq.restore_state(path, fresh) is fresh
  assert sq.bit_widths(fresh) == sq.bit_widths(opt)
  for m, o in ((model, opt), (model2, fresh)):
    nnx_step(m, o, batch(7))
  np.testing.assert_array_equal(np.asarray(nnx.state(model, nnx.Param)["l2"]["kernel"].get_value()),
                                np.asarray(nnx.state(model2, nnx.Param)["l2"]["kernel"].get_value()))
  # the same checkpoint restores into a plain optax state
  plain = sq.restore_state(path, plain_twin(*make(_policy(), steps=0)))
  assert sq.bit_widths(plain)["mu_bits"]["l1/kernel"] == 5


def test_restore_into_an_optimizer_restores_its_step(tmp_path):
  """``optimizer.step`` comes back with the state (it stayed 0): the saved optimizer's
  step, or the count of a plain optax state's checkpoint."""
  model, opt = make(sq.FixedBits(8, 4, min_size=1024), steps=3)
  fresh = make(sq.FixedBits(8, 4, min_size=1024), steps=0)[1]
  sq.restore_state(sq.save_state(tmp_path / "opt", opt), fresh)
  assert int(fresh.step.get_value()) == int(opt.step.get_value()) == 3
  assert fresh.step.get_value().dtype == opt.step.get_value().dtype
  fresh = make(sq.FixedBits(8, 4, min_size=1024), steps=0)[1]
  sq.restore_state(sq.save_state(tmp_path / "plain", plain_twin(model, opt)), fresh)
  assert int(fresh.step.get_value()) == 3


def test_state_shardings_has_the_optimizers_structure():
  model, opt = make(sq.FixedBits(4, 4, min_size=1024))
  mesh = jax.make_mesh((1,), ("fsdp",))
  pshard = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                        nnx.state(model, nnx.Param))
  out = sq.state_shardings(opt, pshard)
  assert jax.tree.structure(out) == jax.tree.structure(opt.opt_state)
  placed = jax.device_put(opt.opt_state, out)
  assert jax.tree.structure(placed) == jax.tree.structure(opt.opt_state)
  assert out == sq.state_shardings(opt.opt_state, pshard)


def test_summary_of_the_optimizer_lists_every_leaf_with_bits_zones_and_bytes():
  model, opt = make(_policy())
  text = sq.summary(opt)
  lines = text.splitlines()
  widths = sq.bit_widths(opt)
  show = lambda b: "f32" if b == 32 else str(b)
  # after its first decision the policy proposes bits the layout does not have yet
  assert widths["mu_proposed"] != widths["mu_bits"]
  assert lines[0].split() == ["leaf", "shape", "m", "bits", "v", "bits", "zone", "(m/v)",
                              "proposed", "(m/v)", "moment", "bytes"]
  assert lines[-1].endswith("leaves have a proposal not applied yet (sq.relayout or "
                            "sq.adaptive_jit applies it; a plain jax.jit step never does)")
  rows = {l.split()[0]: l.split() for l in lines[2:-2]}
  assert set(rows) == set(widths["mu_bits"])
  for name, row in rows.items():
    m, v = widths["mu_bits"][name], widths["nu_bits"][name]
    assert row[-5:-3] == [show(m), show(v)]
    assert row[-3] == f"{widths['mu_zone'][name]}/{widths['nu_zone'][name]}"
    assert row[-2] == f"{show(widths['mu_proposed'][name])}/{show(widths['nu_proposed'][name])}"
  assert lines[-2].startswith(f"total: {sq.state_nbytes(opt):,} bytes")
  assert f"{sq.average_bits(opt):.2f} bits" in lines[-2]
  assert sq.summary(plain_twin(model, opt)) == text
  abstract = sq.abstract_state(opt.tx, nnx.as_pure(nnx.state(model, nnx.Param)))
  assert sq.summary(abstract).splitlines()[-1] == lines[-2]   # nothing to read there


def test_plain_state_is_the_optax_form_of_the_optimizers_state():
  model, opt = make(_policy())
  plain = sq.plain_state(opt)
  assert_same = lambda a, b: [np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
                              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  twin = plain_twin(model, opt)
  assert jax.tree.structure(plain) == jax.tree.structure(twin)
  assert_same(plain, twin)
  assert all(_is_q(x) for x in jax.tree.leaves(plain[0].mu, is_leaf=_is_q)
             if getattr(x, "ndim", 2) == 2)
