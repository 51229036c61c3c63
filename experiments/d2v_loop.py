"""The data2vec pretraining loop: mesh, sharding, checkpoints, resume.

`pretrain(config, workdir)` turns the pure `d2vjax.pretrain.pretrain_step`
into a run:

* a device mesh with axes (``data``, ``fsdp``); the global batch is split
  over all of its devices (the ``fsdp`` devices are data-parallel too, as in
  ZeRO-3 / FSDP), each process building only its own rows and
  `jax.make_array_from_process_local_data` assembling the global array;
* the state (student, EMA teacher, optimizer) replicated when
  ``config.mesh.fsdp == 1``; otherwise every leaf with two or more
  dimensions is split over ``fsdp`` along its largest dimension, and XLA
  gathers the parameters where the step needs them;
* orbax checkpoints every ``config.train.checkpoint_every`` steps and at the
  end, SIGTERM (or ``config.train.stop_after_steps``) checkpoints and
  returns, and a run started again in the same workdir resumes. Batches are
  a function of the step (`experiments.data.pretrain_batches.batch_at`) and
  the dropout key is folded from the step, so a resumed run logs the same
  losses, bit
  for bit, as one that was never interrupted;
* ``train/loss``, ``train/ema_decay``, ``train/target_var``,
  ``train/pred_var``, ``train/grad_norm`` and ``train/learning_rate`` to
  ``metrics.jsonl`` and TensorBoard, and a progress bar.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from d2vjax import audio, optim, text, vision
from d2vjax import ema as ema_lib
from d2vjax import pretrain as pretrain_lib
from experiments.data import pretrain_batches as d2v_data
from experiments.runtime import checkpoint as ckpt_lib
from experiments.runtime import distributed, writers
from experiments.runtime import preemption as preemption_lib
from experiments.runtime import progress as progress_lib

# Fields that may change between a run and its resumption: when to stop,
# log and save, and the device layout (orbax restores into any sharding).
RESUMABLE_FIELDS = (
  "train.stop_after_steps",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "mesh",
)

_ENCODERS = {
  "audio": audio.AudioEncoder,
  "vision": vision.VisionEncoder,
  "text": text.TextEncoder,
}
# config.model fields that configure the loop rather than the encoder.
_NOT_ENCODER_FIELDS = ("top_k", "dtype", "teacher_sees_only_masked")


def create_model(config: ml_collections.ConfigDict) -> pretrain_lib.Data2Vec:
  """The `Data2Vec` student (encoder + head) that `config.model` describes."""
  if config.modality not in _ENCODERS:
    raise ValueError(
      f"config.modality={config.modality!r}; use one of {tuple(_ENCODERS)}"
    )
  fields = config.model.to_dict()
  kwargs = {k: v for k, v in fields.items() if k not in _NOT_ENCODER_FIELDS}
  if "conv_layers" in kwargs:
    # Module attributes must be hashable; a command-line override gives lists.
    kwargs["conv_layers"] = tuple(tuple(x) for x in kwargs["conv_layers"])
  encoder = _ENCODERS[config.modality](
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
  init_batch = d2v_data.batch_at(config, 0, rows=(0, 1))

  def init(key: jax.Array) -> pretrain_lib.PretrainState:
    return pretrain_lib.create_pretrain_state(key, model, init_batch, tx, ema)

  return Pretrainer(model, tx, ema, init)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The (``data``, ``fsdp``) mesh; checks that the batch divides over it."""
  devices = jax.devices()
  fsdp, data = config.mesh.fsdp, config.mesh.data
  if fsdp < 1:
    raise ValueError(f"config.mesh.fsdp={fsdp} must be at least 1")
  if data == -1:
    data = len(devices) // fsdp
  if data < 1 or data * fsdp > len(devices):
    raise ValueError(
      f"config.mesh.data={config.mesh.data} x config.mesh.fsdp={fsdp} asks "
      f"for more devices than the {len(devices)} there are"
    )
  count = data * fsdp
  if config.train.batch_size % count:
    raise ValueError(
      f"config.train.batch_size={config.train.batch_size} is not divisible "
      f"by the {count} devices that split it (config.mesh.data={data} x "
      f"config.mesh.fsdp={fsdp})"
    )
  # Auto axes: Linen dropout breaks under Explicit axes in jax 0.10.
  return jax.make_mesh(
    (data, fsdp),
    ("data", "fsdp"),
    axis_types=(AxisType.Auto,) * 2,
    devices=devices[:count],
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def _path_name(path: tuple[Any, ...]) -> str:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return "/".join(names)


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
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    shape = tuple(leaf.shape)
    if fsdp == 1 or len(shape) < 2:
      return replicated
    axis = int(np.argmax(shape))
    if shape[axis] % fsdp:
      raise ValueError(
        f"cannot shard {_path_name(path)} of shape {shape} over "
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


def pretrain(
  config: ml_collections.ConfigDict, workdir: str
) -> pretrain_lib.PretrainState:
  """Pretrains data2vec for ``config.train.steps`` updates (or resumes).

  Args:
    config: an `experiments/configs/d2v_*.py` config.
    workdir: where checkpoints, ``metrics.jsonl`` and TensorBoard files go;
      a run already there (with the same config, apart from
      `RESUMABLE_FIELDS`) is resumed.

  Returns:
    The final state; on SIGTERM or after ``train.stop_after_steps``, the
    state at the stop.

  Raises:
    ValueError: at start, for a batch that does not divide over the
      devices, a parameter that does not divide over ``fsdp``, or a workdir
      holding a different run.
  """
  distributed.maybe_initialize_distributed()
  t = config.train
  mesh = make_mesh(config)
  data_sharding = batch_sharding(mesh)
  rows = distributed.process_rows(data_sharding, t.batch_size)
  model, tx, ema, init = build(config)

  key = jax.random.key(t.seed)
  shardings = state_shardings(jax.eval_shape(init, key), mesh)
  state = jax.jit(init, out_shardings=shardings)(key)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    state,
  )
  checkpoints = ckpt_lib.Checkpointer(
    workdir,
    config,
    keep=t.keep_checkpoints,
    ignore_fields=RESUMABLE_FIELDS,
  )
  restored = checkpoints.restore(abstract)
  if restored is not None:
    state, extra, _ = restored
    if extra.get("step") != int(state.step):
      raise RuntimeError(
        f"checkpoint extra {extra} does not match state step {int(state.step)}"
      )
    logging.info("resumed at step %d", int(state.step))

  replicated = NamedSharding(mesh, PartitionSpec())
  step_fn = jax.jit(
    functools.partial(
      _train_step,
      model=model,
      tx=tx,
      ema=ema,
      teacher_sees_only_masked=bool(
        config.model.get("teacher_sees_only_masked", False)
      ),
    ),
    in_shardings=(shardings, data_sharding),
    out_shardings=(shardings, replicated),
    donate_argnums=(0,),
  )

  def global_batch(step):
    local = d2v_data.batch_at(config, step, rows=rows)
    return {
      k: jax.make_array_from_process_local_data(
        data_sharding, v, (t.batch_size,) + v.shape[1:]
      )
      for k, v in local.items()
    }

  preemption = preemption_lib.Preemption()
  preemption.install()
  writer = writers.MetricWriter(workdir)
  writer.write_config(config)
  step = int(state.step)
  progress = progress_lib.Progress(t.steps, initial_step=step, desc="train")
  steps_this_process = 0
  try:
    while step < t.steps:
      state, metrics = step_fn(state, global_batch(step))
      step += 1
      steps_this_process += 1
      if step % t.log_every == 0 or step == t.steps:
        writer.write_scalars(
          step, {f"train/{k}": v for k, v in metrics.items()}
        )
      progress.update(step, {"train/loss": metrics["loss"]})
      stop = preemption.reached(step) or (
        t.stop_after_steps and steps_this_process >= t.stop_after_steps
      )
      periodic = t.checkpoint_every and step % t.checkpoint_every == 0
      if stop or periodic or step == t.steps:
        checkpoints.save(step, state, extra={"step": step}, force=stop)
      if stop:
        break
    checkpoints.wait()
    return state
  finally:
    progress.close()
    writer.close()
    checkpoints.close()
    preemption.uninstall()
