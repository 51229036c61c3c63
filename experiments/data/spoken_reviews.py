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
from absl import app, flags
from tqdm import tqdm

from experiments.data import build_cli, espeak, fetch, spoken_features, vader
from experiments.data.spoken_features import (
  articulation,
  log_mel,
)

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
  look = spoken_features.speaker_look(seed, item["speaker"])
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


def _featurize_all(plans, seed: int, workers: int, progress: bool) -> list:
  """`featurize` of every plan, in order, in `workers` processes."""
  jobs = [(p, seed) for p in plans]
  bar = dict(total=len(jobs), desc="SpokenReviews", disable=not progress)
  if workers == 1:
    return [featurize(*job) for job in tqdm(jobs, **bar)]
  # A fresh interpreter per worker: no inherited threads (jax) and no
  # espeak state shared with this process.
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers) as pool:
    return list(tqdm(pool.imap(_featurize_star, jobs, chunksize=16), **bar))


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
  with fetch.atomic_dir(target) as tmp:
    feats = _featurize_all(plans, seed, workers, progress)
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
      **spoken_features.meta(),
      "text": {
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "vocab_size": len(vocab),
      },
      "speakers": [
        {**s, **spoken_features.speaker_look(seed, i)}
        for i, s in enumerate(speakers(seed))
      ],
      "build_seconds": round(time.perf_counter() - start, 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
  return target


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags of `main`; only when run as a program (`build_cli`)."""
  build_cli.define_spoken_flags(__name__, "Synthesis processes.")


def main(argv: Sequence[str]) -> None:
  """Builds (or finds) the set the flags describe; prints its folder."""
  options = build_cli.spoken_options(FLAGS)
  built = build_cli.run(argv, build, FLAGS.data_dir, **options)
  print(build_cli.folder_summary(*built))


if __name__ == "__main__":
  define_flags()
  app.run(main)
