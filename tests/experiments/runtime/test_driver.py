"""The run driver on a toy task: logs, evaluation, best, resume, SIGTERM.

The toy task (least squares by SGD on generated rows) is also the smallest
example of what a new experiment writes: one `Task` subclass.
"""

import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import tasks
from experiments.runtime import distributed, driver
from experiments.runtime import mesh as mesh_lib
from experiments.tasks import base
from tests.helpers import run_records, sigterm_at, train_losses


@flax.struct.dataclass
class State:
  step: jax.Array
  w: jax.Array


class LeastSquares(base.Task):
  """Fits w to y = x . [1, -2, 3] by SGD; batches are a function of step."""

  name = "least_squares"
  legacy_fields = {"task": "least_squares"}
  final_splits = ("test",)

  def setup(self, mesh):
    self.rows = self.process_rows(self.config.train.batch_size)

    def step_fn(state, batch):
      def loss(w):
        return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

      value, grad = jax.value_and_grad(loss)(state.w)
      lr = self.config.train.learning_rate
      new = State(step=state.step + 1, w=state.w - lr * grad)
      return new, {"loss": value}

    self._step = jax.jit(step_fn, donate_argnums=(0,))
    state = State(step=jnp.zeros((), jnp.int32), w=jnp.zeros(3))
    return jax.device_put(state, mesh_lib.replicated(mesh))

  @property
  def total_steps(self):
    return self.config.train.steps

  def _rows(self, seed, lo, hi):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((self.config.train.batch_size, 3))[lo:hi]
    return {
      "x": x.astype(np.float32),
      "y": (x @ [1.0, -2.0, 3.0]).astype(np.float32),
    }

  def train_items(self, step):
    return iter(range(step, self.total_steps))

  def build_batch(self, item):
    local = self._rows([self.config.train.seed, item], *self.rows)
    return distributed.ProcessRows(local, self.config.train.batch_size), item

  def train_step(self, state, batch, step):
    return self._step(state, batch)

  def eval_due(self, step):
    return step % self.config.train.eval_every == 0

  def evaluate(self, state, split):
    batch = self._rows([99, split == "test"], 0, self.config.train.batch_size)
    error = np.asarray(batch["x"] @ np.asarray(state.w) - batch["y"])
    return {"mse": float(np.mean(error**2))}

  @property
  def best_metric(self):
    return "eval/valid/mse", "min"


def _config(**train):
  c = ml_collections.ConfigDict()
  c.task = "least_squares"
  c.mesh = ml_collections.ConfigDict({"data": 2})
  c.train = ml_collections.ConfigDict(
    dict(
      seed=0,
      steps=12,
      batch_size=8,
      learning_rate=0.05,
      eval_every=4,
      log_every=1,
      checkpoint_every=3,
      keep_checkpoints=2,
      stop_after_steps=0,
      prefetch=2,
    )
  )
  c.train.update(train)
  return c


def _run(workdir, **train):
  return driver.run(LeastSquares(_config(**train)), str(workdir))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  return workdir, _run(workdir)


def test_logs_evaluates_keeps_best_and_reports_test(full, capsys):
  workdir, state = full
  assert int(state.step) == 12
  assert sorted(train_losses(workdir)) == list(range(1, 13))
  valid = [r for r in run_records(workdir) if "eval/valid/mse" in r]
  assert [r["step"] for r in valid] == [4, 8, 12]
  # SGD on a noiseless fit: every evaluation improves, the last is best.
  assert valid[0]["eval/valid/mse"] > valid[-1]["eval/valid/mse"]
  assert os.listdir(os.path.join(workdir, "best")) == ["12"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "9"]
  test = [r for r in run_records(workdir) if "eval/test/mse" in r]
  assert len(test) == 1 and test[0]["step"] == 12


def test_resume_and_sigterm_reproduce_thetrain_losses(full, tmp_path):
  workdir, _ = full
  assert int(_run(tmp_path / "a", stop_after_steps=5).step) == 5
  _run(tmp_path / "a", prefetch=0)  # the build-ahead depth may change
  assert train_losses(tmp_path / "a") == train_losses(workdir)  # bit for bit

  with sigterm_at(7):
    assert int(_run(tmp_path / "b").step) == 7
  _run(tmp_path / "b")
  assert train_losses(tmp_path / "b") == train_losses(workdir)


def test_another_config_is_refused_and_legacy_configs_resume(tmp_path):
  _run(tmp_path, stop_after_steps=2)
  with pytest.raises(ValueError, match="learning_rate"):
    _run(tmp_path, learning_rate=0.1)
  # A workdir written before configs had a `task` field resumes.
  path = tmp_path / "config.json"
  saved = json.loads(path.read_text())
  del saved["task"]
  path.write_text(json.dumps(saved))
  assert int(_run(tmp_path).step) == 12


def test_registry_names_a_module_per_task():
  assert set(tasks.TASKS) == {
    "mtag",
    "pretrain",
    "ctc",
    "image_classification",
    "text_classification",
  }
  assert tasks.get("mtag").name == "mtag"
  with pytest.raises(ValueError, match="config.task='nope'"):
    tasks.get("nope")
