"""Train/eval steps: data-parallel equality, AdamW, learning-rate control."""

import functools

import jax
import numpy as np
import optax
import pytest

from mtagjax import batching, train
from mtagjax import config as config_lib
from mtagjax import model as model_lib


def _config(dropout=0.1):
  c = config_lib.default_config()
  c.feature_dims = (6, 7, 5)
  c.padded_lengths = (40, 20, 30)
  c.hidden, c.heads, c.num_layers = 16, 2, 2
  c.attention_dropout = c.pe_dropout = dropout
  return c


def _samples(config, num, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    lens = [rng.integers(0, 25), rng.integers(1, 12), rng.integers(0, 20)]
    feats = [
      rng.standard_normal((n, d)).astype(np.float32)
      for n, d in zip(lens, config.feature_dims, strict=True)
    ]
    # A learnable target: the mean of the first text feature.
    out.append(batching.Sample(feats, label=np.float32(feats[1][:, 0].mean())))
  return out


def _setup(config, shards, num=16):
  model = model_lib.create_model(config)
  tx = train.make_optimizer()
  batch = batching.GraphBatcher(config, batch_size=num, num_shards=shards)(
    _samples(config, num)
  )
  state = train.create_train_state(jax.random.key(0), model, batch, tx)
  return model, tx, batch, state


def _close(a, b, tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def test_eight_devices_equal_one_device():
  assert len(jax.devices()) == 8, "tests simulate 8 CPU devices"
  config = _config()
  model, tx, batch, state = _setup(config, shards=8)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
  one_state, one_metrics = step(state, batch)

  mesh = train.make_mesh(8)
  sharded_step = jax.jit(
    functools.partial(train.train_step, model=model, tx=tx),
    in_shardings=(train.replicated(mesh), train.batch_sharding(mesh)),
    out_shardings=(train.replicated(mesh), train.replicated(mesh)),
  )
  batch8 = jax.device_put(batch, train.batch_sharding(mesh))
  assert len(batch8.features[0].sharding.device_set) == 8
  eight_state, eight_metrics = sharded_step(state, batch8)
  _close(one_metrics, eight_metrics, 1e-6)
  _close(one_state.params, eight_state.params, 1e-6)


def test_shard_layout_does_not_change_the_math():
  # Without dropout (whose masks follow the layout), a batch split into 8
  # shards gives the loss and gradients of the same samples in one shard.
  config = _config(dropout=0.0)
  model, tx, batch1, state = _setup(config, shards=1)
  _, _, batch8, _ = _setup(config, shards=8)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
  s1, m1 = step(state, batch1)
  s8, m8 = step(state, batch8)
  _close(m1, m8, 1e-5)
  _close(s1.params, s8.params, 1e-5)


def test_jit_and_no_jit_agree():
  config = _config()
  model, tx, batch, state = _setup(config, shards=2, num=6)
  fn = functools.partial(train.train_step, model=model, tx=tx)
  s_eager, m_eager = fn(state, batch)
  s_jit, m_jit = jax.jit(fn)(state, batch)
  _close(m_eager, m_jit, 1e-5)
  _close(s_eager.params, s_jit.params, 1e-5)


def test_adamw_matches_pytorch_formula():
  # PyTorch AdamW: p <- p (1 - lr wd); p <- p - lr m_hat / (sqrt(v_hat) + eps)
  rng = np.random.default_rng(0)
  p = rng.standard_normal(5)
  grads = [rng.standard_normal(5) for _ in range(3)]
  tx = train.make_optimizer(1e-3, 1e-2)
  state, jp = tx.init(p), p
  m = v = np.zeros(5)
  for t, g in enumerate(grads, start=1):
    upd, state = tx.update(g, state, jp)
    jp = optax.apply_updates(jp, upd)
    p = p * (1 - 1e-3 * 1e-2)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
    p = p - 1e-3 * m_hat / (np.sqrt(v_hat) + 1e-8)
  np.testing.assert_allclose(jp, p, rtol=1e-5)


def test_loss_normalisation_scales_gradients():
  config = _config(dropout=0.0)
  model, _, batch, state = _setup(config, shards=1, num=4)
  sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  state = state.replace(opt_state=sgd.init(state.params))
  raw_state, metrics = train.train_step(
    state, batch, model=model, tx=sgd, normalize=False
  )
  norm_state, _ = train.train_step(state, batch, model=model, tx=sgd)
  # With SGD at lr 1 the update is -grad: normalised = raw / |loss|.
  loss = float(metrics["loss"])
  d_raw = jax.tree.map(lambda a, b: a - b, raw_state.params, state.params)
  d_norm = jax.tree.map(lambda a, b: a - b, norm_state.params, state.params)
  _close(jax.tree.map(lambda a: a / abs(loss), d_raw), d_norm, 1e-5)


def test_learning_rate_changes_without_recompiling():
  config = _config()
  model, tx, batch, state = _setup(config, shards=1, num=4)
  traces = []

  def fn(state, batch):
    traces.append(1)
    return train.train_step(state, batch, model=model, tx=tx)

  step = jax.jit(fn)
  state, m = step(state, batch)
  assert float(m["learning_rate"]) == pytest.approx(1e-3)
  state = train.set_learning_rate(state, 5e-4)
  state, m = step(state, batch)
  assert float(m["learning_rate"]) == pytest.approx(5e-4)
  assert len(traces) == 1


def test_training_reduces_validation_loss():
  config = _config(dropout=0.0)
  model, tx, batch, state = _setup(config, shards=1, num=16)
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
  evaluate = jax.jit(functools.partial(train.eval_step, model=model))
  before = float(evaluate(state, batch)["loss"])
  for _ in range(40):
    state, _ = step(state, batch)
  after = float(evaluate(state, batch)["loss"])
  assert after < 0.7 * before


def test_eval_step_masks_padding_graphs():
  config = _config()
  model, _, batch, state = _setup(config, shards=2, num=5)
  out = train.eval_step(state, batch, model=model)
  assert out["out"].shape == (2, 4, 1)
  assert int(out["mask"].sum()) == 5


def test_iemocap_losses_run():
  config = _config()
  config.output_dim = 8
  model = model_lib.create_model(config)
  samples = _samples(config, 4)
  rng = np.random.default_rng(0)
  samples = [s._replace(label=rng.integers(0, 2, 4)) for s in samples]
  batch = batching.GraphBatcher(config, batch_size=4)(samples)
  tx = train.make_optimizer()
  state = train.create_train_state(jax.random.key(0), model, batch, tx)
  for kind in ("iemocap_ce", "iemocap_weighted_ce"):
    _, m = train.train_step(state, batch, model=model, tx=tx, loss=kind)
    assert np.isfinite(float(m["loss"]))
  with pytest.raises(ValueError, match="loss 'hinge'"):
    train.train_step(state, batch, model=model, tx=tx, loss="hinge")
