"""The MTAG training loop: sharded steps, evaluation, checkpoints, resume.

Reproduces the official procedure (normalised loss, AdamW, plateau halving
on the valid metric once per epoch) and adds what it lacks: the best epoch
by validation is checkpointed and its test metrics are reported. A run can
be stopped at any step (SIGTERM, or `train.stop_after_steps`) and resumed
from its workdir with the same subsequent losses as an uninterrupted run:
the data order is a function of (seed, epoch), the position in the epoch,
the plateau state and the batch budgets are saved with the state.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from experiments.runtime import checkpoint as ckpt_lib
from experiments.runtime import distributed, prefetch, writers
from experiments.runtime import preemption as preemption_lib
from experiments.runtime import progress as progress_lib
from mtagjax import batching, datasets, metrics, schedules, synthetic, train
from mtagjax import model as model_lib

# Fields that may change between a run and its resumption (the results do
# not depend on the build-ahead depth).
RESUMABLE_FIELDS = ("train.epochs", "train.stop_after_steps", "train.prefetch")


def pool_frames(frames: np.ndarray, width: int) -> np.ndarray:
  """Means over consecutive windows of `width` frames (the last may be short).

  Shrinks a stream's frame rate by `width`: MTAG links every frame of one
  modality to every frame of the others, so a graph grows with the square
  of the frame counts.
  """
  if width < 1:
    raise ValueError(f"pooling width {width} must be >= 1")
  n = len(frames)
  if width == 1 or n == 0:
    return frames.astype(np.float32)
  starts = np.arange(0, n, width)
  sums = np.add.reduceat(frames.astype(np.float32), starts, axis=0)
  counts = np.minimum(starts + width, n) - starts
  return sums / counts[:, None].astype(np.float32)


def spoken_reviews_path(d: ml_collections.ConfigDict) -> str:
  """The SpokenReviews folder of `config.data`: its `path`, else built."""
  if d.get("path", ""):
    return d.path
  # Imported here: the builder pulls in the speech synthesiser, which only
  # this source needs.
  from experiments import spoken_reviews

  return str(
    spoken_reviews.build(
      d.get("data_dir", "") or None,
      seed=d.seed,
      limit=d.limit or None,
      speaker_disjoint=d.speaker_disjoint,
      workers=d.workers,
      archive=d.get("archive", "") or None,
    )
  )


def spoken_reviews_samples(config: ml_collections.ConfigDict) -> dict:
  """SpokenReviews (`experiments/data/spoken_reviews.py`) as MTAG samples.

  Reads the set at `config.data.path`, or builds (or finds in the cache)
  the one that `config.data` describes (`data_dir`, `seed`, `limit`,
  `speaker_disjoint`, `workers`, `archive`). Audio (100 Hz) and vision
  (30 fps) are mean-pooled over `config.data.audio_pool` and
  `vision_pool` frames and standardised per channel with the train
  split's statistics. The modalities are those named in
  `config.model.modalities` (any subset of vision, text, audio, in any
  order), so a text-only model reads the same sentences.

  Text enters as token ids (`[L, 1]`, feature size 1) of a token modality
  whose vocabulary V is `config.model.vocab_sizes[text]`: ids >= V (the
  rarest train words, since the vocabulary is sorted by count) become the
  unknown id.
  """
  d, m = config.data, config.model
  path = spoken_reviews_path(d)
  raw = datasets.load_spoken_reviews(path)
  unk = int(raw["meta"]["text"]["unk_id"])
  vocab_sizes = tuple(m.get("vocab_sizes", None) or (0,) * len(m.modalities))
  widths = {"vision": d.vision_pool, "audio": d.audio_pool}
  streams = {}
  for i, name in enumerate(m.modalities):
    dim, vocab = m.feature_dims[i], vocab_sizes[i]
    if name not in ("vision", "text", "audio"):
      raise ValueError(
        f"config.model.modalities has {name!r}; SpokenReviews has 'vision', "
        "'text' and 'audio'"
      )
    if name != "text":
      if vocab:
        raise ValueError(
          f"config.model.vocab_sizes[{i}]={vocab}: {name} frames are "
          "feature vectors, set it to 0"
        )
      pooled = {
        s: [pool_frames(f, widths[name]) for f in raw[s][name]]
        for s in datasets.SPLITS
      }
      train_frames = np.concatenate(pooled["train"])
      if train_frames.shape[1] != dim:
        raise ValueError(
          f"config.model.feature_dims[{i}]={dim} but SpokenReviews {name} "
          f"frames have {train_frames.shape[1]} channels (in {path}); pass "
          f"that size"
        )
      mean = train_frames.mean(0)
      std = np.maximum(train_frames.std(0), 1e-3)
      streams[name] = {
        s: [(f - mean) / std for f in v] for s, v in pooled.items()
      }
    else:
      if not vocab or dim != 1:
        raise ValueError(
          f"text is a token modality: set config.model.vocab_sizes[{i}] "
          f"to the vocabulary size (got {vocab}) and "
          f"config.model.feature_dims[{i}] to 1 (got {dim})"
        )
      streams[name] = {
        s: [
          np.where(ids < vocab, ids, unk).astype(np.float32)[:, None]
          for ids in raw[s]["text_ids"]
        ]
        for s in datasets.SPLITS
      }
  return {
    s: [
      batching.Sample(
        [streams[name][s][j] for name in m.modalities],
        float(raw[s]["labels"][j]),
      )
      for j in range(len(raw[s]["labels"]))
    ]
    for s in datasets.SPLITS
  }


def load_data(config: ml_collections.ConfigDict) -> dict[str, list]:
  """The train/valid/test splits as lists of `mtagjax.Sample`s.

  `config.data.source` is "synthetic" (generated data), "pickle" (a
  MulT-style pickle at `config.data.path`, read by `mtagjax.datasets`; the
  model's `feature_dims` and `padded_lengths` must match the file) or
  "spoken_reviews" (`spoken_reviews_samples`).
  """

  d = config.data
  if d.source == "spoken_reviews":
    return spoken_reviews_samples(config)
  if d.source == "pickle":
    dataset = "iemocap" if config.train.loss.startswith("iemocap") else "mosi"
    path = d.get("path", "")
    if not path:
      raise ValueError(
        "config.data.source='pickle' needs config.data.path (the .pkl file)"
      )
    splits = datasets.load_mult_pickle(
      path, dataset=dataset, modalities=tuple(config.model.modalities)
    )
    found = {
      "feature_dims": datasets.feature_dims(splits),
      "padded_lengths": datasets.padded_lengths(splits),
    }
    for field, value in found.items():
      want = tuple(config.model[field])
      if want != value:
        raise ValueError(
          f"config.model.{field}={want} does not match the data in {path} "
          f"({value}); pass --config.model.{field}="
          f"{','.join(map(str, value))}"
        )
    return splits
  if d.source != "synthetic":
    raise ValueError(
      f"config.data.source={d.source!r}; use 'synthetic' (generated data), "
      "'pickle' (a MulT-style pickle at config.data.path) or "
      "'spoken_reviews'"
    )
  task = "iemocap" if config.train.loss.startswith("iemocap") else "regression"
  sizes = {"train": d.num_train, "valid": d.num_valid, "test": d.num_test}
  return {
    split: synthetic.make_samples(
      n, config.model, seed=config.train.seed * 1000 + i, task=task
    )
    for i, (split, n) in enumerate(sizes.items())
  }


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The `data` mesh; checks that the batch divides over it."""
  count = config.mesh.data
  mesh = train.make_mesh(None if count == -1 else count)
  devices = mesh.shape["data"]
  if config.train.batch_size % devices:
    raise ValueError(
      f"config.train.batch_size={config.train.batch_size} is not divisible "
      f"by the {devices} devices of the data axis (config.mesh.data)"
    )
  if config.mesh.shards % devices:
    raise ValueError(
      f"config.mesh.shards={config.mesh.shards} is not a multiple of the "
      f"{devices} devices of the data axis"
    )
  return mesh


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


def _evaluate(config, evaluate, state, batcher, samples, sharding):
  preds, labels, loss_sum, count = [], [], 0.0, 0
  batch_size = config.train.batch_size
  chunks = [
    samples[start : start + batch_size]
    for start in range(0, len(samples), batch_size)
  ]
  depth = config.train.get("prefetch", 0)
  for batch in prefetch.build_ahead(batcher, chunks, depth):
    out = evaluate(state, distributed.from_global(batch, sharding))
    mask = np.asarray(out["mask"])
    preds.append(np.asarray(out["out"])[mask])
    labels.append(np.asarray(batch.labels)[mask])
    loss_sum += float(out["loss"]) * int(mask.sum())
    count += int(mask.sum())
  preds, labels = np.concatenate(preds), np.concatenate(labels)
  if config.train.loss.startswith("iemocap"):
    result = metrics.iemocap_metrics(preds, labels)
  else:
    result = metrics.mosi_metrics(preds[:, 0], labels)
  result["loss"] = loss_sum / count
  return result


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> train.TrainState:
  """Trains MTAG, keeps the best epoch by validation, reports its test.

  Args:
    config: an `experiments/configs/mtag_*.py` config.
    workdir: where checkpoints, `metrics.jsonl` and TensorBoard files go;
      an existing run there is resumed.

  Returns:
    The final training state (on preemption, the state at the stop).
  """
  distributed.maybe_initialize_distributed()
  t = config.train
  mesh = make_mesh(config)
  shards = config.mesh.shards or mesh.shape["data"]
  data_sharding = train.batch_sharding(mesh)
  data = load_data(config)
  batchers = {
    split: batching.GraphBatcher(
      config.model, batch_size=t.batch_size, num_shards=shards
    )
    for split in data
  }
  model = model_lib.create_model(config.model)
  tx = train.make_optimizer(t.learning_rate, t.weight_decay)
  example = batchers["train"](data["train"][:2])
  replicated = train.replicated(mesh)
  # Created under jit, straight into its sharding: `device_put` cannot place
  # values on other processes' devices.
  state = jax.jit(
    lambda key: train.create_train_state(key, model, example, tx),
    out_shardings=replicated,
  )(jax.random.key(t.seed))
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    state,
  )
  checkpoints = ckpt_lib.Checkpointer(
    workdir,
    config,
    keep=t.keep_checkpoints,
    best_metric=t.best_metric,
    best_mode=t.best_mode,
    ignore_fields=RESUMABLE_FIELDS,
  )
  epoch, position = 0, 0
  plateau = schedules.plateau_init(t.learning_rate)
  restored = checkpoints.restore(abstract)
  if restored is not None:
    state, extra, _ = restored
    epoch, position = extra["epoch"], extra["position"]
    plateau = _plateau_from_json(extra["plateau"])
    for split, budgets in extra["budgets"].items():
      batchers[split].budgets = budgets
    logging.info("resumed at step %d (epoch %d)", int(state.step), epoch)

  loss_kw = dict(loss=t.loss, beta=t.loss_beta)
  step_fn = jax.jit(
    functools.partial(
      train.train_step,
      model=model,
      tx=tx,
      normalize=t.normalize_loss,
      **loss_kw,
    ),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  evaluate = jax.jit(
    functools.partial(train.eval_step, model=model, **loss_kw),
    out_shardings=replicated,
  )
  preemption = preemption_lib.Preemption()
  preemption.install()
  writer = writers.MetricWriter(workdir)
  per_epoch = len(epoch_batches(np.arange(len(data["train"])), t.batch_size))
  progress = progress_lib.Progress(
    t.epochs * per_epoch, initial_step=int(state.step), desc="mtag"
  )

  def extra_state(epoch, position, train_budgets):
    budgets = {k: list(b.budgets) for k, b in batchers.items()}
    # The train batcher may have built batches ahead: save its budgets as
    # they were after the last batch stepped on, so that a resumed run pads
    # (and so computes) exactly as this one would have.
    budgets["train"] = list(train_budgets)
    return {
      "epoch": epoch,
      "position": position,
      "plateau": _plateau_to_json(plateau),
      "budgets": budgets,
    }

  def build_train(samples):
    batch = batchers["train"](samples)
    return batch, batchers["train"].budgets

  steps_this_process = 0
  try:
    while epoch < t.epochs:
      order = epoch_order(t.seed, epoch, len(data["train"]))
      batches = epoch_batches(order, t.batch_size)
      built = prefetch.build_ahead(
        build_train,
        ([data["train"][i] for i in b] for b in batches[position:]),
        t.get("prefetch", 0),
      )
      # Closed on every way out (preemption return included): no build
      # thread outlives the loop.
      with contextlib.closing(built):
        for index, (batch, budgets) in enumerate(built, start=position):
          state, m = step_fn(
            state, distributed.from_global(batch, data_sharding)
          )
          steps_this_process += 1
          step = int(state.step)
          if step % t.log_every == 0:
            writer.write_scalars(step, {f"train/{k}": v for k, v in m.items()})
          progress.update(step, {"loss": float(m["loss"])})
          stop = preemption.reached(step) or (
            t.stop_after_steps and steps_this_process >= t.stop_after_steps
          )
          if stop or (t.checkpoint_every and step % t.checkpoint_every == 0):
            checkpoints.save(
              step,
              state,
              extra=extra_state(epoch, index + 1, budgets),
              force=stop,
            )
          if stop:
            checkpoints.wait()
            return state
      valid = _evaluate(
        config,
        evaluate,
        state,
        batchers["valid"],
        data["valid"],
        data_sharding,
      )
      step = int(state.step)
      writer.write_scalars(
        step, {f"eval/valid/{k}": v for k, v in valid.items()}
      )
      monitored = valid["mae"] if "mae" in valid else valid["loss"]
      plateau = schedules.plateau_update(
        plateau,
        monitored,
        factor=t.plateau_factor,
        patience=t.plateau_patience,
        threshold=t.plateau_threshold,
      )
      state = train.set_learning_rate(state, plateau.lr)
      epoch, position = epoch + 1, 0
      checkpoints.save(
        step,
        state,
        extra=extra_state(epoch, 0, batchers["train"].budgets),
        metrics={f"eval/valid/{k}": v for k, v in valid.items()},
        force=True,
      )
      logging.info("epoch %d: %s", epoch, valid)
    checkpoints.wait()
    best = checkpoints.restore_best(abstract)
    if best is not None:
      best_state, _, best_step = best
      test = _evaluate(
        config,
        evaluate,
        best_state,
        batchers["test"],
        data["test"],
        data_sharding,
      )
      writer.write_scalars(
        int(state.step), {f"eval/test/{k}": v for k, v in test.items()}
      )
      if jax.process_index() == 0:
        print(f"\ntest metrics of the best epoch (step {best_step}):")
        for name, value in test.items():
          print(f"  {name:<16}{value:9.4f}")
    return state
  finally:
    progress.close()
    writer.close()
    checkpoints.close()
    preemption.uninstall()
