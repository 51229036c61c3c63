"""Evaluation metrics for MTAG on MOSI (regression) and IEMOCAP (4 x binary).

These run on the host, in NumPy, on the concatenated predictions and labels
of a whole split (after padded samples have been dropped), exactly as the
official evaluation does. Weighted F1 is implemented here rather than taken
from scikit-learn so the library does not depend on it; it reproduces
``sklearn.metrics.f1_score(average="weighted")`` including its zero-division
convention.

References:
  Yang et al., "MTAG: Modal-Temporal Attention Graph for Unaligned Human
  Multimodal Language Sequences", NAACL 2021. Official ``main.py``:
  ``eval_mosi_mosei`` and ``eval_iemocap`` (spec ``mtag.md`` §8).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
  "IEMOCAP_EMOTIONS",
  "iemocap_metrics",
  "mosi_metrics",
  "train_sign_accuracy",
  "weighted_f1",
]

# Emotion order of the IEMOCAP label columns and of the (B, 4, 2) logits.
IEMOCAP_EMOTIONS: tuple[str, str, str, str] = (
  "neutral",
  "happy",
  "sad",
  "angry",
)


def _as_array(x: ArrayLike, name: str) -> np.ndarray:
  arr = np.asarray(x)
  if arr.size == 0:
    raise ValueError(f"{name} is empty; metrics need at least one sample")
  if arr.dtype.kind in "fc" and np.isnan(arr).any():
    raise ValueError(f"{name} contains NaN")
  return arr


def _as_pair(
  a: ArrayLike, b: ArrayLike, name_a: str, name_b: str
) -> tuple[np.ndarray, np.ndarray]:
  a = _as_array(a, name_a)
  b = _as_array(b, name_b)
  if a.shape != b.shape:
    raise ValueError(
      f"{name_a} and {name_b} must have the same shape, got {name_a} "
      f"{a.shape} and {name_b} {b.shape}"
    )
  return a.ravel(), b.ravel()


def weighted_f1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
  """Support-weighted mean of per-class F1 scores.

  Matches ``sklearn.metrics.f1_score(y_true, y_pred, average="weighted")``:
  the classes are the union of the labels in ``y_true`` and ``y_pred``; each
  class's F1 is ``2 tp / (2 tp + fp + fn)``, taken as 0 when that is 0/0
  (sklearn's default zero-division value, without its warning); the weight
  of a class is its support in ``y_true``, so a class that only occurs in
  ``y_pred`` gets weight 0 (its predictions still count as misses of the
  true classes, lowering their recall).

  Args:
    y_true: Ground-truth labels, any shape (flattened). Any dtype that
      ``np.unique`` can sort: bools, integers, or integral floats such as
      rounded sentiment scores (``-0.0`` equals ``0.0``).
    y_pred: Predicted labels, same shape as ``y_true``.

  Returns:
    The weighted F1 as a Python float.

  Raises:
    ValueError: If an input is empty or contains NaN, or the shapes differ.

  References:
    MTAG (NAACL 2021): the official code reports sklearn's weighted F1 for
    every F1 number (spec §8).
  """
  t, p = _as_pair(y_true, y_pred, "y_true", "y_pred")
  classes, inverse = np.unique(np.concatenate([t, p]), return_inverse=True)
  inverse = inverse.ravel()
  t_idx, p_idx = inverse[: t.size], inverse[t.size :]
  k = classes.size
  tp = np.bincount(t_idx[t_idx == p_idx], minlength=k).astype(np.float64)
  support = np.bincount(t_idx, minlength=k).astype(np.float64)
  predicted = np.bincount(p_idx, minlength=k).astype(np.float64)
  # 2 tp + fp + fn == support + predicted.
  den = support + predicted
  f1 = np.divide(2.0 * tp, den, out=np.zeros(k), where=den > 0)
  return float(np.sum(f1 * support) / np.sum(support))


def _accuracy(t: np.ndarray, p: np.ndarray) -> float:
  return float(np.mean(t == p))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  # np.corrcoef, as the official code uses; a constant input gives NaN (0/0),
  # which is returned as is rather than warned about.
  with np.errstate(divide="ignore", invalid="ignore"):
    return float(np.corrcoef(x, y)[0, 1])


def mosi_metrics(preds: ArrayLike, labels: ArrayLike) -> dict[str, float]:
  """MOSI/MOSEI regression metrics of the official ``eval_mosi_mosei``.

  Keys:
    * ``mae``: mean |y - y_hat|.
    * ``corr``: Pearson correlation, ``np.corrcoef(y_hat, y)[0, 1]`` (NaN if
      either input is constant).
    * ``acc2``: accuracy of (y >= 0) vs (y_hat >= 0), zeros included
      (the official "acc").
    * ``acc2_nonzero``: accuracy of (y > 0) vs (y_hat > 0) on the samples
      with y != 0 (the MulT convention, official "ex_zero_acc").
    * ``acc7``: accuracy of round(clip(y_hat, -3, 3)) vs round(clip(y, -3,
      3)), with NumPy's round-half-to-even (2.5 -> 2, -0.5 -> -0).
    * ``f1``: weighted F1 on (y >= 0, y_hat >= 0) (official "f1_raven").
    * ``f1_nonzero``: weighted F1 on (y > 0, y_hat > 0) over y != 0
      (official "f1_mult").
    * ``f1_7``: weighted multiclass F1 on (round(y), round(y_hat)), **not
      clipped**, as the official "f1_mfn" is (only Acc7 clips). A prediction
      of 4.2 therefore forms its own class 4.

  When no label is nonzero, ``acc2_nonzero`` and ``f1_nonzero`` are NaN
  (the official code would fail on the empty subset).

  Args:
    preds: Predicted sentiment scores, shape (N,) (any shape, flattened).
    labels: True sentiment scores in [-3, 3], same shape as ``preds``.

  Returns:
    A dict of Python floats with the keys above.

  Raises:
    ValueError: If an input is empty or contains NaN, or the shapes differ.

  References:
    MTAG (NAACL 2021), official ``main.py`` ``eval_mosi_mosei`` (spec §8.1).
  """
  p, y = _as_pair(preds, labels, "preds", "labels")
  p = p.astype(np.float64)
  y = y.astype(np.float64)
  nonzero = y != 0
  if nonzero.any():
    acc2_nz = _accuracy(y[nonzero] > 0, p[nonzero] > 0)
    f1_nz = weighted_f1(y[nonzero] > 0, p[nonzero] > 0)
  else:
    acc2_nz = f1_nz = float("nan")
  return {
    "mae": float(np.mean(np.abs(y - p))),
    "corr": _pearson(p, y),
    "acc2": _accuracy(y >= 0, p >= 0),
    "acc2_nonzero": acc2_nz,
    # np.round rounds half to even; floor(x + 0.5) would not match.
    "acc7": _accuracy(
      np.round(np.clip(y, -3.0, 3.0)), np.round(np.clip(p, -3.0, 3.0))
    ),
    "f1": weighted_f1(y >= 0, p >= 0),
    "f1_nonzero": f1_nz,
    "f1_7": weighted_f1(np.round(y), np.round(p)),
  }


def train_sign_accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
  """Fraction of samples with sign(y) == sign(y_hat).

  This is the official train-time "accuracy": a label of exactly 0 only
  matches a prediction of exactly 0, unlike ``acc2``.

  Args:
    preds: Predicted scores, shape (N,).
    labels: True scores, same shape.

  Returns:
    The accuracy as a Python float.

  Raises:
    ValueError: If an input is empty or contains NaN, or the shapes differ.

  References:
    MTAG (NAACL 2021), official ``main.py`` train loop (spec §8.1).
  """
  p, y = _as_pair(preds, labels, "preds", "labels")
  return _accuracy(np.sign(y), np.sign(p))


def iemocap_metrics(logits: ArrayLike, labels: ArrayLike) -> dict[str, float]:
  """Per-emotion accuracy and weighted F1 of the official ``eval_iemocap``.

  The logits are read as (N, 4, 2) and the prediction per emotion is the
  argmax over the last axis (ties go to class 0, as ``np.argmax`` does).

  Args:
    logits: (N, 4, 2) or (N, 8) logits (or probabilities).
    labels: (N, 4) labels in {0, 1}, columns ordered as
      ``IEMOCAP_EMOTIONS``.

  Returns:
    A dict with ``"{emotion}/acc"`` and ``"{emotion}/f1"`` for each emotion
    in ``IEMOCAP_EMOTIONS``, plus ``mean/acc`` and ``mean/f1``, the plain
    averages over the four emotions (a convenience; the official code only
    logs the per-emotion numbers).

  Raises:
    ValueError: If an input is empty or contains NaN, a shape is wrong, or a
      label is not 0 or 1.

  References:
    MTAG (NAACL 2021), official ``main.py`` ``eval_iemocap`` (spec §8.2).
  """
  x = _as_array(logits, "logits")
  y = _as_array(labels, "labels")
  n = x.shape[0] if x.ndim else 0
  if x.ndim == 2 and x.shape[1] == 8:
    x = x.reshape(n, 4, 2)
  if x.ndim != 3 or x.shape[1:] != (4, 2):
    raise ValueError(
      f"logits must have shape (N, 4, 2) or (N, 8), got {np.shape(logits)}"
    )
  if y.shape != (n, 4):
    raise ValueError(
      f"labels must have shape ({n}, 4) to match logits, got {y.shape}"
    )
  if not np.isin(y, (0, 1)).all():
    raise ValueError("labels must contain only 0 and 1")
  y = y.astype(np.int64)
  pred = np.argmax(x, axis=-1)
  out: dict[str, float] = {}
  for e, name in enumerate(IEMOCAP_EMOTIONS):
    out[f"{name}/acc"] = _accuracy(y[:, e], pred[:, e])
    out[f"{name}/f1"] = weighted_f1(y[:, e], pred[:, e])
  out["mean/acc"] = float(np.mean([out[f"{e}/acc"] for e in IEMOCAP_EMOTIONS]))
  out["mean/f1"] = float(np.mean([out[f"{e}/f1"] for e in IEMOCAP_EMOTIONS]))
  return out
