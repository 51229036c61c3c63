"""TF-IDF features of token n-grams, and ridge regression on them.

The bag-of-words baseline of the text table
(`experiments.tables.d2v_text`): each sentence is the set of its token
unigrams and bigrams (the ids of the corpus BPE that the encoders read,
``<s>``, ``</s>`` and ``<pad>`` left out), weighted by TF-IDF as
scikit-learn's ``TfidfVectorizer`` does by default -- raw counts times
``ln((1 + n) / (1 + df)) + 1``, each row scaled to unit L2 norm -- with
the vocabulary and document frequencies of the training sentences.
`fit_ridge` is ridge regression with an unpenalised intercept (as
``sklearn.linear_model.Ridge``), solved by conjugate gradients on the
sparse features, so that neither the features nor their Gram matrix are
ever dense. `tfidf_ridge` fits one per penalty and keeps the one with the
best validation Pearson correlation; the test split picks nothing.

Only numpy: scikit-learn is a test dependency, against which the tests
check both halves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from d2vjax.datasets import text as text_lib

Ngram = tuple[int, ...]
Split = tuple[np.ndarray, np.ndarray]

# Penalties tried, on the summed squared error (sklearn's ``alpha``).
ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
ORDERS = (1, 2)
# Wrapping and padding: not words of the sentence.
SKIP_IDS = (text_lib.BOS_ID, text_lib.PAD_ID, text_lib.EOS_ID)


class SparseRows(NamedTuple):
  """A sparse ``[n, f]`` matrix as coordinates (no duplicates).

  Attributes:
    rows, cols: int64 coordinates of the stored entries.
    values: float64 entries.
    shape: ``(n, f)``.
  """

  rows: np.ndarray
  cols: np.ndarray
  values: np.ndarray
  shape: tuple[int, int]

  def dot(self, v: np.ndarray) -> np.ndarray:
    """``X @ v`` for ``v`` of shape ``[f]``."""
    return np.bincount(
      self.rows, weights=self.values * v[self.cols], minlength=self.shape[0]
    )

  def tdot(self, u: np.ndarray) -> np.ndarray:
    """``X.T @ u`` for ``u`` of shape ``[n]``."""
    return np.bincount(
      self.cols, weights=self.values * u[self.rows], minlength=self.shape[1]
    )

  def toarray(self) -> np.ndarray:
    """The dense matrix (for small ones: tests, inspection)."""
    out = np.zeros(self.shape)
    out[self.rows, self.cols] = self.values
    return out


class Tfidf(NamedTuple):
  """A fitted TF-IDF map.

  Attributes:
    vocabulary: n-gram -> column.
    idf: ``[f]`` inverse document frequencies.
  """

  vocabulary: dict[Ngram, int]
  idf: np.ndarray


def sentence_ngrams(
  ids: np.ndarray,
  orders: Sequence[int] = ORDERS,
  skip_ids: Iterable[int] = SKIP_IDS,
) -> list[list[Ngram]]:
  """The token n-grams of each sentence, in order, repeats kept.

  Args:
    ids: ``[n, length]`` token ids of padded sentences.
    orders: n-gram lengths.
    skip_ids: ids removed before the n-grams are formed.

  Returns:
    Per sentence, its n-grams as tuples of ids.
  """
  ids = np.asarray(ids)
  keep = ~np.isin(ids, list(skip_ids))
  out = []
  for row, mask in zip(ids, keep, strict=True):
    tokens = row[mask].tolist()
    out.append(
      [
        tuple(tokens[i : i + k])
        for k in orders
        for i in range(len(tokens) - k + 1)
      ]
    )
  return out


def fit_tfidf(docs: Sequence[Sequence[Ngram]]) -> Tfidf:
  """The vocabulary and smoothed IDF of the training documents."""
  vocabulary: dict[Ngram, int] = {}
  df: list[int] = []
  for doc in docs:
    for gram in set(doc):
      col = vocabulary.setdefault(gram, len(vocabulary))
      if col == len(df):
        df.append(0)
      df[col] += 1
  n = len(docs)
  idf = np.log((1 + n) / (1 + np.asarray(df, np.float64))) + 1
  return Tfidf(vocabulary, idf)


def transform(tfidf: Tfidf, docs: Sequence[Sequence[Ngram]]) -> SparseRows:
  """TF-IDF rows of unit L2 norm; n-grams outside the vocabulary dropped.

  A document with none of the vocabulary's n-grams is a row of zeros.
  """
  rows, cols = [], []
  for r, doc in enumerate(docs):
    found = [tfidf.vocabulary[g] for g in doc if g in tfidf.vocabulary]
    rows += [r] * len(found)
    cols += found
  rows = np.asarray(rows, np.int64)
  cols = np.asarray(cols, np.int64)
  # Raw counts: merge the repeats of an n-gram within a document.
  width = len(tfidf.idf)
  keys, counts = np.unique(rows * width + cols, return_counts=True)
  rows, cols = keys // width, keys % width
  values = counts * tfidf.idf[cols]
  norms = np.sqrt(np.bincount(rows, weights=values**2, minlength=len(docs)))
  values = values / norms[rows]
  return SparseRows(rows, cols, values, (len(docs), width))


def fit_ridge(
  x: SparseRows,
  y: np.ndarray,
  alpha: float,
  *,
  tol: float = 1e-10,
  max_iter: int = 10_000,
  init: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
  """Ridge regression with an intercept, by conjugate gradients.

  Minimises ``|y - X w - b|^2 + alpha |w|^2`` over ``(w, b)``: the
  intercept is unpenalised, which is ridge on centred columns and
  targets. Centring would make `x` dense, so it is applied inside the
  matrix-vector products instead.

  Args:
    x: ``[n, f]`` features.
    y: ``[n]`` targets.
    alpha: the penalty (> 0).
    tol: stop when the residual norm falls below `tol` times the
      right-hand side's.
    max_iter: at most this many iterations.
    init: a starting ``w`` (e.g. the solution for a nearby `alpha`).

  Returns:
    ``(w [f], b)``.

  Raises:
    ValueError: for a penalty that is not positive.
  """
  if not alpha > 0:
    raise ValueError(f"alpha={alpha}: the ridge penalty must be positive")
  y = np.asarray(y, np.float64)
  n = x.shape[0]
  mu = x.tdot(np.ones(n)) / n  # column means
  y_mean = y.mean()

  def normal(v: np.ndarray) -> np.ndarray:
    # (Xc^T Xc + alpha I) v with Xc = X - 1 mu^T.
    xv = x.dot(v) - mu @ v
    return x.tdot(xv) - mu * xv.sum() + alpha * v

  rhs = x.tdot(y - y_mean)  # Xc^T (y - mean): the mu term sums to 0
  w = np.zeros(x.shape[1]) if init is None else np.array(init, np.float64)
  r = rhs - normal(w)
  p = r.copy()
  rr = r @ r
  stop = (tol * np.linalg.norm(rhs)) ** 2
  for _ in range(max_iter):
    if rr <= stop:
      break
    ap = normal(p)
    step = rr / (p @ ap)
    w += step * p
    r -= step * ap
    rr, rr_old = r @ r, rr
    p = r + (rr / rr_old) * p
  return w, float(y_mean - mu @ w)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
  if a.std() == 0 or b.std() == 0:
    return float("nan")
  return float(np.corrcoef(a, b)[0, 1])


def tfidf_ridge(
  splits: Mapping[str, Split],
  *,
  alphas: Sequence[float] = ALPHAS,
  orders: Sequence[int] = ORDERS,
) -> tuple[float, dict[str, np.ndarray]]:
  """Fits TF-IDF and a ridge per penalty on ``train``; picks one on ``valid``.

  Args:
    splits: ``(ids [n, length], targets [n])`` for ``train``, ``valid`` and
      any others to predict (``test``).
    alphas: penalties tried; the one with the highest validation Pearson
      correlation is kept (the largest of ties).
    orders: n-gram lengths.

  Returns:
    ``(alpha, predictions)``: the chosen penalty and its predictions for
    every split.
  """
  docs = {s: sentence_ngrams(ids, orders) for s, (ids, _) in splits.items()}
  tfidf = fit_tfidf(docs["train"])
  x = {s: transform(tfidf, d) for s, d in docs.items()}
  y_train, y_valid = splits["train"][1], splits["valid"][1]
  best, w = None, None
  # Largest penalty first: each solution starts the next, less smooth one.
  for alpha in sorted(alphas, reverse=True):
    w, b = fit_ridge(x["train"], y_train, alpha, init=w)
    score = _pearson(x["valid"].dot(w) + b, np.asarray(y_valid, np.float64))
    if best is None or score > best[0] or np.isnan(best[0]):
      best = (score, alpha, w.copy(), b)
  _, alpha, w, b = best
  return alpha, {s: m.dot(w) + b for s, m in x.items()}
