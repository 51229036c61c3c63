"""Readers for the MulT-style multimodal pickles (host numpy).

The CMU-MOSI, CMU-MOSEI and IEMOCAP files distributed with MulT
(`mosi_data_noalign.pkl`, `iemocap_data_noalign.pkl`, and their aligned
variants) all share one layout: `pickle.load` gives a dict with the splits
`train`, `valid` and `test`, each a dict of numpy arrays

* `text` `[N, T_t, 300]`, `audio` `[N, T_a, d_a]`, `vision` `[N, T_v, d_v]`,
  zero-padded on the left;
* `labels`: `[N, 1, 1]` floats (MOSI/MOSEI) or `[N, 4, 2]` one-hot per
  emotion (IEMOCAP);
* optionally `id`, which is not used.

The arrays are treated as the official dataset classes treat them: cast to
float32, audio entries equal to -inf replaced by 0 and nothing else (no
normalisation, no truncation). The official per-batch zero-frame removal is
then applied once per sample by `batching.samples_from_padded`, which keeps
each real frame's index in the padded array as its position.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtagjax.batching import Sample, samples_from_padded

SPLITS = ("train", "valid", "test")
MODALITIES = ("vision", "text", "audio")
# Datasets whose labels are one float per sample.
_REGRESSION = ("mosi", "mosei")
_IEMOCAP_LABEL_SHAPE = (4, 2)


def _read_pickle(path: str | os.PathLike) -> Any:
  """Unpickles `path`, turning every failure into a clear error."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dataset pickle not found: {path!r}")
  try:
    with open(path, "rb") as f:
      try:
        return pickle.load(f)
      except UnicodeDecodeError:
        # Python 2 pickles of numpy arrays need a byte-preserving encoding.
        f.seek(0)
        return pickle.load(f, encoding="latin1")
  except Exception as e:  # any unpickling failure
    raise ValueError(
      f"{path}: cannot read the pickle (truncated or not a pickle?): "
      f"{type(e).__name__}: {e}"
    ) from e


def _check_raw(
  raw: Any, path: str, modalities: Sequence[str], dataset: str
) -> None:
  """Checks the layout of an unpickled file; raises ValueError otherwise."""
  if not isinstance(raw, Mapping):
    raise ValueError(
      f"{path}: expected a dict with splits {list(SPLITS)}, got "
      f"{type(raw).__name__}"
    )
  for split in SPLITS:
    if split not in raw:
      raise ValueError(
        f"{path}: missing split {split!r} (found {sorted(map(str, raw))})"
      )
    data = raw[split]
    if not isinstance(data, Mapping):
      raise ValueError(
        f"{path}: split {split!r} should be a dict of arrays, got "
        f"{type(data).__name__}"
      )
    for key in (*modalities, "labels"):
      if key not in data:
        raise ValueError(f"{path}: split {split!r} lacks {key!r}")
    sizes = {}
    for m in modalities:
      shape = np.shape(data[m])
      if len(shape) != 3:
        raise ValueError(
          f"{path}: split {split!r} {m!r} should be [N, T, d], got shape "
          f"{shape}"
        )
      sizes[m] = shape[0]
    sizes["labels"] = (
      np.shape(data["labels"])[0] if np.ndim(data["labels"]) else 0
    )
    if len(set(sizes.values())) != 1:
      raise ValueError(
        f"{path}: split {split!r} has different numbers of samples per "
        f"item: {sizes}"
      )
    if sizes["labels"] == 0:
      raise ValueError(f"{path}: split {split!r} is empty (0 samples)")
    shape = np.shape(data["labels"])
    if dataset in _REGRESSION:
      if int(np.prod(shape[1:])) != 1:
        raise ValueError(
          f"{path}: split {split!r} 'labels' has shape {shape}; {dataset} "
          "expects one float per sample, [N, 1, 1]"
        )
    elif tuple(shape[1:]) != _IEMOCAP_LABEL_SHAPE:
      raise ValueError(
        f"{path}: split {split!r} 'labels' has shape {shape}; {dataset} "
        "expects one-hot [N, 4, 2]"
      )


def load_mult_pickle(
  path: str | os.PathLike,
  *,
  dataset: str = "mosi",
  modalities: Sequence[str] = MODALITIES,
) -> dict[str, list[Sample]]:
  """Loads a MulT-style pickle as the official MTAG dataset classes do.

  Args:
    path: the `.pkl` file (e.g. `mosi_data_noalign.pkl`).
    dataset: "mosi" or "mosei" (scalar float labels) or "iemocap" (`[4]`
      int32 binary labels, the positive column of the one-hot).
    modalities: the modalities to read, in node order (the model's
      `config.modalities`).

  Returns:
    `{"train", "valid", "test"}` to lists of `Sample`s with the all-zero
    frames removed and positions equal to the padded frame indices.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file is unreadable, or a split, item or shape is wrong,
      or a feature is NaN; the message names the file and the item.
  """
  dataset = dataset.lower()
  if dataset not in (*_REGRESSION, "iemocap"):
    raise ValueError(
      f"unknown dataset {dataset!r}; use 'mosi', 'mosei' or 'iemocap'"
    )
  modalities = tuple(modalities)
  unknown = [m for m in modalities if m not in MODALITIES]
  if unknown or not modalities:
    raise ValueError(
      f"modalities {modalities} should be a non-empty subset of {MODALITIES}"
    )
  raw = _read_pickle(path)
  name = os.fspath(path)
  _check_raw(raw, name, modalities, dataset)
  out = {}
  for split in SPLITS:
    data = raw[split]
    arrays = []
    for m in modalities:
      x = np.array(data[m], dtype=np.float32)  # a copy: raw stays untouched
      if m == "audio":
        x[x == -np.inf] = 0.0
      bad = np.isnan(x).any(axis=(1, 2))
      if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
          f"{name}: split {split!r} sample {i} modality {m!r} has NaN "
          f"features ({int(bad.sum())} samples affected)"
        )
      arrays.append(x)
    labels = np.asarray(data["labels"])
    if dataset in _REGRESSION:
      labels = labels.reshape(labels.shape[0]).astype(np.float32)
    else:
      labels = labels[:, :, 1].astype(np.int32)
    samples = samples_from_padded(arrays, labels)
    if dataset in _REGRESSION:
      samples = [s._replace(label=np.float32(s.label)) for s in samples]
    out[split] = samples
  return out


def feature_dims(splits: Mapping[str, Any]) -> tuple[int, ...]:
  """Per-modality feature sizes, read from the data as the official code.

  Args:
    splits: the output of `load_mult_pickle` (lists of `Sample`s), or an
      unpickled raw file (dicts of `[N, T, d]` arrays, read in the order
      vision, text, audio).

  Returns:
    The tuple `(d_0, d_1, ...)`, one entry per modality.
  """
  first = splits[next(iter(splits))]
  if isinstance(first, Mapping):
    return tuple(int(np.shape(first[m])[2]) for m in MODALITIES if m in first)
  if not first:
    raise ValueError("feature_dims: the first split has no samples")
  return tuple(int(np.shape(f)[-1]) for f in first[0].features)


def padded_lengths(
  path_or_splits: str | os.PathLike | Mapping[str, Any],
) -> tuple[int, ...]:
  """Per-modality padded lengths `T_m` of the arrays.

  Args:
    path_or_splits: a pickle path or an unpickled raw file (the lengths are
      read from the array shapes, modalities ordered vision, text, audio),
      or the output of `load_mult_pickle`: then the length is one more than
      the largest frame position over all splits, which is exact for
      left-padded data with at least one non-empty sample per modality.

  Returns:
    The tuple `(T_0, T_1, ...)`, one entry per modality.
  """
  if isinstance(path_or_splits, str | os.PathLike):
    path_or_splits = _read_pickle(path_or_splits)
  splits = path_or_splits
  first = splits[next(iter(splits))]
  if isinstance(first, Mapping):
    return tuple(int(np.shape(first[m])[1]) for m in MODALITIES if m in first)
  num = None
  lengths: list[int] = []
  for samples in splits.values():
    for s in samples:
      if num is None:
        num = len(s.features)
        lengths = [0] * num
      for m, pos in enumerate(s.positions):
        if len(pos):
          lengths[m] = max(lengths[m], int(np.max(pos)) + 1)
  return tuple(lengths)
