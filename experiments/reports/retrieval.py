"""Nearest neighbours in a representation: k-NN accuracy and a picture.

A representation that puts images of one class near each other classifies
them by their neighbours' labels with no training at all, which a linear
probe cannot tell apart from features a linear map merely unscrambles. Both
read the same features (`experiments.reports.probe.encoder_features`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_neighbours(
  gallery: np.ndarray, queries: np.ndarray, k: int, *, chunk: int = 1024
) -> np.ndarray:
  """The `k` gallery rows most cosine-similar to each query, nearest first.

  Args:
    gallery: ``[N, C]`` features.
    queries: ``[Q, C]`` features.
    k: neighbours per query (at most N).
    chunk: queries per similarity block (memory ``chunk x N``).

  Returns:
    int ``[Q, k]`` indices into `gallery`; ties go to the lower index.

  Raises:
    ValueError: for feature sizes that differ or `k` outside ``1..N``.
  """
  if gallery.shape[1:] != queries.shape[1:] or gallery.ndim != 2:
    raise ValueError(
      f"gallery {gallery.shape} and queries {queries.shape} must be [N, C] "
      "and [Q, C] with the same C"
    )
  if not 1 <= k <= len(gallery):
    raise ValueError(f"k={k} must be between 1 and {len(gallery)}")
  g, q = _unit(gallery), _unit(queries)
  out = np.empty((len(q), k), np.int64)
  for lo in range(0, len(q), chunk):
    sims = q[lo : lo + chunk] @ g.T
    # A stable sort of the negated similarities: equal ones keep index order.
    out[lo : lo + chunk] = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  return out


def knn_accuracy(
  neighbours: np.ndarray,
  gallery_labels: np.ndarray,
  query_labels: np.ndarray,
) -> float:
  """Accuracy of a majority vote of each query's neighbours' labels.

  A tie between classes goes to the one whose nearest member ranks first.
  """
  votes = np.asarray(gallery_labels)[neighbours]  # [Q, k]
  k = votes.shape[1]
  num_classes = int(max(votes.max(), np.max(query_labels))) + 1
  # One vote each, less a rank-dependent fraction far below one vote.
  weight = 1.0 - np.arange(k) / (2.0 * k * k)
  scores = np.zeros((len(votes), num_classes))
  np.add.at(scores, (np.arange(len(votes))[:, None], votes), weight)
  return float(np.mean(scores.argmax(1) == np.asarray(query_labels)))


def plot_neighbours(
  query_images: np.ndarray,
  gallery_images: np.ndarray,
  neighbours: Mapping[str, np.ndarray],
  path: str | pathlib.Path,
  *,
  class_names: Sequence[str] = (),
  query_labels: np.ndarray | None = None,
  gallery_labels: np.ndarray | None = None,
) -> None:
  """One row per query and representation: the query, then its neighbours.

  Args:
    query_images: ``[Q, H, W]`` grey images.
    gallery_images: ``[N, H, W]``.
    neighbours: representation name -> ``[Q, k]`` gallery indices.
    path: the PNG to write.
    class_names: names of the label ids, for the query titles.
    query_labels: the queries' labels; with `gallery_labels`, a neighbour
      of another class is framed in red.
    gallery_labels: the gallery's labels.
  """
  names = list(neighbours)
  k = next(iter(neighbours.values())).shape[1]
  rows = len(query_images) * len(names)
  width = 0.9 * (k + 1) + 1.3  # the last 1.3 inches hold the row titles
  fig, axes = plt.subplots(
    rows, k + 1, figsize=(width, 0.9 * rows), squeeze=False
  )
  for qi, image in enumerate(query_images):
    for ni, name in enumerate(names):
      r = qi * len(names) + ni
      ax = axes[r, 0]
      ax.imshow(image, cmap="gray_r")
      label = ""
      if query_labels is not None:
        label = str(query_labels[qi])
        if class_names:
          label = class_names[int(query_labels[qi])]
      ax.set_ylabel(f"{name}\n{label}", fontsize=6, rotation=0, ha="right")
      for j, g in enumerate(neighbours[name][qi]):
        ax = axes[r, j + 1]
        ax.imshow(gallery_images[g], cmap="gray_r")
        wrong = (
          query_labels is not None
          and gallery_labels is not None
          and gallery_labels[g] != query_labels[qi]
        )
        for side in ax.spines.values():
          side.set_color("red" if wrong else "white")
          side.set_linewidth(1.5)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  fig.subplots_adjust(
    left=1.3 / width, right=0.995, bottom=0.005, top=0.995, wspace=0.08
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)
