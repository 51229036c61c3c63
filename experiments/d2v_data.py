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

The only source so far is ``config.data.source="synthetic"``: the inputs are
*generated*, not read from a corpus -- tones in noise for audio, smooth
random patterns for images, uniform random tokens for text -- while the
masks follow the modality's real recipe with the config's parameters.
Readers of real corpora will replace the input half and keep the masking.

Batch layout (see `d2vjax.pretrain`): ``inputs`` (waveforms ``[B, samples]``
float32, images ``[B, H, W, 3]`` float32, or corrupted ids ``[B, T]``
int32), ``mask`` (``[B, T]`` bool, True = masked and scored), and for text
``targets_ids`` (the uncorrupted ids) and ``attention_mask`` (1 = token,
0 = padding). Audio batches are not padded: the reference crops every clip
of a batch to the same length, which keeps the teacher's instance-norm
statistics free of padding.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from d2vjax import masking, pretrain, speech

SOURCES = ("synthetic",)


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


def _vision(config, step, lo, hi) -> dict[str, np.ndarray]:
  size, patch = config.model.image_size, config.model.patch_size
  grid = (size // patch, size // patch)
  m = config.mask
  images = np.empty((hi - lo, size, size, 3), np.float32)
  masks = np.empty((hi - lo, grid[0] * grid[1]), bool)
  for i, row in enumerate(range(lo, hi)):
    rng = _row_rng(config, step, row)
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


def _text(config, step, lo, hi) -> dict[str, np.ndarray]:
  if config.mask.style not in ("span", "bert"):
    raise ValueError(
      f"config.mask.style={config.mask.style!r}; use 'span' or 'bert'"
    )
  d = config.data
  if not 2 <= d.min_len <= d.seq_len:
    raise ValueError(
      f"config.data.min_len={d.min_len} must be in [2, seq_len={d.seq_len}]"
    )
  rows = {"targets_ids": [], "inputs": [], "mask": []}
  for row in range(lo, hi):
    rng = _row_rng(config, step, row)
    ids = _synthetic_ids(config, rng)[None]
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
    ValueError: for an unknown data source, modality or text masking style,
      bad `rows`, or a degenerate batch (e.g. a mask that masks nothing).
  """
  if config.data.source not in SOURCES:
    raise ValueError(
      f"config.data.source={config.data.source!r}; this build generates "
      f"data only: use one of {SOURCES}"
    )
  if config.modality not in _BUILDERS:
    raise ValueError(
      f"config.modality={config.modality!r}; use one of {tuple(_BUILDERS)}"
    )
  size = config.train.batch_size
  lo, hi = (0, size) if rows is None else (int(rows[0]), int(rows[1]))
  if not 0 <= lo < hi <= size:
    raise ValueError(f"rows {rows} are not a slice of a batch of {size}")
  batch = _BUILDERS[config.modality](config, int(step), lo, hi)
  pretrain.check_batch(batch, config.modality)
  return batch
