"""TF-IDF of token n-grams and sparse ridge, against scikit-learn."""

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import Ridge

from experiments.reports import tfidf


def _sentences(n, seed=0, vocab=30, max_len=10):
  """Padded ``<s> ... </s>`` rows and ratings that follow a few ids."""
  rng = np.random.default_rng(seed)
  ids = np.ones((n, max_len), np.int32)
  for row in ids:
    k = int(rng.integers(3, max_len + 1))
    row[0], row[1 : k - 1], row[k - 1] = 0, rng.integers(4, vocab, k - 2), 2
  y = (ids == 5).sum(1) - (ids == 6).sum(1) + 0.3 * rng.standard_normal(n)
  return ids, y


def test_ngrams_skip_the_wrapping_and_padding():
  ids = np.array([[0, 7, 8, 7, 2, 1, 1]])
  (grams,) = tfidf.sentence_ngrams(ids)
  assert grams == [(7,), (8,), (7,), (7, 8), (8, 7)]
  assert tfidf.sentence_ngrams(ids, orders=(2,)) == [[(7, 8), (8, 7)]]


def test_tfidf_matches_sklearn():
  ids, _ = _sentences(30)
  docs = tfidf.sentence_ngrams(ids)
  fitted = tfidf.fit_tfidf(docs[:20])
  ours = tfidf.transform(fitted, docs).toarray()
  theirs = TfidfVectorizer(analyzer=lambda d: d).fit(docs[:20])
  want = theirs.transform(docs).toarray()
  # The same features, perhaps in another column order: compare Gram
  # matrices, and each n-gram's column.
  np.testing.assert_allclose(ours @ ours.T, want @ want.T, atol=1e-12)
  for gram, col in fitted.vocabulary.items():
    np.testing.assert_allclose(
      ours[:, col], want[:, theirs.vocabulary_[gram]], atol=1e-12
    )
  # n-grams never seen in training leave an all-zero row.
  empty = tfidf.transform(fitted, [[(99,)]])
  assert empty.toarray().sum() == 0


@pytest.mark.parametrize("alpha", [0.01, 1.0, 30.0])
def test_ridge_matches_sklearn_with_an_intercept(alpha):
  ids, y = _sentences(40, seed=1)
  docs = tfidf.sentence_ngrams(ids)
  x = tfidf.transform(tfidf.fit_tfidf(docs), docs)
  w, b = tfidf.fit_ridge(x, y, alpha)
  want = Ridge(alpha=alpha, solver="cholesky").fit(x.toarray(), y)
  np.testing.assert_allclose(w, want.coef_, atol=1e-7)
  assert b == pytest.approx(want.intercept_, abs=1e-7)
  # Warm-started from another penalty's solution: the same answer.
  again, _ = tfidf.fit_ridge(x, y, alpha, init=np.ones_like(w))
  np.testing.assert_allclose(again, w, atol=1e-7)
  with pytest.raises(ValueError, match="positive"):
    tfidf.fit_ridge(x, y, 0.0)


def test_tfidf_ridge_picks_the_penalty_on_valid():
  ids, y = _sentences(120, seed=2)
  splits = {
    "train": (ids[:80], y[:80]),
    "valid": (ids[80:100], y[80:100]),
    "test": (ids[100:], y[100:]),
  }
  alpha, preds = tfidf.tfidf_ridge(splits, alphas=(0.1, 1.0, 1e4))
  assert set(preds) == {"train", "valid", "test"}
  assert preds["test"].shape == (20,)
  # A huge penalty predicts about the mean: the valid split never picks it.
  assert alpha in (0.1, 1.0)
  assert np.corrcoef(preds["test"], y[100:])[0, 1] > 0.5
