r"""Builds the speech sets of data2vec: spoken sentences and Tux Paint clips.

  python -m experiments.data.speech_corpus --set=spoken_sentences [--limit=2000]
  python -m experiments.data.speech_corpus --set=tuxpaint

Two sets, both cached atomically under ``<data_dir>/speech/<key>`` as 16 kHz
int16 clips packed into one ``<split>_audio.npy`` (a memory map when
loaded) with ``<split>.npz`` holding the offsets and per-clip fields:

* ``spoken_sentences`` (synthetic audio of real text, English): the VADER
  movie, NYT and Amazon sentences (`experiments.data.vader`), normalised to the
  letters of fairseq's LibriSpeech dictionary (`normalise_sentence`),
  spoken by espeak-ng (`experiments.data.espeak`) as one of 77 speakers (7
  accents x 11 variants, with rate and pitch drawn per utterance, as in
  `experiments.data.spoken_reviews`), resampled from 22,050 Hz. espeak speaks
  the normalised words themselves (numbers already spelled out), so audio
  and transcript agree; splits train/valid/test are random or
  speaker-disjoint.
* ``tuxpaint`` (real recordings, 12 languages): every stamp description of
  Debian's ``tuxpaint-stamps-default`` (`d2vjax.datasets.audio`), decoded
  from 44.1 kHz Ogg Vorbis and resampled; one split, ``all``, with the
  language, the transcript ("" where the stamp has none) and the category.

Every clip is a pure function of its inputs and the seed, whatever the
number of worker processes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pathlib
import re
import time
import unicodedata
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import app, flags
from tqdm import tqdm

from d2vjax.datasets import audio
from experiments.data import build_cli, espeak, fetch, spoken_reviews, vader

VERSION = 1
SAMPLE_RATE = audio.SAMPLE_RATE
SETS = ("spoken_sentences", "tuxpaint")
DOMAINS = ("movie", "nyt", "amazon")  # tweets: emoticons and slang
SPLITS = spoken_reviews.SPLITS
TUXPAINT_PACKAGE = "tuxpaint-stamps-default"

_ONES = (
  "zero one two three four five six seven eight nine ten eleven twelve "
  "thirteen fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_ORDINAL = {
  "one": "first",
  "two": "second",
  "three": "third",
  "five": "fifth",
  "eight": "eighth",
  "nine": "ninth",
  "twelve": "twelfth",
}
_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "@": " at "}
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})
_NUMBER = re.compile(r"(\d+(?:,\d{3})*)(?:\.(\d+))?(st|nd|rd|th|s)?\b", re.I)
_TOKEN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|[.,!?;:]")


class Sentence(NamedTuple):
  """A source sentence: `id` is "<domain>/<VADER id>"."""

  id: str
  text: str


def spell_number(n: int) -> str:
  """English words of a non-negative integer ("one hundred twenty three")."""
  if n < 20:
    return _ONES[n]
  if n < 100:
    return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
  for size, name in (
    (10**9, "billion"),
    (10**6, "million"),
    (1000, "thousand"),
  ):
    if n >= size:
      head, rest = divmod(n, size)
      if head >= 1000:  # beyond the scale: digit by digit
        return " ".join(_ONES[int(d)] for d in str(n))
      return spell_number(head) + f" {name}" + _rest(rest)
  head, rest = divmod(n, 100)
  return spell_number(head) + " hundred" + _rest(rest)


def _rest(n: int) -> str:
  return "" if n == 0 else " " + spell_number(n)


def _number_words(m: re.Match) -> str:
  words = spell_number(int(m.group(1).replace(",", "")))
  if m.group(2):
    words += " point " + " ".join(_ONES[int(d)] for d in m.group(2))
  suffix = (m.group(3) or "").lower()
  if suffix:
    head, _, last = words.rpartition(" ")
    if suffix == "s":  # "the 90s"
      last = last[:-1] + "ies" if last.endswith("y") else last + "s"
    elif last in _ORDINAL:
      last = _ORDINAL[last]
    else:
      last = last[:-1] + "ieth" if last.endswith("y") else last + "th"
    words = f"{head} {last}".strip()
  return f" {words} "


def normalise_sentence(text: str) -> tuple[str, str] | None:
  """The words espeak speaks and their transcript, or None if no words.

  Accents are stripped (café -> cafe), numbers spelled out (1990 ->
  one thousand nine hundred ninety, 3rd -> third), ``& % + @`` said, hyphens
  and slashes split words; any other character is dropped from both.

  Returns:
    ``(spoken, transcript)``: lower-case words with the sentence
    punctuation ``.,!?;:`` kept (it shapes espeak's prosody), and the same
    words upper case, separated by single spaces: only A-Z, the apostrophe
    and the space.
  """
  text = unicodedata.normalize("NFKD", text.translate(_QUOTES))
  text = "".join(c for c in text if not unicodedata.combining(c))
  for symbol, words in _SYMBOLS.items():
    text = text.replace(symbol, words)
  text = _NUMBER.sub(_number_words, text)
  text = re.sub(r"[-/_]", " ", text)
  spoken, words = "", []
  for token in _TOKEN.findall(text):
    if token[0].isalpha():
      words.append(token.lower())
      spoken += (" " if spoken else "") + token.lower()
    elif spoken and spoken[-1] not in ".,!?;:":
      spoken += token
  if not words:
    return None
  return spoken, " ".join(words).upper()


def _synthesize(item: dict[str, Any]) -> np.ndarray:
  """One planned utterance at 16 kHz, int16."""
  wave, rate, _ = espeak.synthesize(
    item["text"], item["voice"], item["rate"], item["pitch"]
  )
  return audio.to_int16(audio.resample(wave / 32768.0, rate, SAMPLE_RATE))


def _decode(path: str) -> np.ndarray:
  return audio.to_int16(audio.read_audio(path, SAMPLE_RATE))


def _map(fn, jobs: Sequence, workers: int, desc: str, progress: bool):
  """`[fn(j) for j in jobs]`, over spawned processes if `workers > 1`."""
  bar = dict(total=len(jobs), desc=desc, disable=not progress)
  if workers == 1:
    return [fn(j) for j in tqdm(jobs, **bar)]
  # Fresh interpreters: no inherited jax threads and no shared espeak state.
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    return list(tqdm(pool.imap(fn, jobs, chunksize=16), **bar))


def _write(folder: pathlib.Path, name: str, waves, **fields) -> None:
  flat, offsets = audio.pack(waves, np.int16)
  np.save(folder / f"{name}_audio.npy", flat)
  np.savez(folder / f"{name}.npz", offsets=offsets, **fields)


def _column(plans, idx, key: str) -> np.ndarray:
  return np.asarray([plans[i][key] for i in idx], np.int32)


def load(folder: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
  """One split of a built set: ``audio`` (int16 memory map), ``offsets``
  and the per-clip fields (``transcripts``, ...); see `build_*`.

  Raises:
    FileNotFoundError: the split is not in the folder (the message lists
      those that are).
  """
  folder = pathlib.Path(folder)
  if not (folder / f"{split}.npz").is_file():
    have = sorted(p.stem for p in folder.glob("*.npz"))
    raise FileNotFoundError(
      f"{os.fspath(folder)}: no split {split!r} (has {have}); build it with "
      "`python -m experiments.data.speech_corpus`"
    )
  with np.load(folder / f"{split}.npz") as z:
    out = {k: z[k] for k in z.files}
  out["audio"] = np.load(folder / f"{split}_audio.npy", mmap_mode="r")
  if len(out["audio"]) != out["offsets"][-1]:
    raise ValueError(
      f"{os.fspath(folder)}/{split}_audio.npy holds {len(out['audio'])} "
      f"samples, the offsets {out['offsets'][-1]}; delete the folder and "
      "build again"
    )
  return out


def _digest(path: pathlib.Path) -> str:
  return hashlib.sha1(path.read_bytes()).hexdigest()[:10]


def collect_sentences(
  domains: Sequence[str],
  root: str | os.PathLike | None = None,
  archive: str | os.PathLike | None = None,
) -> tuple[list[Sentence], list[str], int]:
  """Normalised, deduplicated sentences of the VADER domains.

  Returns:
    ``(sentences, transcripts, dropped)``: the spoken texts, their
    transcripts, and how many source sentences were dropped (no words, or
    a transcript already taken).
  """
  sentences, transcripts, seen, dropped = [], [], set(), 0
  for domain in domains:
    if archive is None:
      records = vader.load_ratings(domain, root)
    else:
      records = vader.read_ratings(archive, domain)
    for r in records:
      norm = normalise_sentence(r.text)
      if norm is None or norm[1] in seen:
        dropped += 1
        continue
      seen.add(norm[1])
      sentences.append(Sentence(f"{domain}/{r.id}", norm[0]))
      transcripts.append(norm[1])
  return sentences, transcripts, dropped


def build_spoken_sentences(
  root: str | os.PathLike | None = None,
  *,
  domains: Sequence[str] = DOMAINS,
  seed: int = 0,
  limit: int | None = None,
  speaker_disjoint: bool = False,
  workers: int = 2,
  archive: str | os.PathLike | None = None,
  progress: bool = True,
) -> pathlib.Path:
  """Builds (or finds) the spoken-sentences set; returns its folder.

  Args:
    root: the data directory (`fetch.data_dir`).
    domains: VADER domains whose sentences are spoken.
    seed: seeds the sentence order, speakers, prosody and splits.
    limit: keep only the first `limit` sentences of the seeded order.
    speaker_disjoint: hold out whole speakers for valid and test.
    workers: synthesis processes (1 = this one); the clips do not depend
      on it. Scripts calling this with `workers > 1` need the
      ``if __name__ == "__main__":`` guard (spawned workers).
    archive: a vaderSentiment sdist to read instead of fetching it; its
      hash joins the cache key.
    progress: show a progress bar.

  Returns:
    The folder, with ``{train,valid,test}.npz`` (``offsets``, ``ids``,
    ``transcripts``, ``speakers``, ``rates``, ``pitches``), the matching
    ``*_audio.npy`` and ``meta.json``.

  Raises:
    ValueError: an unknown domain, bad `limit` or `workers`, or a sentence
      espeak cannot speak; nothing is cached then.
  """
  unknown = set(domains) - set(vader.DOMAINS)
  if unknown or not domains:
    raise ValueError(f"domains={list(domains)}; use some of {DOMAINS}")
  if limit is not None and limit < 3:
    raise ValueError(f"limit={limit}: need at least 3 sentences")
  if workers < 1:
    raise ValueError(f"workers={workers}: need at least 1")
  key = (
    f"spoken_sentences-v{VERSION}-{'+'.join(domains)}-seed{seed}"
    f"-{'all' if limit is None else f'n{limit}'}"
    f"-{'speaker' if speaker_disjoint else 'random'}"
  )
  if archive is not None:
    if not pathlib.Path(archive).is_file():
      raise FileNotFoundError(f"VADER archive not found: {archive!r}")
    key += f"-src{_digest(pathlib.Path(archive))}"
  target = fetch.data_dir(root) / "speech" / key
  if target.exists():
    return target
  start = time.perf_counter()
  sentences, transcripts, dropped = collect_sentences(domains, root, archive)
  if limit is not None and limit > len(sentences):
    raise ValueError(
      f"limit={limit} exceeds the {len(sentences)} usable sentences"
    )
  order = np.random.default_rng([seed, 0]).permutation(len(sentences))[:limit]
  sentences = [sentences[i] for i in order]
  transcripts = [transcripts[i] for i in order]
  plans = spoken_reviews.plan(sentences, seed)
  splits = spoken_reviews.split_indices(plans, seed, speaker_disjoint)
  with fetch.atomic_dir(target) as tmp:
    waves = _map(_synthesize, plans, workers, "spoken sentences", progress)
    for name in SPLITS:
      idx = splits[name]
      _write(
        tmp,
        name,
        [waves[i] for i in idx],
        ids=np.asarray([plans[i]["id"] for i in idx], str),
        transcripts=np.asarray([transcripts[i] for i in idx], str),
        spoken=np.asarray([plans[i]["text"] for i in idx], str),
        speakers=_column(plans, idx, "speaker"),
        rates=_column(plans, idx, "rate"),
        pitches=_column(plans, idx, "pitch"),
      )
    seconds = sum(len(w) for w in waves) / SAMPLE_RATE
    meta = {
      "name": "spoken_sentences",
      "version": VERSION,
      "key": key,
      "source": f"{vader.REQUIREMENT} {', '.join(domains)} ground truth",
      "audio": "synthetic (espeak-ng via espeakng-loader)",
      "sample_rate": SAMPLE_RATE,
      "seed": seed,
      "split": "speaker" if speaker_disjoint else "random",
      "sizes": {k: int(len(v)) for k, v in splits.items()},
      "dropped_sentences": dropped,
      "hours": round(seconds / 3600, 3),
      "speakers": spoken_reviews.speakers(seed),
      "build_seconds": round(time.perf_counter() - start, 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
  return target


def build_tuxpaint(
  root: str | os.PathLike | None = None,
  *,
  stamps: str | os.PathLike | None = None,
  workers: int = 2,
  progress: bool = True,
) -> pathlib.Path:
  """Builds (or finds) the Tux Paint recordings at 16 kHz; returns them.

  Args:
    root: the data directory; the package is fetched into it too.
    stamps: a stamps tree to read instead of the Debian package; a digest
      of its file list joins the cache key.
    workers: decoding processes; the clips do not depend on it.
    progress: show a progress bar.

  Returns:
    The folder, with ``all.npz`` (``offsets``, ``paths`` relative to the
    stamps root, ``langs``, ``transcripts`` -- "" for recordings whose
    stamp has no text in their language -- and ``categories``),
    ``all_audio.npy`` and ``meta.json``.

  Raises:
    FileNotFoundError: no recordings in the tree.
    ValueError: a clip that cannot be decoded (the message names it).
  """
  key = f"tuxpaint-v{VERSION}"
  if stamps is None:
    tree = fetch.apt_package(TUXPAINT_PACKAGE, root)
    source = f"Debian {TUXPAINT_PACKAGE}"
  else:
    tree = pathlib.Path(stamps)
    source = os.fspath(tree)
  clips = audio.tuxpaint_stamps(tree, require_transcript=False)
  base = audio.stamps_folder(tree)
  rel = [c.path.relative_to(base).as_posix() for c in clips]
  if stamps is not None:
    listing = "\n".join(
      f"{r} {c.path.stat().st_size}" for r, c in zip(rel, clips, strict=True)
    )
    key += "-src" + hashlib.sha1(listing.encode()).hexdigest()[:10]
  target = fetch.data_dir(root) / "speech" / key
  if target.exists():
    return target
  start = time.perf_counter()
  with fetch.atomic_dir(target) as tmp:
    jobs = [os.fspath(c.path) for c in clips]
    waves = _map(_decode, jobs, workers, "tuxpaint", progress)
    _write(
      tmp,
      "all",
      waves,
      paths=np.asarray(rel, str),
      langs=np.asarray([c.lang for c in clips], str),
      transcripts=np.asarray([c.transcript for c in clips], str),
      categories=np.asarray([c.category for c in clips], str),
    )
    langs: dict[str, int] = {}
    for c in clips:
      if c.transcript:
        langs[c.lang] = langs.get(c.lang, 0) + 1
    meta = {
      "name": "tuxpaint",
      "version": VERSION,
      "source": source,
      "audio": "real recordings (volunteer speakers), GPL-2",
      "sample_rate": SAMPLE_RATE,
      "clips": len(clips),
      "with_transcript": sum(langs.values()),
      "per_language": dict(sorted(langs.items(), key=lambda kv: -kv[1])),
      "hours": round(sum(len(w) for w in waves) / SAMPLE_RATE / 3600, 3),
      "build_seconds": round(time.perf_counter() - start, 2),
    }
    (tmp / "meta.json").write_text(
      json.dumps(meta, indent=1, ensure_ascii=False) + "\n"
    )
  return target


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags of `main`; only when run as a program (`build_cli`)."""
  flags.DEFINE_enum("set", "spoken_sentences", SETS, "Which set to build.")
  build_cli.define_spoken_flags(__name__, "Synthesis or decoding processes.")


def main(argv: Sequence[str]) -> None:
  """Builds (or finds) the set the flags name; prints its folder."""
  if FLAGS.set == "tuxpaint":
    built = build_cli.run(
      argv, build_tuxpaint, FLAGS.data_dir, workers=FLAGS.workers
    )
  else:
    options = build_cli.spoken_options(FLAGS)
    built = build_cli.run(
      argv, build_spoken_sentences, FLAGS.data_dir, **options
    )
  print(build_cli.folder_summary(*built))


if __name__ == "__main__":
  define_flags()
  app.run(main)
