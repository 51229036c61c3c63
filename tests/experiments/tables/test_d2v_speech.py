"""The data2vec speech table, end to end on tiny spoken and Tux Paint sets."""

import json
import pathlib

import pytest
from absl import flags
from absl.testing import flagsaver

from experiments.data import speech_corpus as sc
from experiments.tables import d2v_speech, grid
from tests.d2vjax.test_datasets_audio import write_stamps
from tests.experiments.data.test_speech_corpus import SHORT
from tests.experiments.data.test_vader import make_sdist

# The cells' fine-tuning runs share their shapes: compile them once.
pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture(scope="module", autouse=True)
def _flags():
  # The table commands share flag names: leave none of ours behind for the
  # other tables' tests.
  before = set(flags.FLAGS)
  d2v_speech.define_flags()
  flags.FLAGS.mark_as_parsed()
  yield
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
  src = tmp_path_factory.mktemp("src")
  sdist = make_sdist(src / "v.tar.gz", movie=SHORT)
  root = tmp_path_factory.mktemp("data")
  spoken = sc.build_spoken_sentences(
    root, domains=("movie",), seed=1, workers=1, archive=sdist, progress=False
  )
  tree = write_stamps(tmp_path_factory.mktemp("tree"))
  tux = sc.build_tuxpaint(root, stamps=tree, workers=1, progress=False)
  return str(spoken), str(tux)


def test_cells_cover_the_table():
  cells = d2v_speech.cells(seeds=3, results_dir=pathlib.Path("r"))
  names = [c.name for c in cells]
  assert names[0] == "pretrain-s0" and len(set(names)) == len(names)
  assert len(cells) == 1 + 2 * 3 * 2  # budgets x seeds x rows
  by_name = {c.name: c for c in cells}
  d2v = by_name["10min-finetune-d2v-s1"].spec["config"]
  scratch = by_name["10min-finetune-scratch-s1"].spec["config"]
  assert d2v["init"] == "encoder:pretrain-s0/encoder"
  assert scratch["init"] == "scratch"
  # The same recipe and budget but for the initialisation.
  strip = lambda s: {k: v for k, v in s.items() if k != "init"}
  assert strip(d2v) == strip(scratch)
  assert d2v["data"]["label_minutes"] == 10.0
  assert by_name["1h-finetune-d2v-s2"].spec["config"]["data"][
    "label_minutes"
  ] == (60.0)
  assert d2v["data"]["subset_seed"] == d2v["train"]["seed"] == 1
  assert d2v["data"]["tuxpaint_check"]
  # Fine-tuning is scored on the speakers that pretraining never heard.
  pre = cells[0].spec["config"]
  for field in ("speech_limit", "speaker_disjoint"):
    assert pre["data"][field] == d2v["data"][field], field
  assert pre["data"]["speaker_disjoint"]
  # From scratch, the pretraining recipe's architecture.
  for field, value in scratch["model"]["encoder"].items():
    assert pre["model"][field] == value, field
  # Where data and results live is no part of a spec.
  elsewhere = d2v_speech.cells(
    seeds=3,
    results_dir=pathlib.Path("elsewhere"),
    spoken="/data/spoken",
    tuxpaint="/data/tux",
  )
  assert [c.spec for c in elsewhere] == [c.spec for c in cells]
  with pytest.raises(ValueError, match="both"):
    d2v_speech.cells(seeds=1, results_dir=pathlib.Path("r"), spoken="/s")


def test_tiny_table_runs_and_resumes(tmp_path, sets, capsys):
  spoken, tux = sets
  results, readme = tmp_path / "results", tmp_path / "README.md"
  args = dict(
    results_dir=str(results),
    readme=str(readme),
    workdir_root=str(tmp_path / "work"),
    seeds=1,
    # The 1 h column runs as the 10 min one: left out.
    only="^pretrain-s0$|^10min",
    tiny=True,
    spoken_path=spoken,
    tuxpaint_path=tux,
    compilation_cache="",
  )
  with flagsaver.flagsaver(**args):
    d2v_speech.main(["d2v_speech"])
  records = grid.saved_records(results)
  assert {r["name"] for r in records} == {
    "pretrain-s0",
    *(f"10min-{k}-s0" for k in d2v_speech.ROWS),
  }
  for r in records:
    if r["row"] != "pretraining":
      m = r["metrics"]
      for key in ("test/cer", "test/wer", "tuxpaint_en/cer", "valid/wer"):
        assert 0 <= m[key], (r["name"], key)
  text = readme.read_text()
  assert "<!-- begin:d2v_speech -->" in text and "CER 10 min" in text
  assert "Tux Paint English CER 10 min" in text
  assert "fine-tuned from data2vec" in text
  assert (results / "cer_vs_labels.png").exists()
  assert (results / "pretraining.png").exists()
  assert (results / "encoders" / "pretrain-s0" / "encoder").is_dir()
  # Run again: everything is skipped.
  capsys.readouterr()
  with flagsaver.flagsaver(**args):
    d2v_speech.main(["d2v_speech"])
  out = capsys.readouterr().out
  assert out.count("done before, skipped") == 3 and ": running" not in out
  # A cell saved with another recipe is refused, not mixed in.
  path = results / "cells" / "10min-finetune-scratch-s0.json"
  saved = json.loads(path.read_text())
  saved["spec"]["config"]["train"]["steps"] = 99
  path.write_text(json.dumps(saved))
  with flagsaver.flagsaver(**args), pytest.raises(ValueError, match="spec"):
    d2v_speech.main(["d2v_speech"])


def test_report_sets_cer_wer_transfer_and_the_ratio(tmp_path):
  def record(kind, cer, seed=0, column="10 min"):
    return dict(
      name=f"{column.replace(' ', '')}-{kind}-s{seed}",
      row=d2v_speech.ROWS[kind],
      column=column,
      seed=seed,
      metrics={"test/cer": cer, "test/wer": 0.9, "tuxpaint_en/cer": 0.8},
    )

  records = [
    record("finetune-scratch", 0.8),
    record("finetune-scratch", 0.6, seed=1),
    record("finetune-d2v", 0.3),
    record("finetune-d2v", 0.4, seed=1),
    record("finetune-d2v", 0.2, column="1 h"),
  ]
  text = d2v_speech.report(records, tmp_path / "results", tmp_path / "work")
  lines = text.splitlines()
  assert lines[0] == (
    "| spoken sentences, unheard speakers (test) | CER 10 min | CER 1 h | "
    "WER 10 min | WER 1 h | Tux Paint English CER 10 min | "
    "Tux Paint English CER 1 h |"
  )
  body = {line.split(" | ")[0].strip("| "): line for line in lines[2:4]}
  assert body["fine-tuned from data2vec"].startswith(
    "| fine-tuned from data2vec | 0.350 ± 0.071 | 0.200 (n=1) | 0.900 ± 0.000"
  )
  assert "| – |" in body["fine-tuned from scratch"]
  assert "Test CER, data2vec over scratch: 10 min: 0.50." in text
  assert (tmp_path / "results" / "table.md").read_text() == text
  assert (tmp_path / "results" / "cer_vs_labels.png").exists()
