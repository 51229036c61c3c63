"""Fine-tuning data2vec encoders: what the three task families share.

The families -- `experiments.tasks.ctc` (speech recognition),
`experiments.tasks.image_classification` and
`experiments.tasks.text_classification` -- are `FinetuneTask` subclasses
that `experiments.runtime.driver` runs from an
`experiments/configs/d2v_finetune.py` config. Shared here:

* the encoder of ``config.init`` (`load_encoder`): random, the student of a
  data2vec pretraining workdir or an HF checkpoint folder, with the
  fine-tuning regularisation of ``config.model.overrides``;
* one replicated `FinetuneState`, and the pure `train_step` and `eval_step`
  that take the family's model function and per-example losses as static
  arguments; the jitted step donates the old state;
* the optimizer's frame: clipping, the family's update rule, then its
  learning-rate schedule (spec §6);
* batches from `experiments.data.finetune_batches` (synthetic, or the
  family's real source), whole global batches that are a function of
  (``train.seed``, step); with the dropout key folded from the step, a
  resumed run logs the same losses, bit for bit, as an uninterrupted one;
* validation every ``train.eval_every`` steps and at the end; the best
  step by the family's metric is kept as ``best/``.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from d2vjax import finetune as ft
from d2vjax import optim
from experiments import tasks
from experiments.data import finetune_batches
from experiments.runtime import distributed
from experiments.runtime import mesh as mesh_lib
from experiments.tasks import base, encoders

Array = jax.Array
PyTree = Any
Batch = finetune_batches.Batch
# (params, batch, *, train, rng=None, freeze_encoder=False)
#   -> (logits, frame padding or None, per-example losses [B])
ForwardFn = Callable[..., tuple[Array, Array | None, Array]]


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
# The encoder.


def load_encoder(
  config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[nn.Module, PyTree | None]:
  """The task's encoder module and its pretrained parameters, if any.

  Args:
    config: a fine-tuning config; ``config.task`` names the family,
      ``config.init`` is ``"scratch"``, ``"pretrain:<workdir>"``,
      ``"encoder:<folder>"`` or ``"hf:<folder>"``.
    mesh: where pretraining checkpoints are restored to.

  Returns:
    ``(encoder, params)``: see `experiments.tasks.encoders.load`, with the
    family's `FinetuneTask.encoder_overrides`.

  Raises:
    ValueError: for a task that is not a fine-tuning family, a modality
      that is not the family's, an unknown ``config.init`` or an encoder
      of another modality.
  """
  family = tasks.get(config.task)
  if not issubclass(family, FinetuneTask):
    raise ValueError(f"config.task={config.task!r} is not a fine-tuning task")
  if config.modality != family.modality:
    raise ValueError(
      f"config.modality={config.modality!r}; the {family.name} task needs "
      f"{family.modality!r}"
    )
  return encoders.load(config, mesh, family.encoder_overrides)


# ---------------------------------------------------------------------------
# Steps.


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


def train_step(
  state: FinetuneState,
  batch: Batch,
  *,
  forward: ForwardFn,
  optimizer: optim.Optimizer,
  freeze_encoder: bool = False,
) -> tuple[FinetuneState, dict[str, Array]]:
  """One update; pure, with the dropout key folded from the step.

  Args:
    state: the current state.
    batch: a `FinetuneTask.batch_at` batch (on device).
    forward: the family's model and losses (static),
      `FinetuneTask.forward`.
    optimizer: its optimizer and schedule (static, the schedule for
      logging), from `FinetuneTask.make_optimizer`.
    freeze_encoder: train just the head (fairseq's
      ``freeze_finetune_updates``): the encoder's gradient is stopped and
      the ``encoder`` branch of a multi-transform optimizer is left as it
      was.

  Returns:
    ``(new_state, metrics)`` with ``loss``, ``grad_norm`` and
    ``learning_rate`` (of this update).
  """
  rng = jax.random.fold_in(state.rng, state.step)

  def objective(params):
    *_, losses = forward(
      params, batch, train=True, rng=rng, freeze_encoder=freeze_encoder
    )
    return jnp.mean(losses)

  loss, grads = jax.value_and_grad(objective)(state.params)
  updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
  if freeze_encoder:
    # The encoder's gradient is zero here, so its update is too; keeping
    # its Adam state (count included) makes that phase invisible to it.
    opt_state = _keep_encoder_state(opt_state, state.opt_state)
    updates = dict(updates)
    updates["encoder"] = jax.tree.map(jnp.zeros_like, updates["encoder"])
  metrics = {
    "loss": loss,
    "grad_norm": optax.tree.norm(grads),
    "learning_rate": optimizer.schedule(state.step),
  }
  new_state = state.replace(
    step=state.step + 1,
    params=optax.apply_updates(state.params, updates),
    opt_state=opt_state,
  )
  return new_state, metrics


def eval_step(
  params: PyTree, batch: Batch, *, forward: ForwardFn
) -> dict[str, Array]:
  """Eval-mode outputs: ``logits``, per-example ``loss`` (and ``padding``)."""
  logits, padding, losses = forward(params, batch, train=False)
  out = {"logits": logits, "loss": losses}
  if padding is not None:
    out["padding"] = padding
  return out


class Validation(NamedTuple):
  """The model's outputs on the validation examples, for `scores`.

  Attributes:
    logits: ``[n, ...]`` of the first `n` rows (the spare rows of the last
      batch left out).
    padding: the CTC model's frame padding of those rows, else None.
    batches: the validation batches, spare rows included.
    n: the number of validation examples.
  """

  logits: np.ndarray
  padding: np.ndarray | None
  batches: list[Batch]
  n: int

  def labels(self) -> np.ndarray:
    """The ``labels`` of the `n` examples."""
    return np.concatenate([b["labels"] for b in self.batches])[: self.n]


class FinetuneTask(base.Task, finetune_batches.FinetuneBatches):
  """A fine-tuning family: a data2vec encoder under a task head.

  A family sets the attributes below and fills in the hooks of its model
  (`create_model`, `model_inputs`, and `apply` where the default does not
  do), its loss and metrics (`losses`, `scores`, `default_best_metric`),
  its optimizer (`create_update_rule`, `create_schedule`, and
  `frozen_encoder_steps`) and its data (`FinetuneBatches`'s
  `synthetic_example`, `augment_batch`, `check_synthetic`, `check_real`,
  `real_size`, `real_rows`).

  Attributes:
    modality: the encoder's (``"audio"``, ``"vision"``, ``"text"``).
    legacy_name: ``config.task`` in this family's workdirs written before
      the task registry (``"speech"``, ``"image"``, ``"text"``).
    real_source: the ``config.data.source`` of its real examples.
    encoder_overrides: encoder fields the head needs, over
      ``config.model.overrides``.
    encoder: the encoder the data must fit (image size, vocabulary, CNN);
      set by `setup`, or given to look at batches without a run.
    model: the encoder under the head, from `setup`.
  """

  modality: str = ""
  legacy_name: str = ""
  # Older workdirs' configs lack it: they built every batch in the loop.
  legacy_fields = {"train.prefetch": 0}
  encoder_overrides: Mapping[str, Any] = {}
  # What picks ``best/`` when ``config.train.best_metric`` is empty.
  default_best_metric: str = ""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    encoder: nn.Module | None = None,
  ) -> None:
    super().__init__(config)
    self.encoder = encoder
    self.model: nn.Module | None = None

  def upgrade_saved_config(self, saved: dict[str, Any]) -> dict[str, Any]:
    saved = dict(saved)
    # Before the registry, ``task`` named the family; no modality field.
    if saved.get("task") == self.legacy_name:
      saved["task"] = self.name
      saved.setdefault("modality", self.modality)
    return super().upgrade_saved_config(saved)

  # -- the model and its optimizer (family hooks) -----------------------------

  @abc.abstractmethod
  def create_model(self, encoder: nn.Module) -> nn.Module:
    """The task model: `encoder` under the family's head."""

  @abc.abstractmethod
  def model_inputs(
    self, batch: Batch, freeze_encoder: bool | None = None
  ) -> tuple[tuple, dict[str, Any]]:
    """Positional and keyword model inputs of a batch.

    `freeze_encoder` is None when the model is initialised, else whether
    this step trains only the head (only a family with
    `frozen_encoder_steps` passes it on).
    """

  def apply(
    self,
    params: PyTree,
    batch: Batch,
    *,
    train: bool,
    rng: Array | None = None,
    freeze_encoder: bool = False,
  ) -> tuple[Array, Array | None]:
    """``(logits, padding)``: the model on a batch; padding is the CTC
    model's frame padding, None for the heads that pool."""
    args, kw = self.model_inputs(batch, freeze_encoder)
    if train:
      kw["rngs"] = {"dropout": rng}
    out = self.model.apply({"params": params}, *args, train=train, **kw)
    return out if isinstance(out, tuple) else (out, None)

  @abc.abstractmethod
  def losses(self, logits: Array, padding: Array | None, batch: Batch) -> Array:
    """Per-example losses ``[B]``; their mean is the training loss."""

  def forward(
    self, params: PyTree, batch: Batch, **kw: Any
  ) -> tuple[Array, Array | None, Array]:
    """``(logits, padding, losses)``: `apply` (same keywords), `losses`."""
    logits, padding = self.apply(params, batch, **kw)
    return logits, padding, self.losses(logits, padding, batch)

  @abc.abstractmethod
  def create_schedule(self) -> optax.Schedule:
    """The learning rate of update k + 1 at k."""

  @abc.abstractmethod
  def create_update_rule(
    self, params: PyTree
  ) -> list[optax.GradientTransformation]:
    """The family's gradient transformations, before the learning rate."""

  def make_optimizer(self, params: PyTree) -> optim.Optimizer:
    """Clipping, the family's rule, the learning rate; and its schedule.

    The k-th update uses ``schedule(k - 1)``.
    """
    clip = self.config.optim.clip_norm
    parts = [optax.clip_by_global_norm(clip)] if clip else []
    parts += self.create_update_rule(params)
    schedule = self.create_schedule()
    parts.append(optax.scale_by_learning_rate(schedule))
    return optim.Optimizer(optax.chain(*parts), schedule)

  @property
  def frozen_encoder_steps(self) -> int:
    """Updates at the start that train only the head (0: none)."""
    return 0

  # -- the run ---------------------------------------------------------------

  def setup(self, mesh: Mesh) -> FinetuneState:
    c = self.config
    self.check_source()
    self.encoder, pretrained = load_encoder(c, mesh)
    self.model = self.create_model(self.encoder)
    replicated = mesh_lib.replicated(mesh)
    init_key, rng = jax.random.split(jax.random.key(c.train.seed))
    example = self.init_example()

    def init(key):
      args, kw = self.model_inputs(example)
      rngs = {"params": key, "dropout": key}
      return self.model.init(rngs, *args, train=False, **kw)["params"]

    # Created under jit, straight into their sharding: `device_put` cannot
    # place values on other processes' devices.
    params = jax.jit(init, out_shardings=replicated)(init_key)
    if pretrained is not None:
      params = jax.jit(ft.with_pretrained_encoder, out_shardings=replicated)(
        params, pretrained
      )
    optimizer = self.make_optimizer(params)
    step = functools.partial(
      train_step, forward=self.forward, optimizer=optimizer
    )
    # Two compiled variants at most: the frozen-encoder phase, then the rest.
    self._steps = {
      frozen: jax.jit(
        functools.partial(step, freeze_encoder=frozen),
        out_shardings=replicated,
        donate_argnums=(0,),
      )
      for frozen in (False, True)
    }
    self._eval = jax.jit(
      functools.partial(eval_step, forward=self.forward),
      out_shardings=replicated,  # read back on every process
    )
    self._valid = self.valid_batches()
    return jax.jit(
      lambda p, r: FinetuneState(
        step=jnp.zeros((), jnp.int32),
        params=p,
        opt_state=optimizer.tx.init(p),
        rng=r,
      ),
      out_shardings=replicated,
    )(params, rng)

  @property
  def total_steps(self) -> int:
    return self.config.train.steps

  def train_items(self, step: int) -> Iterator[int]:
    return iter(range(step, self.total_steps))

  def build_batch(self, item: int) -> tuple[Batch, int]:
    # Every process builds the whole batch (rows are coupled: time masks
    # cut to a common count, Mixup pairs row i with row B-1-i); the driver
    # hands over only its own rows.
    return self.batch_at(item), item

  def train_step(self, state, batch, step):
    return self._steps[step < self.frozen_encoder_steps](state, batch)

  def eval_due(self, step: int) -> bool:
    # The last step is scored even without ``train.eval_every``.
    every = self.config.train.eval_every
    return bool(every and step % every == 0) or step == self.total_steps

  def evaluate(self, state: FinetuneState, split: str) -> dict[str, float]:
    """``loss`` (mean per example) and the family's `scores` on `split`.

    ``"valid"``: `valid_batches`, built once in `setup`; a final split
    (scored once, on the best checkpoint): `final_batches`. The spare rows
    of the last batch are left out.
    """
    if split == "valid":
      batches, n = self._valid, self.num_valid()
    elif split in self.final_splits:
      batches, n = self.final_batches(split)
    else:
      raise ValueError(
        f"{self.name} scores 'valid' and {list(self.final_splits)}, not "
        f"{split!r}"
      )
    outs = []
    for batch in batches:
      device = {k: v for k, v in batch.items() if k != "text"}
      placed = distributed.from_global(device, self.batch_sharding)
      outs.append(jax.device_get(self._eval(state.params, placed)))
    cat = lambda key: np.concatenate([o[key] for o in outs])[:n]
    padding = cat("padding") if "padding" in outs[0] else None
    result = {"loss": float(cat("loss").mean())}
    outputs = Validation(cat("logits"), padding, batches, n)
    result.update(self.scores(outputs))
    return result

  def final_batches(self, split: str) -> tuple[list[Batch], int]:
    """The batches of a final split (`final_splits`) and its size."""
    raise NotImplementedError(f"{self.name} has no split {split!r}")

  @abc.abstractmethod
  def scores(self, outputs: Validation) -> dict[str, float]:
    """The family's metrics of the validation examples."""

  @property
  def best_metric(self) -> tuple[str, str]:
    """The metric that picks the best checkpoint, and "min" or "max".

    ``config.train.best_metric`` names it, else `default_best_metric`;
    error rates and losses are minimised, the rest maximised.
    """
    name = self.config.train.best_metric or self.default_best_metric
    lower = name.rsplit("/", 1)[-1] in ("wer", "cer", "loss", "mse")
    return name, "min" if lower else "max"
