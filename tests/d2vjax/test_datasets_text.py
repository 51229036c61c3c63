"""Corpus readers, block packing and the block loader on tiny fake trees."""

import gzip
import json

import numpy as np
import pytest

from d2vjax.datasets import sampling, text

GCIDE_HEADER = """\
00-database-url
   ftp://ftp.gnu.org/gnu/gcide

00-database-short
   The Collaborative International Dictionary of English v.0.48

GCIDE is free software; you can redistribute it and/or modify it
      A dictionary containing a natural history requires too
      many hands.                                 --Locke.
"""
GCIDE_ENTRIES = """\
Affear \\Af*fear"\\, v. t. [OE. aferen, AS. [=a]f?ran. See
   {Afeard}.]
   To frighten. [Obs.] --Spenser.
   [1913 Webster]

Affect \\Af*fect"\\, v. t. [imp. & p. p. {Affected}.]
   1. To act upon; to produce an effect upon; as, the caf['e]
      affected the na[i^]ve guests.
      [1913 Webster]

            As might affect the earth with cold heat. --Milton.
      [1913 Webster]
1-hitter \\1-hitter\\ n.
   1. a baseball game in which one team's pitchers allow only one hit.

   Syn: one-hitter
        [WordNet 1.5 +PJC]
"""

WORDNET_HEADER = (
  "  1 This software and database is being provided to you, the LICENSEE, "
  "by  \n  2 Princeton University under the following license. | not a gloss\n"
)
WORDNET = {
  "noun": "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is "
  "perceived or known or inferred to have its own distinct existence  \n",
  "verb": "00001740 29 v 04 breathe 0 take_a_breath 0 | draw air into, and "
  'expel out of, the lungs; "I can breathe better now"  \n',
  "adj": "00001740 00 a 01 able 0 005 = 05207437 n 0000 | (usually followed "
  'by `to\') having the necessary means or skill; "able to swim"  \n',
  "adv": "00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; "
  '"they performed a cappella"  \n',
}
FORTUNES = """\
A clash of doctrine is not a disaster -- it is an opportunity.
%
A dream will always triumph over reality, once it is given the chance.
\t\t-- Stanislaw Lem
%
%
_\bI_\bm_\bp_\bo_\br_\bt_\ba_\bn_\bt: read the fine print.
"""


def make_debian_trees(root, copies=1):
  """Fake unpacked dict-gcide, wordnet-base and fortunes packages."""
  gcide = root / "dict-gcide" / text.GCIDE_FILE
  gcide.parent.mkdir(parents=True)
  gcide.write_bytes(
    gzip.compress((GCIDE_HEADER + GCIDE_ENTRIES * copies).encode())
  )
  wn = root / "wordnet-base" / text.WORDNET_DIR
  wn.mkdir(parents=True)
  for part, line in WORDNET.items():
    (wn / f"data.{part}").write_text(WORDNET_HEADER + line * copies)
  fortunes = root / "fortunes" / text.FORTUNES_DIR
  fortunes.mkdir(parents=True)
  (fortunes / "wisdom").write_text("%\n".join([FORTUNES] * copies))
  (fortunes / "wisdom.dat").write_bytes(bytes(range(256)))
  (fortunes / "wisdom.u8").symlink_to("wisdom")
  (fortunes / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")
  return {
    "gcide": root / "dict-gcide",
    "wordnet": root / "wordnet-base",
    "fortunes": root / "fortunes",
  }


def test_read_gcide_entries_without_markup(tmp_path):
  trees = make_debian_trees(tmp_path)
  docs = list(text.read_gcide(trees["gcide"]))
  assert docs == [
    "Affear, v. t. [OE. aferen, AS. af?ran. See Afeard.] To frighten. "
    "[Obs.] --Spenser.",
    "Affect, v. t. [imp. & p. p. Affected.] 1. To act upon; to produce an "
    "effect upon; as, the cafe affected the naive guests. As might affect "
    "the earth with cold heat. --Milton.",
    "1-hitter n. 1. a baseball game in which one team's pitchers allow only "
    "one hit. Syn: one-hitter",
  ]


def test_read_wordnet_glosses(tmp_path):
  trees = make_debian_trees(tmp_path)
  docs = list(text.read_wordnet(trees["wordnet"]))
  assert len(docs) == 4  # the licence lines are skipped
  assert docs[0].startswith("that which is perceived")
  assert docs[1] == (
    'draw air into, and expel out of, the lungs; "I can breathe better now"'
  )
  (trees["wordnet"] / text.WORDNET_DIR / "data.adv").unlink()
  with pytest.raises(FileNotFoundError, match="data.adv"):
    list(text.read_wordnet(trees["wordnet"]))


def test_read_fortunes_items(tmp_path):
  trees = make_debian_trees(tmp_path)
  docs = list(text.read_fortunes(trees["fortunes"]))
  assert docs == [
    "A clash of doctrine is not a disaster -- it is an opportunity.",
    "A dream will always triumph over reality, once it is given the chance. "
    "-- Stanislaw Lem",
    "Important: read the fine print.",
  ]


def test_clean_text():
  assert text.clean_text(" a\tb\r\n\x01c  ") == "a b c"
  assert text.count_words("one  two\nthree") == 3


def test_pack_blocks_invariants():
  docs = [[10, 11, 12], [20], [30, 31, 32, 33, 34], [40, 41]]
  blocks = text.pack_blocks(docs, 5, bos_id=0, eos_id=2)
  # 15 tokens with the </s> ends -> three rows of 4, the last 3 dropped.
  np.testing.assert_array_equal(
    blocks,
    [[0, 10, 11, 12, 2], [0, 20, 2, 30, 31], [0, 32, 33, 34, 2]],
  )
  assert blocks.dtype == np.int32
  stream = np.array([5, 6, 2, 7, 2, 8, 9, 2], np.uint16)
  packed = text.pack_blocks(stream, 3, dtype=np.uint16)
  assert packed.shape == (4, 3) and packed.dtype == np.uint16
  assert (packed[:, 0] == text.BOS_ID).all()
  np.testing.assert_array_equal(packed[:, 1:].reshape(-1), stream)
  with pytest.raises(ValueError, match="do not fill one block"):
    text.pack_blocks([[1, 2]], 8)
  with pytest.raises(ValueError, match="block_size=1"):
    text.pack_blocks([[1, 2]], 1)


def test_block_loader_is_deterministic_and_disjoint_over_processes():
  blocks = np.arange(40 * 6).reshape(40, 6)
  loader = text.BlockLoader(blocks, batch_size=8, seed=1)
  first = loader.batch(3)
  np.testing.assert_array_equal(first["ids"], loader.batch(3)["ids"])
  np.testing.assert_array_equal(first["ids"], blocks[first["indices"]])
  parts = [loader.batch(3, sampling.process_rows(8, p, 2)) for p in range(2)]
  assert not set(parts[0]["indices"]) & set(parts[1]["indices"])
  np.testing.assert_array_equal(
    np.concatenate([p["ids"] for p in parts]), first["ids"]
  )
  # An epoch (5 steps of 8) visits every block once.
  epoch = np.concatenate([loader.batch(s)["indices"] for s in range(5)])
  assert sorted(epoch) == list(range(40))
  other = text.BlockLoader(blocks, batch_size=8, seed=2).batch(3)
  assert not np.array_equal(other["indices"], first["indices"])


def test_load_corpus_reads_and_names_missing_files(tmp_path):
  stream = np.array([4, 5, 2, 6, 2], np.uint16)
  np.save(tmp_path / "tokens.npy", stream)
  np.save(tmp_path / "blocks.npy", text.pack_blocks(stream, 3))
  with pytest.raises(FileNotFoundError, match="meta.json"):
    text.load_corpus(tmp_path)
  (tmp_path / "meta.json").write_text(json.dumps({"block_size": 3}))
  corpus = text.load_corpus(tmp_path)
  assert corpus["meta"] == {"block_size": 3}
  np.testing.assert_array_equal(corpus["tokens"], stream)
  assert corpus["blocks"].shape == (2, 3)
