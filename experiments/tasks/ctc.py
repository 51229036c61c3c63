"""Speech recognition with CTC: a data2vec audio encoder on letters.

The task behind ``config.task="ctc"`` (`experiments/configs/d2v_finetune.py`
``:speech*``), fairseq's data2vec audio fine-tuning (spec §6.1):

* a linear CTC layer (`d2vjax.finetune.CTCModel`) over the 32 letters of
  fairseq's LibriSpeech dictionary (`VOCAB`, blank = ``<s>`` = 0);
* the CNN frozen with `frozen_mask` (unless
  ``model.freeze_feature_extractor`` is off) and, for the first
  ``optim.freeze_finetune_updates`` updates, the whole encoder: a second
  compiled step trains only the CTC layer, picked by the host step;
* tri-stage learning rate over fairseq Adam, one Adam per branch so that
  the encoder's starts counting when its frozen phase ends;
* fairseq's fine-tuning masks drawn per batch: spans of encoder frames
  (``time_mask``, through the mask embedding) and, with
  ``mask.mask_channel_prob > 0``, spans of feature channels zeroed for the
  whole clip (``channel_mask``);
* WER and CER of greedy CTC decoding; the best step by WER.

Data (``config.data.source``): ``"synthetic"`` clips are a sequence of
tones, one pitch per letter of a random transcript (silence between words),
normalised as fairseq's ``normalize: true``; ``"spoken_sentences"`` are
the espeak-spoken VADER sentences of `experiments.data.speech_corpus` with
their letter transcripts, without the clips longer than
``data.num_samples`` or transcripts longer than ``data.max_label_length``.
Training hears ``data.label_minutes`` of the train split's utterances (0 =
all; a random draw by ``data.subset_seed``, `labelled_subset`: data2vec's
10-minute and 1-hour budgets); the valid split validates and picks the best
checkpoint, on which the final splits are scored once at the end: ``test``
and, with ``data.tuxpaint_check``, ``tuxpaint_en``, the English Tux Paint
recordings (real voices, `tuxpaint_english`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from d2vjax import finetune as ft
from d2vjax import masking, optim, speech
from d2vjax.datasets import audio
from experiments.data import speech_corpus
from experiments.tasks import finetune

Array = jax.Array
Batch = finetune.Batch

VOCAB = ft.LetterVocab()
# The final split of the real English recordings (``data.tuxpaint_check``).
TUXPAINT_SPLIT = "tuxpaint_en"
# The labelled subset's draw is ``default_rng([subset_seed, SUBSET_STREAM])``:
# a stream of its own, apart from the set builders' and the batch sampler's.
SUBSET_STREAM = 0x1AB


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


@functools.lru_cache(maxsize=4)
def _spoken_split(
  path: str, data_dir: str, limit: int, disjoint: bool, split: str
) -> dict:
  if not path:
    path = speech_corpus.build_spoken_sentences(
      data_dir or None, limit=limit or None, speaker_disjoint=disjoint
    )
  return speech_corpus.load(path, split)


def _letter_set(
  clips: dict,
  rows: list[int],
  texts: list[str],
  num_samples: int,
  max_labels: int,
  what: str,
) -> dict:
  """The clips `rows` of a loaded set whose audio and letters fit.

  Args:
    clips: a split of a built set (`experiments.data.speech_corpus.load`).
    rows: candidate clips.
    texts: their transcripts.
    num_samples: the longest clip kept, in samples.
    max_labels: the most letter ids (word breaks included) kept.
    what: the clips' name in the error message.

  Returns:
    ``clips``, ``keep`` (the rows kept), their ``labels`` (``[n,
    max_labels]`` letter ids padded with `VOCAB.pad_id`) and ``texts``.
  """
  lengths = np.diff(clips["offsets"])[np.asarray(rows, int)]
  ids = [VOCAB.encode(t) for t in texts]
  fit = [
    j
    for j, (n, x) in enumerate(zip(lengths, ids, strict=True))
    if n <= num_samples and len(x) <= max_labels
  ]
  if not fit:
    raise ValueError(
      f"no {what} of the {len(texts)} fits "
      f"config.data.num_samples={num_samples} samples and "
      f"config.data.max_label_length={max_labels} letters (the shortest "
      f"has {int(lengths.min()) if len(texts) else 0} samples); raise them"
    )
  labels = np.full((len(fit), max_labels), VOCAB.pad_id, np.int32)
  for row, j in enumerate(fit):
    labels[row, : len(ids[j])] = ids[j]
  return {
    "clips": clips,
    "keep": np.asarray([rows[j] for j in fit], int),
    "labels": labels,
    "texts": [texts[j] for j in fit],
  }


@functools.lru_cache(maxsize=4)
def _speech_set(
  path, data_dir, limit, disjoint, split, num_samples, max_labels
) -> dict:
  """The split's usable clips: short enough, transcripts that fit."""
  clips = _spoken_split(path, data_dir, limit, disjoint, split)
  texts = [str(t) for t in clips["transcripts"]]
  return _letter_set(
    clips,
    list(range(len(texts))),
    texts,
    num_samples,
    max_labels,
    f"{split} utterance",
  )


def labelled_subset(
  samples: np.ndarray, minutes: float, seed: int
) -> np.ndarray:
  """Which training utterances keep their transcripts under a time budget.

  The utterances of a seeded permutation, taken in its order while their
  total duration stays within `minutes`: the same utterances for the same
  (durations, minutes, seed) on every machine, and for one seed a smaller
  budget's utterances are among a larger one's (a prefix of the same
  permutation). The draw stops at the first utterance that does not fit.

  Args:
    samples: ``[n]`` the utterances' lengths in samples (16 kHz).
    minutes: the budget (``config.data.label_minutes``); 0 = all of them.
    seed: the draw (``config.data.subset_seed``).

  Returns:
    Sorted indices into `samples`.

  Raises:
    ValueError: for a negative budget, one beyond the utterances' total
      duration, or one that the first utterance drawn already exceeds.

  References:
    data2vec spec §6.1; the paper's speech table fine-tunes on Libri-light's
    10-minute and 1-hour labelled subsets.
  """
  samples = np.asarray(samples, np.int64)
  per_minute = speech_corpus.SAMPLE_RATE * 60
  total = samples.sum() / per_minute
  if minutes < 0 or minutes > total:
    raise ValueError(
      f"config.data.label_minutes={minutes}: the train split's "
      f"{len(samples)} usable utterances last {total:.3f} minutes; keep up "
      "to that much (0 = all)"
    )
  if not minutes:
    return np.arange(len(samples))
  order = np.random.default_rng([seed, SUBSET_STREAM]).permutation(len(samples))
  spent = np.cumsum(samples[order]) / per_minute
  count = int(np.searchsorted(spent, minutes, side="right"))
  if not count:
    raise ValueError(
      f"config.data.label_minutes={minutes} selects no utterance: the "
      f"first one drawn (config.data.subset_seed={seed}) lasts "
      f"{spent[0]:.4f} minutes; raise the budget"
    )
  return np.sort(order[:count])


@functools.lru_cache(maxsize=2)
def _labelled_set(
  path, data_dir, limit, disjoint, num_samples, max_labels, minutes, seed
) -> dict:
  """The train split's utterances under a budget of minutes (`_speech_set`)."""
  data = _speech_set(
    path, data_dir, limit, disjoint, "train", num_samples, max_labels
  )
  at = labelled_subset(
    np.diff(data["clips"]["offsets"])[data["keep"]], minutes, seed
  )
  return {
    "clips": data["clips"],
    "keep": data["keep"][at],
    "labels": data["labels"][at],
    "texts": [data["texts"][i] for i in at],
  }


@functools.lru_cache(maxsize=2)
def tuxpaint_english(
  path: str, data_dir: str, num_samples: int, max_labels: int
) -> dict:
  """The English Tux Paint recordings with transcripts that fit the CTC.

  Args:
    path: a folder built by `experiments.data.speech_corpus.build_tuxpaint`;
      "" = built (or found) in `data_dir`'s cache.
    data_dir: the data directory ("" = the default).
    num_samples: the longest clip kept, in samples.
    max_labels: the most letter ids kept.

  Returns:
    As `_speech_set`: ``clips`` (the ``all`` split), ``keep`` (the English
    clips with a transcript, no longer than `num_samples`, whose letters fit
    `max_labels`), ``labels`` and ``texts``: the transcripts as the spoken
    sentences hold theirs (`speech_corpus.normalise_sentence`: upper-case
    words of A-Z and the apostrophe); those that normalise to nothing are
    left out.

  Raises:
    ValueError: when no English clip fits.
  """
  if not path:
    path = speech_corpus.build_tuxpaint(data_dir or None)
  clips = speech_corpus.load(path, "all")
  rows, texts = [], []
  for i, (lang, text) in enumerate(
    zip(clips["langs"], clips["transcripts"], strict=True)
  ):
    norm = speech_corpus.normalise_sentence(str(text)) if lang == "en" else None
    if norm is not None:  # "" (no English text) normalises to None too
      rows.append(i)
      texts.append(norm[1])
  return _letter_set(
    clips, rows, texts, num_samples, max_labels, "English Tux Paint clip"
  )


def _speech_labels(params: Any, freeze_cnn: bool) -> Any:
  """Optimizer branches: ``frozen`` (the CNN), ``encoder`` and ``proj``."""
  cnn = ft.frozen_mask(params)
  if not freeze_cnn:
    cnn = jax.tree.map(lambda _: False, cnn)
  return {
    name: jax.tree.map(
      lambda frozen, n=name: "frozen" if frozen else n, cnn[name]
    )
    for name in params
  }


class Task(finetune.FinetuneTask):
  """Speech recognition with CTC (``config.task="ctc"``)."""

  name = "ctc"
  modality = "audio"
  legacy_name = "speech"
  real_source = "spoken_sentences"
  default_best_metric = "eval/valid/wer"
  # Workdirs from before the label budgets and final splits trained on
  # every utterance and scored only the valid split.
  legacy_fields = finetune.FinetuneTask.legacy_fields | {
    "data.label_minutes": 0.0,
    "data.subset_seed": 0,
    "data.tuxpaint_check": False,
    "data.tuxpaint_path": "",
  }

  # -- model -----------------------------------------------------------------

  def create_model(self, encoder: nn.Module) -> nn.Module:
    m = self.config.model
    return ft.CTCModel(
      encoder,
      vocab_size=len(VOCAB),
      final_dropout=m.final_dropout,
      freeze_feature_extractor=m.freeze_feature_extractor,
    )

  def model_inputs(self, batch, freeze_encoder=None):
    kw = {"attention_mask": batch["attention_mask"]}
    if freeze_encoder is not None:  # a step, not the initialisation
      kw.update(
        time_mask=batch.get("time_mask"),  # none in validation batches
        channel_mask=batch.get("channel_mask"),
        freeze_encoder=freeze_encoder,
      )
    return (batch["waveform"],), kw

  def losses(self, logits: Array, padding: Array, batch: Batch) -> Array:
    labels = batch["labels"]
    one = lambda *a: ft.ctc_loss(*(x[None] for x in a))
    return jax.vmap(one)(logits, padding, labels, labels == VOCAB.pad_id)

  def scores(self, outputs):
    refs = [t for b in outputs.batches for t in b["text"]][: outputs.n]
    ids = ft.greedy_decode(outputs.logits, outputs.padding)
    hyps = [VOCAB.decode(x) for x in ids]
    return {"wer": ft.wer(refs, hyps), "cer": ft.cer(refs, hyps)}

  # -- optimizer -------------------------------------------------------------

  def create_schedule(self) -> optax.Schedule:
    o = self.config.optim
    return optim.tri_stage_schedule(
      o.peak_lr,
      self.config.train.steps,
      phase_ratio=tuple(o.phase_ratio),
      init_lr_scale=o.init_lr_scale,
      final_lr_scale=o.final_lr_scale,
    )

  def create_update_rule(
    self, params: Any
  ) -> list[optax.GradientTransformation]:
    """`optax.multi_transform` over `_speech_labels`.

    The CNN gets `optax.set_to_zero` (frozen for good, unless
    ``model.freeze_feature_extractor`` is off), the rest of the encoder and
    the CTC layer each their own fairseq Adam, so that the encoder's Adam
    starts counting when `freeze_finetune_updates` ends, as fairseq's
    per-parameter step does.

    References:
      data2vec spec §6.1; fairseq `optim/adam.py` (per-parameter step) and
      `wav2vec2_asr.py` (`freeze_finetune_updates`).
    """
    o = self.config.optim

    def adam():
      inner = [optim.scale_by_fairseq_adam(o.b1, o.b2, o.eps)]
      if o.weight_decay:
        inner.append(optax.add_decayed_weights(o.weight_decay))
      return optax.chain(*inner)

    labels = _speech_labels(params, self.config.model.freeze_feature_extractor)
    return [
      optax.multi_transform(
        {"frozen": optax.set_to_zero(), "encoder": adam(), "proj": adam()},
        labels,
      )
    ]

  @property
  def frozen_encoder_steps(self) -> int:
    return self.config.optim.freeze_finetune_updates

  def setup(self, mesh: Mesh) -> finetune.FinetuneState:
    self.check_source()
    # A final split without a usable clip, or a Tux Paint set that cannot
    # be built, stops the run now rather than after training.
    for split in self.final_splits:
      self.real_size(split)
    return super().setup(mesh)

  # -- data ------------------------------------------------------------------

  def check_synthetic(self) -> None:
    d = self.config.data
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

  def check_real(self) -> None:
    rate = self.config.data.sample_rate
    if rate != speech_corpus.SAMPLE_RATE:
      raise ValueError(
        f"config.data.sample_rate={rate}: the spoken sentences are "
        f"at {speech_corpus.SAMPLE_RATE} Hz"
      )

  def synthetic_example(self, rng: np.random.Generator) -> Batch:
    d = self.config.data
    num_words = int(rng.integers(1, d.max_words + 1))
    lengths = rng.integers(1, d.max_word_length + 1, num_words)
    words = ["".join(rng.choice(list(d.letters), n)) for n in lengths]
    transcript = " ".join(words)
    per_symbol = int(
      rng.integers(d.min_letter_samples, d.max_letter_samples + 1)
    )
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
    mask = np.arange(d.num_samples) < wave.size
    return {
      "waveform": padded,
      "attention_mask": mask.astype(np.int32),
      "labels": labels,
      "text": transcript,
    }

  def augment_batch(self, batch: Batch, rng: np.random.Generator) -> Batch:
    """Adds fairseq's ``apply_mask`` masks: time spans, channel spans."""
    padding = frame_padding(self.config, self.encoder, batch["attention_mask"])
    m = self.config.mask
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
        (padding.shape[0], self.encoder.hidden),
        mask_prob=m.mask_channel_prob,
        mask_length=m.mask_channel_length,
        min_masks=0,
        require_same_masks=True,
        rng=rng,
      )
    return batch

  def _split(self, split: str) -> dict:
    d = self.config.data
    if split == TUXPAINT_SPLIT:
      return tuxpaint_english(
        d.tuxpaint_path, d.data_dir, d.num_samples, d.max_label_length
      )
    source = (d.path, d.data_dir, d.speech_limit, d.speaker_disjoint)
    fit = (d.num_samples, d.max_label_length)
    # The batch sampler draws from this set: only the labelled utterances.
    if split == "train" and d.label_minutes:
      return _labelled_set(*source, *fit, d.label_minutes, d.subset_seed)
    return _speech_set(*source, split, *fit)

  @property
  def final_splits(self) -> tuple[str, ...]:
    # Once, on the checkpoint the valid split picked: the test utterances
    # and, on request, real voices (espeak's are all training has heard).
    d = self.config.data
    if d.source != self.real_source:
      return ()
    return ("test",) + ((TUXPAINT_SPLIT,) if d.tuxpaint_check else ())

  def final_batches(self, split: str) -> tuple[list[Batch], int]:
    n = self.real_size(split)
    return self.real_split_batches(split, n), n

  def real_size(self, split: str) -> int:
    return len(self._split(split)["keep"])

  def real_rows(self, split: str, idx: np.ndarray) -> Batch:
    data, n = self._split(split), self.config.data.num_samples
    waves = np.zeros((len(idx), n), np.float32)
    mask = np.zeros((len(idx), n), np.int32)
    for row, i in enumerate(idx):
      clips = data["clips"]
      wave = audio.normalize(
        audio.clip(clips["audio"], clips["offsets"], int(data["keep"][i]))
      )
      waves[row, : wave.size], mask[row, : wave.size] = wave, 1
    return {
      "waveform": waves,
      "attention_mask": mask,
      "labels": data["labels"][idx],
      "text": [data["texts"][i] for i in idx],
    }
