"""Tests for mtagjax.metrics against scikit-learn and NumPy references."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score

from mtagjax import metrics


def _sk_f1(t, p):
  with warnings.catch_warnings():
    # sklearn warns where precision is 0/0 and then uses 0, as we do.
    warnings.simplefilter("ignore", UndefinedMetricWarning)
    return f1_score(t, p, average="weighted")


def _reference_mosi(preds, labels):
  """The official eval_mosi_mosei, re-stated with sklearn and NumPy."""
  truth, preds = np.asarray(labels), np.asarray(preds)
  nz = truth != 0
  p7 = np.clip(preds, -3.0, 3.0)
  t7 = np.clip(truth, -3.0, 3.0)
  return {
    "mae": np.mean(np.abs(truth - preds)),
    "corr": np.corrcoef(preds, truth)[0][1],
    "acc2": accuracy_score(truth >= 0, preds >= 0),
    "acc2_nonzero": accuracy_score(truth[nz] > 0, preds[nz] > 0),
    "acc7": np.sum(np.round(p7) == np.round(t7)) / len(truth),
    "f1": _sk_f1(truth >= 0, preds >= 0),
    "f1_nonzero": _sk_f1(truth[nz] > 0, preds[nz] > 0),
    "f1_7": _sk_f1(np.round(truth), np.round(preds)),
  }


def _assert_same(got, want):
  assert set(got) == set(want)
  for k in want:
    assert isinstance(got[k], float), k
    np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------- weighted F1


def test_weighted_f1_random_vs_sklearn():
  rng = np.random.default_rng(0)
  for n_classes in (2, 3, 7):
    for n in (1, 5, 200):
      t = rng.integers(0, n_classes, n)
      p = rng.integers(0, n_classes, n)
      assert metrics.weighted_f1(t, p) == pytest.approx(_sk_f1(t, p), 1e-12)


@pytest.mark.parametrize(
  "t,p",
  [
    ([1, 1, 1], [1, 1, 1]),  # one class only, perfect
    ([0, 0, 0], [1, 1, 1]),  # one class in each, disjoint
    ([0, 0, 1, 1], [0, 0, 0, 0]),  # a class never predicted
    ([0, 0, 0, 0], [0, 1, 2, 0]),  # classes only in y_pred
    ([True, False, True], [True, True, True]),
    ([-0.0, 0.0, 1.0, -2.0], [0.0, -0.0, 2.0, -2.0]),  # -0 == 0
  ],
)
def test_weighted_f1_edge_cases(t, p):
  assert metrics.weighted_f1(t, p) == pytest.approx(_sk_f1(t, p), 1e-12)


@settings(max_examples=150, deadline=None)
@given(
  st.integers(1, 6).flatmap(
    lambda k: st.lists(
      st.tuples(st.integers(-k, k), st.integers(-k, k)),
      min_size=1,
      max_size=40,
    )
  )
)
def test_weighted_f1_property_vs_sklearn(pairs):
  t = np.array([a for a, _ in pairs])
  p = np.array([b for _, b in pairs])
  assert metrics.weighted_f1(t, p) == pytest.approx(_sk_f1(t, p), abs=1e-12)


def test_weighted_f1_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="y_true is empty"):
    metrics.weighted_f1([], [])
  with pytest.raises(ValueError, match="y_pred contains NaN"):
    metrics.weighted_f1([0.0, 1.0], [0.0, np.nan])
  with pytest.raises(ValueError, match="y_true and y_pred"):
    metrics.weighted_f1([0, 1, 1], [0, 1])


# ---------------------------------------------------------------------- MOSI


def test_mosi_metrics_random_vs_reference():
  rng = np.random.default_rng(1)
  labels = np.round(rng.uniform(-3, 3, 300) * 3) / 3  # MOSI-like averages
  labels[:20] = 0.0
  labels[20:30] = rng.choice([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5], 10)
  preds = rng.normal(size=300) * 1.8
  preds[:5] = 0.0
  preds[30:40] = rng.choice([-3.5, -0.5, 0.5, 2.5, 3.2, 4.6], 10)
  _assert_same(
    metrics.mosi_metrics(preds, labels), _reference_mosi(preds, labels)
  )


def test_mosi_metrics_edge_values_vs_reference():
  labels = np.array([0.0, 0.0, 2.5, -0.5, 1.5, 3.0, -3.0, 2.0, -1.0, 0.4])
  preds = np.array([0.0, -0.1, 2.0, -0.4, 2.4, 4.2, -3.7, 2.5, 0.0, -0.0])
  got = metrics.mosi_metrics(preds, labels)
  _assert_same(got, _reference_mosi(preds, labels))


def test_acc7_rounds_half_to_even_and_clips():
  # 2.5 -> 2, -0.5 -> -0 (== 0), 1.5 -> 2; 4.2 and 3.0 both clip to 3.
  labels = np.array([2.0, 0.0, 2.0, 3.0])
  preds = np.array([2.5, -0.5, 1.5, 4.2])
  got = metrics.mosi_metrics(preds, labels)
  assert got["acc7"] == 1.0
  # floor(x + 0.5) would give 3, 0, 2, 3 -> 0.75; make sure that is not used.
  assert np.mean(np.floor(np.clip(preds, -3, 3) + 0.5) == labels) == 0.75


def test_f1_7_does_not_clip():
  # Acc7 clips 4.2 -> 3 and -3.7 -> -3 (match); f1_7 (official f1_mfn) does
  # not clip, so round(4.2) = 4 and round(-3.7) = -4 miss the labels.
  labels = np.array([3.0, -3.0])
  preds = np.array([4.2, -3.7])
  got = metrics.mosi_metrics(preds, labels)
  assert got["acc7"] == 1.0
  assert got["f1_7"] == 0.0


def test_acc2_includes_zeros_nonzero_excludes_them():
  labels = np.array([0.0, 0.0, 1.0, -1.0])
  preds = np.array([0.0, -0.1, 0.5, 0.2])
  got = metrics.mosi_metrics(preds, labels)
  # y>=0 vs p>=0: T/T ok, T/F miss, T/T ok, F/T miss.
  assert got["acc2"] == 0.5
  # Only the two nonzero labels: hit, miss.
  assert got["acc2_nonzero"] == 0.5


def test_all_zero_labels_give_nan_nonzero_metrics():
  got = metrics.mosi_metrics([0.1, -0.2, 0.3], [0.0, 0.0, 0.0])
  assert np.isnan(got["acc2_nonzero"]) and np.isnan(got["f1_nonzero"])
  assert got["acc2"] == pytest.approx(2 / 3)


def test_constant_predictions_corr_is_nan_without_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = metrics.mosi_metrics(np.zeros(4), np.array([1.0, -1.0, 2.0, 0.5]))
  assert np.isnan(got["corr"])


def test_mosi_one_class_only():
  labels = np.array([1.0, 2.0, 0.5])
  preds = np.array([0.7, 1.9, 0.2])
  got = metrics.mosi_metrics(preds, labels)
  _assert_same(got, _reference_mosi(preds, labels))
  assert got["acc2"] == got["f1"] == got["f1_nonzero"] == 1.0


def test_mosi_metrics_keys():
  got = metrics.mosi_metrics([0.1, -0.2], [1.0, -1.0])
  assert set(got) == {
    "mae",
    "corr",
    "acc2",
    "acc2_nonzero",
    "acc7",
    "f1",
    "f1_nonzero",
    "f1_7",
  }


def test_train_sign_accuracy():
  labels = np.array([0.0, 1.0, -1.0, 0.0, 2.0])
  preds = np.array([0.0, 2.0, 1.0, 0.1, 0.0])
  # 0 only matches exactly 0: hit, hit, miss, miss, miss.
  assert metrics.train_sign_accuracy(preds, labels) == pytest.approx(0.4)


def test_mosi_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="preds is empty"):
    metrics.mosi_metrics([], [])
  with pytest.raises(ValueError, match="preds contains NaN"):
    metrics.mosi_metrics([0.1, np.nan], [0.0, 1.0])
  with pytest.raises(ValueError, match="labels contains NaN"):
    metrics.mosi_metrics([0.1, 0.2], [0.0, np.nan])
  with pytest.raises(ValueError, match="preds and labels"):
    metrics.mosi_metrics(np.zeros(3), np.zeros((3, 1)))
  with pytest.raises(ValueError, match="preds and labels"):
    metrics.train_sign_accuracy(np.zeros(3), np.zeros(2))


# ------------------------------------------------------------------- IEMOCAP


def test_iemocap_metrics_vs_sklearn():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(50, 8))
  labels = rng.integers(0, 2, size=(50, 4))
  got = metrics.iemocap_metrics(logits, labels)
  pred = logits.reshape(50, 4, 2).argmax(-1)
  accs, f1s = [], []
  for e, name in enumerate(metrics.IEMOCAP_EMOTIONS):
    acc = accuracy_score(labels[:, e], pred[:, e])
    f1 = _sk_f1(labels[:, e], pred[:, e])
    assert got[f"{name}/acc"] == pytest.approx(acc, abs=1e-12)
    assert got[f"{name}/f1"] == pytest.approx(f1, abs=1e-12)
    accs.append(acc)
    f1s.append(f1)
  assert got["mean/acc"] == pytest.approx(np.mean(accs), abs=1e-12)
  assert got["mean/f1"] == pytest.approx(np.mean(f1s), abs=1e-12)
  assert set(got) == {
    f"{e}/{m}"
    for e in (*metrics.IEMOCAP_EMOTIONS, "mean")
    for m in ("acc", "f1")
  }
  assert got == metrics.iemocap_metrics(logits.reshape(50, 4, 2), labels)


def test_iemocap_metrics_one_class_and_ties():
  # Equal logits: argmax picks class 0, so all-negative labels are perfect.
  got = metrics.iemocap_metrics(np.zeros((3, 8)), np.zeros((3, 4), int))
  assert got["mean/acc"] == 1.0 and got["mean/f1"] == 1.0


def test_iemocap_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="logits"):
    metrics.iemocap_metrics(np.zeros((3, 6)), np.zeros((3, 4), int))
  with pytest.raises(ValueError, match="labels"):
    metrics.iemocap_metrics(np.zeros((3, 8)), np.zeros((2, 4), int))
  with pytest.raises(ValueError, match="labels"):
    metrics.iemocap_metrics(np.zeros((3, 8)), np.full((3, 4), 2))
  with pytest.raises(ValueError, match="logits contains NaN"):
    metrics.iemocap_metrics(np.full((3, 8), np.nan), np.zeros((3, 4), int))
  with pytest.raises(ValueError, match="logits is empty"):
    metrics.iemocap_metrics(np.zeros((0, 8)), np.zeros((0, 4), int))
