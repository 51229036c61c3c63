"""data2vec pretraining of an audio, vision or text encoder.

The task behind ``config.task="pretrain"`` (`experiments/configs/d2v_*.py`):

* the global batch is split over every device of the (``data``, ``fsdp``)
  mesh, each process building only its own rows
  (`experiments.data.pretrain_batches.batch_at`);
* the state (student, EMA teacher, optimizer) is replicated when
  ``config.mesh.fsdp == 1``; otherwise every leaf with two or more
  dimensions is split over ``fsdp`` along its largest dimension, and XLA
  gathers the parameters where the step needs them;
* batches are a function of the step and the dropout key is folded from
  the step, so a resumed run logs the same losses, bit for bit, as one
  that was never interrupted;
* ``train/loss``, ``train/ema_decay``, ``train/target_var``,
  ``train/pred_var``, ``train/grad_norm`` and ``train/learning_rate``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from d2vjax import ema as ema_lib
from d2vjax import encoder_io, optim, tree_util
from d2vjax import finetune as ft
from d2vjax import pretrain as pretrain_lib
from experiments.data import pretrain_batches
from experiments.runtime import distributed
from experiments.runtime import mesh as mesh_lib
from experiments.tasks import base

# The encoder class of each modality (one registry, `d2vjax.encoder_io`'s).
ENCODERS = encoder_io.ENCODERS
# config.model fields that configure the task rather than the encoder.
_NOT_ENCODER_FIELDS = ("top_k", "dtype", "teacher_sees_only_masked")


def create_model(config: ml_collections.ConfigDict) -> pretrain_lib.Data2Vec:
  """The `Data2Vec` student (encoder + head) that `config.model` describes."""
  if config.modality not in ENCODERS:
    raise ValueError(
      f"config.modality={config.modality!r}; use one of {tuple(ENCODERS)}"
    )
  fields = config.model.to_dict()
  kwargs = {k: v for k, v in fields.items() if k not in _NOT_ENCODER_FIELDS}
  if "conv_layers" in kwargs:
    # Module attributes must be hashable; a command-line override gives lists.
    kwargs["conv_layers"] = tuple(tuple(x) for x in kwargs["conv_layers"])
  encoder = ENCODERS[config.modality](
    **kwargs, dtype=jnp.dtype(fields["dtype"])
  )
  return pretrain_lib.Data2Vec(
    encoder=encoder, modality=config.modality, top_k=fields["top_k"]
  )


class Pretrainer(NamedTuple):
  """What a pretraining config builds, besides the data and the devices.

  Attributes:
    model: the `Data2Vec` student (`create_model`).
    tx: the modality's optimizer (`d2vjax.optim.make_optimizer`).
    ema: the EMA teacher with the config's decay schedule.
    init: ``init(key) -> PretrainState``, a fresh state; jittable, and
      `jax.eval_shape(init, key)` gives the state's layout, e.g. as the
      target for restoring a pretraining checkpoint elsewhere.
  """

  model: pretrain_lib.Data2Vec
  tx: optax.GradientTransformation
  ema: ema_lib.TeacherEMA
  init: Callable[[jax.Array], pretrain_lib.PretrainState]


def build(config: ml_collections.ConfigDict) -> Pretrainer:
  """The model, optimizer, teacher and state initialiser of a config."""
  model = create_model(config)
  o = config.optim
  tx = optim.make_optimizer(
    config.modality,
    total_steps=config.train.steps,
    peak_lr=o.peak_lr,
    warmup_steps=o.warmup_steps,
    weight_decay=o.weight_decay,
    clip_norm=o.clip_norm,
  ).tx
  ema = pretrain_lib.make_teacher_ema(
    config.modality,
    ema_lib.ema_decay_schedule(
      config.ema.start, config.ema.end, config.ema.anneal_steps
    ),
  )
  # Parameter shapes do not depend on the batch size: one row suffices.
  init_batch = pretrain_batches.batch_at(config, 0, rows=(0, 1))

  def init(key: jax.Array) -> pretrain_lib.PretrainState:
    return pretrain_lib.create_pretrain_state(key, model, init_batch, tx, ema)

  return Pretrainer(model, tx, ema, init)


def state_shardings(abstract: Any, mesh: Mesh) -> Any:
  """Shardings for a state of `jax.ShapeDtypeStruct` leaves.

  Leaves with fewer than two dimensions (biases, norms, scalars, the key)
  are replicated. With an ``fsdp`` axis of size n > 1, every other leaf --
  parameters, their teacher copies and optimizer moments alike -- is split
  over ``fsdp`` along its largest dimension (the first, on ties).

  Args:
    abstract: e.g. `jax.eval_shape` of the state's creation.
    mesh: a mesh with an ``fsdp`` axis.

  Returns:
    A pytree of `NamedSharding`s of the same structure.

  Raises:
    ValueError: naming the leaf's path, its shape and ``config.mesh.fsdp``
      when its largest dimension is not divisible by n.
  """
  fsdp = mesh.shape["fsdp"]
  replicated = mesh_lib.replicated(mesh)

  def pick(path, leaf):
    shape = tuple(leaf.shape)
    if fsdp == 1 or len(shape) < 2:
      return replicated
    axis = int(np.argmax(shape))
    if shape[axis] % fsdp:
      raise ValueError(
        f"cannot shard {tree_util.path_name(path)} of shape {shape} over "
        f"config.mesh.fsdp={fsdp}: its largest dimension ({shape[axis]}) "
        "is not divisible by it"
      )
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map_with_path(pick, abstract)


def _train_step(state, batch, *, model, tx, ema, teacher_sees_only_masked):
  state, metrics = pretrain_lib.pretrain_step(
    state,
    batch,
    model=model,
    tx=tx,
    ema=ema,
    text_teacher_sees_only_masked=teacher_sees_only_masked,
  )
  metrics["learning_rate"] = optim.current_learning_rate(state.opt_state)
  return state, metrics


class Task(base.Task):
  """data2vec pretraining (``config.task="pretrain"``)."""

  name = "pretrain"
  legacy_fields = {"task": "pretrain", "train.export_encoder_at": ()}

  def upgrade_saved_config(self, saved: dict[str, Any]) -> dict[str, Any]:
    saved = super().upgrade_saved_config(saved)
    if saved.get("modality") == "audio":
      # Speech pretraining read the random split before the switch.
      data = saved.setdefault("data", {})
      data.setdefault("speaker_disjoint", False)
    return saved

  def setup(self, mesh: Mesh) -> pretrain_lib.PretrainState:
    c = self.config
    model, tx, ema, init = build(c)
    self.encoder = model.encoder
    key = jax.random.key(c.train.seed)
    shardings = state_shardings(jax.eval_shape(init, key), mesh)
    self._step = jax.jit(
      functools.partial(
        _train_step,
        model=model,
        tx=tx,
        ema=ema,
        teacher_sees_only_masked=bool(
          c.model.get("teacher_sees_only_masked", False)
        ),
      ),
      in_shardings=(shardings, self.batch_sharding),
      out_shardings=(shardings, mesh_lib.replicated(mesh)),
      donate_argnums=(0,),
    )
    self.rows = self.process_rows(c.train.batch_size)
    return jax.jit(init, out_shardings=shardings)(key)

  @property
  def total_steps(self) -> int:
    return self.config.train.steps

  def train_items(self, step: int) -> Iterator[int]:
    return iter(range(step, self.total_steps))

  def build_batch(self, item: int) -> tuple[distributed.ProcessRows, int]:
    local = pretrain_batches.batch_at(self.config, item, rows=self.rows)
    return distributed.ProcessRows(local, self.config.train.batch_size), item

  def train_step(self, state, batch, step):
    del step
    return self._step(state, batch)

  def export_steps(self) -> dict[int, str]:
    """Steps whose student encoder is saved, and the folder names.

    The last step's goes to ``encoder/``; ``train.export_encoder_at``
    adds fractions of the run (``encoder-<step>/``), e.g. for fine-tuning
    after a shorter pretraining.
    """
    total = self.total_steps
    out = {round(f * total): "" for f in self.config.train.export_encoder_at}
    out = {s: f"encoder-{s}" for s in out if 0 < s < total}
    return out | {total: "encoder"}

  def save_artifacts(self, state, step, workdir):
    folder = self.export_steps().get(step)
    if folder is None:
      return
    # Whole arrays on every process (FSDP shards live on several).
    params = multihost_utils.process_allgather(
      ft.encoder_params_from_pretrained(state.params), tiled=True
    )
    if jax.process_index() == 0:
      encoder_io.save(
        os.path.join(workdir, folder),
        self.encoder,
        params,
        metadata={"pretraining_workdir": str(workdir), "step": step},
      )
      logging.info("step %d: encoder saved to %s/%s", step, workdir, folder)
