"""Image classification: a data2vec vision encoder under a linear head.

The task behind ``config.task="image_classification"``
(`experiments/configs/d2v_finetune.py` ``:image*``), BEiT's fine-tuning
recipe as data2vec uses it (spec §6.2):

* the mean of the patch tokens, a new ``fc_norm`` and a linear head
  initialised ×``model.init_scale`` (`d2vjax.finetune.ImageClassifier`);
  the encoder's final norm and mask token go unused;
* AdamW with weight decay on matrices only, each parameter's update scaled
  by its layer's learning-rate decay (``optim.layer_decay``), linear
  warm-up then cosine decay;
* Mixup / CutMix with label smoothing on every training batch (soft
  targets, timm's ``SoftTargetCrossEntropy``); validation uses the hard
  labels;
* accuracy; the best step by it.

Data (``config.data.source``): ``"synthetic"`` images are noise around a
random colour, whose class is the hue sector of its mean colour;
``"fashion_mnist"`` is Fashion-MNIST's 10 classes
(`experiments.data.fashion_mnist.labelled_splits`): ``data.valid_size``
training images held out for validation, ``data.labels`` of the rest
(class-balanced; 0 = all) through `d2vjax.datasets.images.ImageLoader`'s
augmentations, and the 10,000 test images scored once at the end, on the
best checkpoint (with ``valid_size=0`` they are the validation split, as
before that field existed).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from d2vjax import finetune as ft
from d2vjax import optim
from d2vjax.datasets import images as images_lib
from experiments.data import fashion_mnist
from experiments.tasks import finetune

Array = jax.Array
Batch = finetune.Batch


def hue_class(colour: np.ndarray, num_classes: int) -> int:
  """Sector of the colour's hue angle (around the grey axis), of K equal."""
  x = (colour[0] - colour[1]) / np.sqrt(2.0)
  y = (colour[0] + colour[1] - 2.0 * colour[2]) / np.sqrt(6.0)
  angle = np.arctan2(y, x) % (2 * np.pi)
  return int(angle // (2 * np.pi / num_classes)) % num_classes


class Task(finetune.FinetuneTask):
  """Image classification (``config.task="image_classification"``)."""

  name = "image_classification"
  modality = "vision"
  legacy_name = "image"
  real_source = "fashion_mnist"
  # Mean pooling replaces the final norm by fc_norm; nothing is masked.
  encoder_overrides = {"use_final_norm": False, "use_mask_token": False}
  default_best_metric = "eval/valid/accuracy"
  # Workdirs from before the held-out validation split validated on test.
  legacy_fields = finetune.FinetuneTask.legacy_fields | {
    "data.valid_size": 0,
    "data.labels": 0,
    "data.subset_seed": 0,
  }

  # -- model -----------------------------------------------------------------

  def create_model(self, encoder: nn.Module) -> nn.Module:
    m = self.config.model
    return ft.ImageClassifier(
      encoder, num_classes=m.num_classes, init_scale=m.init_scale
    )

  def model_inputs(self, batch, freeze_encoder=None):
    return (batch["images"],), {}

  def losses(self, logits: Array, padding: None, batch: Batch) -> Array:
    # Soft targets already hold the label smoothing (`mixup_cutmix`), so
    # this is timm's SoftTargetCrossEntropy; validation uses hard labels.
    target = batch.get("targets")
    if target is None:
      target = jax.nn.one_hot(batch["labels"], logits.shape[-1])
    return optax.softmax_cross_entropy(logits, target)

  def scores(self, outputs):
    predicted = outputs.logits.argmax(axis=-1)
    return {"accuracy": float(np.mean(predicted == outputs.labels()))}

  # -- optimizer -------------------------------------------------------------

  def create_schedule(self) -> optax.Schedule:
    o = self.config.optim
    return optim.warmup_cosine_schedule(
      o.peak_lr,
      self.config.train.steps,
      o.warmup_steps,
      end_lr=o.end_lr,
      linspace_warmup=True,  # BEiT's utils.cosine_scheduler
    )

  def create_update_rule(
    self, params: Any
  ) -> list[optax.GradientTransformation]:
    """Adam, weight decay on matrices, then the layer-decay multipliers.

    `scale_by_layer` of `layer_decay_multipliers` comes right before the
    learning rate, where `d2vjax.finetune.scale_by_layer` documents it.

    References:
      data2vec spec §6.2; data2vec_vision `optim_factory.py` (layer decay).
    """
    o = self.config.optim
    parts = [optax.scale_by_adam(o.b1, o.b2, o.eps)]
    if o.weight_decay:
      parts.append(
        optax.add_decayed_weights(o.weight_decay, optim.decay_matrices_only)
      )
    multipliers = ft.layer_decay_multipliers(
      params, self.encoder.num_layers, o.layer_decay
    )
    parts.append(ft.scale_by_layer(multipliers))
    return parts

  # -- data ------------------------------------------------------------------

  def check_real(self) -> None:
    k = self.config.model.num_classes
    if k != len(images_lib.CLASS_NAMES):
      raise ValueError(
        f"config.model.num_classes={k}: Fashion-MNIST has "
        f"{len(images_lib.CLASS_NAMES)} classes; pass "
        "--config.model.num_classes=10"
      )

  def synthetic_example(self, rng: np.random.Generator) -> Batch:
    h, w = np.broadcast_to(self.encoder.image_size, (2,)).tolist()
    image = rng.standard_normal(3) + 0.5 * rng.standard_normal((h, w, 3))
    image = image.astype(np.float32)
    label = hue_class(image.mean(axis=(0, 1)), self.config.model.num_classes)
    return {"images": image, "labels": np.int32(label)}

  def augment_batch(self, batch: Batch, rng: np.random.Generator) -> Batch:
    """Mixes the batch: ``images`` and soft ``targets`` replace the labels."""
    m = self.config.mixup
    batch["images"], batch["targets"] = ft.mixup_cutmix(
      batch["images"],
      batch.pop("labels"),
      rng=rng,
      num_classes=self.config.model.num_classes,
      mixup_alpha=m.mixup_alpha,
      cutmix_alpha=m.cutmix_alpha,
      switch_prob=m.switch_prob,
      smoothing=m.smoothing,
      prob=m.prob,
    )
    return batch

  def _splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # Drawn once per task and data config: every training batch asks.
    d = self.config.data
    key = (d.path, d.data_dir, d.valid_size, d.labels, d.subset_seed)
    cache = self.__dict__.setdefault("_split_cache", {})
    if key not in cache:
      cache.clear()
      cache[key] = fashion_mnist.labelled_splits(
        d.path,
        d.data_dir,
        valid_size=d.valid_size,
        labels=d.labels,
        subset_seed=d.subset_seed,
      )
    return cache[key]

  def _loader(self, split: str) -> images_lib.ImageLoader:
    """The labelled training images (augmented), or an evaluation split."""
    d, train = self.config.data, split == "train"
    images, labels = self._splits()[split]
    return images_lib.ImageLoader(
      images,
      labels,
      batch_size=self.config.train.batch_size,
      image_size=int(np.broadcast_to(self.encoder.image_size, (2,))[0]),
      seed=self.config.train.seed,
      augment=train and d.augment,
      scale=tuple(d.crop_scale),
      flip=d.flip,
      jitter=d.jitter,
    )

  @property
  def final_splits(self) -> tuple[str, ...]:
    # The test images, once, on the best checkpoint -- unless they are the
    # validation split (``data.valid_size=0``).
    d = self.config.data
    held_out = d.source == self.real_source and d.valid_size
    return ("test",) if held_out else ()

  def real_size(self, split: str) -> int:
    return len(self._splits()[split][1])

  def real_train_batch(self, step: int) -> Batch:
    batch = self._loader("train").batch(step)
    return {"images": batch["images"], "labels": batch["labels"]}

  def _eval_batches(self, split: str, n: int) -> list[Batch]:
    # Batches of an unaugmented loader: within its first epoch every row
    # is a different image (spare rows wrap into the next).
    loader = self._loader(split)
    count = -(-n // self.config.train.batch_size)
    batches = [loader.batch(i) for i in range(count)]
    return [{"images": b["images"], "labels": b["labels"]} for b in batches]

  def real_valid_batches(self) -> list[Batch]:
    return self._eval_batches("valid", self.num_valid())

  def final_batches(self, split: str) -> tuple[list[Batch], int]:
    n = self.real_size(split)
    return self._eval_batches(split, n), n
