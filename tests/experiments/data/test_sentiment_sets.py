"""Helpers of the sentiment fine-tuning sets: dedupe, splits, encoding."""

import bz2
import zipfile

import numpy as np
import pytest

from experiments.data import sentiment_sets, text_corpus
from tests.d2vjax.test_datasets_text import make_debian_trees


def test_normalise_and_dedupe():
  assert sentiment_sets.normalise("It's  GREAT -- 10/10!") == "it s great 10 10"
  texts = ["A fine film.", "a FINE film", "Dull.", "New one", "dull"]
  keep, overlap, repeat = sentiment_sets.dedupe(texts, exclude=["dull!"])
  assert keep == [0, 3] and overlap == 2 and repeat == 1


def test_split_keeps_groups_together():
  groups = [f"movie{i % 30}" for i in range(300)]
  split = sentiment_sets.split_groups(groups, seed=1)
  for g in set(groups):
    assert (
      len({int(s) for s, h in zip(split, groups, strict=True) if h == g}) == 1
    )
  counts = np.bincount(split, minlength=3)
  np.testing.assert_array_equal(counts, [240, 30, 30])
  again = sentiment_sets.split_groups(groups, seed=1)
  np.testing.assert_array_equal(split, again)


def test_read_rotten_tomatoes_from_a_wheel(tmp_path):
  csv_text = (
    "category,text,movie_name,has_plot_and_reviews\n"
    'fresh,"Warm, witty.",a,False\nplot,A man goes home.,a,False\n'
  )
  wheel = tmp_path / "w.whl"
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr(sentiment_sets.RT_MEMBER, bz2.compress(csv_text.encode()))
  rows = sentiment_sets.read_rotten_tomatoes(wheel)
  assert [(r["category"], r["text"]) for r in rows] == [
    ("fresh", "Warm, witty."),
    ("plot", "A man goes home."),
  ]
  with zipfile.ZipFile(tmp_path / "x.whl", "w") as z:
    z.writestr("other.txt", "")
  with pytest.raises(ValueError, match="rotten_tomatoes_corpus_full"):
    sentiment_sets.read_rotten_tomatoes(tmp_path / "x.whl")


def test_encode_wraps_pads_and_truncates(tmp_path):
  trees = make_debian_trees(tmp_path / "debian", copies=2)
  path = text_corpus.build_corpus(
    tmp_path, vocab_size=280, block_size=8, trees=trees
  )
  tok = text_corpus.load_tokenizer(path)
  out = sentiment_sets.encode(tok, ["the earth", "a " * 40], max_len=12)
  assert out["ids"].shape == (2, 12) and out["ids"].dtype == np.int32
  n = out["lengths"][0]
  assert out["ids"][0, 0] == 0 and out["ids"][0, n - 1] == 2
  assert (out["ids"][0, n:] == 1).all()
  assert out["lengths"][1] == 12 and out["ids"][1, -1] == 2
  assert tok.decode(out["ids"][0, :n].tolist()).strip() == "the earth"


def test_labelled_subset_is_a_fixed_nested_draw():
  small = sentiment_sets.labelled_subset(100, 10, seed=1)
  large = sentiment_sets.labelled_subset(100, 40, seed=1)
  assert len(small) == 10 and np.all(np.diff(small) > 0)
  # A smaller budget's sentences are among a larger one's of the same seed.
  assert set(small) <= set(large)
  np.testing.assert_array_equal(
    small, sentiment_sets.labelled_subset(100, 10, seed=1)
  )
  other = sentiment_sets.labelled_subset(100, 10, seed=2)
  assert set(other) != set(small)
  np.testing.assert_array_equal(
    sentiment_sets.labelled_subset(100, 0, seed=1), np.arange(100)
  )
  with pytest.raises(ValueError, match="config.data.labels=101"):
    sentiment_sets.labelled_subset(100, 101, seed=1)
