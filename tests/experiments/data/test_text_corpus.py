"""The corpus builder on fake Debian trees: tokenizer, packing, metadata."""

import json

import numpy as np
import pytest

from d2vjax.datasets import text
from experiments.data import text_corpus
from tests.d2vjax.test_datasets_text import make_debian_trees

VOCAB, BLOCK = 300, 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  trees = make_debian_trees(root / "debian", copies=3)
  path = text_corpus.build_corpus(
    root, vocab_size=VOCAB, block_size=BLOCK, seed=1, trees=trees
  )
  return root, trees, path


def test_files_and_metadata(built):
  root, trees, path = built
  assert path.parent == root / "text_corpus"
  assert path.name.endswith("-custom")
  assert sorted(p.name for p in path.iterdir()) == [
    "blocks.npy",
    "meta.json",
    "tokenizer.json",
    "tokens.npy",
  ]
  meta = json.loads((path / "meta.json").read_text())
  counts = {
    name: sum(text.count_words(d) for d in reader(trees[name]))
    for name, reader in text.READERS.items()
  }
  assert counts["gcide"] > 0 and counts["fortunes"] > 0
  for name, words in counts.items():
    assert meta["sources"][name]["words"] == words
    assert meta["sources"][name]["kept_words"] == words
  assert meta["words"] == sum(counts.values())
  assert meta["documents"] == 3 * (3 + 4 + 3)
  assert meta["ids"] == {
    "bos": 0,
    "pad": 1,
    "eos": 2,
    "unk": 3,
    "mask": meta["vocab_size"] - 1,
  }
  assert meta["vocab_size"] <= VOCAB and meta["block_size"] == BLOCK
  blocks = np.load(path / "blocks.npy")
  tokens = np.load(path / "tokens.npy")
  assert blocks.shape == (meta["blocks"], BLOCK) and blocks.dtype == np.uint16
  assert len(tokens) == meta["tokens"]
  assert meta["blocks"] == meta["tokens"] // (BLOCK - 1)


def test_tokenizer_layout_matches_the_configs(built):
  _, _, path = built
  tok = text_corpus.load_tokenizer(path)
  size = tok.get_vocab_size()
  assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [
    0,
    1,
    2,
    3,
  ]
  assert tok.token_to_id("<mask>") == size - 1
  # Single texts come wrapped like RoBERTa's; learned merges shorten text.
  ids = tok.encode("the earth").ids
  assert ids[0] == 0 and ids[-1] == 2 and len(ids) < len(" the earth") + 2


def test_packing_invariants_and_round_trip(built):
  _, trees, path = built
  tok = text_corpus.load_tokenizer(path)
  blocks = np.load(path / "blocks.npy")
  tokens = np.load(path / "tokens.npy")
  assert (blocks[:, 0] == text.BOS_ID).all()
  assert (blocks[:, 1:] != text.BOS_ID).all()  # <s> only at block starts
  assert not (blocks == text.PAD_ID).any()
  body = blocks[:, 1:].reshape(-1)
  np.testing.assert_array_equal(body, tokens[: len(body)])
  # Documents, in the builder's shuffled order, are separated by </s>.
  docs, _ = text_corpus.collect_documents(trees, seed=1)
  assert tokens[-1] == text.EOS_ID
  ends = np.flatnonzero(tokens == text.EOS_ID)
  assert len(ends) == len(docs)
  pieces = np.split(tokens, ends + 1)[:-1]
  decoded = [tok.decode(p[:-1].tolist()).strip() for p in pieces]
  assert decoded == docs
  # A block decodes to <s> and the stream text it holds.
  first = tok.decode(blocks[0].tolist(), skip_special_tokens=False)
  assert first.startswith("<s>")
  assert first[3:].strip().startswith(docs[0][:10])


def test_second_build_is_cached(built):
  root, trees, path = built
  stamp = (path / "blocks.npy").stat().st_mtime_ns
  again = text_corpus.build_corpus(
    root, vocab_size=VOCAB, block_size=BLOCK, seed=1, trees=trees
  )
  assert again == path
  assert (path / "blocks.npy").stat().st_mtime_ns == stamp


def test_max_words_builds_a_smaller_slice(built, tmp_path):
  root, trees, _ = built
  path = text_corpus.build_corpus(
    tmp_path, vocab_size=VOCAB, block_size=8, max_words=100, trees=trees
  )
  meta = json.loads((path / "meta.json").read_text())
  assert 100 <= meta["words"] < 100 + 60  # stops after the 100th word
  full = sum(s["words"] for s in meta["sources"].values())
  assert meta["words"] < full
  assert "w100" in path.name


def test_bad_requests(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100"):
    text_corpus.train_tokenizer(["a b c"], 100)
  with pytest.raises(ValueError, match="unknown source 'bible'"):
    text_corpus.collect_documents({"bible": tmp_path})
