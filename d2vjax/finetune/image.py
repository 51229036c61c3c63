"""Image classification fine-tuning (data2vec_vision / BEiT recipe).

* `ImageClassifier`: the pretrained ViT without its final LayerNorm, mean of
  the patch tokens, a new `fc_norm` LayerNorm and a linear head initialised
  small (× `init_scale`).
* Layer-wise learning-rate decay: `layer_decay_multipliers` assigns every
  parameter BEiT's layer id and its scale `decay ** (L + 1 - id)`;
  `scale_by_layer` applies those scales inside an optax chain.
* `label_smoothing_cross_entropy` and the host-side `mixup_cutmix` (timm's
  batch-mode `Mixup`, which also applies the label smoothing).

Recipe (ViT-B, spec §6.2): AdamW (0.9, 0.999, 1e-8), lr 4e-3 for batch 1024,
10 warm-up epochs then cosine to 1e-6, layer decay 0.65, weight decay 0,
drop path 0.2, mixup 0.8 / cutmix 1.0 / switch 0.5, smoothing 0.1.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2vjax import encoder as encoder_lib
from d2vjax import tree_util, vision

Array = jax.Array
PyTree = Any

# Parameters that BEiT puts in layer 0 with the patch embedding.
_EMBEDDING_NAMES = frozenset(
  {"patch_embed", "cls_token", "mask_token", "pos_embed"}
)
_BLOCK = re.compile(r"layers_(\d+)")


class ImageClassifier(nn.Module):
  """Mean-pooled ViT classifier on the data2vec vision encoder.

  Parameters: `encoder/...` (the `VisionEncoder` layout, so pretrained
  encoder trees drop in; the pretraining `norm` is not used), `fc_norm`,
  `head`.

  Attributes:
    encoder: a `VisionEncoder` built with `use_final_norm=False` (the
      reference replaces the final norm by the identity under mean
      pooling) and the fine-tuning drop path (0.2 for ViT-B). Its mask
      token is unused here and may be turned off (`use_mask_token=False`).
    num_classes: number of classes.
    init_scale: factor applied to the head's initial weights and bias.

  References:
    Baevski et al., "data2vec", 2022, section 5.1; Bao et al., "BEiT",
    2021 (mean pooling head); data2vec_vision `modeling_finetune.py`;
    data2vec spec §6.2.
  """

  encoder: vision.VisionEncoder
  num_classes: int
  init_scale: float = 0.001

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> Array:
    """Class logits.

    Args:
      images: `[B, H, W, C]` (NHWC).
      train: enables dropout and drop path (needs a `"dropout"` RNG).

    Returns:
      float32 logits `[B, num_classes]`.

    Raises:
      ValueError: if the encoder applies its own final norm.
    """
    if getattr(self.encoder, "use_final_norm", False):
      raise ValueError(
        "build the encoder with use_final_norm=False: mean pooling uses a "
        "new fc_norm instead of the pretraining norm"
      )
    x, _ = self.encoder(images, None, train)
    pooled = jnp.mean(x[:, 1:].astype(jnp.float32), axis=1)  # CLS excluded
    pooled = encoder_lib.layer_norm(1e-6, "fc_norm")(pooled)
    # timm's trunc_normal_(std=0.02) cuts at ±2 in absolute value, i.e. at
    # ±100σ: effectively an untruncated normal. The bias starts at 0, so
    # scaling it changes nothing.
    head_init = nn.initializers.normal(0.02)

    def scaled(key, shape, dtype=jnp.float32):
      return head_init(key, shape, dtype) * self.init_scale

    return nn.Dense(
      self.num_classes,
      kernel_init=scaled,
      bias_init=nn.initializers.zeros,
      name="head",
    )(pooled)


def _layer_id(names: tuple[str, ...], num_layers: int) -> int:
  """BEiT's layer id of one parameter path."""
  for name in names:
    if name in _EMBEDDING_NAMES:
      return 0
    match = _BLOCK.fullmatch(name)
    if match:
      i = int(match.group(1))
      if i >= num_layers:
        raise ValueError(
          f"parameter {'/'.join(names)} belongs to block {i} but "
          f"num_layers is {num_layers}"
        )
      return i + 1
  return num_layers + 1


def layer_decay_multipliers(
  params: PyTree, num_layers: int, decay: float = 0.65
) -> PyTree:
  """Per-parameter learning-rate scales of layer-wise decay.

  Layer ids follow BEiT: the patch embedding, CLS token, mask token and
  absolute position embedding are layer 0; block i (`layers_{i}`) is layer
  i + 1; everything else (the shared relative-position table, `fc_norm`,
  `head`) is layer `num_layers + 1`. A parameter of layer `id` gets
  `decay ** (num_layers + 1 - id)`, so the head trains at the full rate
  and the patch embedding at `decay ** (num_layers + 1)`.

  Args:
    params: an `ImageClassifier` (or bare `VisionEncoder`) parameter tree.
    num_layers: number of Transformer blocks.
    decay: per-layer decay factor (0.65 for ViT-B).

  Returns:
    A tree with the structure of `params` holding Python floats.

  References:
    Bao et al., "BEiT", 2021, section 3 (layer-wise lr decay); Clark et
    al., "ELECTRA", 2020; data2vec_vision `optim_factory.py`; spec §6.2.
  """
  top = num_layers + 1

  def scale(path, _):
    layer = _layer_id(tree_util.path_names(path), num_layers)
    return float(decay ** (top - layer))

  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_layer(multipliers: PyTree) -> optax.GradientTransformation:
  """Multiplies every update leaf by its (layer-decay) multiplier.

  Placement: after the Adam scaling and after `add_decayed_weights`, next
  to `scale_by_learning_rate`:

      optax.chain(optax.scale_by_adam(0.9, 0.999, 1e-8),
                  optax.add_decayed_weights(wd, mask),
                  scale_by_layer(layer_decay_multipliers(params, 12)),
                  optax.scale_by_learning_rate(schedule))

  Each parameter then moves by `lr * m * (adam + wd * p)`, exactly torch
  AdamW with a parameter group whose learning rate is `lr * m` (the
  reference's `lr_scale`), weight decay included. Placed before the Adam
  scaling it would do nothing: Adam's direction is invariant to scaling
  the gradient.

  Args:
    multipliers: a tree with the structure of the updates holding scalars
      (e.g. `layer_decay_multipliers(params, num_layers)`).

  Returns:
    A stateless optax transformation.
  """

  def init_fn(params: PyTree) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree.map(
      lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers
    )
    return scaled, state

  return optax.GradientTransformation(init_fn, update_fn)


def label_smoothing_cross_entropy(
  logits: Array, labels: Array, smoothing: float = 0.0
) -> Array:
  """Cross-entropy against (optionally smoothed) targets, batch mean.

  The target is `(1 - smoothing) * y + smoothing / K` for the one-hot (or
  given soft) target `y` over K classes, which for integer labels equals
  timm's `LabelSmoothingCrossEntropy`. `mixup_cutmix` already smooths its
  soft targets: use `smoothing=0` with them (timm's
  `SoftTargetCrossEntropy`).

  Args:
    logits: `[B, K]` unnormalised scores.
    labels: `[B]` integer classes or `[B, K]` soft targets.
    smoothing: label smoothing in [0, 1).

  Returns:
    Scalar float32.

  References:
    Szegedy et al., "Rethinking the Inception Architecture", 2016,
    section 7; timm `loss/cross_entropy.py`.
  """
  logits = jnp.asarray(logits, jnp.float32)
  k = logits.shape[-1]
  labels = jnp.asarray(labels)
  if labels.ndim == logits.ndim - 1:
    target = jax.nn.one_hot(labels, k, dtype=jnp.float32)
  else:
    target = labels.astype(jnp.float32)
  target = target * (1.0 - smoothing) + smoothing / k
  return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), axis=-1))


def _smooth_one_hot(labels: np.ndarray, k: int, smoothing: float):
  off = smoothing / k
  target = np.full((labels.shape[0], k), off, np.float32)
  target[np.arange(labels.shape[0]), labels] = 1.0 - smoothing + off
  return target


def _cutmix_box(
  height: int, width: int, lam: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
  """A box of area ≈ (1 - lam)·H·W around a uniform centre, clipped."""
  ratio = np.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
  y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
  x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
  return int(y0), int(y1), int(x0), int(x1)


def mixup_cutmix(
  images: Any,
  labels: Any,
  *,
  rng: np.random.Generator,
  num_classes: int,
  mixup_alpha: float = 0.8,
  cutmix_alpha: float = 1.0,
  switch_prob: float = 0.5,
  smoothing: float = 0.1,
  prob: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
  """Batch-wise Mixup or CutMix with the reversed batch, on the host.

  One draw per batch: with probability `prob` mix at all; if both alphas
  are positive choose CutMix with probability `switch_prob`, else Mixup;
  draw `lam ~ Beta(alpha, alpha)`. Sample i is mixed with sample B-1-i.
  Mixup blends whole images, `lam * x + (1 - lam) * x_flip`. CutMix pastes
  a box of side `sqrt(1 - lam)` times the image's from the partner; after
  clipping to the image the box can be smaller, so `lam` is recomputed as
  the fraction of the image left untouched. Targets are
  `lam * y + (1 - lam) * y_flip` with smoothed one-hots `y`
  (`1 - s + s/K` on the class, `s/K` elsewhere); each row sums to 1.

  Args:
    images: `[B, H, W, C]` (NHWC) floats.
    labels: `[B]` integer classes.
    rng: numpy generator (all randomness is drawn from it).
    num_classes: K.
    mixup_alpha: Beta parameter of Mixup (0 disables Mixup).
    cutmix_alpha: Beta parameter of CutMix (0 disables CutMix).
    switch_prob: probability of CutMix when both are enabled.
    smoothing: label smoothing folded into the targets.
    prob: probability of mixing a batch at all.

  Returns:
    `(images [B, H, W, C] float32, targets [B, K] float32)`.

  References:
    Zhang et al., "mixup", ICLR 2018; Yun et al., "CutMix", ICCV 2019;
    timm `data/mixup.py` (`Mixup`, mode "batch", `correct_lam=True`).
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels).astype(np.int64)
  if images.ndim != 4 or labels.shape != images.shape[:1]:
    raise ValueError(
      f"expected images [B, H, W, C] and labels [B], got {images.shape} and "
      f"{labels.shape}"
    )
  lam, use_cutmix = 1.0, False
  if (mixup_alpha > 0 or cutmix_alpha > 0) and rng.random() < prob:
    if mixup_alpha > 0 and cutmix_alpha > 0:
      use_cutmix = bool(rng.random() < switch_prob)
    else:
      use_cutmix = cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))

  partner = images[::-1]
  mixed = images.copy()
  if lam < 1.0:
    if use_cutmix:
      h, w = images.shape[1:3]
      y0, y1, x0, x1 = _cutmix_box(h, w, lam, rng)
      mixed[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
      lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    else:
      mixed = lam * images + (1.0 - lam) * partner
  y = _smooth_one_hot(labels, num_classes, smoothing)
  targets = lam * y + (1.0 - lam) * y[::-1]
  return mixed.astype(np.float32), targets.astype(np.float32)
