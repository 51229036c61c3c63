"""The data2vec fine-tuning loop: speech CTC, image classes, GLUE-style text.

`finetune(config, workdir)` runs one `experiments/configs/d2v_finetune.py`
config:

* the encoder comes from ``config.init`` (random, a data2vec pretraining
  workdir or an HF checkpoint folder), with the fine-tuning regularisation
  of ``config.model.overrides``, under the task's head (`CTCModel`,
  `ImageClassifier`, `SentenceClassifier` of `d2vjax.finetune`);
* a ``data`` mesh splits every batch, the state is replicated, and the
  jitted step donates the old state;
* the optimiser follows the task's recipe (spec §6): speech freezes the CNN
  with `frozen_mask` and, for the first ``freeze_finetune_updates`` updates,
  the whole encoder; images scale each parameter's update by its layer's
  learning-rate decay; text decays every weight;
* the validation set is scored every ``train.eval_every`` steps and at the
  end (speech WER and CER of greedy CTC decoding, image and text accuracy,
  Pearson correlation and MSE for regression), and the best step by that
  metric is kept apart from the last ``train.keep_checkpoints``;
* SIGTERM (or ``train.stop_after_steps``) checkpoints and returns; a run
  started again in the same workdir resumes. Batches are a pure function of
  (``train.seed``, step) and the dropout key is folded from the step, so a
  resumed run logs the same losses, bit for bit, as an uninterrupted one.

Data come from `experiments.finetune_data` (batches as pure functions of
(seed, step), speech masks included).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from d2vjax import audio, convert, optim, text, vision
from d2vjax import finetune as ft
from experiments import d2v_loop
from experiments import finetune_data as ft_data
from experiments.runtime import checkpoint as ckpt_lib
from experiments.runtime import distributed, writers
from experiments.runtime import preemption as preemption_lib
from experiments.runtime import progress as progress_lib

Array = jax.Array
PyTree = Any

TASKS = ("speech", "image", "text")
_MODALITY = {"speech": "audio", "image": "vision", "text": "text"}
_ENCODERS = {
  "speech": audio.AudioEncoder,
  "image": vision.VisionEncoder,
  "text": text.TextEncoder,
}
# Fields that may change between a run and its resumption.
RESUMABLE_FIELDS = (
  "train.stop_after_steps",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "mesh",
)


@flax.struct.dataclass
class FinetuneState:
  """Everything that changes during fine-tuning, as one pytree.

  Attributes:
    step: optimizer updates done.
    params: the task model's parameters (`encoder` plus the head).
    opt_state: optimizer state.
    rng: base key; each step folds in `step`.
  """

  step: Array
  params: Any
  opt_state: Any
  rng: Array


# ---------------------------------------------------------------------------
# The encoder and the task model.


def _check_task(config: ml_collections.ConfigDict) -> None:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r}; use one of {TASKS}")


def _pretrained_encoder(
  workdir: str, task: str, mesh: Mesh
) -> tuple[nn.Module, PyTree]:
  """The student encoder of a data2vec pretraining run and its parameters.

  The pretraining state is rebuilt abstractly from the run's `config.json`
  with the pretraining loop's own builder (`d2v_loop.build`) and restored,
  replicated on `mesh`, through `experiments.runtime.checkpoint.Checkpointer`
  from   the newest readable step; the EMA teacher and the regression head are
  then dropped (spec §3.1). The whole state, optimizer moments included,
  is read once.
  """
  path = epath.Path(workdir)
  pconfig = ml_collections.ConfigDict(
    json.loads((path / ckpt_lib.CONFIG_FILENAME).read_text())
  )
  if pconfig.modality != _MODALITY[task]:
    raise ValueError(
      f"{workdir} pretrained a {pconfig.modality} encoder; the {task} task "
      f"needs {_MODALITY[task]}"
    )
  pretrainer = d2v_loop.build(pconfig)
  abstract = jax.eval_shape(pretrainer.init, jax.random.key(0))
  replicated = NamedSharding(mesh, PartitionSpec())
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    abstract,
  )
  with ckpt_lib.Checkpointer(
    path,
    pconfig,
    keep=pconfig.train.keep_checkpoints,
    ignore_fields=d2v_loop.RESUMABLE_FIELDS,
  ) as checkpoints:
    restored = checkpoints.restore(target)
  if restored is None:
    raise FileNotFoundError(f"{workdir} holds no pretraining checkpoint")
  state, _, step = restored
  logging.info("encoder from pretraining step %d of %s", step, workdir)
  return (
    pretrainer.model.encoder,
    ft.encoder_params_from_pretrained(state.params),
  )


def load_encoder(
  config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[nn.Module, PyTree | None]:
  """The task's encoder module and its pretrained parameters, if any.

  Args:
    config: a fine-tuning config; ``config.init`` is ``"scratch"``,
      ``"pretrain:<workdir>"`` or ``"hf:<folder>"``.
    mesh: where pretraining checkpoints are restored to.

  Returns:
    ``(encoder, params)``: the encoder (architecture from the config, the
    pretraining run or the HF checkpoint) with ``config.model.overrides``
    applied, and its pretrained parameter tree (None from scratch).

  Raises:
    ValueError: for an unknown ``config.init`` or an encoder of another
      modality.
  """
  _check_task(config)
  kind, _, where = config.init.partition(":")
  params = None
  if kind == "scratch" and not where:
    arch = config.model.encoder.to_dict()
    if "conv_layers" in arch:
      # Module attributes must be hashable; JSON and flags give lists.
      arch["conv_layers"] = tuple(tuple(x) for x in arch["conv_layers"])
    encoder = _ENCODERS[config.task](**arch)
  elif kind == "pretrain" and where:
    encoder, params = _pretrained_encoder(where, config.task, mesh)
  elif kind == "hf" and where:
    encoder, params = convert.load_hf_checkpoint(where)
  else:
    raise ValueError(
      f"config.init={config.init!r}; use 'scratch', 'pretrain:<workdir>' or "
      "'hf:<folder>'"
    )
  if not isinstance(encoder, _ENCODERS[config.task]):
    raise ValueError(
      f"config.init={config.init!r} holds a {type(encoder).__name__}; the "
      f"{config.task} task needs a {_ENCODERS[config.task].__name__}"
    )
  overrides = config.model.overrides.to_dict()
  overrides["dtype"] = jnp.dtype(overrides["dtype"])
  if config.task == "image":
    # Mean pooling replaces the final norm by fc_norm; nothing is masked.
    overrides.update(use_final_norm=False, use_mask_token=False)
  return encoder.clone(parent=None, **overrides), params


def create_model(
  config: ml_collections.ConfigDict, encoder: nn.Module
) -> nn.Module:
  """The task model (`CTCModel`, `ImageClassifier`, `SentenceClassifier`)."""
  m = config.model
  if config.task == "speech":
    return ft.CTCModel(
      encoder,
      vocab_size=len(ft_data.VOCAB),
      final_dropout=m.final_dropout,
      freeze_feature_extractor=m.freeze_feature_extractor,
    )
  if config.task == "image":
    return ft.ImageClassifier(
      encoder, num_classes=m.num_classes, init_scale=m.init_scale
    )
  return ft.SentenceClassifier(
    encoder, num_labels=m.num_labels, pooler_dropout=m.pooler_dropout
  )


# ---------------------------------------------------------------------------
# Optimizers.


def _speech_labels(params: PyTree, freeze_cnn: bool) -> PyTree:
  cnn = ft.frozen_mask(params)
  if not freeze_cnn:
    cnn = jax.tree.map(lambda _: False, cnn)
  return {
    name: jax.tree.map(
      lambda frozen, n=name: "frozen" if frozen else n, cnn[name]
    )
    for name in params
  }


def make_optimizer(
  config: ml_collections.ConfigDict, params: PyTree, encoder: nn.Module
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The task's optimizer (spec §6) and its learning-rate schedule.

  * speech: `optax.multi_transform` over `_speech_labels`: the CNN gets
    `optax.set_to_zero` (frozen for good, unless
    ``model.freeze_feature_extractor`` is off), the rest of the encoder and the
    CTC layer each their own fairseq Adam, so that the encoder's Adam
    starts counting when `freeze_finetune_updates` ends, as fairseq's
    per-parameter step does; then the tri-stage schedule.
  * image: AdamW with weight decay on matrices, then `scale_by_layer` of
    `layer_decay_multipliers` right before the learning rate, where
    `d2vjax.finetune.scale_by_layer` documents it; warm-up + cosine.
  * text: fairseq Adam, decay of every weight, polynomial (linear) decay
    after a linear warm-up.

  Args:
    config: a fine-tuning config.
    params: the task model's parameters (for labels and layer ids).
    encoder: the encoder (its depth sets the layer-decay ids).

  Returns:
    ``(tx, schedule)``; the k-th update uses ``schedule(k - 1)``.

  References:
    data2vec spec §6.1-§6.3; fairseq `optim/adam.py` (per-parameter step)
    and `wav2vec2_asr.py` (`freeze_finetune_updates`); data2vec_vision
    `optim_factory.py` (layer decay); RoBERTa's GLUE yamls.
  """
  o, steps = config.optim, config.train.steps
  parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
  if config.task == "speech":
    schedule = optim.tri_stage_schedule(
      o.peak_lr,
      steps,
      phase_ratio=tuple(o.phase_ratio),
      init_lr_scale=o.init_lr_scale,
      final_lr_scale=o.final_lr_scale,
    )

    def adam():
      inner = [optim.scale_by_fairseq_adam(o.b1, o.b2, o.eps)]
      if o.weight_decay:
        inner.append(optax.add_decayed_weights(o.weight_decay))
      return optax.chain(*inner)

    parts.append(
      optax.multi_transform(
        {"frozen": optax.set_to_zero(), "encoder": adam(), "proj": adam()},
        _speech_labels(params, config.model.freeze_feature_extractor),
      )
    )
  elif config.task == "image":
    schedule = optim.warmup_cosine_schedule(
      o.peak_lr,
      steps,
      o.warmup_steps,
      end_lr=o.end_lr,
      linspace_warmup=True,  # BEiT's utils.cosine_scheduler
    )
    parts.append(optax.scale_by_adam(o.b1, o.b2, o.eps))
    if o.weight_decay:
      parts.append(
        optax.add_decayed_weights(o.weight_decay, optim.decay_matrices_only)
      )
    multipliers = ft.layer_decay_multipliers(
      params, encoder.num_layers, o.layer_decay
    )
    parts.append(ft.scale_by_layer(multipliers))
  else:
    schedule = optim.polynomial_warmup_schedule(
      o.peak_lr, steps, o.warmup_steps
    )
    parts.append(optim.scale_by_fairseq_adam(o.b1, o.b2, o.eps))
    if o.weight_decay:
      parts.append(optax.add_decayed_weights(o.weight_decay, optim.decay_all))
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts), schedule


def _keep_encoder_state(new: PyTree, old: PyTree) -> PyTree:
  """`new` with the encoder branch of every multi-transform state from `old`."""

  def pick(n, o):
    if isinstance(n, optax.MultiTransformState):
      inner = dict(n.inner_states)
      inner["encoder"] = o.inner_states["encoder"]
      return n._replace(inner_states=inner)
    return n

  is_multi = lambda x: isinstance(x, optax.MultiTransformState)
  return jax.tree.map(pick, new, old, is_leaf=is_multi)


# ---------------------------------------------------------------------------
# Steps.


def _apply(model, params, batch, task, *, train, rng=None, freeze=False):
  kw = {"rngs": {"dropout": rng}} if train else {}
  variables = {"params": params}
  if task == "speech":
    return model.apply(
      variables,
      batch["waveform"],
      attention_mask=batch["attention_mask"],
      time_mask=batch.get("time_mask"),
      channel_mask=batch.get("channel_mask"),
      train=train,
      freeze_encoder=freeze,
      **kw,
    )
  if task == "image":
    return model.apply(variables, batch["images"], train=train, **kw), None
  logits = model.apply(
    variables,
    batch["input_ids"],
    attention_mask=batch["attention_mask"],
    train=train,
    **kw,
  )
  return logits, None


def _losses(task, logits, padding, batch, num_labels) -> Array:
  """Per-example losses `[B]` (their mean is the training loss)."""
  if task == "speech":
    labels = batch["labels"]
    one = lambda *a: ft.ctc_loss(*(x[None] for x in a))
    return jax.vmap(one)(
      logits, padding, labels, labels == ft_data.VOCAB.pad_id
    )
  if task == "image":
    # Soft targets already hold the label smoothing (`mixup_cutmix`), so
    # this is timm's SoftTargetCrossEntropy; validation uses hard labels.
    target = batch.get("targets")
    if target is None:
      target = jax.nn.one_hot(batch["labels"], logits.shape[-1])
    return optax.softmax_cross_entropy(logits, target)
  one = lambda x, y: ft.classification_loss(x[None], y[None], num_labels)
  return jax.vmap(one)(logits, batch["labels"])


def train_step(
  state: FinetuneState,
  batch: dict[str, Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  task: str,
  num_labels: int = 0,
  freeze_encoder: bool = False,
) -> tuple[FinetuneState, dict[str, Array]]:
  """One update; pure, with the dropout key folded from the step.

  Args:
    state: the current state.
    batch: a `batch_at` batch (on device).
    model: the task model (static).
    tx: its optimizer (static), from `make_optimizer`.
    schedule: the optimizer's schedule, for logging the learning rate.
    task: "speech", "image" or "text" (static).
    num_labels: the text head's outputs (1 = regression).
    freeze_encoder: speech only: train just the CTC layer; the encoder's
      gradient is stopped and its Adam state is left as it was.

  Returns:
    ``(new_state, metrics)`` with ``loss``, ``grad_norm`` and
    ``learning_rate`` (of this update).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def objective(params):
    logits, padding = _apply(
      model, params, batch, task, train=True, rng=rng, freeze=freeze_encoder
    )
    return jnp.mean(_losses(task, logits, padding, batch, num_labels))

  loss, grads = jax.value_and_grad(objective)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if freeze_encoder:
    # The encoder's gradient is zero here, so its update is too; keeping
    # its Adam state (count included) makes that phase invisible to it.
    opt_state = _keep_encoder_state(opt_state, state.opt_state)
    updates = dict(updates)
    updates["encoder"] = jax.tree.map(jnp.zeros_like, updates["encoder"])
  metrics = {
    "loss": loss,
    "grad_norm": optax.tree.norm(grads),
    "learning_rate": schedule(state.step),
  }
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
  )
  return new_state, metrics


def eval_step(
  params: PyTree,
  batch: dict[str, Array],
  *,
  model: nn.Module,
  task: str,
  num_labels: int = 0,
) -> dict[str, Array]:
  """Eval-mode outputs: ``logits``, per-example ``loss`` (and ``padding``)."""
  logits, padding = _apply(model, params, batch, task, train=False)
  loss = _losses(task, logits, padding, batch, num_labels)
  out = {"logits": logits, "loss": loss}
  if padding is not None:
    out["padding"] = padding
  return out


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  if x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def evaluate(
  config: ml_collections.ConfigDict,
  evaluate_fn: Any,
  params: PyTree,
  batches: list[dict[str, Any]],
  sharding: NamedSharding,
) -> dict[str, float]:
  """Validation metrics over `valid_batches` (spare rows left out).

  Args:
    config: a fine-tuning config.
    evaluate_fn: `eval_step` with its static arguments bound, jitted.
    params: the task model's parameters.
    batches: from `valid_batches`.
    sharding: how a batch is split over the devices.

  Returns:
    ``loss`` (mean per example) and, for speech, ``wer`` and ``cer`` of
    greedy CTC decoding; for regression ``mse`` and ``pearson``; otherwise
    ``accuracy``.
  """
  outs = []
  for batch in batches:
    device = {k: v for k, v in batch.items() if k != "text"}
    outs.append(
      jax.device_get(
        evaluate_fn(params, distributed.from_global(device, sharding))
      )
    )
  n = ft_data.num_valid(config)
  cat = lambda key: np.concatenate([o[key] for o in outs])[:n]
  loss, logits = cat("loss"), cat("logits")
  result = {"loss": float(loss.mean())}
  if config.task == "speech":
    refs = [t for b in batches for t in b["text"]][:n]
    hyps = [
      ft_data.VOCAB.decode(ids)
      for ids in ft.greedy_decode(logits, cat("padding"))
    ]
    result["wer"] = ft.wer(refs, hyps)
    result["cer"] = ft.cer(refs, hyps)
    return result
  labels = np.concatenate([b["labels"] for b in batches])[:n]
  if config.task == "text" and config.model.num_labels == 1:
    preds = logits[:, 0]
    result["mse"] = float(np.mean((preds - labels) ** 2))
    result["pearson"] = _pearson(preds, labels)
  else:
    result["accuracy"] = float(np.mean(logits.argmax(axis=-1) == labels))
  return result


# ---------------------------------------------------------------------------
# The run.


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """The `data` mesh; checks that the batch divides over it."""
  devices = jax.devices()
  count = len(devices) if config.mesh.data == -1 else config.mesh.data
  if not 1 <= count <= len(devices):
    raise ValueError(
      f"config.mesh.data={config.mesh.data}: there are {len(devices)} devices"
    )
  if config.train.batch_size % count:
    raise ValueError(
      f"config.train.batch_size={config.train.batch_size} is not divisible "
      f"by the {count} devices of the data axis (config.mesh.data)"
    )
  return jax.make_mesh(
    (count,), ("data",), axis_types=(AxisType.Auto,), devices=devices[:count]
  )


def best_metric(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """The metric that picks the best checkpoint, and "min" or "max".

  ``config.train.best_metric`` names it (empty: ``eval/valid/wer`` for
  speech, ``eval/valid/pearson`` for regression, ``eval/valid/accuracy``
  otherwise); error rates and losses are minimised, the rest maximised.
  """
  name = config.train.best_metric
  if not name:
    if config.task == "speech":
      name = "eval/valid/wer"
    elif config.task == "text" and config.model.num_labels == 1:
      name = "eval/valid/pearson"
    else:
      name = "eval/valid/accuracy"
  lower = name.rsplit("/", 1)[-1] in ("wer", "cer", "loss", "mse")
  return name, "min" if lower else "max"


def _num_labels(config: ml_collections.ConfigDict) -> int:
  return config.model.num_labels if config.task == "text" else 0


def create_state(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  encoder: nn.Module,
  pretrained: PyTree | None,
) -> tuple[FinetuneState, optax.GradientTransformation, optax.Schedule]:
  """The state at step 0 (pretrained encoder swapped in) and its optimizer.

  Args:
    config: a fine-tuning config.
    model: the task model, from `create_model`.
    encoder: its encoder.
    pretrained: the pretrained encoder parameters, or None.

  Returns:
    ``(state, tx, schedule)``.
  """
  init_key, rng = jax.random.split(jax.random.key(config.train.seed))
  example = ft_data.init_example(config, encoder)

  def init(key):
    kw = {}
    if config.task == "image":
      args = (example["images"],)
    elif config.task == "speech":
      args = (example["waveform"],)
      kw = {"attention_mask": example["attention_mask"]}
    else:
      args = (example["input_ids"],)
      kw = {"attention_mask": example["attention_mask"]}
    rngs = {"params": key, "dropout": key}
    return model.init(rngs, *args, train=False, **kw)["params"]

  params = jax.jit(init)(init_key)
  if pretrained is not None:
    params = ft.with_pretrained_encoder(params, pretrained)
  tx, schedule = make_optimizer(config, params, encoder)
  state = FinetuneState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=rng,
  )
  return state, tx, schedule


def finetune(config: ml_collections.ConfigDict, workdir: str) -> FinetuneState:
  """Fine-tunes for ``config.train.steps`` updates (or resumes).

  Args:
    config: an `experiments/configs/d2v_finetune.py` config.
    workdir: where checkpoints, ``metrics.jsonl`` and TensorBoard files go;
      a run already there (with the same config, apart from
      `RESUMABLE_FIELDS`) is resumed.

  Returns:
    The final state; on SIGTERM or after ``train.stop_after_steps``, the
    state at the stop.

  Raises:
    ValueError: at start, for an unknown task or init, a batch that does
      not divide over the devices, or a workdir holding a different run.
  """
  _check_task(config)
  ft_data.check_source(config)
  t = config.train
  mesh = make_mesh(config)
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  encoder, pretrained = load_encoder(config, mesh)
  model = create_model(config, encoder)
  state, tx, schedule = create_state(config, model, encoder, pretrained)
  state = jax.device_put(state, replicated)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
    state,
  )
  metric, mode = best_metric(config)
  checkpoints = ckpt_lib.Checkpointer(
    workdir,
    config,
    keep=t.keep_checkpoints,
    best_metric=metric,
    best_mode=mode,
    ignore_fields=RESUMABLE_FIELDS,
  )
  restored = checkpoints.restore(abstract)
  if restored is not None:
    state = restored[0]
    logging.info("resumed at step %d", int(state.step))

  static = dict(task=config.task, num_labels=_num_labels(config))
  step_fns = {
    freeze: jax.jit(
      functools.partial(
        train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        freeze_encoder=freeze,
        **static,
      ),
      out_shardings=replicated,
      donate_argnums=(0,),
    )
    for freeze in (False, True)
  }
  evaluate_fn = jax.jit(
    functools.partial(eval_step, model=model, **static),
    out_shardings=replicated,  # read back on every process
  )
  valid = ft_data.valid_batches(config, encoder)
  freeze_until = (
    config.optim.freeze_finetune_updates if config.task == "speech" else 0
  )

  preemption = preemption_lib.Preemption()
  preemption.install()
  writer = writers.MetricWriter(workdir)
  writer.write_config(config)
  step = int(state.step)
  progress = progress_lib.Progress(t.steps, initial_step=step, desc="train")
  steps_this_process = 0
  try:
    while step < t.steps:
      # Every process builds the whole batch (rows are coupled: time masks
      # cut to a common count, Mixup pairs row i with row B-1-i) and hands
      # over only its own rows.
      batch = distributed.from_global(
        ft_data.batch_at(config, encoder, step), data_sharding
      )
      # Two compiled variants at most: the frozen-encoder phase, then the
      # rest.
      state, metrics = step_fns[step < freeze_until](state, batch)
      step += 1
      steps_this_process += 1
      if step % t.log_every == 0 or step == t.steps:
        writer.write_scalars(
          step, {f"train/{k}": v for k, v in metrics.items()}
        )
      progress.update(step, {"train/loss": metrics["loss"]})
      if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
        scores = evaluate(
          config, evaluate_fn, state.params, valid, data_sharding
        )
        scores = {f"eval/valid/{k}": v for k, v in scores.items()}
        writer.write_scalars(step, scores)
        # Before any stop below: a resumed run starts after this step.
        checkpoints.save(
          step, state, extra={"step": step}, metrics=scores, force=True
        )
        logging.info("step %d: %s", step, scores)
      stop = preemption.reached(step) or (
        t.stop_after_steps and steps_this_process >= t.stop_after_steps
      )
      periodic = t.checkpoint_every and step % t.checkpoint_every == 0
      if stop or periodic:
        checkpoints.save(step, state, extra={"step": step}, force=stop)
      if stop:
        break
    checkpoints.wait()
    if step >= t.steps and checkpoints.best_step() is not None:
      logging.info(
        "best %s = %s at step %d",
        metric,
        checkpoints.best_value,
        checkpoints.best_step(),
      )
    return state
  finally:
    progress.close()
    writer.close()
    checkpoints.close()
    preemption.uninstall()
