"""The data2vec model and its pure pretraining step, for every modality.

The student encodes the masked input and a regression head predicts, at the
masked positions, the teacher's targets: the normalised average of the top-K
per-layer taps of an EMA copy of the encoder that sees the whole input in
eval mode, without gradient.

    model = Data2Vec(encoder=VisionEncoder(...), modality="vision")
    state = create_pretrain_state(rng, model, batch, tx, ema)
    step = jax.jit(functools.partial(pretrain_step, model=model, tx=tx,
                                     ema=ema), donate_argnums=(0,))
    state, metrics = step(state, batch)

A batch is a dict: `inputs` (waveforms `[B, samples]`, images `[B, H, W, C]`
or corrupted token ids `[B, T]`), `mask` (`[B, T]` bool, True = masked, the
loss positions), optionally `attention_mask` (audio, text; 1 = real) and, for
text, `targets_ids` (the uncorrupted ids the teacher reads).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2vjax import ema as ema_lib
from d2vjax import encoder as encoder_lib
from d2vjax import initializers, losses, masking, targets

Array = jax.Array

MODALITIES = ("audio", "vision", "text")

# What the teacher shares with the student instead of averaging it (spec
# section 1.2): audio shares its front end (the teacher reads the student's
# CNN features and uses the student's positional conv), text its embeddings;
# the vision teacher averages everything.
SHARED_PREFIXES = {
  "audio": ("front_end/",),
  "text": (
    "word_embeddings/",
    "position_embeddings/",
    "token_type_embeddings/",
    "embedding_layer_norm/",
  ),
  "vision": (),
}


def _check_modality(modality: str) -> None:
  if modality not in MODALITIES:
    raise ValueError(f"modality {modality!r}; expected one of {MODALITIES}")


class RegressionHead(nn.Module):
  """The pretraining head that maps student outputs to target space.

  audio: one Linear with PyTorch's default init (`final_proj`); vision: one
  Linear with BEiT's init (`lm_head`); text: Linear(C, 2C) - GELU -
  Linear(2C, C) with BERT init (`regression_head`).

  References:
    Baevski et al., data2vec, 2022; spec section 3.1.
  """

  modality: str
  hidden: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _check_modality(self.modality)
    if self.modality == "text":
      bert = nn.initializers.normal(encoder_lib.BERT_INIT_STD)
      x = nn.Dense(2 * self.hidden, kernel_init=bert, name="dense_0")(x)
      x = nn.gelu(x, approximate=False)
      return nn.Dense(self.hidden, kernel_init=bert, name="dense_1")(x)
    if self.modality == "vision":
      return nn.Dense(
        self.hidden,
        kernel_init=encoder_lib.truncated_normal_one_sigma(),
        name="dense",
      )(x)
    return nn.Dense(
      self.hidden, name="dense", **initializers.torch_linear_init(x.shape[-1])
    )(x)


class Data2Vec(nn.Module):
  """Student encoder plus regression head.

  Attributes:
    encoder: an `AudioEncoder`, `VisionEncoder` or `TextEncoder`; its params
      live under `encoder`, which is also the tree the teacher averages.
    modality: "audio", "vision" or "text".
    top_k: layers averaged into the targets (None: the modality's recipe,
      8 / 6 / 10 for audio / vision / text).
  """

  encoder: nn.Module
  modality: str
  top_k: int | None = None

  @nn.compact
  def __call__(
    self, inputs: Array, mask: Array, *, train: bool, **encoder_kwargs: Any
  ) -> tuple[Array, dict]:
    """Predictions `[B, T, C]` at every position (the loss picks the masked).

    For vision the CLS token is dropped, so `T` is the number of patches.
    """
    x, aux = self.encoder(inputs, mask, train, **encoder_kwargs)
    if self.modality == "vision":
      x = x[:, 1:]
    return RegressionHead(self.modality, x.shape[-1], name="head")(x), aux


@flax.struct.dataclass
class PretrainState:
  """Everything that changes during pretraining, as one pytree.

  Attributes:
    step: optimizer updates done.
    params: the student (`encoder` and `head`).
    teacher: the EMA state; `teacher.teacher` mirrors `params["encoder"]`.
    opt_state: optimizer state.
    rng: base key; each step folds in `step`.
  """

  step: Array
  params: Any
  teacher: ema_lib.EmaState
  opt_state: Any
  rng: Array


def make_teacher_ema(
  modality: str, decay: float | optax.Schedule
) -> ema_lib.TeacherEMA:
  """The EMA teacher with the modality's sharing rule (spec section 1.2)."""
  _check_modality(modality)
  prefixes = SHARED_PREFIXES[modality]
  return ema_lib.teacher_ema(
    decay, shared=ema_lib.shared_by_prefix(prefixes) if prefixes else None
  )


def _encoder_kwargs(batch: Mapping[str, Array]) -> dict:
  return (
    {"attention_mask": batch["attention_mask"]}
    if "attention_mask" in batch
    else {}
  )


def check_batch(batch: Mapping[str, Any], modality: str) -> None:
  """Host-side checks of a pretraining batch; raises `ValueError`.

  Inside the jitted step a degenerate mask would silently give a zero loss,
  so loops call this on every batch (it is cheap). Rejected: a mask that is
  not a `[B, T]` boolean array, that masks nothing in the whole batch (no
  loss positions), that masks every valid position of a row (the student
  sees no context), or that masks padding; text batches without
  `targets_ids` of the inputs' shape.
  """
  _check_modality(modality)
  if "inputs" not in batch or "mask" not in batch:
    raise ValueError("batch needs 'inputs' and 'mask'")
  mask = np.asarray(batch["mask"])
  if mask.ndim != 2 or mask.dtype != np.bool_:
    raise ValueError(
      f"batch['mask'] must be a [B, T] boolean array, got {mask.dtype} "
      f"{mask.shape}"
    )
  if not mask.any():
    raise ValueError(
      "batch['mask'] masks nothing: the loss would have no positions"
    )
  padding = None
  if modality == "text":
    ids = batch.get("targets_ids")
    if ids is None or np.shape(ids) != np.shape(batch["inputs"]):
      raise ValueError(
        "text batches need 'targets_ids' (the uncorrupted ids the teacher "
        f"reads) of the inputs' shape {np.shape(batch['inputs'])}"
      )
  if modality != "audio" and "attention_mask" in batch:
    padding = np.asarray(batch["attention_mask"]) == 0
  masking.check_mask(mask, padding, "batch['mask']", allow_empty_rows=True)


def create_pretrain_state(
  rng: Array,
  model: Data2Vec,
  batch: Mapping[str, Array],
  tx: optax.GradientTransformation,
  ema: ema_lib.TeacherEMA,
  params: Any | None = None,
) -> PretrainState:
  """Initialises the student (unless `params` are given), teacher, optimizer.

  The teacher starts as a copy of the initial student encoder.
  """
  check_batch(batch, model.modality)
  init_rng, rng = jax.random.split(rng)
  if params is None:
    params = jax.jit(
      functools.partial(model.init, train=False, **_encoder_kwargs(batch))
    )(init_rng, batch["inputs"], batch["mask"])["params"]
  return PretrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    teacher=ema.init(params["encoder"]),
    opt_state=tx.init(params),
    rng=rng,
  )


def teacher_targets(
  model: Data2Vec,
  teacher_params: Any,
  batch: Mapping[str, Array],
  *,
  text_teacher_sees_only_masked: bool = False,
  features: Array | None = None,
) -> Array:
  """The regression targets `[B, T, C]` (float32, no gradient).

  Args:
    model: the `Data2Vec` module (its encoder is run with teacher params).
    teacher_params: the teacher's encoder params.
    batch: the pretraining batch.
    text_teacher_sees_only_masked: reproduce the released text code, whose
      teacher reads only the masked tokens (original ids there, padding
      elsewhere, positions renumbered); default is the paper: the whole
      original sequence (spec section 4c.4).
    features: audio only: the student's projected CNN features
      (`aux["features"]` of its forward), which the teacher reads as fairseq
      does; None runs the teacher's copy of the (shared, hence identical)
      front end on the waveform again.
  """
  inputs = batch["inputs"]
  kwargs = _encoder_kwargs(batch)
  if features is not None:
    if model.modality != "audio":
      raise ValueError("features: only the audio teacher reads CNN features")
    kwargs["features"] = jax.lax.stop_gradient(features)
    inputs = None
  if model.modality == "text":
    inputs = batch["targets_ids"]
    if text_teacher_sees_only_masked:
      pad = model.encoder.pad_id
      inputs = jnp.where(batch["mask"], inputs, pad)
      kwargs = {"attention_mask": batch["mask"].astype(jnp.int32)}
  _, aux = model.encoder.apply(
    {"params": teacher_params}, inputs, None, False, **kwargs
  )
  layer_results = aux["layer_results"]
  if model.modality == "vision":
    layer_results = layer_results[:, :, 1:]  # the CLS token is no target
  return jax.lax.stop_gradient(
    targets.modality_targets(
      layer_results,
      model.modality,
      **({} if model.top_k is None else {"top_k": model.top_k}),
    )
  )


def pretrain_step(
  state: PretrainState,
  batch: Mapping[str, Array],
  *,
  model: Data2Vec,
  tx: optax.GradientTransformation,
  ema: ema_lib.TeacherEMA,
  text_teacher_sees_only_masked: bool = False,
) -> tuple[PretrainState, dict[str, Array]]:
  """One data2vec update: student loss, optimizer step, teacher EMA step.

  Args:
    state: the pretraining state.
    batch: see the module docstring.
    model: the `Data2Vec` module (static).
    tx: the optimizer (static).
    ema: the teacher update (static), e.g. `make_teacher_ema`.
    text_teacher_sees_only_masked: see `teacher_targets`.

  Returns:
    The new state and metrics: `loss`, `ema_decay` (used by this step's
    teacher update), `target_var` and `pred_var` (mean per-channel std over
    masked positions: the collapse monitors), `grad_norm`.

  References:
    Baevski et al., data2vec, 2022; spec sections 1.1 and 3.
  """
  mask = batch["mask"]
  # The audio teacher reads the student's CNN features (fairseq), so its
  # targets are made inside the objective, from the student's forward; the
  # stop_gradient there keeps them out of the backward pass.
  teacher_in_objective = model.modality == "audio"
  if not teacher_in_objective:
    y = teacher_targets(
      model,
      state.teacher.teacher,
      batch,
      text_teacher_sees_only_masked=text_teacher_sees_only_masked,
    )
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def objective(params):
    pred, aux = model.apply(
      {"params": params},
      batch["inputs"],
      mask,
      train=True,
      rngs={"dropout": dropout_rng},
      **_encoder_kwargs(batch),
    )
    if teacher_in_objective:
      targets = teacher_targets(
        model, state.teacher.teacher, batch, features=aux["features"]
      )
    else:
      targets = y
    pred = pred.astype(jnp.float32)
    loss = losses.modality_loss(pred, targets, mask, model.modality)
    return loss, (pred, targets)

  (loss, (pred, y)), grads = jax.value_and_grad(objective, has_aux=True)(
    state.params
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  teacher = ema.update(params["encoder"], state.teacher)
  metrics = {
    "loss": loss,
    "ema_decay": teacher.decay,
    "target_var": losses.variance_monitor(y, mask),
    "pred_var": losses.variance_monitor(pred, mask),
    "grad_norm": optax.tree.norm(grads),
  }
  new_state = state.replace(
    step=state.step + 1, params=params, teacher=teacher, opt_state=opt_state
  )
  return new_state, metrics
