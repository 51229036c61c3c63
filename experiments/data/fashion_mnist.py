"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (MIT).

`load(path, data_dir)` reads the IDX files of a folder, or fetches the
package into the data directory first (`experiments.data.fetch`), and
keeps the last two sets read in memory: the main job's pretraining and
fine-tuning runs all read the same 60,000 + 10,000 images.

`labelled_splits` carves what a few-label experiment needs out of them: a
validation split held out of the training images (the same in every run,
so that every recipe is tuned on it and none on the test images), and a
class-balanced labelled subset of the rest.
"""

from __future__ import annotations

import functools

import numpy as np

from d2vjax.datasets import images
from experiments.data import fetch

PACKAGE = "dataset-fashion-mnist"


@functools.lru_cache(maxsize=2)
def load(path: str = "", data_dir: str = "") -> dict:
  """The ``train`` and ``test`` splits as ``(images, labels)`` pairs.

  Args:
    path: a folder of Fashion-MNIST IDX files; "" = the Debian package.
    data_dir: where the package is fetched to ("" = the user's cache).

  Returns:
    `d2vjax.datasets.images.load_fashion_mnist` of the folder: uint8
    images ``[N, 28, 28]`` and int labels per split.
  """
  if not path:
    path = str(fetch.apt_package(PACKAGE, data_dir or None))
  return images.load_fashion_mnist(path)


# Fixed: every run, whatever its seed, holds out the same validation images.
_VALID_SEED = 20_211_114


def labelled_splits(
  path: str = "",
  data_dir: str = "",
  *,
  valid_size: int,
  labels: int = 0,
  subset_seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``train``, ``valid`` and ``test`` for a few-label experiment.

  Args:
    path, data_dir: as for `load`.
    valid_size: training images held out for validation, drawn once (the
      same ones in every run); 0 = none, ``valid`` is the test split (how
      runs before this switch validated).
    labels: labelled training images kept of the rest, the same number of
      each class (``labels // 10``, the remainder to the first classes);
      0 = all of them.
    subset_seed: draws the labelled subset.

  Returns:
    ``(images, labels)`` per split; ``test`` is always the 10,000 test
    images.

  Raises:
    ValueError: for sizes that do not fit the 60,000 training images.
  """
  data = load(path, data_dir)
  x, y = data["train"]
  if not 0 <= valid_size < len(y):
    raise ValueError(
      f"config.data.valid_size={valid_size}: hold out 0 to {len(y) - 1} of "
      f"the {len(y)} training images"
    )
  order = np.random.default_rng(_VALID_SEED).permutation(len(y))
  valid_idx, pool = np.sort(order[:valid_size]), np.sort(order[valid_size:])
  if labels < 0 or labels > len(pool):
    raise ValueError(
      f"config.data.labels={labels}: keep 1 to {len(pool)} labelled images "
      "(0 = all)"
    )
  if labels:
    pool = _balanced_subset(y, pool, labels, subset_seed)
  valid = (x[valid_idx], y[valid_idx]) if valid_size else data["test"]
  return {"train": (x[pool], y[pool]), "valid": valid, "test": data["test"]}


def _balanced_subset(
  y: np.ndarray, pool: np.ndarray, count: int, seed: int
) -> np.ndarray:
  """`count` indices of `pool`, as many of each class as can be."""
  classes = np.unique(y[pool])
  share = np.full(len(classes), count // len(classes))
  share[: count % len(classes)] += 1
  rng = np.random.default_rng([seed, 7])
  picked = []
  for k, n in zip(classes, share, strict=True):
    members = pool[y[pool] == k]
    if n > len(members):
      raise ValueError(
        f"config.data.labels={count}: class {k} has only {len(members)} "
        "images to label"
      )
    picked.append(rng.choice(members, size=n, replace=False))
  return np.sort(np.concatenate(picked))
