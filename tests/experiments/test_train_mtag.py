"""MTAG training end to end: metrics, best checkpoint, resume, SIGTERM."""

import os
import signal

import numpy as np
import pytest

from experiments import train_mtag
from experiments.configs import mtag_iemocap, mtag_mosi
from experiments.runtime import writers
from experiments.tasks import mtag as mtag_task
from tests.helpers import sigterm_at, train_losses


def _config(**train):
  c = mtag_mosi.get_config("tiny")
  c.mesh.data = 1
  for k, v in train.items():
    setattr(c.train, k, v)
  return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  state = train_mtag.run(_config(), workdir)
  return workdir, state


def test_tiny_run_logs_evaluates_and_keeps_the_best(uninterrupted, capsys):
  workdir, state = uninterrupted
  records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  losses = train_losses(workdir)
  per_epoch = len(mtag_task.epoch_batches(np.arange(48), 8))
  assert sorted(losses) == list(range(1, 2 * per_epoch + 1))
  assert int(state.step) == 2 * per_epoch
  valid = [r for r in records if "eval/valid/mae" in r]
  assert [r["step"] for r in valid] == [per_epoch, 2 * per_epoch]
  test = [r for r in records if "eval/test/mae" in r]
  assert len(test) == 1 and np.isfinite(test[0]["eval/test/acc2"])
  assert os.path.isdir(os.path.join(workdir, "best"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_resume_reproduces_the_uninterrupted_losses(uninterrupted, tmp_path):
  full, _ = uninterrupted
  workdir = str(tmp_path)
  # Stop mid-epoch, then mid-next-epoch, then finish.
  train_mtag.run(_config(stop_after_steps=3), workdir)
  train_mtag.run(_config(stop_after_steps=4), workdir)
  train_mtag.run(_config(), workdir)
  assert train_losses(workdir) == train_losses(full)  # bit for bit


def test_building_in_the_loop_gives_the_same_run(uninterrupted, tmp_path):
  """Batches built ahead on a thread (the default) change nothing."""
  full, _ = uninterrupted
  assert _config().train.prefetch > 0
  workdir = str(tmp_path)
  train_mtag.run(_config(prefetch=0), workdir)
  assert train_losses(workdir) == train_losses(full)  # bit for bit
  records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  expected = writers.read_jsonl(os.path.join(full, "metrics.jsonl"))
  pick = lambda rs: [r["eval/valid/mae"] for r in rs if "eval/valid/mae" in r]
  assert pick(records) == pick(expected)


def test_sigterm_checkpoints_and_resumes(uninterrupted, tmp_path):
  full, _ = uninterrupted
  workdir = str(tmp_path)
  with sigterm_at(2):
    state = train_mtag.run(_config(), workdir)
  assert int(state.step) == 2
  assert signal.getsignal(signal.SIGTERM) is not None
  train_mtag.run(_config(), workdir)
  assert train_losses(workdir) == train_losses(full)


def test_eight_devices_match_one_device(tmp_path):
  losses = []
  for devices in (1, 8):
    c = _config()
    c.train.epochs = 1
    c.mesh.data, c.mesh.shards = devices, 8
    workdir = str(tmp_path / f"d{devices}")
    train_mtag.run(c, workdir)
    losses.append(train_losses(workdir))
  assert losses[0].keys() == losses[1].keys()
  np.testing.assert_allclose(
    list(losses[0].values()), list(losses[1].values()), rtol=1e-5
  )


def test_iemocap_tiny_runs(tmp_path):
  c = mtag_iemocap.get_config("tiny")
  c.mesh.data = 1
  c.train.epochs = 1
  train_mtag.run(c, str(tmp_path))
  records = writers.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert any("eval/test/mean/f1" in r for r in records)


def test_bad_configs_fail_at_start(tmp_path):
  c = _config()
  c.mesh.data = 8
  c.train.batch_size = 12
  with pytest.raises(ValueError, match="batch_size=12 is not divisible"):
    train_mtag.run(c, str(tmp_path / "a"))
  c = _config()
  c.mesh.shards = 3
  c.mesh.data = 2
  with pytest.raises(ValueError, match="mesh.shards=3"):
    train_mtag.run(c, str(tmp_path / "b"))
  # A workdir holding another config's run.
  c = _config(stop_after_steps=1)
  train_mtag.run(c, str(tmp_path / "c"))
  c.model.hidden = 32
  with pytest.raises(ValueError, match="hidden"):
    train_mtag.run(c, str(tmp_path / "c"))
