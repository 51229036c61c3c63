r"""Builds the English pretraining corpus and its byte-level BPE tokenizer.

  python -m experiments.data.text_corpus --vocab_size=8192 --block_size=512
  python -m experiments.data.text_corpus --max_words=200000   # a quick slice

Fetches three Debian packages of real English (`experiments.data.fetch`; no
install), reads them with `d2vjax.datasets.text` -- GCIDE dictionary
entries, WordNet glosses, fortunes -- shuffles the documents with the
seed, trains a byte-level BPE tokenizer on them with HuggingFace
`tokenizers`, encodes every document and packs the ids RoBERTa-style.

The ids follow the fairseq/RoBERTa dictionary, which the data2vec configs
assume: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ordinary tokens,
and ``<mask>`` last (``vocab_size - 1``, the configs' ``mask.mask_id``).
A corpus that is too small for the requested vocabulary ends up with fewer
ids; ``meta.json`` records the real size.

Output, written atomically to ``<data_dir>/text_corpus/<key>``:
``tokenizer.json``, ``tokens.npy`` (the stream, each document ended by
``</s>``), ``blocks.npy`` (``[num_blocks, block_size]``, `<s>` first) and
``meta.json`` (words and documents per source, tokens, blocks, ids,
timings). A second build with the same settings returns the cached
folder.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
from absl import app, flags, logging

from d2vjax.datasets import text
from experiments.data import build_cli, fetch

# Source name -> Debian package that holds it.
PACKAGES = {
  "gcide": "dict-gcide",
  "wordnet": "wordnet-base",
  "fortunes": "fortunes",
}
FORMAT_VERSION = 1
_ENCODE_CHUNK = 8192


def corpus_key(vocab_size: int, block_size: int, max_words: int, seed: int):
  """The folder name of a build; every setting that changes the output."""
  words = f"w{max_words}" if max_words else "all"
  return f"v{FORMAT_VERSION}-bpe{vocab_size}-b{block_size}-{words}-s{seed}"


def collect_documents(
  trees: Mapping[str, str | os.PathLike], max_words: int = 0, seed: int = 0
) -> tuple[list[str], dict]:
  """Reads and shuffles the documents of every source; counts words.

  Args:
    trees: source name (a key of `PACKAGES`) -> unpacked package root.
    max_words: keep shuffled documents until this many words (0 = all).
    seed: the shuffle.

  Returns:
    ``(documents, stats)``; stats per source: documents and words read,
    and those kept.
  """
  docs, origin, stats = [], [], {}
  for name, root in trees.items():
    if name not in text.READERS:
      raise ValueError(f"unknown source {name!r}; use {tuple(text.READERS)}")
    n = words = 0
    for doc in text.READERS[name](root):
      docs.append(doc)
      origin.append(name)
      n += 1
      words += text.count_words(doc)
    stats[name] = {
      "package": PACKAGES.get(name),
      "documents": n,
      "words": words,
    }
  order = np.random.default_rng(seed).permutation(len(docs))
  kept, total = [], 0
  for name in stats:
    stats[name].update(kept_documents=0, kept_words=0)
  for i in order:
    if max_words and total >= max_words:
      break
    w = text.count_words(docs[i])
    kept.append(docs[i])
    total += w
    stats[origin[i]]["kept_documents"] += 1
    stats[origin[i]]["kept_words"] += w
  return kept, stats


def train_tokenizer(
  documents: Sequence[str], vocab_size: int, min_frequency: int = 2
):
  """Trains a byte-level BPE with the RoBERTa id layout (see module doc).

  Args:
    documents: the training text.
    vocab_size: ids in all, `<mask>` (the last) included.
    min_frequency: merges seen fewer times are not learned.

  Returns:
    A `tokenizers.Tokenizer` whose ``post_processor`` wraps single texts
    in ``<s> ... </s>``.
  """
  from tokenizers import (  # noqa: PLC0415 -- only builds need it
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
  )

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  smallest = len(alphabet) + 5
  if vocab_size < smallest:
    raise ValueError(
      f"vocab_size={vocab_size} is below the {smallest} ids of the 256 "
      "bytes and 5 special tokens"
    )
  tok = Tokenizer(models.BPE())
  # A prefix space makes a document's first word tokenise like any other.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size - 1,  # <mask> is added last, below
    min_frequency=min_frequency,
    special_tokens=[text.BOS, text.PAD, text.EOS, text.UNK],
    initial_alphabet=alphabet,
    show_progress=False,
  )
  tok.train_from_iterator(documents, trainer, length=len(documents))
  tok.add_special_tokens([text.MASK])
  tok.post_processor = processors.RobertaProcessing(
    (text.EOS, text.EOS_ID), (text.BOS, text.BOS_ID), add_prefix_space=True
  )
  want = {
    text.BOS: text.BOS_ID,
    text.PAD: text.PAD_ID,
    text.EOS: text.EOS_ID,
    text.UNK: text.UNK_ID,
    text.MASK: tok.get_vocab_size() - 1,
  }
  got = {t: tok.token_to_id(t) for t in want}
  if got != want:
    raise RuntimeError(f"special token ids {got} differ from {want}")
  return tok


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer of a corpus folder (or a ``tokenizer.json`` file)."""
  from tokenizers import Tokenizer  # noqa: PLC0415

  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  return Tokenizer.from_file(str(path))


def encode_stream(tokenizer, documents: Sequence[str], dtype) -> np.ndarray:
  """All documents' ids, each followed by ``</s>``, as one 1-D array."""
  pieces = []
  eos = np.array([text.EOS_ID], dtype)
  for start in range(0, len(documents), _ENCODE_CHUNK):
    chunk = documents[start : start + _ENCODE_CHUNK]
    for enc in tokenizer.encode_batch(chunk, add_special_tokens=False):
      pieces.append(np.asarray(enc.ids, dtype))
      pieces.append(eos)
  return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


def build_corpus(
  root: str | os.PathLike | None = None,
  *,
  vocab_size: int = 8192,
  block_size: int = 512,
  max_words: int = 0,
  seed: int = 0,
  trees: Mapping[str, str | os.PathLike] | None = None,
) -> pathlib.Path:
  """Builds (or finds) a corpus folder; returns its path.

  Args:
    root: the data directory (`experiments.data.fetch.data_dir`).
    vocab_size: tokenizer ids, specials included.
    block_size: row length of ``blocks.npy``, ``<s>`` included.
    max_words: a slice of about this many words (0 = everything).
    seed: shuffles the documents before slicing and packing.
    trees: source -> unpacked package root, instead of fetching `PACKAGES`
      (tests pass small fake trees). The folder name then ends in
      ``-custom`` so it never passes for the real corpus.

  Returns:
    The folder with ``tokenizer.json``, ``tokens.npy``, ``blocks.npy`` and
    ``meta.json``.
  """
  key = corpus_key(vocab_size, block_size, max_words, seed)
  if trees is not None:
    key += "-custom"
  target = fetch.data_dir(root) / "text_corpus" / key
  if (target / "meta.json").is_file():
    return target
  t0 = time.perf_counter()
  if trees is None:
    trees = {
      name: fetch.apt_package(pkg, root) for name, pkg in PACKAGES.items()
    }
  t1 = time.perf_counter()
  docs, stats = collect_documents(trees, max_words, seed)
  t2 = time.perf_counter()
  tok = train_tokenizer(docs, vocab_size)
  t3 = time.perf_counter()
  real_vocab = tok.get_vocab_size()
  dtype = np.uint16 if real_vocab <= 1 << 16 else np.int32
  stream = encode_stream(tok, docs, dtype)
  blocks = text.pack_blocks(stream, block_size, dtype=dtype)
  t4 = time.perf_counter()
  meta = {
    "format_version": FORMAT_VERSION,
    "key": key,
    "sources": stats,
    "documents": len(docs),
    "words": sum(s["kept_words"] for s in stats.values()),
    "tokens": int(len(stream)),
    "blocks": int(len(blocks)),
    "block_size": block_size,
    "vocab_size": real_vocab,
    "requested_vocab_size": vocab_size,
    "ids": {
      "bos": text.BOS_ID,
      "pad": text.PAD_ID,
      "eos": text.EOS_ID,
      "unk": text.UNK_ID,
      "mask": real_vocab - 1,
    },
    "max_words": max_words,
    "seed": seed,
    "dtype": np.dtype(dtype).name,
    "seconds": {
      "fetch": round(t1 - t0, 2),
      "read": round(t2 - t1, 2),
      "train_tokenizer": round(t3 - t2, 2),
      "encode_and_pack": round(t4 - t3, 2),
    },
  }
  with fetch.atomic_dir(target) as tmp:
    tok.save(str(tmp / "tokenizer.json"))
    np.save(tmp / "tokens.npy", stream)
    np.save(tmp / "blocks.npy", blocks)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
  return target


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the flags of `main`; only when run as a program (`build_cli`)."""
  flags.DEFINE_string("data_dir", None, "Data directory (default: cache).")
  flags.DEFINE_integer("vocab_size", 8192, "Tokenizer ids, specials included.")
  flags.DEFINE_integer("block_size", 512, "Tokens per block, <s> included.")
  flags.DEFINE_integer("max_words", 0, "Build a slice of this many words.")
  flags.DEFINE_integer("seed", 0, "Document shuffle.")


def main(argv: Sequence[str]) -> None:
  """Builds (or finds) the corpus; prints its summary as JSON."""
  path, seconds = build_cli.run(
    argv,
    build_corpus,
    FLAGS.data_dir,
    vocab_size=FLAGS.vocab_size,
    block_size=FLAGS.block_size,
    max_words=FLAGS.max_words,
    seed=FLAGS.seed,
  )
  meta = json.loads((path / "meta.json").read_text())
  logging.info("corpus in %s (%.1f s)", path, seconds)
  summary = {k: meta[k] for k in ("words", "tokens", "blocks", "vocab_size")}
  summary["seconds"] = meta["seconds"]
  summary["path"] = str(path)
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
