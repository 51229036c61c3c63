"""Linear probes: softmax regression on frozen features, tuned on valid.

A probe asks what a frozen encoder's features (or the raw pixels) can tell
apart with a linear map. `fit_softmax` is multinomial logistic regression
with an L2 penalty, fitted full-batch by L-BFGS (`optax.lbfgs`) on
features standardised with the training statistics; `probe` fits one per
penalty of a grid, keeps the best by validation accuracy and reports it on
the test split -- the test images never pick anything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2vjax.datasets import images as images_lib

Split = tuple[np.ndarray, np.ndarray]

# L2 penalties tried, on the mean loss of standardised features.
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def probe_images(images: np.ndarray, size: int) -> np.ndarray:
  """Whole uint8 images, resized and normalised as pretraining sees them."""
  boxes = np.tile([0, 0, *images.shape[1:]], (len(images), 1))
  x = images_lib.resize_boxes(images, boxes, size) / np.float32(255)
  x = (x - images_lib.MEAN) / images_lib.STD
  return np.repeat(x[..., None], 3, axis=-1).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _pooled(encoder: Any, params: Any, images: jax.Array) -> jax.Array:
  return encoder.apply({"params": params}, images)[0][:, 1:].mean(1)


def encoder_features(
  encoder: Any,
  params: Any,
  images: np.ndarray,
  *,
  batch: int = 256,
  progress: Callable[[Any], Any] = lambda it: it,
) -> np.ndarray:
  """Mean of the patch tokens of a ViT encoder's final output, ``[N, C]``.

  Args:
    encoder: a `d2vjax` vision encoder module.
    params: its parameters.
    images: ``[N, H, W, 3]`` normalised images (`probe_images`).
    batch: images per forward pass; the last one is padded (one shape,
      compiled once per encoder for every split).
    progress: wraps the batch iterator (e.g. ``tqdm``).

  Returns:
    float32 features.
  """
  parts = []
  for lo in progress(range(0, len(images), batch)):
    chunk = images[lo : lo + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    parts.append(np.asarray(_pooled(encoder, params, chunk))[: batch - pad])
  return np.concatenate(parts).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(
  x: jax.Array, y: jax.Array, l2: jax.Array, *, num_classes: int, steps: int
) -> dict[str, jax.Array]:
  """L-BFGS on the penalised loss; `l2` traced, so one compile per shape."""

  def loss(p):
    logits = x @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def body(_, carry):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(
      grad, state, p, value=value, grad=grad, value_fn=loss
    )
    return optax.apply_updates(p, updates), state

  init = {
    "w": jnp.zeros((x.shape[1], num_classes)),
    "b": jnp.zeros((num_classes,)),
  }
  return jax.lax.fori_loop(0, steps, body, (init, opt.init(init)))[0]


def fit_softmax(
  x: np.ndarray, y: np.ndarray, *, num_classes: int, l2: float, steps: int
) -> dict[str, jax.Array]:
  """Multinomial logistic regression with an L2 penalty on the weights.

  Args:
    x: ``[N, D]`` standardised features.
    y: ``[N]`` integer labels.
    num_classes: the number of classes.
    l2: the penalty's weight (on ``sum(w ** 2) / 2``, beside the mean
      cross-entropy).
    steps: L-BFGS iterations.

  Returns:
    ``{"w": [D, K], "b": [K]}``.
  """
  return _fit(
    jnp.asarray(x),
    jnp.asarray(y),
    jnp.float32(l2),
    num_classes=num_classes,
    steps=steps,
  )


def _accuracy(p: dict[str, jax.Array], x: np.ndarray, y: np.ndarray) -> float:
  predicted = np.asarray(jnp.argmax(jnp.asarray(x) @ p["w"] + p["b"], -1))
  return float(np.mean(predicted == y))


def probe(
  train: Split,
  valid: Split,
  test: Split,
  *,
  num_classes: int,
  l2_grid: Sequence[float] = L2_GRID,
  steps: int = 300,
) -> dict[str, float]:
  """Fits a probe per penalty; reports the best on valid, scored on test.

  Args:
    train, valid, test: ``(features [N, D], labels [N])``.
    num_classes: the number of classes.
    l2_grid: penalties tried.
    steps: L-BFGS iterations per fit.

  Returns:
    ``valid/accuracy``, ``test/accuracy`` and the chosen ``l2``.

  Raises:
    ValueError: for features that are not finite.
  """
  for name, (x, _) in (("train", train), ("valid", valid), ("test", test)):
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{name} features hold NaN or inf: the encoder diverged")
  mean = train[0].mean(0)
  std = train[0].std(0) + 1e-6
  scaled = [((x - mean) / std, y) for x, y in (train, valid, test)]
  best = None
  for l2 in l2_grid:
    p = fit_softmax(*scaled[0], num_classes=num_classes, l2=l2, steps=steps)
    score = _accuracy(p, *scaled[1])
    if best is None or score > best[0]:
      best = (score, l2, p)
  score, l2, p = best
  return {
    "valid/accuracy": score,
    "test/accuracy": _accuracy(p, *scaled[2]),
    "l2": l2,
  }


# Ridge penalties tried, on the summed squared error of standardised
# features.
RIDGE_GRID = (1.0, 10.0, 100.0, 1_000.0, 10_000.0)


def ridge_probe(
  splits: dict[str, tuple[np.ndarray, np.ndarray]],
  *,
  alphas: tuple[float, ...] = RIDGE_GRID,
) -> tuple[float, dict[str, np.ndarray]]:
  """Ridge regression of real targets on frozen features.

  Features are standardised with the ``train`` split's statistics; the
  intercept is not penalised. The penalty with the best Pearson correlation
  on ``valid`` is kept (the largest of ties).

  Args:
    splits: ``(features [n, D], targets [n])`` for ``train``, ``valid`` and
      any others to predict.
    alphas: the penalties tried (positive).

  Returns:
    ``(alpha, predictions)``: the chosen penalty and its predictions for
    every split.
  """
  x_train, y_train = (np.asarray(a, np.float64) for a in splits["train"])
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  x = {s: (np.asarray(f, np.float64) - mu) / sd for s, (f, _) in splits.items()}
  gram = x["train"].T @ x["train"]
  rhs = x["train"].T @ (y_train - y_train.mean())
  y_valid = np.asarray(splits["valid"][1], np.float64)
  best = None
  for alpha in sorted(alphas, reverse=True):
    w = np.linalg.solve(gram + alpha * np.eye(len(gram)), rhs)
    pred = x["valid"] @ w + y_train.mean()
    score = np.corrcoef(pred, y_valid)[0, 1] if pred.std() > 0 else np.nan
    if best is None or score > best[0] or np.isnan(best[0]):
      best = (score, alpha, w)
  _, alpha, w = best
  return alpha, {s: m @ w + y_train.mean() for s, m in x.items()}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _text_pooled(encoder: Any, params: Any, ids: jax.Array, pad_id: int):
  mask = (ids != pad_id).astype(jnp.int32)
  hidden = encoder.apply({"params": params}, ids, attention_mask=mask)[0]
  real = mask[..., None].astype(hidden.dtype)
  mean = (hidden * real).sum(1) / jnp.maximum(real.sum(1), 1)
  return jnp.concatenate([mean, hidden[:, 0]], axis=-1)


def text_features(
  encoder: Any, params: Any, ids: np.ndarray, *, pad_id: int, batch: int = 256
) -> np.ndarray:
  """A text encoder's final output: mean of the real tokens, then ``<s>``.

  Args:
    encoder: a `d2vjax` text encoder module.
    params: its parameters.
    ids: ``[N, L]`` token ids, padded with `pad_id`.
    pad_id: the padding id.
    batch: sentences per forward pass; the last one is padded (one shape).

  Returns:
    float32 ``[N, 2 C]``.
  """
  parts = []
  for lo in range(0, len(ids), batch):
    chunk = ids[lo : lo + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out = _text_pooled(encoder, params, jnp.asarray(chunk), pad_id)
    parts.append(np.asarray(out)[: batch - pad])
  return np.concatenate(parts).astype(np.float32)
