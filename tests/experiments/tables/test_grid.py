"""Tests of the resumable result grid and its markdown tables."""

import dataclasses
import pathlib

import pytest

from experiments.tables import grid


def _cells(calls, fail_on=None):
  def make(name, row, column, seed, value):
    def run(workdir: pathlib.Path):
      calls.append((name, workdir.name))
      if name == fail_on:
        raise KeyboardInterrupt  # a grid killed mid-cell
      return {"acc": value}

    return grid.Cell(name, row, column, seed, {"lr": 0.1, "seed": seed}, run)

  return [
    make("a-s0", "A", "x", 0, 0.5),
    make("a-s1", "A", "x", 1, 0.7),
    make("b-s0", "B", "x", 0, 0.9),
  ]


def test_a_killed_grid_resumes_where_it_stopped(tmp_path):
  calls = []
  with pytest.raises(KeyboardInterrupt):
    grid.run_grid(_cells(calls, fail_on="a-s1"), tmp_path, tmp_path / "w")
  assert [r["name"] for r in grid.saved_records(tmp_path)] == ["a-s0"]
  calls.clear()
  lines = []
  records = grid.run_grid(
    _cells(calls), tmp_path, tmp_path / "w", log=lines.append
  )
  assert [c[0] for c in calls] == ["a-s1", "b-s0"]
  assert calls[0][1] == "a-s1"  # each cell has its own workdir
  assert "skipped" in lines[0]
  assert [r["metrics"]["acc"] for r in records] == [0.5, 0.7, 0.9]
  assert records[0]["machine"]["cores"] >= 1 and "seconds" in records[0]


def test_only_and_rerun(tmp_path):
  calls = []
  grid.run_grid(_cells(calls), tmp_path, tmp_path / "w", only="^a-")
  assert [c[0] for c in calls] == ["a-s0", "a-s1"]
  calls.clear()
  grid.run_grid(_cells(calls), tmp_path, tmp_path / "w", only="s0$", rerun=True)
  assert [c[0] for c in calls] == ["a-s0", "b-s0"]


def test_changed_spec_and_bad_records_are_refused(tmp_path):
  grid.run_grid(_cells([]), tmp_path, tmp_path / "w")
  changed = [
    grid.Cell(c.name, c.row, c.column, c.seed, {"lr": 0.2}, c.run)
    for c in _cells([])
  ]
  with pytest.raises(ValueError, match="another spec.*delete it"):
    grid.run_grid(changed, tmp_path, tmp_path / "w")
  (tmp_path / "cells" / "a-s0.json").write_text("{not json")
  with pytest.raises(ValueError, match="a-s0.json: not a readable cell"):
    grid.run_grid(_cells([]), tmp_path, tmp_path / "w")
  with pytest.raises(ValueError, match="duplicate cell names"):
    grid.run_grid(_cells([]) * 2, tmp_path, tmp_path / "w")
  with pytest.raises(ValueError, match="cell name"):
    grid.Cell("a b", "A", "", 0, {}, lambda w: {})


def test_render_mean_and_sample_std(tmp_path):
  records = grid.run_grid(_cells([]), tmp_path, tmp_path / "w")
  text = grid.render(
    records, metric="acc", rows=["A", "B", "C"], columns=["x"], digits=2
  )
  lines = text.splitlines()
  assert lines[0] == "|  | x |"
  # A: mean 0.6, sample std 0.1414; B: one seed (not the usual two); C: none.
  assert lines[2] == "| A | 0.60 ± 0.14 |"
  assert lines[3] == "| B | 0.90 (n=1) |"
  assert lines[4] == "| C | – |"
  assert grid.mean_of(records, "A", "x", "acc")[2] == 2


def test_relabel_follows_the_cells_of_today(tmp_path):
  records = grid.run_grid(_cells([]), tmp_path, tmp_path / "w")
  renamed = [
    dataclasses.replace(c, row="A2") if c.row == "A" else c for c in _cells([])
  ]
  relabelled = grid.relabel(records, renamed[:2])
  assert [r["row"] for r in relabelled] == ["A2", "A2", "B"]
  assert [r["metrics"] for r in relabelled] == [r["metrics"] for r in records]
  assert records[0]["row"] == "A"  # the saved records are left alone


def test_update_readme_replaces_only_its_block(tmp_path):
  path = tmp_path / "README.md"
  path.write_text("# Results\n\nintro\n")
  grid.update_readme(path, "t1", "first")
  grid.update_readme(path, "t2", "other")
  grid.update_readme(path, "t1", "second")
  text = path.read_text()
  assert text.startswith("# Results\n\nintro\n")
  assert "second" in text and "first" not in text and "other" in text
  assert text.index("begin:t1") < text.index("begin:t2")
