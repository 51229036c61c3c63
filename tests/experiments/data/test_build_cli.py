"""Tests of the builders' shared command line, with the builds stubbed."""

import json
import subprocess
import sys
import types

import pytest
from absl import app

from experiments.data import (
  build_cli,
  sentiment_sets,
  speech_corpus,
  spoken_reviews,
  text_corpus,
)


def _folder(tmp_path, files):
  tmp_path.mkdir(parents=True, exist_ok=True)
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  return tmp_path


def test_run_times_the_build_and_refuses_arguments(tmp_path):
  calls = []

  def build(root, *, seed):
    calls.append((root, seed))
    return str(tmp_path)

  path, seconds = build_cli.run(["prog"], build, "here", seed=3)
  assert path == tmp_path and seconds >= 0 and calls == [("here", 3)]
  with pytest.raises(app.UsageError, match="unexpected arguments"):
    build_cli.run(["prog", "extra"], build, "here", seed=3)
  assert len(calls) == 1


def test_folder_summary_gives_size_and_time(tmp_path):
  _folder(tmp_path, {"a.npy": "x" * 1_500_000, "meta.json": "{}"})
  assert build_cli.folder_summary(tmp_path, 2.25) == (
    f"{tmp_path}: 1.5 MB, 2.2 s (0 s if it was cached)"
  )


def test_mains_pass_their_flags_and_print(tmp_path, monkeypatch, capsys):
  folder = _folder(tmp_path / "built", {"meta.json": '{"n": 1}\n'})
  got = {}

  def fake(*args, **kwargs):
    got["call"] = (args, kwargs)
    return folder

  sentences = dict(seed=1, limit=5, speaker_disjoint=True, workers=1)
  monkeypatch.setattr(spoken_reviews, "build", fake)
  monkeypatch.setattr(
    spoken_reviews, "FLAGS", types.SimpleNamespace(data_dir="d", **sentences)
  )
  spoken_reviews.main(["prog"])
  assert got["call"] == (("d",), sentences)
  assert capsys.readouterr().out.startswith(f"{folder}: 0.0 MB, ")

  monkeypatch.setattr(speech_corpus, "build_tuxpaint", fake)
  monkeypatch.setattr(
    speech_corpus,
    "FLAGS",
    types.SimpleNamespace(set="tuxpaint", data_dir="d", **sentences),
  )
  speech_corpus.main(["prog"])
  assert got["call"] == (("d",), {"workers": 1})
  assert "(0 s if it was cached)" in capsys.readouterr().out

  monkeypatch.setattr(sentiment_sets, "build", fake)
  monkeypatch.setattr(
    sentiment_sets,
    "FLAGS",
    types.SimpleNamespace(corpus="c", data_dir=None, max_len=8),
  )
  sentiment_sets.main(["prog"])
  assert got["call"] == (("c", None), {"max_len": 8})
  assert capsys.readouterr().out == '{"n": 1}\n\n'

  meta = {"words": 1, "tokens": 2, "blocks": 3, "vocab_size": 4, "seconds": 5}
  (folder / "meta.json").write_text(json.dumps(meta))
  monkeypatch.setattr(text_corpus, "build_corpus", fake)
  monkeypatch.setattr(
    text_corpus,
    "FLAGS",
    types.SimpleNamespace(
      data_dir=None, vocab_size=64, block_size=16, max_words=0, seed=0
    ),
  )
  text_corpus.main(["prog"])
  assert json.loads(capsys.readouterr().out) == meta | {"path": str(folder)}


def test_flags_are_defined_when_run_not_on_import():
  # speech_corpus imports spoken_reviews: both own --data_dir, --seed, ...
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.data.speech_corpus", "--helpshort"],
    capture_output=True,
    text=True,
    check=False,
  )
  for flag in ("--set", "--data_dir", "--limit", "speaker_disjoint"):
    assert flag in proc.stdout, proc.stderr
