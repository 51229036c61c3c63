"""Fine-tuning data: batches as pure functions of (seed, step).

``config.data.source`` picks the examples (`SOURCES`):

* ``"spoken_sentences"`` (speech): the espeak-spoken VADER sentences of
  `experiments.data.speech_corpus` with their letter transcripts, train split
  for training and valid split for validation; clips longer than
  ``config.data.num_samples`` or transcripts longer than
  ``config.data.max_label_length`` letters are left out;
* ``"fashion_mnist"`` (image): Fashion-MNIST's 10 classes, the train split
  through `d2vjax.datasets.images.ImageLoader`'s augmentations, the test
  split (not augmented) for validation;
* ``"sentiment"`` (text): a set of `experiments.data.sentiment_sets`
  (``config.data.sentiment_task``): ``vader_movie`` with ``num_labels=1``
  regresses the rating in [-3, 3], with ``num_labels=2`` classifies its
  sign (zero ratings left out); ``rt_polarity`` is fresh vs rotten;
  train split for training, valid split for validation;
* ``"synthetic"``: generated examples.

Real sources pick the examples of a step with `d2vjax.datasets.sampling`
(a per-epoch permutation); ``config.data.num_valid`` caps their validation
examples (0 = all).

``config.data.source="synthetic"`` generates examples with a label the model
can learn: speech is a sequence of tones, one pitch per letter of a random
transcript (silence between words); an image is noise around a random colour
and its class is the hue sector of its mean colour; a text is random
ordinary tokens and its label is the most frequent token group (``id %
num_labels``) or, for regression, five times the share of even ids.

Every training batch is drawn from ``(config.train.seed, step)`` alone, so
a resumed run sees the batches an uninterrupted run would. Speech batches
carry the fine-tuning masks (fairseq ``apply_mask``): span masks over
encoder frames (``time_mask``) and, with ``config.mask.mask_channel_prob >
0``, spans of feature channels zeroed for the whole clip (``channel_mask``).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from d2vjax import finetune as ft
from d2vjax import masking, speech
from d2vjax.datasets import audio, sampling
from d2vjax.datasets import images as images_lib
from d2vjax.datasets import text as text_lib
from experiments.data import pretrain_batches as d2v_data
from experiments.data import sentiment_sets, speech_corpus

Array = jax.Array

# Source -> the tasks it serves.
SOURCES = {
  "synthetic": ("speech", "image", "text"),
  "spoken_sentences": ("speech",),
  "fashion_mnist": ("image",),
  "sentiment": ("text",),
}
VOCAB = ft.LetterVocab()
SENTIMENT_TASKS = ("vader_movie", "rt_polarity")


def check_source(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError if the data config cannot serve the task."""
  d = config.data
  if config.task not in SOURCES.get(d.source, ()):
    usable = tuple(k for k, v in SOURCES.items() if config.task in v)
    raise ValueError(
      f"config.data.source={d.source!r} does not serve the {config.task} "
      f"task; use one of {usable}"
    )
  if d.source != "synthetic":
    _check_real(config)
    return
  if config.task != "speech":
    return
  # The longest transcript: its letter ids, and its audio, must fit.
  symbols = d.max_words * (d.max_word_length + 1)
  if symbols > d.max_label_length:
    raise ValueError(
      f"transcripts of up to {d.max_words} words of {d.max_word_length} "
      f"letters need config.data.max_label_length >= {symbols}"
    )
  if (symbols - 1) * d.max_letter_samples > d.num_samples:
    raise ValueError(
      f"config.data.num_samples={d.num_samples} is too short for "
      f"{symbols - 1} symbols of {d.max_letter_samples} samples"
    )
  unknown = set(d.letters) - set(VOCAB.letters)
  if unknown:
    raise ValueError(f"config.data.letters has no CTC outputs: {unknown}")


def _speech_example(config, encoder, rng) -> dict[str, Any]:
  d = config.data
  num_words = int(rng.integers(1, d.max_words + 1))
  lengths = rng.integers(1, d.max_word_length + 1, num_words)
  words = ["".join(rng.choice(list(d.letters), n)) for n in lengths]
  transcript = " ".join(words)
  per_symbol = int(rng.integers(d.min_letter_samples, d.max_letter_samples + 1))
  t = np.arange(per_symbol, dtype=np.float32) / np.float32(d.sample_rate)
  pieces = []
  for symbol in transcript:
    if symbol == " ":
      pieces.append(np.zeros(per_symbol, np.float32))
    else:
      pitch = 200.0 * (1 + d.letters.index(symbol))
      phase = rng.uniform(0, 2 * np.pi)
      pieces.append(np.sin(np.float32(2 * np.pi * pitch) * t + phase))
  # Silence after short transcripts: a clip needs more frames than a
  # time-mask span.
  pieces.append(np.zeros(max(0, d.min_samples - per_symbol * len(pieces))))
  wave = np.concatenate(pieces).astype(np.float32)
  wave = wave + 0.1 * rng.standard_normal(wave.size).astype(np.float32)
  # fairseq `normalize: true` over the real samples; padding stays 0.
  wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-5)
  padded = np.zeros(d.num_samples, np.float32)
  padded[: wave.size] = wave
  labels = np.full(d.max_label_length, VOCAB.pad_id, np.int32)
  ids = VOCAB.encode(transcript)
  labels[: len(ids)] = ids
  return {
    "waveform": padded,
    "attention_mask": (np.arange(d.num_samples) < wave.size).astype(np.int32),
    "labels": labels,
    "text": transcript,
  }


def _hue_class(colour: np.ndarray, num_classes: int) -> int:
  """Sector of the colour's hue angle (around the grey axis), of K equal."""
  x = (colour[0] - colour[1]) / np.sqrt(2.0)
  y = (colour[0] + colour[1] - 2.0 * colour[2]) / np.sqrt(6.0)
  angle = np.arctan2(y, x) % (2 * np.pi)
  return int(angle // (2 * np.pi / num_classes)) % num_classes


def _image_example(config, encoder, rng) -> dict[str, Any]:
  h, w = np.broadcast_to(encoder.image_size, (2,)).tolist()
  image = rng.standard_normal(3) + 0.5 * rng.standard_normal((h, w, 3))
  image = image.astype(np.float32)
  label = _hue_class(image.mean(axis=(0, 1)), config.model.num_classes)
  return {"images": image, "labels": np.int32(label)}


def _text_example(config, encoder, rng) -> dict[str, Any]:
  d, k = config.data, config.model.num_labels
  length = int(rng.integers(d.min_len, d.seq_len + 1))
  ids = np.full(d.seq_len, encoder.pad_id, np.int32)
  ids[0], ids[length - 1] = d.bos_id, d.eos_id
  content = rng.integers(d.num_special, encoder.vocab_size, length - 2)
  ids[1 : length - 1] = content
  counts = np.bincount(content % max(k, 2), minlength=max(k, 2))
  if k == 1:
    label = np.float32(5.0 * counts[0] / content.size)
  else:
    label = np.int32(np.argmax(counts))
  return {
    "input_ids": ids,
    "attention_mask": (ids != encoder.pad_id).astype(np.int32),
    "labels": label,
  }


EXAMPLES = {
  "speech": _speech_example,
  "image": _image_example,
  "text": _text_example,
}


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
  out = {}
  for key in examples[0]:
    values = [e[key] for e in examples]
    out[key] = values if key == "text" else np.stack(values)
  return out


def frame_padding(
  config: ml_collections.ConfigDict,
  encoder: nn.Module,
  attention_mask: np.ndarray,
) -> np.ndarray:
  """`[B, T]` True at the encoder frames that padding samples produce."""
  conv = tuple(tuple(x) for x in encoder.conv_layers)
  frames = speech.feature_lengths(attention_mask.sum(axis=1), conv)
  width = speech.feature_lengths(config.data.num_samples, conv)
  return np.arange(width)[None] >= np.asarray(frames)[:, None]


def batch_at(
  config: ml_collections.ConfigDict, encoder: nn.Module, step: int
) -> dict[str, Any]:
  """The training batch of global step `step`: a function of (seed, step).

  Synthetic row r is drawn from ``default_rng([seed, 0, step, r])``, real
  rows are picked by `d2vjax.datasets.sampling`; the draws that span the
  batch (speech time masks, image Mixup/CutMix) from
  ``default_rng([seed, 1, step])``.

  Args:
    config: a fine-tuning config.
    encoder: the encoder the data must fit (image size, vocabulary, CNN).
    step: optimizer updates done before this batch.

  Returns:
    numpy arrays with a leading batch axis: speech ``waveform``,
    ``attention_mask``, ``time_mask`` (over frames), ``labels`` (letter
    ids, padded with ``<pad>``), and ``channel_mask`` ``[B, hidden]`` when
    ``config.mask.mask_channel_prob > 0``; image ``images`` and soft
    ``targets``;
    text ``input_ids``, ``attention_mask`` and ``labels``.
  """
  check_source(config)
  seed, size = config.train.seed, config.train.batch_size
  if config.data.source == "synthetic":
    make = EXAMPLES[config.task]
    batch = collate(
      [
        make(config, encoder, np.random.default_rng([seed, 0, step, row]))
        for row in range(size)
      ]
    )
  else:
    batch = _real_train_batch(config, encoder, step)
  batch.pop("text", None)
  rng = np.random.default_rng([seed, 1, step])
  if config.task == "speech":
    padding = frame_padding(config, encoder, batch["attention_mask"])
    m = config.mask
    batch["time_mask"] = masking.span_mask(
      padding.shape,
      mask_prob=m.mask_prob,
      mask_length=m.mask_length,
      min_masks=m.min_masks,
      require_same_masks=m.require_same_masks,
      padding_mask=padding,
      rng=rng,
    )
    if m.mask_channel_prob > 0:
      batch["channel_mask"] = masking.span_mask(
        (size, encoder.hidden),
        mask_prob=m.mask_channel_prob,
        mask_length=m.mask_channel_length,
        min_masks=0,
        require_same_masks=True,
        rng=rng,
      )
  elif config.task == "image":
    m = config.mixup
    batch["images"], batch["targets"] = ft.mixup_cutmix(
      batch["images"],
      batch.pop("labels"),
      rng=rng,
      num_classes=config.model.num_classes,
      mixup_alpha=m.mixup_alpha,
      cutmix_alpha=m.cutmix_alpha,
      switch_prob=m.switch_prob,
      smoothing=m.smoothing,
      prob=m.prob,
    )
  return batch


def valid_batches(
  config: ml_collections.ConfigDict, encoder: nn.Module
) -> list[dict[str, Any]]:
  """The validation set in training-sized batches, padded with spare rows.

  Synthetic example i is drawn from ``default_rng([seed, 2, i])``; real
  ones are the validation split's (`num_valid` of them). The rows past
  `num_valid` in the last batch are filled too (static shapes) and left
  out of the metrics.
  """
  check_source(config)
  if config.data.source != "synthetic":
    return _real_valid_batches(config, encoder)
  seed, size = config.train.seed, config.train.batch_size
  count = -(-config.data.num_valid // size) * size
  make = EXAMPLES[config.task]
  examples = [
    make(config, encoder, np.random.default_rng([seed, 2, i]))
    for i in range(count)
  ]
  return [collate(examples[i : i + size]) for i in range(0, count, size)]


def num_valid(config: ml_collections.ConfigDict) -> int:
  """Validation examples scored: ``config.data.num_valid``, or for a real
  source the validation split's size capped by it (0 = no cap)."""
  cap = config.data.num_valid
  if config.data.source == "synthetic":
    return cap
  n = _real_size(config, "valid")
  return min(n, cap) if cap > 0 else n


def init_example(
  config: ml_collections.ConfigDict, encoder: nn.Module
) -> dict[str, Any]:
  """A one-row batch with the shapes of the data, to initialise a model."""
  if config.data.source == "synthetic":
    make = EXAMPLES[config.task]
    example = collate([make(config, encoder, np.random.default_rng(0))])
  else:
    example = {
      k: v[:1] for k, v in _real_valid_batches(config, encoder)[0].items()
    }
  example.pop("text", None)
  return example


# ---------------------------------------------------------------------------
# Real sources.


def _check_real(config: ml_collections.ConfigDict) -> None:
  d = config.data
  if config.task == "image" and config.model.num_classes != len(
    images_lib.CLASS_NAMES
  ):
    raise ValueError(
      f"config.model.num_classes={config.model.num_classes}: Fashion-MNIST "
      f"has {len(images_lib.CLASS_NAMES)} classes; pass "
      "--config.model.num_classes=10"
    )
  if config.task == "text":
    task, k = d.get("sentiment_task", ""), config.model.num_labels
    if task not in SENTIMENT_TASKS:
      raise ValueError(
        f"config.data.sentiment_task={task!r}; use one of {SENTIMENT_TASKS}"
      )
    if (task, k) not in (("vader_movie", 1), ("vader_movie", 2)) and k != 2:
      raise ValueError(
        f"config.model.num_labels={k}: {task} needs 2 (classes)"
        + (" or 1 (rating regression)" if task == "vader_movie" else "")
      )
    if not (d.get("path", "") or d.get("corpus", "")):
      raise ValueError(
        "config.data.path (a built experiments.data.sentiment_sets folder) or "
        "config.data.corpus (the text_corpus whose tokenizer the encoder "
        "uses) must be set for source='sentiment'"
      )
  if config.task == "speech" and d.sample_rate != speech_corpus.SAMPLE_RATE:
    raise ValueError(
      f"config.data.sample_rate={d.sample_rate}: the spoken sentences are "
      f"at {speech_corpus.SAMPLE_RATE} Hz"
    )


@functools.lru_cache(maxsize=4)
def _spoken_split(
  path: str, data_dir: str, limit: int, disjoint: bool, split: str
) -> dict:
  if not path:
    path = speech_corpus.build_spoken_sentences(
      data_dir or None, limit=limit or None, speaker_disjoint=disjoint
    )
  return speech_corpus.load(path, split)


@functools.lru_cache(maxsize=4)
def _speech_set(
  path, data_dir, limit, disjoint, split, num_samples, max_labels
) -> dict:
  """The split's usable clips: short enough, transcripts that fit."""
  clips = _spoken_split(path, data_dir, limit, disjoint, split)
  lengths = np.diff(clips["offsets"])
  texts = [str(t) for t in clips["transcripts"]]
  ids = [VOCAB.encode(t) for t in texts]
  keep = [
    i
    for i, (n, x) in enumerate(zip(lengths, ids, strict=True))
    if n <= num_samples and len(x) <= max_labels
  ]
  if not keep:
    raise ValueError(
      f"no {split} utterance of the {len(texts)} fits "
      f"config.data.num_samples={num_samples} samples and "
      f"config.data.max_label_length={max_labels} letters (the shortest "
      f"has {int(lengths.min()) if len(texts) else 0} samples); raise them"
    )
  labels = np.full((len(keep), max_labels), VOCAB.pad_id, np.int32)
  for row, i in enumerate(keep):
    labels[row, : len(ids[i])] = ids[i]
  return {
    "clips": clips,
    "keep": np.asarray(keep),
    "labels": labels,
    "texts": [texts[i] for i in keep],
  }


@functools.lru_cache(maxsize=2)
def _sentiment_set(
  path: str, corpus: str, data_dir: str, task: str, seq_len: int, k: int
) -> dict:
  if not path:
    path = sentiment_sets.build(corpus, data_dir or None)
  file = pathlib.Path(path) / f"{task}.npz"
  if not file.is_file():
    raise FileNotFoundError(
      f"{file} not found: point config.data.path at a folder built by "
      "`python -m experiments.data.sentiment_sets`"
    )
  with np.load(file) as z:
    ids, lengths = z["ids"], z["lengths"]
    labels, split = z["labels"], z["split"]
  if task == "vader_movie" and k == 2:  # the sign; zero ratings left out
    keep = labels != 0
    ids, lengths, split = ids[keep], lengths[keep], split[keep]
    labels = (labels[keep] > 0).astype(np.int32)
  fitted = np.full((len(ids), seq_len), text_lib.PAD_ID, np.int32)
  width = min(seq_len, ids.shape[1])
  fitted[:, :width] = ids[:, :width]
  cut = lengths > seq_len  # truncated here: end on </s> again
  fitted[cut, seq_len - 1] = text_lib.EOS_ID
  labels = labels.astype(np.float32 if k == 1 else np.int32)
  return {"ids": fitted, "labels": labels, "split": split}


def _data(config, split: str) -> dict:
  d = config.data
  if config.task == "speech":
    return _speech_set(
      d.get("path", ""),
      d.get("data_dir", ""),
      d.get("speech_limit", 0),
      d.get("speaker_disjoint", False),
      split,
      d.num_samples,
      d.max_label_length,
    )
  if config.task == "image":
    return d2v_data._fashion_mnist(d.get("path", ""), d.get("data_dir", ""))
  return _sentiment_set(
    d.get("path", ""),
    d.get("corpus", ""),
    d.get("data_dir", ""),
    d.sentiment_task,
    d.seq_len,
    config.model.num_labels,
  )


def _real_size(config, split: str) -> int:
  data = _data(config, split)
  if config.task == "speech":
    return len(data["keep"])
  if config.task == "image":
    return len(data["test" if split == "valid" else "train"][1])
  code = sentiment_sets.SPLITS.index(split)
  return int((data["split"] == code).sum())


def _image_loader(config, encoder, split: str) -> images_lib.ImageLoader:
  d, train = config.data, split == "train"
  images, labels = _data(config, split)["train" if train else "test"]
  return images_lib.ImageLoader(
    images,
    labels,
    batch_size=config.train.batch_size,
    image_size=int(np.broadcast_to(encoder.image_size, (2,))[0]),
    seed=config.train.seed,
    augment=train and d.get("augment", True),
    scale=tuple(d.get("crop_scale", (0.25, 1.0))),
    flip=d.get("flip", True),
    jitter=d.get("jitter", 0.0),
  )


def _real_rows(config, encoder, split: str, idx: np.ndarray) -> dict:
  """The examples `idx` of a split (speech or text) as a batch."""
  data = _data(config, split)
  if config.task == "speech":
    n = config.data.num_samples
    waves = np.zeros((len(idx), n), np.float32)
    mask = np.zeros((len(idx), n), np.int32)
    for row, i in enumerate(idx):
      wave = audio.normalize(
        audio.clip(
          data["clips"]["audio"], data["clips"]["offsets"], int(data["keep"][i])
        )
      )
      waves[row, : wave.size], mask[row, : wave.size] = wave, 1
    return {
      "waveform": waves,
      "attention_mask": mask,
      "labels": data["labels"][idx],
      "text": [data["texts"][i] for i in idx],
    }
  at = np.flatnonzero(data["split"] == sentiment_sets.SPLITS.index(split))
  ids = data["ids"][at[idx]]
  if ids.max() >= encoder.vocab_size or encoder.pad_id != text_lib.PAD_ID:
    raise ValueError(
      f"the sentiment set's tokenizer (pad {text_lib.PAD_ID}, ids up to "
      f"{int(ids.max())}) does not fit the encoder (pad {encoder.pad_id}, "
      f"vocab_size {encoder.vocab_size}); use the pretraining corpus"
    )
  return {
    "input_ids": ids,
    "attention_mask": (ids != text_lib.PAD_ID).astype(np.int32),
    "labels": data["labels"][at[idx]],
  }


def _real_train_batch(config, encoder, step: int) -> dict[str, Any]:
  size = config.train.batch_size
  if config.task == "image":
    batch = _image_loader(config, encoder, "train").batch(step)
    return {"images": batch["images"], "labels": batch["labels"]}
  idx = sampling.example_indices(
    _real_size(config, "train"), size, step, (0, size), config.train.seed
  )
  return _real_rows(config, encoder, "train", idx)


def _real_valid_batches(config, encoder) -> list[dict[str, Any]]:
  size, n = config.train.batch_size, num_valid(config)
  count = -(-n // size)
  if config.task == "image":
    # Eval batches of an unaugmented loader: within its first epoch every
    # row is a different test image (spare rows wrap into the next).
    loader = _image_loader(config, encoder, "valid")
    return [
      {k: loader.batch(i)[k] for k in ("images", "labels")}
      for i in range(count)
    ]
  idx = np.arange(count * size) % n  # spare rows repeat the first ones
  return [
    _real_rows(config, encoder, "valid", idx[i : i + size])
    for i in range(0, count * size, size)
  ]
