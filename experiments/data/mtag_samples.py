"""MTAG samples of a run's config: generated, a MulT pickle, SpokenReviews.

`load_data(config)` returns the train/valid/test splits as lists of
`mtagjax.Sample`s for ``config.data.source``:

* ``"synthetic"``: generated samples (`mtagjax.synthetic`);
* ``"pickle"``: a MulT-style pickle at ``config.data.path``
  (`mtagjax.datasets.load_mult_pickle`), checked against the model's
  ``feature_dims`` and ``padded_lengths``;
* ``"spoken_reviews"``: SpokenReviews (`experiments.data.spoken_reviews`),
  built or found in the cache, streams pooled and standardised.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mtagjax import batching, datasets, synthetic


def pool_frames(frames: np.ndarray, width: int) -> np.ndarray:
  """Means over consecutive windows of `width` frames (the last may be short).

  Shrinks a stream's frame rate by `width`: MTAG links every frame of one
  modality to every frame of the others, so a graph grows with the square
  of the frame counts.
  """
  if width < 1:
    raise ValueError(f"pooling width {width} must be >= 1")
  n = len(frames)
  if width == 1 or n == 0:
    return frames.astype(np.float32)
  starts = np.arange(0, n, width)
  sums = np.add.reduceat(frames.astype(np.float32), starts, axis=0)
  counts = np.minimum(starts + width, n) - starts
  return sums / counts[:, None].astype(np.float32)


def spoken_reviews_path(d: ml_collections.ConfigDict) -> str:
  """The SpokenReviews folder of `config.data`: its `path`, else built."""
  if d.path:
    return d.path
  # Imported here: the builder pulls in the speech synthesiser, which only
  # this source needs.
  from experiments.data import spoken_reviews

  return str(
    spoken_reviews.build(
      d.data_dir or None,
      seed=d.seed,
      limit=d.limit or None,
      speaker_disjoint=d.speaker_disjoint,
      workers=d.workers,
      archive=d.archive or None,
    )
  )


def spoken_reviews_samples(config: ml_collections.ConfigDict) -> dict:
  """SpokenReviews (`experiments/data/spoken_reviews.py`) as MTAG samples.

  Reads the set at `config.data.path`, or builds (or finds in the cache)
  the one that `config.data` describes (`data_dir`, `seed`, `limit`,
  `speaker_disjoint`, `workers`, `archive`). Audio (100 Hz) and vision
  (30 fps) are mean-pooled over `config.data.audio_pool` and
  `vision_pool` frames and standardised per channel with the train
  split's statistics. The modalities are those named in
  `config.model.modalities` (any subset of vision, text, audio, in any
  order), so a text-only model reads the same sentences.

  Text enters as token ids (`[L, 1]`, feature size 1) of a token modality
  whose vocabulary V is `config.model.vocab_sizes[text]`: ids >= V (the
  rarest train words, since the vocabulary is sorted by count) become the
  unknown id.
  """
  d, m = config.data, config.model
  path = spoken_reviews_path(d)
  raw = datasets.load_spoken_reviews(path)
  unk = int(raw["meta"]["text"]["unk_id"])
  vocab_sizes = tuple(m.vocab_sizes or (0,) * len(m.modalities))
  widths = {"vision": d.vision_pool, "audio": d.audio_pool}
  streams = {}
  for i, name in enumerate(m.modalities):
    dim, vocab = m.feature_dims[i], vocab_sizes[i]
    if name not in ("vision", "text", "audio"):
      raise ValueError(
        f"config.model.modalities has {name!r}; SpokenReviews has 'vision', "
        "'text' and 'audio'"
      )
    if name != "text":
      if vocab:
        raise ValueError(
          f"config.model.vocab_sizes[{i}]={vocab}: {name} frames are "
          "feature vectors, set it to 0"
        )
      pooled = {
        s: [pool_frames(f, widths[name]) for f in raw[s][name]]
        for s in datasets.SPLITS
      }
      train_frames = np.concatenate(pooled["train"])
      if train_frames.shape[1] != dim:
        raise ValueError(
          f"config.model.feature_dims[{i}]={dim} but SpokenReviews {name} "
          f"frames have {train_frames.shape[1]} channels (in {path}); pass "
          f"that size"
        )
      mean = train_frames.mean(0)
      std = np.maximum(train_frames.std(0), 1e-3)
      streams[name] = {
        s: [(f - mean) / std for f in v] for s, v in pooled.items()
      }
    else:
      if not vocab or dim != 1:
        raise ValueError(
          f"text is a token modality: set config.model.vocab_sizes[{i}] "
          f"to the vocabulary size (got {vocab}) and "
          f"config.model.feature_dims[{i}] to 1 (got {dim})"
        )
      streams[name] = {
        s: [
          np.where(ids < vocab, ids, unk).astype(np.float32)[:, None]
          for ids in raw[s]["text_ids"]
        ]
        for s in datasets.SPLITS
      }
  return {
    s: [
      batching.Sample(
        [streams[name][s][j] for name in m.modalities],
        float(raw[s]["labels"][j]),
      )
      for j in range(len(raw[s]["labels"]))
    ]
    for s in datasets.SPLITS
  }


def load_data(config: ml_collections.ConfigDict) -> dict[str, list]:
  """The train/valid/test splits as lists of `mtagjax.Sample`s.

  `config.data.source` is "synthetic" (generated data), "pickle" (a
  MulT-style pickle at `config.data.path`, read by `mtagjax.datasets`; the
  model's `feature_dims` and `padded_lengths` must match the file) or
  "spoken_reviews" (`spoken_reviews_samples`).
  """

  d = config.data
  if d.source == "spoken_reviews":
    return spoken_reviews_samples(config)
  if d.source == "pickle":
    dataset = "iemocap" if config.train.loss.startswith("iemocap") else "mosi"
    path = d.path
    if not path:
      raise ValueError(
        "config.data.source='pickle' needs config.data.path (the .pkl file)"
      )
    splits = datasets.load_mult_pickle(
      path, dataset=dataset, modalities=tuple(config.model.modalities)
    )
    found = {
      "feature_dims": datasets.feature_dims(splits),
      "padded_lengths": datasets.padded_lengths(splits),
    }
    for field, value in found.items():
      want = tuple(config.model[field])
      if want != value:
        raise ValueError(
          f"config.model.{field}={want} does not match the data in {path} "
          f"({value}); pass --config.model.{field}="
          f"{','.join(map(str, value))}"
        )
    return splits
  if d.source != "synthetic":
    raise ValueError(
      f"config.data.source={d.source!r}; use 'synthetic' (generated data), "
      "'pickle' (a MulT-style pickle at config.data.path) or "
      "'spoken_reviews'"
    )
  task = "iemocap" if config.train.loss.startswith("iemocap") else "regression"
  sizes = {"train": d.num_train, "valid": d.num_valid, "test": d.num_test}
  return {
    split: synthetic.make_samples(
      n, config.model, seed=config.train.seed * 1000 + i, task=task
    )
    for i, (split, n) in enumerate(sizes.items())
  }
