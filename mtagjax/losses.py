"""Training losses for MTAG: regression (MOSI) and per-emotion CE (IEMOCAP).

Every loss here is a mean over the *real* samples of a batch. Batches are
padded to a fixed number of graphs so that one compiled step serves a whole
epoch; the padded rows carry whatever the model made of an empty graph, so
each loss takes an optional ``mask`` over the leading (sample) axis. A mask
may be boolean or a float weight per sample; the result is then
``sum(w * l) / sum(w)``, i.e. the plain mean over the real samples when the
mask is boolean. Masked rows are zeroed *before* the loss is evaluated so
that NaN or inf in a padded row cannot leak into the value or the gradient.
A batch with no real sample gives a loss of 0 (and a zero gradient).

All functions are written in ``jax.numpy`` and can be used inside ``jax.jit``;
shape checks happen at trace time and raise ``ValueError`` naming the
offending argument. Losses are computed in at least float32.

References:
  Yang et al., "MTAG: Modal-Temporal Attention Graph for Unaligned Human
  Multimodal Language Sequences", NAACL 2021. The official training code
  (``main.py``) uses ``nn.SmoothL1Loss()`` for MOSI, ``nn.CrossEntropyLoss()``
  over ``view(-1, 2)`` for IEMOCAP, an optional inverse-sample-count weighted
  CE, and ``loss / |loss.detach()|`` normalisation (spec ``mtag.md`` §7).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "IEMOCAP_POSITIVES",
  "IEMOCAP_TRAIN_SIZE",
  "iemocap_cross_entropy",
  "iemocap_inverse_count_weights",
  "l1",
  "mse",
  "normalize_loss",
  "smooth_l1",
]

# Positive counts per emotion (Neutral, Happy, Sad, Angry) among the 2717
# IEMOCAP training samples, as hard-coded in the official weighted CE.
IEMOCAP_POSITIVES: tuple[int, int, int, int] = (954, 338, 690, 735)
IEMOCAP_TRAIN_SIZE: int = 2717

_NUM_EMOTIONS = 4


def _as_float(x: jax.Array) -> jax.Array:
  """Promotes to at least float32, keeping float64 when x64 is on."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_mask(mask: jax.Array | None, batch: int) -> jax.Array | None:
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != (batch,):
    raise ValueError(
      f"mask must have shape ({batch},) (one entry per sample), got "
      f"{mask.shape}"
    )
  return mask


def _sample_weights(mask: jax.Array | None, dtype) -> jax.Array | None:
  if mask is None:
    return None
  return mask.astype(dtype)


def _expand(w: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a (B,) vector so it broadcasts against a rank-ndim array."""
  return w.reshape(w.shape + (1,) * (ndim - 1))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  # A division whose denominator is replaced by 1 where it is 0, so that
  # neither the value nor the gradient becomes NaN for an all-padding batch
  # (the numerator is then 0 as well).
  return num / jnp.where(den > 0, den, jnp.ones_like(den))


def _elementwise_regression(
  pred: jax.Array,
  target: jax.Array,
  mask: jax.Array | None,
  fn,
) -> jax.Array:
  pred = _as_float(pred)
  target = _as_float(target)
  if pred.shape != target.shape:
    raise ValueError(
      f"pred and target must have the same shape, got pred {pred.shape} and "
      f"target {target.shape}"
    )
  if pred.ndim == 0:
    if mask is not None:
      raise ValueError("mask needs pred with a leading sample axis")
    return fn(pred - target)
  mask = _check_mask(mask, pred.shape[0])
  diff = pred - target
  if mask is None:
    return jnp.mean(fn(diff))
  w = _expand(_sample_weights(mask, diff.dtype), diff.ndim)
  keep = w != 0
  # Zero the padded rows first: fn(0) == 0 and its gradient is finite there.
  diff = jnp.where(keep, diff, jnp.zeros_like(diff))
  per_elem = jnp.where(keep, fn(diff) * w, jnp.zeros_like(diff))
  elems_per_sample = int(np.prod(diff.shape[1:], dtype=np.int64))
  den = jnp.sum(_sample_weights(mask, diff.dtype)) * elems_per_sample
  return _safe_div(jnp.sum(per_elem), den)


def smooth_l1(
  pred: jax.Array,
  target: jax.Array,
  *,
  beta: float = 1.0,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Smooth-L1 (Huber-like) loss with PyTorch ``nn.SmoothL1Loss`` semantics.

  Per element, with d = pred - target: ``0.5 * d**2 / beta`` if
  ``|d| < beta``, else ``|d| - 0.5 * beta``. ``beta == 0`` is plain L1, as in
  PyTorch. Reduction is the mean over all elements of the real samples.

  Args:
    pred: Predictions, shape (B, ...). MOSI uses (B,).
    target: Targets, same shape as ``pred``.
    beta: Transition point between the quadratic and linear parts; must be
      >= 0. The official MOSI run uses the default 1.0.
    mask: Optional (B,) boolean mask or float weights over samples; padded
      samples (mask 0) are ignored.

  Returns:
    A scalar loss.

  Raises:
    ValueError: If ``beta`` is negative or the shapes disagree.

  References:
    MTAG (NAACL 2021), official ``main.py``: ``loss_type sl1`` is
    ``nn.SmoothL1Loss()`` with mean reduction (spec §7).
  """
  beta = float(beta)
  if beta < 0:
    raise ValueError(f"beta must be >= 0, got {beta}")
  if beta == 0.0:
    # PyTorch special-cases beta == 0 to L1 (the formula would divide by 0).
    return l1(pred, target, mask=mask)

  def fn(d):
    ad = jnp.abs(d)
    return jnp.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta)

  return _elementwise_regression(pred, target, mask, fn)


def l1(
  pred: jax.Array,
  target: jax.Array,
  *,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Mean absolute error, averaged over the real samples.

  Args:
    pred: Predictions, shape (B, ...).
    target: Targets, same shape as ``pred``.
    mask: Optional (B,) boolean mask or float weights over samples.

  Returns:
    A scalar loss.

  References:
    MTAG (NAACL 2021), official ``main.py`` (``loss_type`` l1 option).
  """
  return _elementwise_regression(pred, target, mask, jnp.abs)


def mse(
  pred: jax.Array,
  target: jax.Array,
  *,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Mean squared error, averaged over the real samples.

  Arguments and result as for :func:`l1`.

  References:
    MTAG (NAACL 2021), official ``main.py`` (``loss_type`` mse option).
  """
  return _elementwise_regression(pred, target, mask, jnp.square)


def normalize_loss(loss: jax.Array) -> jax.Array:
  """Divides a scalar loss by its own stop-gradient magnitude.

  The value becomes ``sign(loss)`` (so +1 for the non-negative losses here)
  and the gradient becomes ``grad(loss) / |loss|``: a per-batch rescaling of
  the step that the official code switches on with ``use_loss_norm=1``.

  If ``loss == 0`` (e.g. a perfect fit or an all-padding batch) PyTorch would
  produce 0/0 = NaN. Here the loss is returned unchanged instead (value 0,
  gradient ``grad(loss)``), so a degenerate batch cannot poison the params.

  Args:
    loss: A scalar loss.

  Returns:
    The normalised scalar loss.

  References:
    MTAG (NAACL 2021), official ``main.py``:
    ``loss = loss / torch.abs(loss.detach())`` (spec §7, "loss norm"). The
    logged train loss of the official runs is therefore always 1.000.
  """
  loss = jnp.asarray(loss)
  scale = jnp.abs(jax.lax.stop_gradient(loss))
  return _safe_div(loss, scale)


def iemocap_inverse_count_weights(
  positives: Sequence[int] = IEMOCAP_POSITIVES,
  total: int = IEMOCAP_TRAIN_SIZE,
) -> np.ndarray:
  """Per-emotion class weights of the official inverse-sample-count CE.

  Row e is ``[pos_e / total, (total - pos_e) / total]``: the weight of class
  0 (emotion absent) is the *positive* fraction and vice versa, so the rarer
  class gets the larger weight.

  Args:
    positives: Number of positive training samples per emotion, in the
      order (Neutral, Happy, Sad, Angry).
    total: Number of training samples.

  Returns:
    A float64 array of shape (len(positives), 2).

  Raises:
    ValueError: If ``total`` is not positive or a count is out of range.

  References:
    MTAG (NAACL 2021), official ``iemocap_inverse_sample_count_ce_loss.py``
    (spec §7, "IEMOCAP weighted CE").
  """
  pos = np.asarray(positives, dtype=np.float64)
  if pos.ndim != 1:
    raise ValueError(f"positives must be 1-D, got shape {pos.shape}")
  if total <= 0:
    raise ValueError(f"total must be positive, got {total}")
  if np.any(pos < 0) or np.any(pos > total):
    raise ValueError(f"positives must lie in [0, total={total}], got {pos}")
  total = float(total)
  return np.stack([pos / total, (total - pos) / total], axis=-1)


def iemocap_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  *,
  class_weights: jax.Array | np.ndarray | None = None,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Cross-entropy over the four binary IEMOCAP emotion problems.

  Without ``class_weights`` this is the official default: the (B, 8) output
  viewed as (B*4, 2) logits and a plain mean of the B*4 negative
  log-likelihoods. With ``class_weights`` (4, 2), each emotion e gets its own
  weighted-mean CE, ``sum_b w[e, y_be] * nll_be / sum_b w[e, y_be]`` (the
  ``weight=`` semantics of PyTorch's CrossEntropyLoss), and the four are
  averaged.

  Args:
    logits: (B, 4, 2) or (B, 8) logits; (B, 8) is read as (B, 4, 2), i.e.
      emotion-major with the two logits of an emotion adjacent.
    labels: (B, 4) integer labels in {0, 1}. Values outside {0, 1} are not
      checked (they cannot be inside ``jit``) and give a wrong loss.
    class_weights: Optional (4, 2) weights, e.g.
      ``iemocap_inverse_count_weights()``.
    mask: Optional (B,) boolean mask or float weights over samples. A float
      weight multiplies the class weight of each of the sample's problems.

  Returns:
    A scalar loss.

  Raises:
    ValueError: If a shape is wrong.

  References:
    MTAG (NAACL 2021), official ``main.py`` (``outputs.view(-1, 2)`` into
    ``nn.CrossEntropyLoss()``) and ``iemocap_inverse_sample_count_ce_loss.py``
    (spec §7).
  """
  logits = _as_float(logits)
  labels = jnp.asarray(labels)
  if logits.ndim == 2 and logits.shape[1] == 2 * _NUM_EMOTIONS:
    logits = logits.reshape(logits.shape[0], _NUM_EMOTIONS, 2)
  if logits.ndim != 3 or logits.shape[1:] != (_NUM_EMOTIONS, 2):
    raise ValueError(
      f"logits must have shape (B, 4, 2) or (B, 8), got {logits.shape}"
    )
  batch = logits.shape[0]
  if labels.shape != (batch, _NUM_EMOTIONS):
    raise ValueError(
      f"labels must have shape ({batch}, 4) to match logits, got {labels.shape}"
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer) and labels.dtype != bool:
    raise ValueError(f"labels must be integers in {{0, 1}}, got {labels.dtype}")
  mask = _check_mask(mask, batch)
  labels = labels.astype(jnp.int32)

  # Per-problem weight: the sample weight times the class weight of the true
  # class. Padded rows get weight 0 and their logits are zeroed so NaN there
  # cannot reach the value or the gradient.
  w = jnp.ones(labels.shape, logits.dtype)
  if mask is not None:
    sw = _sample_weights(mask, logits.dtype)
    w = w * sw[:, None]
    logits = jnp.where((sw != 0)[:, None, None], logits, 0.0)
  if class_weights is not None:
    cw = _as_float(class_weights).astype(logits.dtype)
    if cw.shape != (_NUM_EMOTIONS, 2):
      raise ValueError(f"class_weights must have shape (4, 2), got {cw.shape}")
    # cw[e, labels[b, e]] for every (b, e).
    w = w * jnp.take_along_axis(cw[None], labels[..., None], axis=-1)[..., 0]

  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  weighted = jnp.where(w != 0, w * nll, 0.0)

  if class_weights is None:
    # One pool of B*4 problems (the official view(-1, 2)).
    return _safe_div(jnp.sum(weighted), jnp.sum(w))
  per_emotion = _safe_div(jnp.sum(weighted, axis=0), jnp.sum(w, axis=0))
  return jnp.mean(per_emotion)
