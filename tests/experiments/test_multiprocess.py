"""Real multi-process runs: two CPU processes joined by jax.distributed.

Each entry point is launched twice, as a cluster launch would, with the
coordinator in the environment; each process has two devices, so the mesh
spans four devices in two processes. The losses must equal those of a
one-process run with the same global batch, and only process 0 writes logs.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import pretrain_d2v, train_mtag
from experiments.configs import d2v_vision, mtag_mosi
from experiments.runtime import writers

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("xla_cache")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(module: str, workdir: pathlib.Path, *overrides: str) -> list[str]:
  """Runs `module` in two processes; returns their outputs."""
  port = _free_port()
  procs, logs = [], []
  for rank in range(2):
    env = dict(
      os.environ,
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(rank),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    cmd = [sys.executable, "-m", module, f"--workdir={workdir}", *overrides]
    # Output goes to files, not pipes: a process blocked on a full pipe
    # would stall the other one inside a collective.
    logs.append(workdir.parent / f"{workdir.name}-{rank}.log")
    with open(logs[-1], "w") as out:
      procs.append(
        subprocess.Popen(
          cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
      )
  for p in procs:
    p.wait(timeout=600)
  outputs = [log.read_text() for log in logs]
  for rank, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, f"process {rank} failed:\n{out[-3000:]}"
  return outputs


def _losses(workdir) -> dict[int, float]:
  records = writers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  steps = [r["step"] for r in records if "train/loss" in r]
  assert len(steps) == len(set(steps)), "a step was logged twice"
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _compare(two, one):
  assert two.keys() == one.keys()
  np.testing.assert_allclose(list(two.values()), list(one.values()), rtol=1e-5)


def test_pretraining_in_two_processes_matches_one(tmp_path):
  config = "--config=experiments/configs/d2v_vision.py:tiny"
  _launch(
    "experiments.pretrain_d2v",
    tmp_path / "two",
    config,
    "--config.train.steps=3",
  )
  c = d2v_vision.get_config("tiny")
  c.mesh.data, c.train.steps = 4, 3
  pretrain_d2v.run(c, str(tmp_path / "one"))
  _compare(_losses(tmp_path / "two"), _losses(tmp_path / "one"))
  saved = json.loads((tmp_path / "two" / "config.json").read_text())
  assert saved["train"]["steps"] == c.train.steps


def test_mtag_in_two_processes_matches_one(tmp_path):
  outputs = _launch(
    "experiments.train_mtag",
    tmp_path / "two",
    "--config=experiments/configs/mtag_mosi.py:tiny",
    "--config.mesh.shards=4",
  )
  # The test table is printed by process 0 only.
  assert ["test metrics" in out for out in outputs] == [True, False]
  c = mtag_mosi.get_config("tiny")
  c.mesh.data, c.mesh.shards = 1, 4
  train_mtag.run(c, str(tmp_path / "one"))
  _compare(_losses(tmp_path / "two"), _losses(tmp_path / "one"))
