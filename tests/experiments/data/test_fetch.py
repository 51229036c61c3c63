"""Data fetching: cache folders are written atomically, errors say why."""

import pathlib

import pytest

from experiments.data import fetch


def test_data_dir_follows_xdg_cache_home(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert fetch.data_dir() == tmp_path / fetch.PROJECT
  assert fetch.data_dir(tmp_path / "mine") == tmp_path / "mine"
  assert (tmp_path / "mine").is_dir()


def test_atomic_dir_publishes_only_complete_folders(tmp_path):
  target = tmp_path / "cache" / "item"
  with pytest.raises(RuntimeError, match="midway"):
    with fetch.atomic_dir(target) as tmp:
      (tmp / "half.bin").write_bytes(b"x")
      raise RuntimeError("midway")
  assert not target.exists()
  assert list((tmp_path / "cache").iterdir()) == []  # no temporary left
  with fetch.atomic_dir(target) as tmp:
    (tmp / "whole.bin").write_bytes(b"y")
  assert (target / "whole.bin").read_bytes() == b"y"


def test_atomic_dir_keeps_a_folder_another_process_finished(tmp_path):
  target = tmp_path / "item"
  with fetch.atomic_dir(target) as tmp:
    target.mkdir()
    (target / "first.bin").write_bytes(b"1")
    (tmp / "second.bin").write_bytes(b"2")
  assert [p.name for p in target.iterdir()] == ["first.bin"]
  assert [p.name for p in tmp_path.iterdir()] == ["item"]


def test_missing_program_is_named(tmp_path):
  with pytest.raises(RuntimeError, match="no-such-program.*not on this"):
    fetch._run(["no-such-program"], cwd=tmp_path, what="fetching x")


def test_failed_command_reports_its_output(tmp_path):
  with pytest.raises(RuntimeError, match="exit code 3:\n  oops"):
    fetch._run(
      ["sh", "-c", "echo oops >&2; exit 3"], cwd=tmp_path, what="fetching x"
    )


def test_archive_folder_with_two_files_is_refused(tmp_path):
  folder = tmp_path / "pypi" / "sdist-pkg--1.0"
  folder.mkdir(parents=True)
  for name in ("a.tar.gz", "b.tar.gz"):
    pathlib.Path(folder, name).write_bytes(b"")
  with pytest.raises(RuntimeError, match="expected one archive"):
    fetch.pip_archive("pkg==1.0", tmp_path, source=True)
  (folder / "b.tar.gz").unlink()
  assert fetch.pip_archive("pkg==1.0", tmp_path, source=True).name == "a.tar.gz"
