"""English text for data2vec pretraining: corpus readers, packing, a loader.

Readers of three Debian corpora, given the root of the unpacked package
(nothing here downloads; `experiments.data.text_corpus` fetches and builds):

* GCIDE, the Collaborative International Dictionary of English
  (``dict-gcide``: ``usr/share/dictd/gcide.dict.dz``, gzip-readable): one
  document per entry, with pronunciations (``\\...\\``), source tags
  (``[1913 Webster]``, ``[PJC]``), cross-reference braces and character
  codes (``[=a]``, ``['e]``) taken out;
* WordNet 3.0 glosses (``wordnet-base``: ``usr/share/wordnet/data.*``): the
  text after ``|`` on every line that is not part of the licence header
  (those start with two spaces);
* fortunes (``fortunes``: ``usr/share/games/fortunes/*``): items separated
  by ``%`` lines; the binary ``.dat`` indexes and the ``.u8`` links are
  skipped, and so is ``ascii-art``, which is pictures.

Token ids are packed RoBERTa-style (`pack_blocks`): documents end in
``</s>``, the stream is cut into rows of ``block_size - 1`` tokens, and each
row starts with ``<s>``, as fairseq's ``TokenBlockDataset`` with
``break_mode="none"`` followed by a prepended beginning-of-sentence token.
`BlockLoader` draws rows as a pure function of ``(seed, step, row)``.

References:
  Liu et al., "RoBERTa", 2019, §4.2 (full-sentence packing); fairseq
  ``TokenBlockDataset`` and ``PrependTokenDataset``; data2vec spec §4c.1.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from d2vjax.datasets import sampling

# fairseq/RoBERTa dictionary layout: four specials first, <mask> last.
BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
MASK = "<mask>"
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

GCIDE_FILE = "usr/share/dictd/gcide.dict.dz"
WORDNET_DIR = "usr/share/wordnet"
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
FORTUNES_DIR = "usr/share/games/fortunes"
FORTUNES_SKIPPED = ("ascii-art",)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_OVERSTRIKE = re.compile(r".\x08")
_SPACE = re.compile(r"\s+")
# A GCIDE entry starts on an unindented line with a headword and its
# pronunciation in backslashes: "Affect \Af*fect"\, v. t. ...".
_GCIDE_HEAD = re.compile(r"^[^\s\\][^\\\n]*\\[^\\\n]+\\")
_GCIDE_PRON = re.compile(r"\\[^\\\n]*\\")
_GCIDE_SOURCE = re.compile(
  r"\[(?:[^\]\n]*\b(?:Webster|WordNet|Century|Suppl)\b[^\]\n]*"
  r"|\+?[A-Z]{3,4}\d*|[A-Z]{2}\d+|wn\d+)\]"
)
_GCIDE_ACCENT = re.compile(r"\[(['\"=~.\-`^*,]?)([A-Za-z]{1,2})([\^~]?)\]")
_GCIDE_NAMED = {
  "imac": "i",
  "aum": "a",
  "udd": "u",
  "eth": "th",
  "thorn": "th",
  "yogh": "y",
  "ae": "ae",
  "AE": "AE",
  "oe": "oe",
  "OE": "OE",
  "ng": "ng",
  "th": "th",
  "deg": "°",
  "sect": "§",
  "pounds": "£",
  "middot": "·",
  "times": "×",
  "root": "",
  "add": "",
  "asl": "",
  "nbsp": " ",
  "ldqo": '"',
  "rdqo": '"',
}
_GREEK = (
  "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi "
  "omicron pi rho sigma tau upsilon phi chi psi omega"
).split()
_GCIDE_NAMED.update(
  {g: chr(0x3B1 + i + (i > 16)) for i, g in enumerate(_GREEK)}
)
_GCIDE_CODE = re.compile(r"\[([A-Za-z]{2,6})\]")


def clean_text(text: str) -> str:
  """One line of plain text: overstrikes and control codes out, spaces one.

  Terminal overstrikes (``_\\bA`` = underlined A) keep the last character.
  """
  text = _OVERSTRIKE.sub("", text)
  text = _CONTROL.sub(" ", text)
  return _SPACE.sub(" ", text).strip()


def clean_gcide(entry: str) -> str:
  """Plain text of one GCIDE entry (markup of the dictd conversion out)."""
  text = _GCIDE_PRON.sub("", entry)
  text = _GCIDE_SOURCE.sub("", text)

  def accent(m: re.Match) -> str:
    if m.group(1) or m.group(3):
      return m.group(2)
    return _GCIDE_NAMED.get(m.group(2), m.group(0))

  text = _GCIDE_ACCENT.sub(accent, text)
  text = _GCIDE_CODE.sub(
    lambda m: _GCIDE_NAMED.get(m.group(1), m.group(0)), text
  )
  text = text.replace("{", "").replace("}", "")
  text = clean_text(text)
  # The pronunciation sat between the headword and its comma.
  return re.sub(r" ([,.;])", r"\1", text)


def read_gcide(root: str | os.PathLike) -> Iterator[str]:
  """Yields the cleaned entries of GCIDE, one document each.

  Args:
    root: the unpacked ``dict-gcide`` package, or the ``.dict.dz`` file.

  The database header before the first entry (licence, ``00-database-*``)
  is skipped.
  """
  path = pathlib.Path(root)
  if path.is_dir():
    path = path / GCIDE_FILE
  entry: list[str] = []
  with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
    for line in f:
      if _GCIDE_HEAD.match(line):
        if entry:
          text = clean_gcide("".join(entry))
          if text:
            yield text
        entry = [line]
      elif entry:
        entry.append(line)
  if entry and (text := clean_gcide("".join(entry))):
    yield text


def read_wordnet(root: str | os.PathLike) -> Iterator[str]:
  """Yields the WordNet glosses (definition and examples), one each.

  Args:
    root: the unpacked ``wordnet-base`` package, or its ``usr/share/
      wordnet`` folder.
  """
  folder = pathlib.Path(root)
  if (folder / WORDNET_DIR).is_dir():
    folder = folder / WORDNET_DIR
  for part in WORDNET_PARTS:
    path = folder / f"data.{part}"
    if not path.is_file():
      raise FileNotFoundError(
        f"{path} is missing; point the path at an unpacked wordnet-base package"
      )
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("  ") or "|" not in line:
          continue  # the licence header, or a line without a gloss
        gloss = clean_text(line.split("|", 1)[1])
        if gloss:
          yield gloss


def read_fortunes(root: str | os.PathLike) -> Iterator[str]:
  """Yields the fortunes (quotes, jokes, poems), one document each.

  Args:
    root: the unpacked ``fortunes`` package, or its fortunes folder.
  """
  folder = pathlib.Path(root)
  if (folder / FORTUNES_DIR).is_dir():
    folder = folder / FORTUNES_DIR
  files = sorted(
    p
    for p in folder.iterdir()
    if p.is_file()
    and not p.is_symlink()
    and "." not in p.name
    and p.name not in FORTUNES_SKIPPED
  )
  if not files:
    raise FileNotFoundError(f"{folder} holds no fortune files")
  for path in files:
    item: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in [*f, "%\n"]:
        if line.rstrip("\r\n") == "%":
          text = clean_text(" ".join(item))
          if text:
            yield text
          item = []
        else:
          item.append(line)


READERS = {
  "gcide": read_gcide,
  "wordnet": read_wordnet,
  "fortunes": read_fortunes,
}


def count_words(text: str) -> int:
  """Whitespace-separated words, the unit of the corpus statistics."""
  return len(text.split())


def pack_blocks(
  documents: Iterable[Sequence[int]],
  block_size: int,
  *,
  bos_id: int = BOS_ID,
  eos_id: int = EOS_ID,
  dtype: np.dtype | type = np.int32,
) -> np.ndarray:
  """Packs token documents into full rows of `block_size`, RoBERTa-style.

  Each document is followed by `eos_id`; the concatenation is cut into
  pieces of ``block_size - 1`` tokens (a document may continue in the next
  row) and every row starts with `bos_id`. The final partial piece is
  dropped, so no row holds padding.

  Args:
    documents: token ids of each document (without specials), or one
      already concatenated stream that ends in `eos_id`, as a 1-D array.
    block_size: row length, ``<s>`` included (>= 2).
    bos_id, eos_id: the ``<s>`` and ``</s>`` ids.
    dtype: of the result (uint16 suffices below 65536 ids).

  Returns:
    ``[num_blocks, block_size]`` ids.

  Raises:
    ValueError: if the documents do not fill one row.
  """
  if block_size < 2:
    raise ValueError(f"block_size={block_size} must be at least 2")
  if isinstance(documents, np.ndarray) and documents.ndim == 1:
    stream = documents
  else:
    pieces = []
    for doc in documents:
      pieces.append(np.asarray(doc, np.int64))
      pieces.append(np.array([eos_id], np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
  body = block_size - 1
  rows = len(stream) // body
  if rows == 0:
    raise ValueError(
      f"{len(stream)} tokens do not fill one block of {block_size}; use a "
      "larger corpus or a smaller block_size"
    )
  blocks = np.empty((rows, block_size), dtype)
  blocks[:, 0] = bos_id
  blocks[:, 1:] = stream[: rows * body].reshape(rows, body)
  return blocks


def load_corpus(path: str | os.PathLike) -> dict:
  """Reads a corpus folder written by `experiments.data.text_corpus`.

  Returns:
    ``{"meta": dict, "tokens": [n] stream (documents ended by </s>),
    "blocks": [num_blocks, meta["block_size"]]}``, the arrays memory-mapped.

  Raises:
    FileNotFoundError: if a file of the corpus is missing.
  """
  folder = pathlib.Path(path)
  names = ("meta.json", "tokens.npy", "blocks.npy")
  for name in names:
    if not (folder / name).is_file():
      raise FileNotFoundError(
        f"{folder / name} is missing; build the corpus with "
        "`python -m experiments.data.text_corpus`"
      )
  meta = json.loads((folder / "meta.json").read_text())
  return {
    "meta": meta,
    "tokens": np.load(folder / "tokens.npy", mmap_mode="r"),
    "blocks": np.load(folder / "blocks.npy", mmap_mode="r"),
  }


@dataclasses.dataclass
class BlockLoader:
  """Rows of packed blocks for each step, a pure function of (seed, step).

  Attributes:
    blocks: ``[num_blocks, block_size]`` ids (e.g. from `pack_blocks`).
    batch_size: rows of the global batch.
    seed: picks the per-epoch permutation of the blocks.
  """

  blocks: np.ndarray
  batch_size: int
  seed: int = 0

  def batch(
    self, step: int, rows: tuple[int, int] | None = None
  ) -> dict[str, np.ndarray]:
    """Rows ``lo..hi-1`` (default: all) of the batch of global `step`.

    Returns:
      ``ids`` int32 ``[n, block_size]`` and ``indices`` int64 ``[n]``.
    """
    rows = (0, self.batch_size) if rows is None else rows
    idx = sampling.example_indices(
      len(self.blocks), self.batch_size, step, rows, self.seed
    )
    return {"ids": np.asarray(self.blocks[idx], np.int32), "indices": idx}
