"""MTAG training: the official procedure, with the best epoch kept.

Reproduces the official loop (normalised loss, AdamW, plateau halving on
the valid metric once per epoch) and adds what it lacks: the best epoch by
validation is checkpointed and its test metrics are reported. Steps count
batches; an epoch is `epoch_batches` of a shuffled order that is a function
of (seed, epoch), so the position in the epoch, the plateau state and the
batchers' budgets, saved with every checkpoint, are all a resumed run needs
to pad (and so compute) exactly as an uninterrupted one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments.data import mtag_samples
from experiments.runtime import distributed, driver, prefetch
from experiments.runtime import mesh as mesh_lib
from experiments.tasks import base
from mtagjax import batching, metrics, schedules, train
from mtagjax import model as model_lib


def epoch_order(seed: int, epoch: int, num: int) -> np.ndarray:
  """The shuffled sample order of one epoch (reproducible on resume)."""
  return np.random.default_rng([seed, epoch]).permutation(num)


def epoch_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
  """Index batches of an epoch; like the official loop, skips size-1 ones."""
  out = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
  return [b for b in out if len(b) > 1]


def _plateau_to_json(state: schedules.PlateauState) -> dict[str, Any]:
  # JSON has no infinity: the initial "best" (+-inf) is stored as None.
  out = state._asdict()
  out["best"] = None if not np.isfinite(out["best"]) else float(out["best"])
  return out


def _plateau_from_json(data: dict[str, Any]) -> schedules.PlateauState:
  data = dict(data)
  if data["best"] is None:
    data["best"] = np.inf if data["mode"] == "min" else -np.inf
  return schedules.PlateauState(**data)


class Task(base.Task):
  """MTAG on `experiments.data.mtag_samples` (``config.task="mtag"``)."""

  name = "mtag"
  # The build-ahead depth does not change the results.
  resumable_fields = (
    "train.epochs",
    "train.stop_after_steps",
    "train.prefetch",
  )
  # Workdirs from before the task field existed.
  legacy_fields = {"task": "mtag"}
  final_splits = ("test",)

  def make_mesh(self) -> jax.sharding.Mesh:
    c = self.config
    mesh = mesh_lib.make_mesh(c, c.train.batch_size)
    devices = mesh.devices.size
    if c.mesh.shards % devices:
      raise ValueError(
        f"config.mesh.shards={c.mesh.shards} is not a multiple of the "
        f"{devices} devices of the data axis"
      )
    return mesh

  def setup(self, mesh: jax.sharding.Mesh) -> train.TrainState:
    c, t = self.config, self.config.train
    self.data = mtag_samples.load_data(c)
    shards = c.mesh.shards or mesh.devices.size
    self.batchers = {
      split: batching.GraphBatcher(
        c.model, batch_size=t.batch_size, num_shards=shards
      )
      for split in self.data
    }
    self.per_epoch = len(
      epoch_batches(np.arange(len(self.data["train"])), t.batch_size)
    )
    self.plateau = schedules.plateau_init(t.learning_rate)
    model = model_lib.create_model(c.model)
    tx = train.make_optimizer(t.learning_rate, t.weight_decay)
    loss = dict(loss=t.loss, beta=t.loss_beta)
    replicated = mesh_lib.replicated(mesh)
    self._step = jax.jit(
      functools.partial(
        train.train_step,
        model=model,
        tx=tx,
        normalize=t.normalize_loss,
        **loss,
      ),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,),
    )
    self._eval = jax.jit(
      functools.partial(train.eval_step, model=model, **loss),
      out_shardings=replicated,
    )
    example = self.batchers["train"](self.data["train"][:2])
    # Created under jit, straight into its sharding: `device_put` cannot
    # place values on other processes' devices.
    return jax.jit(
      lambda key: train.create_train_state(key, model, example, tx),
      out_shardings=replicated,
    )(jax.random.key(t.seed))

  @property
  def total_steps(self) -> int:
    return self.config.train.epochs * self.per_epoch

  @property
  def best_metric(self) -> tuple[str, str]:
    return self.config.train.best_metric, self.config.train.best_mode

  # -- host state ------------------------------------------------------------

  def restore_extra(self, extra: dict[str, Any], state: Any) -> None:
    position = extra["epoch"] * self.per_epoch + extra["position"]
    if position != int(state.step):
      raise RuntimeError(
        f"checkpoint extra {extra} does not match state step {int(state.step)}"
      )
    self.plateau = _plateau_from_json(extra["plateau"])
    for split, budgets in extra["budgets"].items():
      self.batchers[split].budgets = budgets

  def checkpoint_extra(self, step: int, marker: Any) -> dict[str, Any]:
    epoch, position = divmod(step, self.per_epoch)
    budgets = {k: list(b.budgets) for k, b in self.batchers.items()}
    # The train batcher may have built batches ahead: save its budgets as
    # they were after the last batch stepped on, so that a resumed run
    # pads (and so computes) exactly as this one would have.
    budgets["train"] = list(marker)
    return {
      "epoch": epoch,
      "position": position,
      "plateau": _plateau_to_json(self.plateau),
      "budgets": budgets,
    }

  # -- data and steps --------------------------------------------------------

  def train_items(self, step: int) -> Iterator[list[batching.Sample]]:
    samples, t = self.data["train"], self.config.train
    epoch, position = divmod(step, self.per_epoch)
    for e in range(epoch, t.epochs):
      order = epoch_order(t.seed, e, len(samples))
      for b in epoch_batches(order, t.batch_size)[position:]:
        yield [samples[i] for i in b]
      position = 0

  def build_batch(self, item: list[batching.Sample]) -> tuple[Any, Any]:
    batch = self.batchers["train"](item)
    return batch, tuple(self.batchers["train"].budgets)

  def train_step(self, state, batch, step):
    del step
    return self._step(state, batch)

  def eval_due(self, step: int) -> bool:
    return step % self.per_epoch == 0

  def evaluate(self, state: train.TrainState, split: str) -> dict[str, float]:
    samples, size = self.data[split], self.config.train.batch_size
    chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
    preds, labels, loss_sum, count = [], [], 0.0, 0
    depth = self.config.train.prefetch
    for batch in prefetch.build_ahead(self.batchers[split], chunks, depth):
      out = self._eval(
        state, distributed.from_global(batch, self.batch_sharding)
      )
      mask = np.asarray(out["mask"])
      preds.append(np.asarray(out["out"])[mask])
      labels.append(np.asarray(batch.labels)[mask])
      loss_sum += float(out["loss"]) * int(mask.sum())
      count += int(mask.sum())
    preds, labels = np.concatenate(preds), np.concatenate(labels)
    if self.config.train.loss.startswith("iemocap"):
      result = metrics.iemocap_metrics(preds, labels)
    else:
      result = metrics.mosi_metrics(preds[:, 0], labels)
    result["loss"] = loss_sum / count
    return result

  def after_evaluation(self, state, scores):
    # The official ReduceLROnPlateau, once per epoch on the valid MAE (the
    # loss where there is none).
    t = self.config.train
    monitored = scores.get("eval/valid/mae", scores["eval/valid/loss"])
    self.plateau = schedules.plateau_update(
      self.plateau,
      monitored,
      factor=t.plateau_factor,
      patience=t.plateau_patience,
      threshold=t.plateau_threshold,
    )
    return train.set_learning_rate(state, self.plateau.lr)


def best_state(
  config: ml_collections.ConfigDict, workdir: str, state: Any
) -> Any:
  """The best checkpoint of a finished run in `workdir` (else `state`)."""
  task = Task(config)
  with driver.open_checkpoints(task, workdir) as checkpoints:
    best = checkpoints.restore_best(mesh_lib.abstract(state))
  return state if best is None else best[0]
