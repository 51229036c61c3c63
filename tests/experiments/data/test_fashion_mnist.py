"""Tests of the few-label splits of Fashion-MNIST."""

import numpy as np
import pytest

from experiments.data import fashion_mnist
from tests.d2vjax.test_datasets_images import write_fashion_mnist


@pytest.fixture(name="folder")
def _folder(tmp_path):
  write_fashion_mnist(tmp_path, n_train=200, n_test=30)
  return str(tmp_path)


def _rows(x):
  return {r.tobytes() for r in x}


def test_valid_is_fixed_and_disjoint_from_train(folder):
  a = fashion_mnist.labelled_splits(folder, valid_size=40, subset_seed=0)
  b = fashion_mnist.labelled_splits(
    folder, valid_size=40, labels=20, subset_seed=5
  )
  assert len(a["valid"][1]) == 40 and len(a["train"][1]) == 160
  np.testing.assert_array_equal(a["valid"][0], b["valid"][0])
  assert not _rows(a["valid"][0]) & _rows(a["train"][0])
  assert len(a["test"][1]) == 30


def test_labelled_subset_is_balanced_and_seeded(folder):
  get = lambda seed: fashion_mnist.labelled_splits(
    folder, valid_size=40, labels=23, subset_seed=seed
  )["train"]
  x, y = get(0)
  counts = np.bincount(y, minlength=10)
  assert len(y) == 23 and counts.max() - counts.min() <= 1
  np.testing.assert_array_equal(x, get(0)[0])
  assert _rows(x) != _rows(get(1)[0])


def test_no_valid_means_test_validates(folder):
  s = fashion_mnist.labelled_splits(folder, valid_size=0)
  np.testing.assert_array_equal(s["valid"][0], s["test"][0])
  assert len(s["train"][1]) == 200


@pytest.mark.parametrize(
  ("kw", "match"),
  [
    ({"valid_size": 200}, "valid_size=200"),
    ({"valid_size": 10, "labels": 500}, "labels=500"),
    ({"valid_size": 40, "labels": 159}, "has only"),
  ],
)
def test_sizes_that_do_not_fit(folder, kw, match):
  with pytest.raises(ValueError, match=match):
    fashion_mnist.labelled_splits(folder, **kw)
