"""The data2vec text table, end to end on a tiny corpus and rating set."""

import json
import math
import pathlib

import pytest
from absl import flags
from absl.testing import flagsaver

from experiments.data import text_corpus
from experiments.tables import d2v_text, grid
from tests.d2vjax.test_datasets_text import make_debian_trees
from tests.helpers import write_vader_movie_set

# The cells' fine-tuning runs share their shapes: compile them once.
pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture(scope="module", autouse=True)
def _flags():
  # The table commands share flag names: leave none of ours behind for the
  # other tables' tests.
  before = set(flags.FLAGS)
  d2v_text.define_flags()
  flags.FLAGS.mark_as_parsed()
  yield
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  trees = make_debian_trees(root / "debian", copies=2)
  return text_corpus.build_corpus(
    root, vocab_size=300, block_size=16, trees=trees
  )


def test_cells_cover_the_table():
  cells = d2v_text.cells(seeds=3, results_dir=pathlib.Path("r"))
  names = [c.name for c in cells]
  assert names[0] == "pretrain-s0" and len(set(names)) == len(names)
  # 5 rows x 3 seeds at 10 %; at 100 % TF-IDF and the probes run once.
  assert len(cells) == 1 + 5 * 3 + (3 + 2 * 3)
  assert "100pct-tfidf-ridge-s0" in names
  assert "100pct-tfidf-ridge-s1" not in names
  by_name = {c.name: c for c in cells}
  probes = {k: by_name[f"10pct-probe-{k}-s1"].spec for k in ("random", "d2v")}
  assert probes["d2v"]["init"] == "encoder:pretrain-s0/encoder"
  assert probes["random"]["seed"] == 1
  assert probes["d2v"]["data"] == probes["random"]["data"]
  assert probes["d2v"]["data"]["labels"] == 848
  d2v = by_name["10pct-finetune-d2v-s1"].spec["config"]
  scratch = by_name["10pct-finetune-scratch-s1"].spec["config"]
  assert d2v["init"] == "encoder:pretrain-s0/encoder"
  assert scratch["init"] == "scratch"
  # The same recipe and budget but for the initialisation.
  strip = lambda s: {k: v for k, v in s.items() if k != "init"}
  assert strip(d2v) == strip(scratch)
  assert d2v["data"]["labels"] == 848 == d2v_text.TRAIN_SENTENCES // 10
  assert d2v["data"]["subset_seed"] == d2v["train"]["seed"] == 1
  # From scratch, the pretraining recipe's architecture.
  pre = cells[0].spec["config"]["model"]
  for field, value in scratch["model"]["encoder"].items():
    assert pre[field] == value, field
  tfidf = by_name["10pct-tfidf-ridge-s1"].spec
  assert tfidf["data"]["labels"] == 848 and tfidf["data"]["subset_seed"] == 1
  # Where data and results live is no part of a spec.
  elsewhere = d2v_text.cells(
    seeds=3,
    results_dir=pathlib.Path("elsewhere"),
    corpus="/data/corpus",
    sentiment_path="/data/sentiment",
  )
  assert [c.spec for c in elsewhere] == [c.spec for c in cells]


def test_tiny_table_runs_and_resumes(tmp_path, corpus, capsys):
  vocab = json.loads((corpus / "meta.json").read_text())["vocab_size"]
  write_vader_movie_set(tmp_path / "sent", n=60, max_len=16, vocab_size=vocab)
  results, readme = tmp_path / "results", tmp_path / "README.md"
  args = dict(
    results_dir=str(results),
    readme=str(readme),
    workdir_root=str(tmp_path / "work"),
    seeds=1,
    # Fine-tuning on all the labels runs as on 10 % of them: left out.
    only="^pretrain-s0$|^10pct|^100pct-tfidf",
    tiny=True,
    corpus_path=str(corpus),
    sentiment_path=str(tmp_path / "sent"),
    compilation_cache="",
  )
  with flagsaver.flagsaver(**args):
    d2v_text.main(["d2v_text"])
  records = grid.saved_records(results)
  assert {r["name"] for r in records} == {
    "pretrain-s0",
    "100pct-tfidf-ridge-s0",
    *(f"10pct-{k}-s0" for k in d2v_text.ROWS),
  }
  for r in records:
    if r["row"] != "pretraining":
      m = r["metrics"]
      assert 0 <= m["test/acc2"] <= 1, r
      assert math.isnan(m["test/pearson"]) or -1 <= m["test/pearson"] <= 1
  text = readme.read_text()
  assert "<!-- begin:d2v_text -->" in text and "Corr 100%" in text
  assert "fine-tuned from data2vec" in text
  assert (results / "corr_vs_labels.png").exists()
  assert (results / "pretraining.png").exists()
  assert (results / "encoders" / "pretrain-s0" / "encoder").is_dir()
  # Run again: everything is skipped.
  capsys.readouterr()
  with flagsaver.flagsaver(**args):
    d2v_text.main(["d2v_text"])
  out = capsys.readouterr().out
  assert out.count("done before, skipped") == 7 and ": running" not in out
  # A cell saved with another recipe is refused, not mixed in.
  path = results / "cells" / "10pct-finetune-scratch-s0.json"
  saved = json.loads(path.read_text())
  saved["spec"]["config"]["train"]["steps"] = 99
  path.write_text(json.dumps(saved))
  with flagsaver.flagsaver(**args), pytest.raises(ValueError, match="spec"):
    d2v_text.main(["d2v_text"])


def test_report_sets_corr_beside_acc2_and_the_gain(tmp_path):
  def record(kind, corr, seed=0, column="10%"):
    return dict(
      name=f"{column.rstrip('%')}pct-{kind}-s{seed}",
      row=d2v_text.ROWS[kind],
      column=column,
      seed=seed,
      metrics={"test/pearson": corr, "test/acc2": 0.75},
    )

  records = [
    record("finetune-scratch", 0.4),
    record("finetune-scratch", 0.5, seed=1),
    record("finetune-d2v", 0.6),
    record("finetune-d2v", 0.7, seed=1),
    record("tfidf-ridge", 0.45),
    record("tfidf-ridge", 0.7, column="100%"),
  ]
  text = d2v_text.report(records, tmp_path / "results", tmp_path / "work")
  lines = text.splitlines()
  assert lines[0] == (
    "| VADER movie ratings (test) | Corr 10% | Acc2 10% | Corr 100% | "
    "Acc2 100% |"
  )
  body = {line.split(" | ")[0].strip("| "): line for line in lines[2:7]}
  assert (
    "| 0.650 ± 0.071 | 0.750 ± 0.000 | – | – |"
    in (body["fine-tuned from data2vec"])
  )
  assert "0.700 (n=1)" in body["TF-IDF + ridge"]
  assert "data2vec minus scratch (test Corr): 10%: +0.200." in text
  assert (tmp_path / "results" / "table.md").read_text() == text
