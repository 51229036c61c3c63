"""Fashion-MNIST: an IDX reader, the data2vec image augmentations, a loader.

Reads the four IDX files of Fashion-MNIST (Xiao et al., 2017), gzipped or
raw, from a folder the caller names; nothing here downloads. The
augmentations are data2vec_vision's pretraining pipeline (spec §4b.1:
colour jitter 0.4, horizontal flip, random resized crop with scale
``(0.08, 1)`` and ratio ``(3/4, 4/3)``) in numpy, for grey images: colour
jitter reduces to brightness and contrast, and the resize is bilinear
rather than bicubic. Every random draw comes from a generator of
``(seed, step, row)``, so a batch is a pure function of them
(`d2vjax.datasets.sampling`).

  data = load_fashion_mnist("path/to/fashion-mnist")
  loader = ImageLoader(*data["train"], batch_size=256, image_size=16)
  batch = loader.batch(step=0)            # images [256, 16, 16, 3] float32

References:
  Xiao, Rasul and Vollgraf, "Fashion-MNIST", 2017 (IDX layout from LeCun's
  MNIST page); Bao et al., "BEiT", 2021, and the data2vec_vision code
  (``beit/datasets.py``) for the augmentations.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pathlib
import zlib

import numpy as np

from d2vjax.datasets import sampling

CLASS_NAMES = (
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
)
# Pixel statistics of the 60k training images, scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530
# The Debian package `dataset-fashion-mnist` puts the files here.
DEBIAN_SUBDIR = "usr/share/datasets/fashion-mnist"
_SPLITS = {"train": "train", "test": "t10k"}
_IDX_TYPES = {
  0x08: np.dtype("u1"),
  0x09: np.dtype("i1"),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (gzip-compressed or raw) into a numpy array.

  Args:
    path: the file; gzip is recognised by its magic bytes, not the name.

  Returns:
    The array, in native byte order, with the header's dimensions.

  Raises:
    ValueError: naming the file, for a bad magic number, an unknown type
      code, or a payload whose length differs from what the dimensions
      need (a truncated or corrupt download).
  """
  path = pathlib.Path(path)
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
      raise ValueError(
        f"{path}: the gzip stream is truncated or corrupt ({e}); delete the "
        "file and fetch it again"
      ) from e
  if len(raw) < 4 or raw[:2] != b"\0\0":
    raise ValueError(
      f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; "
      "IDX files start with two zero bytes, a type code and the rank)"
    )
  code, ndim = raw[2], raw[3]
  if code not in _IDX_TYPES or ndim < 1:
    raise ValueError(
      f"{path}: IDX type code 0x{code:02x} with rank {ndim} is not "
      f"supported (type codes {[hex(c) for c in _IDX_TYPES]}, rank >= 1)"
    )
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(
      f"{path}: truncated header: expected {header} bytes, found {len(raw)}"
    )
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  dtype = _IDX_TYPES[code]
  expected = math.prod(dims) * dtype.itemsize
  found = len(raw) - header
  if found != expected:
    raise ValueError(
      f"{path}: payload is {found} bytes but dims {dims} of {dtype.name} "
      f"need {expected} bytes; the file is truncated or corrupt -- fetch it "
      "again"
    )
  data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
  return data.astype(f"{dtype.kind}{dtype.itemsize}", copy=False)


def _find(folder: pathlib.Path, stem: str) -> pathlib.Path:
  for name in (stem + ".gz", stem):
    if (folder / name).is_file():
      return folder / name
  raise FileNotFoundError(
    f"{folder}: no {stem}.gz or {stem}; point the path at the folder with "
    "the four Fashion-MNIST IDX files (or at an unpacked "
    "dataset-fashion-mnist Debian package)"
  )


def load_fashion_mnist(root: str | os.PathLike) -> dict:
  """Loads both splits of Fashion-MNIST from a folder of IDX files.

  Args:
    root: the folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``
      (each optionally ``.gz``), or the root of the unpacked Debian package,
      which holds them under `DEBIAN_SUBDIR`.

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}``: images
    uint8 ``[N, H, W]`` (28x28 in the real set), labels uint8 ``[N]`` in
    ``[0, 10)`` (names in `CLASS_NAMES`).

  Raises:
    FileNotFoundError: if a file is missing.
    ValueError: for corrupt files, or images and labels that disagree.
  """
  folder = pathlib.Path(root)
  if (folder / DEBIAN_SUBDIR).is_dir():
    folder = folder / DEBIAN_SUBDIR
  out = {}
  for split, prefix in _SPLITS.items():
    images_path = _find(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(
        f"{images_path}: expected uint8 images [N, H, W], got "
        f"{images.dtype} {images.shape}"
      )
    if labels.shape != images.shape[:1] or labels.dtype != np.uint8:
      raise ValueError(
        f"{labels_path}: expected uint8 labels [{len(images)}] to match "
        f"{images_path.name}, got {labels.dtype} {labels.shape}"
      )
    if labels.size and labels.max() >= len(CLASS_NAMES):
      raise ValueError(
        f"{labels_path}: label {int(labels.max())} is not a Fashion-MNIST "
        f"class (0..{len(CLASS_NAMES) - 1})"
      )
    out[split] = (images, labels)
  return out


def random_resized_crop_box(
  rng: np.random.Generator,
  height: int,
  width: int,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """A crop ``(top, left, h, w)`` as torchvision's RandomResizedCrop draws.

  Ten tries of an area fraction from `scale` and a log-uniform aspect
  ratio from `ratio`; if none fits, the centre crop of the clamped ratio.

  References:
    torchvision ``RandomResizedCrop.get_params``, which BEiT and
    data2vec_vision call.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def resize_boxes(
  images: np.ndarray, boxes: np.ndarray, size: int | tuple[int, int]
) -> np.ndarray:
  """Bilinearly resamples a box of each image to `size` (half-pixel grid).

  Args:
    images: ``[B, H, W]`` or ``[B, H, W, C]``, any real dtype.
    boxes: int ``[B, 4]`` rows ``(top, left, h, w)`` inside the images.
    size: output ``(height, width)`` (an int means square).

  Returns:
    float32 ``[B, size_h, size_w(, C)]``. Corners are not aligned (the
    PyTorch ``align_corners=False`` convention); no antialiasing.
  """
  out_h, out_w = (size, size) if isinstance(size, int) else size
  images = np.asarray(images, np.float32)
  boxes = np.asarray(boxes, np.float64)
  _, height, width = images.shape[:3]

  def grid(start, extent, n, limit):
    # Centres of n output pixels mapped into the box, in input pixels.
    pos = start[:, None] + (np.arange(n) + 0.5) * (extent[:, None] / n) - 0.5
    pos = np.clip(pos, 0, limit - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, limit - 1)
    return i0, i1, (pos - i0).astype(np.float32)

  y0, y1, wy = grid(boxes[:, 0], boxes[:, 2], out_h, height)
  x0, x1, wx = grid(boxes[:, 1], boxes[:, 3], out_w, width)
  b = np.arange(len(images))[:, None, None]
  extra = (None,) * (images.ndim - 3)
  wy = wy[(slice(None), slice(None), None, *extra)]
  wx = wx[(slice(None), None, slice(None), *extra)]

  def rows(y):
    return (1 - wx) * images[b, y[:, :, None], x0[:, None, :]] + wx * images[
      b, y[:, :, None], x1[:, None, :]
    ]

  return (1 - wy) * rows(y0) + wy * rows(y1)


@dataclasses.dataclass
class ImageLoader:
  """Fixed-shape, augmented batches of grey images as a function of the step.

  Attributes:
    images: uint8 ``[N, H, W]``.
    labels: ``[N]`` class ids (returned, not used by pretraining).
    batch_size: rows of the global batch.
    image_size: side of the square output images (the model's size).
    seed: picks the epoch permutations and the augmentations.
    augment: False = the whole image resized, no flip or jitter (for
      evaluation).
    scale, ratio: RandomResizedCrop area-fraction and aspect ranges.
    flip: draw a horizontal flip with probability 1/2.
    jitter: brightness and contrast factors drawn from ``[1-j, 1+j]``.
    mean, std: normalisation after scaling pixels to ``[0, 1]``.
    channels: the grey channel is repeated this many times (ViTs built for
      RGB take 3).
  """

  images: np.ndarray
  labels: np.ndarray
  batch_size: int
  image_size: int
  seed: int = 0
  augment: bool = True
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  jitter: float = 0.4
  mean: float = MEAN
  std: float = STD
  channels: int = 3

  def __post_init__(self):
    if self.images.ndim != 3 or len(self.images) != len(self.labels):
      raise ValueError(
        f"images must be [N, H, W] with one label each, got images "
        f"{self.images.shape} and labels {np.shape(self.labels)}"
      )
    if not 0 < self.scale[0] <= self.scale[1] <= 1:
      raise ValueError(f"scale={self.scale} must satisfy 0 < lo <= hi <= 1")
    if not 0 < self.ratio[0] <= self.ratio[1]:
      raise ValueError(f"ratio={self.ratio} must satisfy 0 < lo <= hi")
    if not 0 <= self.jitter < 1 or self.std <= 0:
      raise ValueError(
        f"jitter={self.jitter} must be in [0, 1) and std={self.std} > 0"
      )

  def batch(
    self, step: int, rows: tuple[int, int] | None = None
  ) -> dict[str, np.ndarray]:
    """Rows ``lo..hi-1`` (default: all) of the batch of global `step`.

    Returns:
      ``images`` float32 ``[n, S, S, channels]`` (normalised), ``labels``
      int32 ``[n]`` and ``indices`` int64 ``[n]`` (into the dataset).
    """
    rows = (0, self.batch_size) if rows is None else rows
    idx = sampling.example_indices(
      len(self.images), self.batch_size, step, rows, self.seed
    )
    images = self.images[idx]
    _, h, w = images.shape
    boxes = np.tile(np.array([0, 0, h, w]), (len(idx), 1))
    flips = np.zeros(len(idx), bool)
    gains = np.ones((len(idx), 2), np.float32)  # brightness, contrast
    if self.augment:
      for i, row in enumerate(range(rows[0], rows[1])):
        rng = sampling.row_rng(self.seed, sampling.AUGMENT_STREAM, step, row)
        boxes[i] = random_resized_crop_box(rng, h, w, self.scale, self.ratio)
        flips[i] = (rng.random() < 0.5) and self.flip
        gains[i] = rng.uniform(1 - self.jitter, 1 + self.jitter, 2)
    out = resize_boxes(images, boxes, self.image_size) / np.float32(255)
    out[flips] = out[flips, :, ::-1]
    if self.augment and self.jitter:
      # Brightness, then contrast around each image's mean (torchvision's
      # grey-image contrast); saturation and hue do nothing to grey pixels.
      out = np.clip(out * gains[:, :1, None], 0, 1)
      mean = out.mean(axis=(1, 2), keepdims=True)
      out = np.clip((out - mean) * gains[:, 1:, None] + mean, 0, 1)
    out = (out - np.float32(self.mean)) / np.float32(self.std)
    out = np.repeat(out[..., None], self.channels, axis=-1)
    return {
      "images": out.astype(np.float32),
      "labels": np.asarray(self.labels[idx], np.int32),
      "indices": idx,
    }
