"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (MIT).

`load(path, data_dir)` reads the IDX files of a folder, or fetches the
package into the data directory first (`experiments.data.fetch`), and
keeps the last two sets read in memory: pretraining, fine-tuning and the
linear probe of the main job all read the same 60,000 + 10,000 images.
"""

from __future__ import annotations

import functools

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
