"""Fine-tuning data: batches as pure functions of (seed, step).

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

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from d2vjax import finetune as ft
from d2vjax import masking, speech

Array = jax.Array

SOURCES = ("synthetic",)
VOCAB = ft.LetterVocab()


def check_source(config: ml_collections.ConfigDict) -> None:
  d = config.data
  if d.source != "synthetic":
    raise ValueError(
      f"config.data.source={d.source!r}; this build generates data only: "
      "use 'synthetic'"
    )
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


def to_global(
  batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, Array]:
  """Global arrays from a batch that every process built whole.

  Each process places only the rows its devices hold; batches are cheap to
  rebuild and rows are coupled (time masks cut to a common count, Mixup
  pairs row i with row B-1-i), so no process builds only its share.
  """
  return {
    k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
    for k, v in batch.items()
  }


def batch_at(
  config: ml_collections.ConfigDict, encoder: nn.Module, step: int
) -> dict[str, Any]:
  """The training batch of global step `step`: a function of (seed, step).

  Row r is drawn from ``default_rng([seed, 0, step, r])``; the draws that
  span the batch (speech time masks, image Mixup/CutMix) from
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
  make = EXAMPLES[config.task]
  batch = collate(
    [
      make(config, encoder, np.random.default_rng([seed, 0, step, row]))
      for row in range(size)
    ]
  )
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

  Example i is drawn from ``default_rng([seed, 2, i])``; the rows past
  ``config.data.num_valid`` in the last batch are generated too (static
  shapes) and left out of the metrics.
  """
  check_source(config)
  seed, size = config.train.seed, config.train.batch_size
  count = -(-config.data.num_valid // size) * size
  make = EXAMPLES[config.task]
  examples = [
    make(config, encoder, np.random.default_rng([seed, 2, i]))
    for i in range(count)
  ]
  return [collate(examples[i : i + size]) for i in range(0, count, size)]
