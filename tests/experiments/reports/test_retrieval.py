"""Nearest neighbours: the indices, the vote, the picture."""

import numpy as np
import pytest

from experiments.reports import retrieval


def test_cosine_neighbours_rank_by_angle_not_length():
  gallery = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
  queries = np.array([[2.0, 0.1], [0.0, -3.0]])
  near = retrieval.cosine_neighbours(gallery, queries, 3, chunk=1)
  np.testing.assert_array_equal(near[0], [1, 0, 2])  # 10x longer, closer
  # Equal similarities keep the gallery order: 0 and 3 are both orthogonal.
  np.testing.assert_array_equal(near[1], [0, 3, 1])
  # Brute force on random data, chunks or not.
  rng = np.random.default_rng(0)
  g, q = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  want = np.argsort(-(unit(q) @ unit(g).T), axis=1)[:, :5]
  np.testing.assert_array_equal(retrieval.cosine_neighbours(g, q, 5), want)
  np.testing.assert_array_equal(
    retrieval.cosine_neighbours(g, q, 5, chunk=3), want
  )
  with pytest.raises(ValueError, match="k=51"):
    retrieval.cosine_neighbours(g, q, 51)
  with pytest.raises(ValueError, match="same C"):
    retrieval.cosine_neighbours(g, q[:, :4], 5)


def test_knn_vote_and_ties_go_to_the_nearest_class():
  labels = np.array([0, 1, 1, 2])
  near = np.array([[1, 2, 0], [0, 1, 3], [3, 0, 1]])
  # Majority 1; a three-way tie goes to the nearest (0); then to 2.
  assert retrieval.knn_accuracy(near, labels, np.array([1, 0, 2])) == 1.0
  assert retrieval.knn_accuracy(near, labels, np.array([1, 1, 0])) == (1 / 3)
  # Two against one beats the nearest neighbour.
  near = np.array([[0, 1, 2]])
  assert retrieval.knn_accuracy(near, labels, np.array([1])) == 1.0


def test_plot_neighbours_writes_a_png(tmp_path):
  rng = np.random.default_rng(1)
  gallery = rng.integers(0, 255, (20, 8, 8)).astype(np.uint8)
  near = {"a": rng.integers(0, 20, (3, 4)), "b": rng.integers(0, 20, (3, 4))}
  path = tmp_path / "n.png"
  retrieval.plot_neighbours(
    gallery[:3],
    gallery,
    near,
    path,
    class_names=("x", "y"),
    query_labels=np.array([0, 1, 0]),
    gallery_labels=rng.integers(0, 2, 20),
  )
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
