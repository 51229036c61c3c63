"""Readers of real datasets for data2vec: images and text.

Readers take paths and return numpy arrays; fetching the files (Debian
packages, wheels) is the job of `experiments`. Loaders build fixed-shape
batches as a pure function of ``(seed, step, rows)`` (`sampling`), the
contract of the pretraining loop.

* `images`: Fashion-MNIST IDX files, the data2vec image augmentations,
  `images.ImageLoader`.
* `text`: GCIDE, WordNet and fortunes readers, RoBERTa-style block
  packing, `text.BlockLoader`.
"""

from d2vjax.datasets import images, sampling, text

__all__ = ["images", "sampling", "text"]
