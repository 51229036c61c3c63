"""Deterministic, resumable pretraining batches for data2vec.

`batch_at(config, step)` is the whole data pipeline of a run: the batch of
global step `step` is a pure function of `(config.train.seed, step)`, so a
resumed run needs nothing but the step it restarts from, and the batch does
not depend on how many processes or devices share it. Every draw comes from
numpy generators seeded with that pair:

* per-row draws (the row's input, its vision block mask, its text masking
  and corruption) use ``np.random.default_rng([seed, step, row])``, so a
  process builds only its own rows (`rows=(lo, hi)`) and gets exactly what
  a single process would have built for them;
* draws that couple the rows of a batch -- audio's ``require_same_masks``
  cuts every row to the batch's smallest masked count -- use
  ``np.random.default_rng([seed, step])`` over the whole global batch,
  which is cheap ([B, frames] booleans) and then sliced. fairseq takes that
  minimum per GPU batch (about 11 clips in the Base recipe); over the
  global batch of 176 clips the masked fraction is about 0.43 instead of
  0.46 (spec §4a.4), the price of a batch independent of the device count.

Sources (``config.data.source``):

* ``"synthetic"`` (the default, every modality): the inputs are
  *generated* -- tones in noise for audio, smooth random patterns for
  images, uniform random tokens for text -- while the masks follow the
  modality's real recipe with the config's parameters;
* ``"fashion_mnist"`` (vision): Fashion-MNIST's training images through
  data2vec's augmentations, resized to the model's image size
  (`d2vjax.datasets.images.ImageLoader`); ``config.data.path`` names the
  folder of IDX files, else the Debian package is fetched into
  ``config.data.data_dir``;
* ``"speech"`` (audio): fixed-length random crops of real clips
  (`d2vjax.datasets.audio.CropLoader`, normalised per clip) from the sets
  of `experiments.data.speech_corpus` named in ``config.data.speech_sets``
  (comma-separated: ``spoken_sentences`` -- its train split -- and/or
  ``tuxpaint``), built or found under ``config.data.data_dir``, or from
  the built folders in ``config.data.path``. Clips shorter than
  ``config.data.num_samples`` are skipped (the reference's
  ``min_sample_size``), so lower it for short clips (Tux Paint: about
  1.4 s);
* ``"corpus"`` (text): RoBERTa-style blocks of real English
  (`experiments.data.text_corpus`); ``config.data.path`` names a built corpus,
  else the one with the model's vocabulary is found or built under
  ``config.data.data_dir`` (and repacked to ``config.data.seq_len``).
  The model's ``vocab_size`` and ``mask.mask_id`` must match the
  tokenizer.

Real sources pick the examples of a step with
`d2vjax.datasets.sampling` (a per-epoch permutation) and draw their
augmentations from their own streams; the masks come from the same
per-row generators as in the synthetic path.

Batch layout (see `d2vjax.pretrain`): ``inputs`` (waveforms ``[B, samples]``
float32, images ``[B, H, W, 3]`` float32, or corrupted ids ``[B, T]``
int32), ``mask`` (``[B, T]`` bool, True = masked and scored), and for text
``targets_ids`` (the uncorrupted ids) and ``attention_mask`` (1 = token,
0 = padding). Audio batches are not padded: the reference crops every clip
of a batch to the same length, which keeps the teacher's instance-norm
statistics free of padding.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from d2vjax import masking, pretrain, speech
from d2vjax.datasets import audio as audio_lib
from d2vjax.datasets import images as images_lib
from d2vjax.datasets import text as text_lib
from experiments.data import fashion_mnist, speech_corpus, text_corpus

# Data source -> the modalities it serves.
SOURCES = {
  "synthetic": ("audio", "vision", "text"),
  "fashion_mnist": ("vision",),
  "corpus": ("text",),
  "speech": ("audio",),
}


def num_frames(config: ml_collections.ConfigDict) -> int:
  """Frames the audio CNN makes from `config.data.num_samples` samples."""
  conv_layers = tuple(tuple(layer) for layer in config.model.conv_layers)
  return int(speech.feature_lengths(config.data.num_samples, conv_layers))


def _row_rng(config: ml_collections.ConfigDict, step: int, row: int):
  return np.random.default_rng([config.train.seed, step, row])


def _normalise(wave: np.ndarray) -> np.ndarray:
  # fairseq `normalize: true`: layer norm over the whole clip, eps 1e-5.
  mean = wave.mean(axis=-1, keepdims=True)
  var = wave.var(axis=-1, keepdims=True)
  return (wave - mean) / np.sqrt(var + 1e-5)


def _synthetic_wave(rng: np.random.Generator, num: int, rate: int):
  """A few amplitude-modulated tones in noise: stand-in speech, normalised.

  The tones are computed for one second and repeated, and everything is
  float32, so that generating Base batches (176 clips of 320k samples)
  stays well below a step's device time.
  """
  period = min(num, rate)
  t = np.arange(period, dtype=np.float32) / np.float32(rate)
  tones = np.zeros(period, np.float32)
  for _ in range(3):
    freq, beat, phase = rng.uniform((80.0, 1.0, 0.0), (2000.0, 4.0, 6.28))
    tone = np.sin(np.float32(2 * np.pi * freq) * t + np.float32(phase))
    tones += (1 + np.sin(np.float32(2 * np.pi * beat) * t)) * tone
  noise = rng.random(num, dtype=np.float32) - np.float32(0.5)
  return _normalise(np.resize(tones, num) + noise)


@functools.lru_cache(maxsize=2)
def speech_sets(
  names: str, path: str, data_dir: str, limit: int, disjoint: bool = False
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """The packed clips ``(audio, offsets)`` of the configured speech sets.

  Args:
    names: comma-separated `speech_corpus.SETS`, built (or found) under
      `data_dir`; spoken sentences give their train split.
    path: comma-separated built set folders instead (their train split, or
      ``all`` for Tux Paint); "" = use `names`.
    data_dir: the data directory ("" = the default cache).
    limit: sentences of the spoken set (0 = all).
    disjoint: the spoken set's speaker-disjoint split, whose train split
      holds no voice of its valid and test splits.
  """
  folders = [p.strip() for p in path.split(",") if p.strip()]
  if not folders:
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = set(chosen) - set(speech_corpus.SETS)
    if unknown or not chosen:
      raise ValueError(
        f"config.data.speech_sets={names!r}; use some of "
        f"{speech_corpus.SETS}, comma-separated"
      )
    for name in chosen:
      if name == "tuxpaint":
        folders.append(speech_corpus.build_tuxpaint(data_dir or None))
      else:
        folders.append(
          speech_corpus.build_spoken_sentences(
            data_dir or None, limit=limit or None, speaker_disjoint=disjoint
          )
        )
  out = []
  for folder in folders:
    split = "all" if (Path(folder) / "all.npz").is_file() else "train"
    clips = speech_corpus.load(folder, split)
    out.append((clips["audio"], clips["offsets"]))
  return tuple(out)


def _speech_waves(config, step, lo, hi) -> np.ndarray:
  d = config.data
  if d.sample_rate != speech_corpus.SAMPLE_RATE:
    raise ValueError(
      f"config.data.sample_rate={d.sample_rate}: the speech sets are at "
      f"{speech_corpus.SAMPLE_RATE} Hz"
    )
  sets = speech_sets(
    d.speech_sets,
    d.path,
    d.data_dir,
    d.speech_limit,
    d.speaker_disjoint,
  )
  loader = audio_lib.CropLoader(
    sets, config.train.batch_size, d.num_samples, config.train.seed
  )
  return loader.batch(step, (lo, hi))["waveforms"]


def _audio(config, step, lo, hi) -> dict[str, np.ndarray]:
  frames = num_frames(config)
  m = config.mask
  # Drawn over the whole global batch: require_same_masks couples its rows.
  mask = masking.span_mask(
    (config.train.batch_size, frames),
    mask_prob=m.mask_prob,
    mask_length=m.mask_length,
    min_masks=m.min_masks,
    require_same_masks=m.require_same_masks,
    mask_dropout=m.mask_dropout,
    rng=np.random.default_rng([config.train.seed, step]),
  )
  if config.data.source == "speech":
    return {"inputs": _speech_waves(config, step, lo, hi), "mask": mask[lo:hi]}
  waves = [
    _synthetic_wave(
      _row_rng(config, step, row),
      config.data.num_samples,
      config.data.sample_rate,
    )
    for row in range(lo, hi)
  ]
  return {"inputs": np.stack(waves), "mask": mask[lo:hi]}


def _synthetic_image(rng: np.random.Generator, size: int, out: np.ndarray):
  """Smooth random colour patterns plus pixel noise, roughly unit scale.

  Written into `out` in float32: at Base sizes (2048 images a step)
  generation must stay cheap next to the step itself.
  """
  coarse = rng.standard_normal((size // 4 + 1, size // 4 + 1, 3), np.float32)
  out[...] = np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)[:size, :size]
  out += (rng.random((size, size, 3), np.float32) - 0.5) * np.float32(0.7)


def _image_loader(config) -> images_lib.ImageLoader:
  d = config.data
  splits = fashion_mnist.load(d.path, d.data_dir)
  if d.split not in splits:
    raise ValueError(
      f"config.data.split={d.split!r}; use one of {tuple(splits)}"
    )
  return images_lib.ImageLoader(
    *splits[d.split],
    batch_size=config.train.batch_size,
    image_size=config.model.image_size,
    seed=config.train.seed,
    augment=d.augment,
    scale=tuple(d.crop_scale),
    ratio=tuple(d.crop_ratio),
    flip=d.flip,
    jitter=d.jitter,
    mean=d.mean,
    std=d.std,
  )


def _vision(config, step, lo, hi) -> dict[str, np.ndarray]:
  size, patch = config.model.image_size, config.model.patch_size
  grid = (size // patch, size // patch)
  m = config.mask
  synthetic = config.data.source == "synthetic"
  if synthetic:
    images = np.empty((hi - lo, size, size, 3), np.float32)
  else:
    images = _image_loader(config).batch(step, (lo, hi))["images"]
  masks = np.empty((hi - lo, grid[0] * grid[1]), bool)
  for i, row in enumerate(range(lo, hi)):
    rng = _row_rng(config, step, row)
    if synthetic:  # the image first: keeps the generated batches as they were
      _synthetic_image(rng, size, images[i])
    masks[i] = masking.block_mask(
      grid,
      num_masking_patches=m.num_masking_patches,
      min_num_patches=m.min_num_patches,
      max_num_patches=m.max_num_patches,
      min_aspect=m.min_aspect,
      rng=rng,
    ).reshape(-1)
  return {"inputs": images, "mask": masks}


def _synthetic_ids(config, rng: np.random.Generator) -> np.ndarray:
  """`<s>`, uniform ordinary tokens, `</s>`, then padding to `seq_len`."""
  d = config.data
  length = int(rng.integers(d.min_len, d.seq_len + 1))
  # Uniform over the ordinary ids: the specials and <mask> skipped.
  mask_id = config.mask.mask_id
  body = rng.integers(d.num_special, config.model.vocab_size - 1, length - 2)
  body += body >= mask_id
  ids = np.full(d.seq_len, config.model.pad_id, np.int32)
  ids[0], ids[length - 1] = d.bos_id, d.eos_id
  ids[1 : length - 1] = body
  return ids


def _text_row(config, rng: np.random.Generator, ids: np.ndarray):
  m = config.mask
  vocab = config.model.vocab_size
  if m.style == "span":
    # The released recipe counts and may mask <s> and </s> too.
    mask = masking.text_span_mask(
      ids,
      mask_prob=m.mask_prob,
      mask_multiple_length=m.span_length,
      pad_id=config.model.pad_id,
      rng=rng,
    )
    corrupted = masking.apply_text_mask(
      ids, mask, mask_id=m.mask_id, rng=rng, vocab_size=vocab
    )
  else:
    # The paper's BERT masking. The loss covers every selected token, the
    # kept and randomised ones included (BERT's convention); fairseq would
    # score only the <mask> positions (its issue #4229).
    mask = masking.bert_mask(
      ids,
      mask_prob=m.bert_prob,
      pad_id=config.model.pad_id,
      special_ids=(config.data.bos_id, config.data.eos_id),
      rng=rng,
    )
    corrupted = masking.apply_text_mask(
      ids,
      mask,
      mask_id=m.mask_id,
      rng=rng,
      vocab_size=vocab,
      leave_unmasked_prob=m.bert_leave_unmasked_prob,
      random_token_prob=m.bert_random_token_prob,
    )
  return mask, corrupted


@functools.lru_cache(maxsize=2)
def _corpus_blocks(path: str, seq_len: int) -> tuple[dict, np.ndarray]:
  corpus = text_lib.load_corpus(path)
  meta, blocks = corpus["meta"], corpus["blocks"]
  if blocks.shape[1] != seq_len:  # repack the stream for this length
    blocks = text_lib.pack_blocks(
      np.asarray(corpus["tokens"]), seq_len, dtype=blocks.dtype
    )
  return meta, blocks


@functools.lru_cache(maxsize=2)
def _default_corpus(data_dir: str, vocab: int, words: int) -> str:
  # The vocabulary comes from the config, so that model and tokenizer agree
  # by construction; blocks of another length are repacked on loading.
  try:
    path = text_corpus.build_corpus(
      data_dir or None, vocab_size=vocab, max_words=words
    )
  except ValueError as e:
    raise ValueError(
      f"config.model.vocab_size={vocab} cannot size the corpus tokenizer: "
      f"{e}; pass e.g. --config.model.vocab_size=8192 "
      "--config.mask.mask_id=8191"
    ) from e
  return str(path)


def _corpus_path(config) -> str:
  d = config.data
  if d.path:
    return d.path
  return _default_corpus(d.data_dir, config.model.vocab_size, d.max_words)


def check_corpus_ids(config, meta: dict, path: str) -> None:
  """Raises ValueError unless the config's ids are the tokenizer's."""
  ids = meta["ids"]
  pairs = (
    ("config.model.vocab_size", config.model.vocab_size, meta["vocab_size"]),
    ("config.mask.mask_id", config.mask.mask_id, ids["mask"]),
    ("config.model.pad_id", config.model.pad_id, ids["pad"]),
    ("config.data.bos_id", config.data.bos_id, ids["bos"]),
    ("config.data.eos_id", config.data.eos_id, ids["eos"]),
  )
  for name, have, want in pairs:
    if have != want:
      raise ValueError(
        f"{name}={have} but the corpus tokenizer in {path} has {want}; pass "
        f"--config.model.vocab_size={meta['vocab_size']} "
        f"--config.mask.mask_id={ids['mask']} (and the tokenizer's pad/bos/"
        "eos ids) or point config.data.path at a matching corpus"
      )


def _corpus_ids(config, step, lo, hi) -> np.ndarray:
  path = _corpus_path(config)
  meta, blocks = _corpus_blocks(path, config.data.seq_len)
  check_corpus_ids(config, meta, path)
  loader = text_lib.BlockLoader(
    blocks, config.train.batch_size, config.train.seed
  )
  return loader.batch(step, (lo, hi))["ids"]


def _text(config, step, lo, hi) -> dict[str, np.ndarray]:
  if config.mask.style not in ("span", "bert"):
    raise ValueError(
      f"config.mask.style={config.mask.style!r}; use 'span' or 'bert'"
    )
  d = config.data
  synthetic = d.source == "synthetic"
  if synthetic and not 2 <= d.min_len <= d.seq_len:
    raise ValueError(
      f"config.data.min_len={d.min_len} must be in [2, seq_len={d.seq_len}]"
    )
  corpus = None if synthetic else _corpus_ids(config, step, lo, hi)
  rows = {"targets_ids": [], "inputs": [], "mask": []}
  for i, row in enumerate(range(lo, hi)):
    rng = _row_rng(config, step, row)
    ids = _synthetic_ids(config, rng)[None] if synthetic else corpus[i : i + 1]
    mask, corrupted = _text_row(config, rng, ids)
    rows["targets_ids"].append(ids[0])
    rows["inputs"].append(corrupted[0])
    rows["mask"].append(mask[0])
  batch = {k: np.stack(v) for k, v in rows.items()}
  batch["attention_mask"] = (
    batch["targets_ids"] != config.model.pad_id
  ).astype(np.int32)
  return batch


_BUILDERS = {"audio": _audio, "vision": _vision, "text": _text}


def batch_at(
  config: ml_collections.ConfigDict,
  step: int,
  rows: tuple[int, int] | None = None,
) -> dict[str, Any]:
  """The pretraining batch of global step `step` (or some of its rows).

  Args:
    config: a `experiments/configs/d2v_*.py` config.
    step: the global step (optimizer updates done before this batch).
    rows: ``(lo, hi)``: build only rows ``lo..hi-1`` of the global batch of
      ``config.train.batch_size`` rows, e.g. one process's share; None =
      all of them. The rows equal the same rows of the whole batch.

  Returns:
    A dict of numpy arrays with leading dimension ``hi - lo`` (see the
    module docstring), checked with `d2vjax.pretrain.check_batch`.

  Raises:
    ValueError: for an unknown data source or modality (or a source that
      does not serve the modality), an unknown text masking style, bad
      `rows`, a tokenizer whose ids differ from the config's, or a
      degenerate batch (e.g. a mask that masks nothing).
  """
  if config.modality not in _BUILDERS:
    raise ValueError(
      f"config.modality={config.modality!r}; use one of {tuple(_BUILDERS)}"
    )
  source = config.data.source
  if config.modality not in SOURCES.get(source, ()):
    usable = tuple(k for k, v in SOURCES.items() if config.modality in v)
    raise ValueError(
      f"config.data.source={source!r} does not serve {config.modality}; "
      f"use one of {usable}"
    )
  size = config.train.batch_size
  lo, hi = (0, size) if rows is None else (int(rows[0]), int(rows[1]))
  if not 0 <= lo < hi <= size:
    raise ValueError(f"rows {rows} are not a slice of a batch of {size}")
  batch = _BUILDERS[config.modality](config, int(step), lo, hi)
  pretrain.check_batch(batch, config.modality)
  return batch
