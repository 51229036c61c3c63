"""Readers of real datasets for data2vec: speech, images and text.

Readers take paths and return numpy arrays; fetching the files (Debian
packages, wheels) is the job of `experiments`. Loaders build fixed-shape
batches as a pure function of ``(seed, step, rows)`` (`sampling`), the
contract of the pretraining loop.

* `audio`: audio files to 16 kHz mono, the Tux Paint stamp recordings,
  `audio.CropLoader` (fixed-length random crops).
* `images`: Fashion-MNIST IDX files, the data2vec image augmentations,
  `images.ImageLoader`.
* `text`: GCIDE, WordNet and fortunes readers, RoBERTa-style block
  packing, `text.BlockLoader`.
"""

from d2vjax.datasets import audio, images, sampling, text

__all__ = ["audio", "images", "sampling", "text"]
