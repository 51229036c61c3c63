"""Speech audio for data2vec: reading, resampling, cropping, Tux Paint stamps.

Audio files are decoded with soundfile (libsndfile, with Vorbis and FLAC),
mixed to mono and resampled to the model's rate (16 kHz) with a polyphase
filter. Clips of a set are stored packed, one flat array and ``[n + 1]``
offsets (`pack`, `clip`), so that hours of audio load as one memory map.

The Tux Paint stamps (Debian ``tuxpaint-stamps-default``) hold real
recordings of short descriptions, "A frog.", in a dozen languages, read by
volunteers: ``<category>/.../<name>_desc[_<lang>].ogg`` with the text in
``<name>.txt`` (first line English, then ``<lang>.utf8=<text>`` lines).
`tuxpaint_stamps` pairs them.

`CropLoader` serves pretraining: every row a clip of exactly
``num_samples`` samples, a random crop of a clip at least that long, as a
pure function of ``(seed, step, row)`` (`sampling`).

No downloads happen here; `experiments.data.speech_corpus` fetches and caches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import soundfile
from scipy import signal

from d2vjax.datasets import sampling

SAMPLE_RATE = 16_000
STAMPS_SUBDIR = "usr/share/tuxpaint/stamps"
# The recording of a stamp's description, English when no language is named.
_DESC = re.compile(r"^(?P<name>.+)_desc(?:_(?P<lang>[A-Za-z@_]+))?\.ogg$")
_LANG_LINE = re.compile(r"^(?P<lang>[A-Za-z@_]+)\.utf8=(?P<text>.*)$")
CROP_STREAM = 0xC209  # the crop offsets' random stream (see `sampling`)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
  """Resamples a 1-d signal with a polyphase anti-aliasing filter.

  Args:
    wave: ``[T]`` samples, any real dtype.
    orig_rate: its sample rate in Hz.
    new_rate: the wanted rate in Hz.

  Returns:
    float32 ``[ceil(T * new_rate / orig_rate)]``.

  References:
    `scipy.signal.resample_poly` (Kaiser-windowed FIR, 5.0 beta).
  """
  if orig_rate <= 0 or new_rate <= 0:
    raise ValueError(f"sample rates must be positive: {orig_rate}, {new_rate}")
  wave = np.asarray(wave, np.float32)
  if orig_rate == new_rate:
    return wave
  g = math.gcd(int(orig_rate), int(new_rate))
  out = signal.resample_poly(wave, new_rate // g, orig_rate // g)
  return out.astype(np.float32)


def read_audio(
  path: str | os.PathLike, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
  """Decodes an audio file to mono float32 at `sample_rate`.

  Args:
    path: any format libsndfile reads (WAV, FLAC, Ogg Vorbis, ...).
    sample_rate: the output rate in Hz.

  Returns:
    float32 ``[T]`` in about [-1, 1]: the mean of the channels, resampled.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file cannot be decoded or holds no samples (the
      message names it).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"audio file not found: {os.fspath(path)!r}")
  try:
    wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
    raise ValueError(
      f"{os.fspath(path)}: cannot decode the audio ({e}); is it a complete "
      "WAV/FLAC/Ogg file?"
    ) from e
  if wave.size == 0:
    raise ValueError(f"{os.fspath(path)}: the audio file holds no samples")
  return resample(wave.mean(axis=1), rate, sample_rate)


def to_int16(wave: np.ndarray) -> np.ndarray:
  """float samples in [-1, 1] -> int16 (clipped, rounded): half the bytes."""
  return np.clip(np.round(np.asarray(wave) * 32767.0), -32768, 32767).astype(
    np.int16
  )


def normalize(wave: np.ndarray, eps: float = 1e-5) -> np.ndarray:
  """Zero mean, unit variance over the last axis, in float32.

  References:
    fairseq ``task.normalize=true``: ``F.layer_norm(wav, wav.shape)``
    on each utterance (data2vec spec §4a.1).
  """
  wave = np.asarray(wave, np.float32)
  mean = wave.mean(axis=-1, keepdims=True)
  var = wave.var(axis=-1, keepdims=True)
  return (wave - mean) / np.sqrt(var + np.float32(eps))


def random_crop(
  wave: np.ndarray, max_len: int, rng: np.random.Generator
) -> np.ndarray:
  """A window of `max_len` samples at a uniform offset (all if shorter)."""
  if max_len < 1:
    raise ValueError(f"max_len={max_len} must be positive")
  extra = len(wave) - max_len
  if extra <= 0:
    return wave
  start = int(rng.integers(0, extra + 1))
  return wave[start : start + max_len]


def pack(waves: Sequence[np.ndarray], dtype=np.int16):
  """``(flat, offsets)``: clips concatenated, clip i = flat[o[i]:o[i+1]]."""
  offsets = np.zeros(len(waves) + 1, np.int64)
  offsets[1:] = np.cumsum([len(w) for w in waves])
  if not waves:
    return np.zeros(0, dtype), offsets
  return np.concatenate(waves).astype(dtype, copy=False), offsets


def clip(flat: np.ndarray, offsets: np.ndarray, i: int) -> np.ndarray:
  """Clip `i` of a packed set, as float32 in [-1, 1] if stored as int16."""
  wave = np.asarray(flat[offsets[i] : offsets[i + 1]])
  if wave.dtype == np.int16:
    return wave.astype(np.float32) / np.float32(32768.0)
  return wave.astype(np.float32)


class StampClip(NamedTuple):
  """One recorded Tux Paint stamp description.

  Attributes:
    path: the ``.ogg`` file.
    lang: the language code of the recording ("en", "fr", "pt_BR", ...).
    transcript: the description in that language, or "" when the stamp's
      ``.txt`` has none for it.
    category: the first folder below the stamps root ("animals", ...).
  """

  path: pathlib.Path
  lang: str
  transcript: str
  category: str


def parse_stamp_text(text: str) -> dict[str, str]:
  """Transcripts by language of a stamp's ``.txt`` file.

  The first non-empty line is the English text; ``<lang>.utf8=<text>``
  lines give the translations. Other lines are ignored.
  """
  out: dict[str, str] = {}
  lines = [line.strip() for line in text.splitlines()]
  lines = [line for line in lines if line]
  if lines and not _LANG_LINE.match(lines[0]):
    out["en"] = lines[0]
  for line in lines:
    m = _LANG_LINE.match(line)
    if m and m.group("text").strip():
      out.setdefault(m.group("lang"), m.group("text").strip())
  return out


def stamps_folder(root: str | os.PathLike) -> pathlib.Path:
  """The stamps folder: `root`, or `STAMPS_SUBDIR` of an unpacked package."""
  folder = pathlib.Path(root)
  if (folder / STAMPS_SUBDIR).is_dir():
    return folder / STAMPS_SUBDIR
  return folder


def tuxpaint_stamps(
  root: str | os.PathLike, *, require_transcript: bool = True
) -> list[StampClip]:
  """The described stamps of a Tux Paint stamps tree, in path order.

  Args:
    root: the stamps folder, or the root of an unpacked
      ``tuxpaint-stamps-default`` package (which holds it under
      `STAMPS_SUBDIR`).
    require_transcript: drop recordings whose ``.txt`` lacks the language
      (or is missing); otherwise keep them with transcript "".

  Returns:
    The clips, sorted by path.

  Raises:
    FileNotFoundError: `root` is not a folder, or holds no recordings.
    ValueError: a ``.txt`` file is not UTF-8 (the message names it).
  """
  folder = stamps_folder(root)
  if not folder.is_dir():
    raise FileNotFoundError(
      f"Tux Paint stamps folder not found: {os.fspath(folder)!r}; unpack "
      "the tuxpaint-stamps-default package there"
    )
  texts: dict[pathlib.Path, dict[str, str]] = {}
  out = []
  for path in sorted(folder.rglob("*_desc*.ogg")):
    m = _DESC.match(path.name)
    if not m:
      continue
    txt = path.with_name(m.group("name") + ".txt")
    if txt not in texts:
      try:
        texts[txt] = parse_stamp_text(txt.read_text("utf-8"))
      except FileNotFoundError:
        texts[txt] = {}
      except UnicodeDecodeError as e:
        raise ValueError(f"{txt}: not UTF-8 text ({e})") from e
    lang = m.group("lang") or "en"
    transcript = texts[txt].get(lang, "")
    if require_transcript and not transcript:
      continue
    category = path.relative_to(folder).parts[0]
    out.append(StampClip(path, lang, transcript, category))
  if not out:
    raise FileNotFoundError(
      f"{os.fspath(folder)}: no <name>_desc[_<lang>].ogg recordings"
      + (" with a transcript" if require_transcript else "")
    )
  return out


@dataclasses.dataclass
class CropLoader:
  """Fixed-length, normalised waveforms as a function of the step.

  Only clips of at least `num_samples` samples take part (the reference's
  ``min_sample_size``): each row is a uniform random crop of one, so a
  batch is the reference's crop-to-shortest batch without padding, at a
  static length.

  Attributes:
    sets: packed sets ``(flat, offsets)`` (int16 or float `flat`, e.g. a
      memory map; int ``[n + 1]`` offsets), read as one list of clips.
    batch_size: rows of the global batch.
    num_samples: samples per row.
    seed: picks the epoch permutations and the crop offsets.
    normalize: per-clip zero mean and unit variance, over the whole clip
      before cropping (fairseq normalises in ``__getitem__``, crops in the
      collater).
  """

  sets: Sequence[tuple[np.ndarray, np.ndarray]]
  batch_size: int
  num_samples: int
  seed: int = 0
  normalize: bool = True

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f"num_samples={self.num_samples} must be positive")
    # (set, clip) of every clip long enough, in set order.
    usable, total, longest = [], 0, 0
    for k, (_, offsets) in enumerate(self.sets):
      lengths = np.diff(np.asarray(offsets, np.int64))
      total += len(lengths)
      longest = max([longest, *lengths.tolist()])
      ok = np.flatnonzero(lengths >= self.num_samples)
      usable.append(np.stack([np.full(len(ok), k), ok], axis=1))
    self.usable = np.concatenate(usable) if usable else np.zeros((0, 2), int)
    if not len(self.usable):
      raise ValueError(
        f"no clip of the {total} has num_samples={self.num_samples} "
        f"samples (the longest has {longest}); lower config.data.num_samples"
      )

  def batch(
    self, step: int, rows: tuple[int, int] | None = None
  ) -> dict[str, np.ndarray]:
    """Rows ``lo..hi-1`` (default: all) of the batch of global `step`.

    Returns:
      ``waveforms`` float32 ``[n, num_samples]`` and ``clips`` int64
      ``[n, 2]``: the set and the clip within it of each row.
    """
    rows = (0, self.batch_size) if rows is None else rows
    pick = sampling.example_indices(
      len(self.usable), self.batch_size, step, rows, self.seed
    )
    out = np.empty((len(pick), self.num_samples), np.float32)
    for i, row in enumerate(range(rows[0], rows[1])):
      k, j = self.usable[pick[i]]
      wave = clip(*self.sets[k], int(j))
      if self.normalize:
        wave = normalize(wave)
      rng = sampling.row_rng(self.seed, CROP_STREAM, step, row)
      out[i] = random_crop(wave, self.num_samples, rng)
    return {"waveforms": out, "clips": self.usable[pick]}
