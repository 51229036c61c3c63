"""Builds SpokenReviews: real rated sentences, spoken and "seen", unaligned.

SpokenReviews is a local stand-in for CMU-MOSI with three unaligned
streams per utterance:

* **text** (real): the 10,605 VADER movie-review snippets (`vader.py`),
  lowercased word tokens with punctuation split off, as ids over a
  vocabulary of the train split (0 = pad, 1 = unknown) and as strings;
* **label** (real): the mean human rating times 0.75, in [-3, 3];
* **audio** (synthetic): espeak-ng speaking the sentence (`espeak.py`) as
  one of 77 "speakers" (7 English accents x 11 voice variants, each with its
  own rate and pitch), turned into 40-d log-mel frames at 100 Hz;
* **vision** (synthetic): a 30 fps articulatory track (jaw opening, lip
  rounding, closure, spreading, lip-teeth and tongue-tip contact) rendered
  from espeak's phoneme timing with Gaussian coarticulation, a
  speaker-specific offset and gain, and noise. It carries the words'
  timing and nothing else: no sentiment cue beyond what the words hold.

Speaker, rate, pitch and noise are drawn from the seed and the sentence id
only, never from the rating, so no prosody leaks the label. Every
utterance is a pure function of (seed, sentence): the build gives the same
arrays for any number of worker processes. The result is cached under
`<data_dir>/spoken_reviews/<key>` and read with
`mtagjax.datasets.load_spoken_reviews`.

  python -m experiments.data.spoken_reviews --data_dir=... [--limit=300]
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import re
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.fft
from scipy import ndimage
from tqdm import tqdm

from experiments.data import espeak, fetch, vader

VERSION = 1
SPLITS = ("train", "valid", "test")
FRACTIONS = {"valid": 0.1, "test": 0.2}  # train takes the rest
ACCENTS = (
  "en-us",
  "en-gb",
  "en-gb-scotland",
  "en-gb-x-gbclan",
  "en-gb-x-rp",
  "en-gb-x-gbcwmd",
  "en-029",
)
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
RATE_RANGE = (140, 200)  # words per minute
PITCH_RANGE = (30, 70)
PAD_ID, UNK_ID = 0, 1
SPECIALS = ("<pad>", "<unk>")

# Audio features: a 25 ms Hann window every 10 ms (the hop is 220.5 samples
# at 22,050 Hz: frame i starts at round(i * sr / 100)), zero-padded to a
# 1024-point FFT; power spectrum; 40 triangular HTK-mel filters from 20 Hz
# to sr / 2; natural log of the energies plus 1e-6 (silence -> -13.8).
N_MELS = 40
FRAME_RATE = 100  # audio frames per second
WIN_S = 0.025
N_FFT = 1024
F_MIN = 20.0
LOG_FLOOR = 1e-6
# Vision: 30 frames per second, one value per channel in about [0, 1].
FPS = 30
CHANNELS = (
  "jaw_open",
  "lip_round",
  "lip_closure",
  "lip_spread",
  "lip_teeth",
  "tongue_tip",
)
COARTICULATION_MS = 30.0  # std of the Gaussian smoothing the targets
GRID_MS = 4  # time step of the targets before smoothing
SPEAKER_OFFSET_STD, SPEAKER_GAIN, NOISE_STD = 0.05, (0.85, 1.15), 0.02

# Articulatory targets per phoneme class, in CHANNELS order.
_TARGETS = {
  "pause": (0.05, 0.1, 0.6, 0.0, 0.0, 0.0),
  "bilabial": (0.1, 0.1, 1.0, 0.1, 0.0, 0.0),
  "labiodental": (0.15, 0.0, 0.3, 0.1, 1.0, 0.0),
  "dental": (0.2, 0.0, 0.0, 0.2, 0.0, 1.0),
  "postalveolar": (0.2, 0.6, 0.0, 0.0, 0.0, 0.3),
  "w": (0.15, 0.9, 0.2, 0.0, 0.0, 0.0),
  "r": (0.25, 0.4, 0.0, 0.0, 0.0, 0.3),
  "l": (0.3, 0.0, 0.0, 0.2, 0.0, 0.6),
  "alveolar": (0.2, 0.0, 0.0, 0.3, 0.0, 0.4),
  "dorsal": (0.35, 0.0, 0.0, 0.1, 0.0, 0.0),
  "open": (0.9, 0.0, 0.0, 0.2, 0.0, 0.0),
  "mid": (0.55, 0.0, 0.0, 0.2, 0.0, 0.0),
  "close_front": (0.25, 0.0, 0.0, 0.8, 0.0, 0.0),
  "back_round": (0.6, 0.7, 0.0, 0.0, 0.0, 0.0),
  "close_round": (0.3, 0.9, 0.0, 0.0, 0.0, 0.0),
}
_CLASS_INDEX = {name: i for i, name in enumerate(_TARGETS)}
_TARGET_TABLE = np.asarray(list(_TARGETS.values()), np.float32)
# espeak's English phoneme mnemonics, by their leading characters.
_CONSONANTS = (
  (("tS", "dZ", "S", "Z"), "postalveolar"),
  (("p", "b", "m"), "bilabial"),
  (("f", "v"), "labiodental"),
  (("T", "D"), "dental"),
  (("w",), "w"),
  (("r",), "r"),
  (("l",), "l"),
  (("t", "d", "n", "s", "z"), "alveolar"),
  (("k", "g", "N", "h", "j", "x"), "dorsal"),
)
_VOWELS = {
  **dict.fromkeys("aA", "open"),
  **dict.fromkeys("Ee3@V", "mid"),
  **dict.fromkeys("Ii", "close_front"),
  **dict.fromkeys("Oo0", "back_round"),
  **dict.fromkeys("Uu", "close_round"),
}
_STRESS = "',%="  # espeak's stress and syllable marks before a phoneme
_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
  """Lowercased words (inner apostrophes kept) and punctuation marks."""
  return _TOKEN.findall(text.lower())


def speakers(seed: int) -> list[dict[str, Any]]:
  """The 77 speakers: voice and central rate and pitch, drawn from `seed`."""
  out = []
  for accent in ACCENTS:
    for variant in VARIANTS:
      rng = np.random.default_rng([seed, 1, len(out)])
      out.append(
        {
          "voice": f"{accent}+{variant}",
          "accent": accent,
          "variant": variant,
          # Centres leave room for the per-utterance jitter.
          "rate": int(rng.integers(RATE_RANGE[0] + 10, RATE_RANGE[1] - 9)),
          "pitch": int(rng.integers(PITCH_RANGE[0] + 5, PITCH_RANGE[1] - 4)),
        }
      )
  return out


def _utterance_rng(seed: int, sid: str, stream: int) -> np.random.Generator:
  # crc32, unlike hash(), is the same in every process.
  return np.random.default_rng([seed, stream, zlib.crc32(sid.encode())])


def _phoneme_class(name: str) -> str:
  name = name.lstrip(_STRESS)
  if not name or name[0] in "_;":
    return "pause"
  for prefixes, cls in _CONSONANTS:
    if name.startswith(prefixes):
      return cls
  return _VOWELS.get(name[0], "mid")


def _phoneme_segments(name: str) -> list[str]:
  """One class, or two for a diphthong (its first and last vowel)."""
  cls = _phoneme_class(name)
  vowels = [_VOWELS[c] for c in name.lstrip(_STRESS) if c in _VOWELS]
  if cls in _VOWELS.values() and len(vowels) > 1 and vowels[-1] != cls:
    return [cls, vowels[-1]]
  return [cls]


_MEL_CACHE: dict[int, np.ndarray] = {}


def _mel_filters(sr: int) -> np.ndarray:
  """`[N_MELS, N_FFT // 2 + 1]` triangular filters on the HTK mel scale."""
  if sr not in _MEL_CACHE:
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    edges = hz(np.linspace(mel(F_MIN), mel(sr / 2), N_MELS + 2))
    freqs = np.linspace(0, sr / 2, N_FFT // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lo) / (mid - lo)
    down = (hi - freqs) / (hi - mid)
    _MEL_CACHE[sr] = np.maximum(0.0, np.minimum(up, down)).astype(np.float32)
  return _MEL_CACHE[sr]


def log_mel(wave: np.ndarray, sr: int) -> np.ndarray:
  """`[T, 40]` float32 log-mel energies, T = floor(100 x seconds) (>= 1)."""
  x = wave.astype(np.float32) / 32768.0
  win = round(WIN_S * sr)
  num = max(1, len(x) * FRAME_RATE // sr)
  starts = np.round(np.arange(num) * (sr / FRAME_RATE)).astype(np.int64)
  x = np.concatenate([x, np.zeros(win, np.float32)])
  frames = x[starts[:, None] + np.arange(win)]
  # The periodic Hann window, as scipy.signal.get_window("hann", win).
  frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)).astype(
    np.float32
  )
  spec = scipy.fft.rfft(frames, N_FFT)  # complex64 for float32 frames
  power = spec.real**2 + spec.imag**2
  return np.log(power @ _mel_filters(sr).T + LOG_FLOOR)


def articulation(
  events: Sequence[espeak.Event],
  duration_ms: float,
  speaker: dict[str, Any],
  rng: np.random.Generator,
) -> np.ndarray:
  """`[T, 6]` float32 articulatory track at 30 fps, T = floor(30 x s).

  Each phoneme holds its class's targets from its event to the next one
  (a diphthong moves half-way through); a Gaussian of 30 ms std blends
  neighbours (coarticulation); the speaker's gain and offset and per-frame
  noise follow.
  """
  steps = max(1, math.ceil(duration_ms / GRID_MS))
  classes = np.full(steps, _CLASS_INDEX["pause"], np.int64)
  phones = [e for e in events if e.kind == "phoneme"]
  for i, e in enumerate(phones):
    end = phones[i + 1].ms if i + 1 < len(phones) else duration_ms
    a = min(round(e.ms / GRID_MS), steps)
    b = min(max(round(end / GRID_MS), a), steps)
    parts = _phoneme_segments(e.phoneme)
    mid = (a + b) // 2 if len(parts) == 2 else b
    classes[a:mid] = _CLASS_INDEX[parts[0]]
    classes[mid:b] = _CLASS_INDEX[parts[-1]]
  grid = ndimage.gaussian_filter1d(
    _TARGET_TABLE[classes], COARTICULATION_MS / GRID_MS, axis=0
  )
  num = max(1, int(duration_ms * FPS // 1000))
  centres = ((np.arange(num) + 0.5) * 1000.0 / FPS / GRID_MS).astype(int)
  track = grid[np.minimum(centres, steps - 1)]
  gain = np.asarray(speaker["gain"], np.float32)
  offset = np.asarray(speaker["offset"], np.float32)
  noise = rng.normal(0.0, NOISE_STD, track.shape).astype(np.float32)
  return track * gain + offset + noise


def _speaker_look(seed: int, index: int) -> dict[str, Any]:
  """A speaker's articulatory gain and offset, one value per channel."""
  rng = np.random.default_rng([seed, 3, index])
  return {
    "gain": rng.uniform(*SPEAKER_GAIN, len(CHANNELS)).tolist(),
    "offset": rng.normal(0.0, SPEAKER_OFFSET_STD, len(CHANNELS)).tolist(),
  }


def plan(records: Sequence[vader.Record], seed: int) -> list[dict[str, Any]]:
  """Each sentence's speaker, rate and pitch (from seed and id only)."""
  table = speakers(seed)
  out = []
  for r in records:
    rng = _utterance_rng(seed, r.id, stream=2)
    s = int(rng.integers(len(table)))
    prosody = {
      "rate": table[s]["rate"] + int(rng.integers(-10, 11)),
      "pitch": table[s]["pitch"] + int(rng.integers(-5, 6)),
    }
    voice = table[s]["voice"]
    out.append(dict(id=r.id, text=r.text, speaker=s, voice=voice, **prosody))
  return out


def featurize(item: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
  """Synthesises one planned utterance; returns its float16 features."""
  wave, sr, events = espeak.synthesize(
    item["text"], item["voice"], item["rate"], item["pitch"]
  )
  rng = _utterance_rng(seed, item["id"], stream=5)  # the vision noise
  look = _speaker_look(seed, item["speaker"])
  audio = log_mel(wave, sr)
  vision = articulation(events, 1000.0 * len(wave) / sr, look, rng)
  words = [
    (e.ms, e.text_position, e.length) for e in events if e.kind == "word"
  ]
  return {
    "audio": audio.astype(np.float16),
    "vision": vision.astype(np.float16),
    "words": np.asarray(words, np.int32).reshape(-1, 3),
  }


def _featurize_star(args):
  return featurize(*args)


def split_indices(
  plans: Sequence[dict[str, Any]], seed: int, speaker_disjoint: bool
) -> dict[str, np.ndarray]:
  """Indices into `plans` per split, about 70/10/20 of the utterances.

  Random: a seeded permutation cut at 70% and 80%. Speaker-disjoint: the
  speakers present, in a seeded order, fill test then valid until each
  holds its share of utterances; the rest go to train, so no test or valid
  voice is heard in training.
  """
  n = len(plans)
  if n < 3:
    raise ValueError(f"need at least 3 sentences for 3 splits, got {n}")
  rng = np.random.default_rng([seed, 4])
  if not speaker_disjoint:
    order = rng.permutation(n)
    n_test = max(1, round(FRACTIONS["test"] * n))
    n_valid = max(1, round(FRACTIONS["valid"] * n))
    cuts = np.split(order, [n_test, n_test + n_valid])
    return dict(
      zip(("test", "valid", "train"), map(np.sort, cuts), strict=True)
    )
  spk = np.asarray([p["speaker"] for p in plans])
  present = np.unique(spk)
  if len(present) < 3:
    raise ValueError(
      f"a speaker-disjoint split needs at least 3 speakers; the "
      f"{n} sentences use {len(present)}: build more sentences"
    )
  groups: dict[str, list[int]] = {s: [] for s in SPLITS}
  counts = dict.fromkeys(SPLITS, 0)
  for s in rng.permutation(present):
    size = int((spk == s).sum())
    name = "train"
    for held in ("test", "valid"):
      if counts[held] < FRACTIONS[held] * n:
        name = held
        break
    groups[name].append(int(s))
    counts[name] += size
  if not groups["train"]:
    raise ValueError(
      f"speaker-disjoint split of {n} sentences left no speaker for "
      "train: build more sentences"
    )
  return {k: np.flatnonzero(np.isin(spk, v)) for k, v in groups.items()}


def cache_key(
  seed: int,
  limit: int | None,
  speaker_disjoint: bool,
  archive: str | os.PathLike | None = None,
) -> str:
  """The cache folder name for these build parameters."""
  key = (
    f"movie-v{VERSION}-seed{seed}-{'all' if limit is None else f'n{limit}'}"
    f"-{'speaker' if speaker_disjoint else 'random'}"
  )
  if archive is not None:  # a custom source: name it by its content
    if not pathlib.Path(archive).is_file():
      raise FileNotFoundError(f"VADER archive not found: {archive!r}")
    digest = hashlib.sha1(pathlib.Path(archive).read_bytes()).hexdigest()
    key += f"-src{digest[:10]}"
  return key


def _ragged(parts: Sequence[np.ndarray], dtype) -> tuple[np.ndarray, ...]:
  """Concatenation and `[n + 1]` int64 offsets of a list of arrays."""
  offsets = np.zeros(len(parts) + 1, np.int64)
  offsets[1:] = np.cumsum([len(p) for p in parts])
  return np.concatenate(parts).astype(dtype, copy=False), offsets


def _vocabulary(tokens: Sequence[list[str]]) -> list[str]:
  """Pad, unknown, then the train tokens by falling count, then A-Z."""
  counts = Counter(t for sent in tokens for t in sent)
  return [*SPECIALS, *sorted(counts, key=lambda t: (-counts[t], t))]


def _write_split(path, plans, records, feats, tokens, vocab_ids) -> None:
  ids = [[vocab_ids.get(t, UNK_ID) for t in sent] for sent in tokens]
  text_ids, text_offsets = _ragged([np.asarray(x) for x in ids], np.int32)
  flat_tokens = np.asarray([t for sent in tokens for t in sent], dtype=str)
  audio, audio_offsets = _ragged([f["audio"] for f in feats], np.float16)
  vision, vision_offsets = _ragged([f["vision"] for f in feats], np.float16)
  words, word_offsets = _ragged([f["words"] for f in feats], np.int32)
  np.savez(
    path,
    ids=np.asarray([p["id"] for p in plans], dtype=str),
    labels=np.asarray([r.label for r in records], np.float32),
    ratings=np.asarray([r.rating for r in records], np.float32),
    speakers=np.asarray([p["speaker"] for p in plans], np.int32),
    rates=np.asarray([p["rate"] for p in plans], np.int32),
    pitches=np.asarray([p["pitch"] for p in plans], np.int32),
    text_ids=text_ids,
    text_offsets=text_offsets,
    tokens=flat_tokens.reshape(-1),
    audio=audio,
    audio_offsets=audio_offsets,
    vision=vision,
    vision_offsets=vision_offsets,
    word_events=words,
    word_offsets=word_offsets,
  )


def build(
  root: str | os.PathLike | None = None,
  *,
  seed: int = 0,
  limit: int | None = None,
  speaker_disjoint: bool = False,
  workers: int = 2,
  archive: str | os.PathLike | None = None,
  progress: bool = True,
) -> pathlib.Path:
  """Builds (or finds) the cached SpokenReviews set; returns its folder.

  Args:
    root: the data directory (`fetch.data_dir`); the set goes to
      `<root>/spoken_reviews/<cache_key(...)>`.
    seed: seeds the sentence order, speakers, prosody, noise and splits.
    limit: build only the first `limit` sentences of the seeded order.
    speaker_disjoint: hold out whole speakers for valid and test instead
      of a random split of the sentences.
    workers: synthesis processes (1 = this process); the arrays do not
      depend on it. Workers are spawned, so a script that calls `build`
      with `workers > 1` needs the `if __name__ == "__main__":` guard.
    archive: a vaderSentiment sdist (or ratings archive) to read instead
      of fetching the published one; its hash joins the cache key.
    progress: show a tqdm bar.

  Returns:
    The cache folder, holding `train.npz`, `valid.npz`, `test.npz`,
    `vocab.json` and `meta.json`; see `mtagjax.datasets.load_spoken_reviews`.

  Raises:
    ValueError: bad `limit` or `workers`, or a sentence espeak cannot
      speak (the message names it); nothing is cached then.
  """
  if limit is not None and limit < 3:
    raise ValueError(f"limit={limit}: need at least 3 sentences")
  if workers < 1:
    raise ValueError(f"workers={workers}: need at least 1")
  key = cache_key(seed, limit, speaker_disjoint, archive)
  target = fetch.data_dir(root) / "spoken_reviews" / key
  if target.exists():
    return target
  start = time.perf_counter()
  if archive is None:
    records = vader.load_ratings("movie", root)
  else:
    records = vader.read_ratings(archive, "movie")
  if limit is not None and limit > len(records):
    raise ValueError(
      f"limit={limit} exceeds the {len(records)} sentences of the source"
    )
  order = np.random.default_rng([seed, 0]).permutation(len(records))
  records = [records[i] for i in order[:limit]]
  plans = plan(records, seed)
  splits = split_indices(plans, seed, speaker_disjoint)
  tokens = [tokenize(r.text) for r in records]
  vocab = _vocabulary([tokens[i] for i in splits["train"]])
  vocab_ids = {t: i for i, t in enumerate(vocab)}
  jobs = [(p, seed) for p in plans]
  bar = dict(total=len(jobs), desc="SpokenReviews", disable=not progress)
  with fetch.atomic_dir(target) as tmp:
    if workers == 1:
      feats = [featurize(*job) for job in tqdm(jobs, **bar)]
    else:
      # A fresh interpreter per worker: no inherited threads (jax) and no
      # espeak state shared with this process.
      ctx = multiprocessing.get_context("spawn")
      with ctx.Pool(workers) as pool:
        it = pool.imap(_featurize_star, jobs, chunksize=16)
        feats = list(tqdm(it, **bar))
    for name in SPLITS:
      idx = splits[name]
      _write_split(
        tmp / f"{name}.npz",
        [plans[i] for i in idx],
        [records[i] for i in idx],
        [feats[i] for i in idx],
        [tokens[i] for i in idx],
        vocab_ids,
      )
    (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    meta = {
      "name": "SpokenReviews",
      "version": VERSION,
      "key": key,
      "seed": seed,
      "limit": limit,
      "split": "speaker" if speaker_disjoint else "random",
      "source": f"{vader.REQUIREMENT} movieReviewSnippets_GroundTruth.txt",
      "sizes": {k: int(len(v)) for k, v in splits.items()},
      "sample_rate": espeak.sample_rate(),
      "audio": {
        "features": "log-mel",
        "n_mels": N_MELS,
        "frame_rate": FRAME_RATE,
        "window_s": WIN_S,
        "window": "hann",
        "n_fft": N_FFT,
        "f_min": F_MIN,
        "f_max": "sample_rate / 2",
        "mel": "htk",
        "log_floor": LOG_FLOOR,
      },
      "vision": {
        "fps": FPS,
        "channels": list(CHANNELS),
        "grid_ms": GRID_MS,
        "coarticulation_ms": COARTICULATION_MS,
        "speaker_offset_std": SPEAKER_OFFSET_STD,
        "speaker_gain": list(SPEAKER_GAIN),
        "noise_std": NOISE_STD,
      },
      "text": {
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "vocab_size": len(vocab),
      },
      "speakers": [
        {**s, **_speaker_look(seed, i)} for i, s in enumerate(speakers(seed))
      ],
      "build_seconds": round(time.perf_counter() - start, 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
  return target


def main(argv: Sequence[str]) -> None:
  del argv
  start = time.perf_counter()
  path = build(
    FLAGS.data_dir,
    seed=FLAGS.seed,
    limit=FLAGS.limit,
    speaker_disjoint=FLAGS.speaker_disjoint,
    workers=FLAGS.workers,
  )
  size = sum(p.stat().st_size for p in path.iterdir())
  print(
    f"{path}: {size / 1e6:.1f} MB, "
    f"{time.perf_counter() - start:.1f} s (0 s if it was cached)"
  )


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("data_dir", None, "Data directory (default: cache).")
  flags.DEFINE_integer("seed", 0, "Seed of order, speakers and splits.")
  flags.DEFINE_integer("limit", None, "Build only this many sentences.")
  flags.DEFINE_bool("speaker_disjoint", False, "Hold out whole speakers.")
  flags.DEFINE_integer("workers", 2, "Synthesis processes.")
  FLAGS = flags.FLAGS
  app.run(main)
