"""Readers of the multimodal datasets (host numpy): MulT pickles, SpokenReviews.

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

`load_spoken_reviews` reads the SpokenReviews folder that
`experiments/data/spoken_reviews.py` builds: `train.npz`, `valid.npz` and
`test.npz`, each storing its ragged sequences (text ids and tokens, log-mel
audio frames, articulatory vision frames, word events) as one concatenated
array plus `[n + 1]` offsets, next to per-sample labels in [-3, 3], ratings,
speakers, speaking rates and pitches; `vocab.json` (the token strings,
0 = pad, 1 = unknown) and `meta.json` (the build's parameters). It returns
each split as a dict of per-sample arrays and lists, after checking every
array's key, dtype, shape and range (errors name the file and the array).
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


# SpokenReviews (built by `experiments/data/spoken_reviews.py`): one npz per
# split holding ragged sequences as concatenations plus `[n + 1]` offsets.
_SR_RAGGED = {  # key -> (offsets key, dtype kind, trailing dims)
  "text_ids": ("text_offsets", "i", 0),
  "tokens": ("text_offsets", "U", 0),
  "audio": ("audio_offsets", "f", 1),
  "vision": ("vision_offsets", "f", 1),
  "word_events": ("word_offsets", "i", 1),
}
_SR_PER_SAMPLE = {  # key -> dtype kind
  "ids": "U",
  "labels": "f",
  "ratings": "f",
  "speakers": "i",
  "rates": "i",
  "pitches": "i",
}


def _read_json(path: str) -> Any:
  import json

  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} is missing; the SpokenReviews folder is incomplete: build it "
      "again with `python -m experiments.data.spoken_reviews`"
    )
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def _sr_split(path: str, width: Mapping[str, int], vocab_size: int) -> dict:
  """Reads and checks one SpokenReviews split file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SpokenReviews split file not found: {path!r}")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:  # zip, header or pickle-refusal errors
    raise ValueError(
      f"{path}: cannot read the npz (truncated or not an npz?): "
      f"{type(e).__name__}: {e}"
    ) from e
  expected = [*_SR_PER_SAMPLE, *_SR_RAGGED]
  expected += sorted({off for off, _, _ in _SR_RAGGED.values()})
  missing = [k for k in expected if k not in arrays]
  if missing:
    raise ValueError(f"{path}: missing arrays {missing} (has {sorted(arrays)})")
  n = arrays["labels"].shape[0] if arrays["labels"].ndim == 1 else -1
  for key, kind in _SR_PER_SAMPLE.items():
    a = arrays[key]
    if a.shape != (n,) or a.dtype.kind != kind:
      raise ValueError(
        f"{path}: {key!r} should be a 1-d array of kind {kind!r} with one "
        f"entry per sample (labels say {n}), got {a.dtype} {a.shape}"
      )
  if n == 0:
    raise ValueError(f"{path}: the split is empty (0 samples)")
  labels = arrays["labels"].astype(np.float32)
  if not np.all(np.isfinite(labels)) or np.abs(labels).max() > 3.0:
    raise ValueError(f"{path}: 'labels' should be finite and in [-3, 3]")
  out: dict[str, Any] = {
    "labels": labels,
    "ratings": arrays["ratings"].astype(np.float32),
    "ids": [str(x) for x in arrays["ids"]],
    "speakers": arrays["speakers"].astype(np.int32),
    "rates": arrays["rates"].astype(np.int32),
    "pitches": arrays["pitches"].astype(np.int32),
  }
  for key, (off_key, kind, extra) in _SR_RAGGED.items():
    a, off = arrays[key], arrays[off_key]
    dims = (width[key],) if key in width else a.shape[1:]
    if a.dtype.kind != kind or a.ndim != 1 + extra or a.shape[1:] != dims:
      raise ValueError(
        f"{path}: {key!r} should be kind {kind!r} with shape "
        f"[rows{', ' + str(dims[0]) if extra else ''}], got {a.dtype} "
        f"{a.shape}"
      )
    if (
      off.shape != (n + 1,)
      or off.dtype.kind != "i"
      or off[0] != 0
      or off[-1] != a.shape[0]
      or np.any(np.diff(off) < 0)
    ):
      raise ValueError(
        f"{path}: {off_key!r} should be {n + 1} nondecreasing offsets from "
        f"0 to {a.shape[0]} (the rows of {key!r}), got {off.dtype} "
        f"{off.shape} {off[:3]}...{off[-2:]}"
      )
    if key in ("text_ids", "audio", "vision") and np.any(np.diff(off) == 0):
      i = int(np.flatnonzero(np.diff(off) == 0)[0])
      raise ValueError(f"{path}: sample {i} has an empty {key!r} sequence")
    if key == "text_ids" and (a.min() < 0 or a.max() >= vocab_size):
      raise ValueError(
        f"{path}: 'text_ids' should lie in [0, {vocab_size}) (the "
        f"vocabulary size), found {a.min()}..{a.max()}"
      )
    if kind == "f":
      a = a.astype(np.float32)
      if not np.all(np.isfinite(a)):
        raise ValueError(f"{path}: {key!r} holds NaN or infinite values")
    if key == "tokens":
      words = a.tolist()
      parts = [words[i:j] for i, j in zip(off[:-1], off[1:], strict=True)]
    else:
      parts = np.split(a, off[1:-1])
    out["words" if key == "word_events" else key] = parts
  return out


def load_spoken_reviews(path: str | os.PathLike) -> dict[str, Any]:
  """Loads a SpokenReviews folder (`experiments/data/spoken_reviews.py`).

  Args:
    path: the cache folder, holding `train.npz`, `valid.npz`, `test.npz`,
      `vocab.json` and `meta.json`.

  Returns:
    A dict with one entry per split, `"train"`, `"valid"`, `"test"`, each
    a dict of

    * `text_ids`: list of `[L]` int32 token ids (0 = pad, 1 = unknown);
    * `tokens`: list of lists of the token strings;
    * `audio`: list of `[T_a, 40]` float32 log-mel frames at 100 Hz;
    * `vision`: list of `[T_v, C]` float32 articulatory frames at 30 fps;
    * `labels`: `[n]` float32 in [-3, 3] (mean rating x 0.75);
    * `ratings`, `speakers`, `rates`, `pitches`: `[n]` arrays;
    * `ids`: list of the sentence ids; `words`: list of `[W, 3]` int32
      word events (audio ms, 1-based character position, length);

    plus `"vocab"` (the list of token strings, index = id) and `"meta"`
    (the build's parameters, from `meta.json`).

  Raises:
    FileNotFoundError: the folder or one of its files is missing.
    ValueError: a file is unreadable or an array has the wrong key, dtype,
      shape or range; the message names the file and the array.
  """
  root = os.fspath(path)
  if not os.path.isdir(root):
    raise FileNotFoundError(
      f"SpokenReviews folder not found: {root!r}; build it with "
      "`python -m experiments.data.spoken_reviews --data_dir=...`"
    )
  meta_path = os.path.join(root, "meta.json")
  meta = _read_json(meta_path)
  try:
    width = {
      "audio": int(meta["audio"]["n_mels"]),
      "vision": len(meta["vision"]["channels"]),
    }
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(
      f"{meta_path}: expected audio.n_mels and vision.channels ({e!r})"
    ) from e
  vocab_path = os.path.join(root, "vocab.json")
  vocab = _read_json(vocab_path)
  if (
    not isinstance(vocab, list)
    or len(vocab) < 2
    or not all(isinstance(t, str) for t in vocab)
  ):
    raise ValueError(
      f"{vocab_path}: expected a list of token strings starting with the "
      "pad and unknown tokens"
    )
  out: dict[str, Any] = {
    split: _sr_split(os.path.join(root, f"{split}.npz"), width, len(vocab))
    for split in SPLITS
  }
  out["vocab"] = vocab
  out["meta"] = meta
  return out
