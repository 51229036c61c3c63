r"""A tiny MTAG training run on generated data that prints its metrics.

  python -m experiments.quickstart --epochs=4

Trains the official MOSI model (run.sh sizes) on synthetic unaligned
sequences with the official recipe (normalised SmoothL1, AdamW, plateau
halving on valid MAE), keeps the epoch with the best valid MAE and reports
its test metrics. Data-parallel over every local device.
"""

from __future__ import annotations

import functools
import json
import time

import jax
import numpy as np
from absl import app, flags

from mtagjax import batching, metrics, schedules, synthetic, train
from mtagjax import config as config_lib
from mtagjax import model as model_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 4, "Training epochs.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("num_train", 320, "Generated training samples.")
flags.DEFINE_integer("num_eval", 96, "Generated valid and test samples each.")
flags.DEFINE_integer("seed", 0, "Seed for data, init and dropout.")


def _batches(batcher, samples, batch_size, rng=None):
  order = (
    np.arange(len(samples)) if rng is None else rng.permutation(len(samples))
  )
  for start in range(0, len(samples), batch_size):
    # The official loop skips batches of one sample.
    if len(order[start : start + batch_size]) > 1 or rng is None:
      yield batcher([samples[i] for i in order[start : start + batch_size]])


def _evaluate(evaluate, state, batcher, samples, batch_size, sharding):
  preds, labels = [], []
  for batch in _batches(batcher, samples, batch_size):
    out = evaluate(state, jax.device_put(batch, sharding))
    mask = np.asarray(out["mask"])
    preds.append(np.asarray(out["out"])[..., 0][mask])
    labels.append(np.asarray(batch.labels)[mask])
  return metrics.mosi_metrics(np.concatenate(preds), np.concatenate(labels))


def run(epochs=4, batch_size=32, num_train=320, num_eval=96, seed=0):
  """Trains and evaluates; returns `(best_state, test_metrics)`."""
  config = config_lib.default_config()
  config.padded_lengths = (100, 25, 75)
  data = {
    split: synthetic.make_samples(n, config, seed=seed + i)
    for i, (split, n) in enumerate(
      [("train", num_train), ("valid", num_eval), ("test", num_eval)]
    )
  }
  mesh = train.make_mesh()
  shards = mesh.shape["data"]
  batcher = batching.GraphBatcher(
    config, batch_size=batch_size, num_shards=shards
  )
  model = model_lib.create_model(config)
  tx = train.make_optimizer()
  state = train.create_train_state(
    jax.random.key(seed), model, batcher(data["train"][:2]), tx
  )
  data_sharding = train.batch_sharding(mesh)
  state = jax.device_put(state, train.replicated(mesh))
  compiles = []

  def counted_step(state, batch):
    compiles.append(1)  # runs once per trace, i.e. per compilation
    return train.train_step(state, batch, model=model, tx=tx)

  step = jax.jit(counted_step, donate_argnums=(0,))
  evaluate = jax.jit(functools.partial(train.eval_step, model=model))
  plateau = schedules.plateau_init(1e-3)
  best, best_mae = state, np.inf
  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    tic, losses = time.time(), []
    for batch in _batches(batcher, data["train"], batch_size, rng):
      state, m = step(state, jax.device_put(batch, data_sharding))
      losses.append(float(m["loss"]))
    valid = _evaluate(
      evaluate, state, batcher, data["valid"], batch_size, data_sharding
    )
    plateau = schedules.plateau_update(plateau, valid["mae"])
    state = train.set_learning_rate(state, plateau.lr)
    if valid["mae"] < best_mae:
      best_mae = valid["mae"]
      best = jax.tree.map(lambda x: x.copy(), state)
    print(
      f"epoch {epoch}: train/loss {np.mean(losses):.4f}  valid/mae "
      f"{valid['mae']:.4f}  valid/corr {valid['corr']:.3f}  lr {plateau.lr:g}"
      f"  ({time.time() - tic:.1f}s, {len(compiles)} compiles)",
      flush=True,
    )
  test = _evaluate(
    evaluate, best, batcher, data["test"], batch_size, data_sharding
  )
  return best, test


def main(argv):
  del argv
  _, test = run(
    FLAGS.epochs, FLAGS.batch_size, FLAGS.num_train, FLAGS.num_eval, FLAGS.seed
  )
  print("\ntest metrics of the best-valid-MAE epoch:")
  for name, value in test.items():
    print(f"  {name:<14}{value:8.4f}")
  print(json.dumps({f"test/{k}": round(v, 6) for k, v in test.items()}))


if __name__ == "__main__":
  app.run(main)
