"""Tests for `experiments.runtime.checkpoint`: round trips, sharding,
retention, config checks and recovery from damaged checkpoints."""

from __future__ import annotations

import logging
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.runtime import checkpoint as ckpt_lib

# Reading a damaged checkpoint makes tensorstore call back into an event loop
# that orbax has already closed; Python reports it at some later garbage
# collection, in whichever test is running then. It is harmless noise.
pytestmark = pytest.mark.filterwarnings(
  "ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning"
)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict[str, jax.Array]
  opt_state: optax.OptState
  rng: jax.Array


_TX = optax.adam(1e-2)


def _make_state(seed: int = 0) -> TrainState:
  """A train state with non-trivial values in every leaf."""
  key = jax.random.key(seed)
  k_w, k_b, k_g, key = jax.random.split(key, 4)
  params = {
    "w": jax.random.normal(k_w, (16, 4)),
    "b": jax.random.normal(k_b, (4,)),
  }
  opt_state = _TX.init(params)
  grads = jax.tree.map(lambda p: jax.random.normal(k_g, p.shape), params)
  _, opt_state = _TX.update(grads, opt_state, params)
  return TrainState(
    step=jnp.asarray(seed + 1, jnp.int32),
    params=params,
    opt_state=opt_state,
    rng=key,
  )


def _config(**overrides: Any) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_epochs = 10
  config.model = ml_collections.ConfigDict({"hidden": 64, "layers": (2, 3)})
  config.update(overrides)
  return config


def _assert_bit_equal(a: Any, b: Any) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)

  def check(x, y):
    x_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    assert x_key == jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
    if x_key:
      assert jax.random.key_impl(x) == jax.random.key_impl(y)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True)

  jax.tree.map(check, a, b)


def _step_dirs(path: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


@pytest.fixture
def workdir(tmp_path: pathlib.Path) -> pathlib.Path:
  return tmp_path / "run"


def test_round_trip_is_bit_exact(workdir):
  state = _make_state()
  extra = {"epoch": 3, "position": 17, "plateau": {"best": 0.5, "bad": [1]}}
  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    ckpt.save(5, state, extra=extra)
  assert not any(
    jax.dtypes.issubdtype(x.dtype, np.float64) for x in jax.tree.leaves(state)
  )

  # A fresh instance, as after a restart.
  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    assert ckpt.latest_step() == 5
    restored, restored_extra, step = ckpt.restore(_make_state(seed=9))
  assert step == 5
  assert restored_extra == extra
  assert isinstance(restored, TrainState)
  _assert_bit_equal(restored, state)
  # The typed key still draws the same numbers.
  np.testing.assert_array_equal(
    jax.random.uniform(restored.rng, (3,)), jax.random.uniform(state.rng, (3,))
  )


def test_relative_workdir_saves(tmp_path, monkeypatch):
  # orbax takes only absolute paths and fails in its background thread.
  monkeypatch.chdir(tmp_path)
  state = _make_state()
  with ckpt_lib.Checkpointer("rel/run", _config()) as ckpt:
    ckpt.save(3, state)
    ckpt.wait()
  with ckpt_lib.Checkpointer("rel/run", _config()) as ckpt:
    restored, _, step = ckpt.restore(_make_state(seed=9))
  assert step == 3
  _assert_bit_equal(restored, state)


def test_a_failed_background_save_raises(tmp_path, monkeypatch):
  # A relative path reaching orbax fails in its background commit thread;
  # waiting for the save raises it.
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(ckpt_lib, "_absolute", lambda w: w)
  ckpt = ckpt_lib.Checkpointer("rel/run", _config())
  with pytest.raises(ValueError, match="should be absolute"):
    ckpt.save(1, _make_state())
    ckpt.wait()
  ckpt.close()


def test_restore_into_sharded_abstract_target(workdir):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  state = _make_state()

  def sharding_of(path, leaf):
    # Shard the rows of the weight matrix and its Adam moments; replicate
    # the rest (biases, counts, step, key).
    name = jax.tree_util.keystr(path)
    rows = "['w']" in name and leaf.ndim == 2
    return NamedSharding(mesh, P("data") if rows else P())

  abstract = jax.eval_shape(_make_state)
  shardings = jax.tree_util.tree_map_with_path(sharding_of, abstract)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    shardings,
  )

  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    ckpt.save(1, state)
    ckpt.wait()
    restored, extra, step = ckpt.restore(target)

  assert (extra, step) == ({}, 1)
  _assert_bit_equal(restored, state)
  jax.tree.map(lambda x, s: _assert_same_sharding(x, s), restored, shardings)
  assert restored.params["w"].sharding.spec == P("data")
  assert len(restored.params["w"].addressable_shards) == 8
  assert restored.params["w"].addressable_shards[0].data.shape == (2, 4)
  assert restored.rng.sharding.spec == P()


def _assert_same_sharding(x: jax.Array, s: NamedSharding) -> None:
  assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  assert x.sharding.mesh.devices.size == 8


def test_keeps_last_n_and_the_best_even_when_older(workdir):
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 5.0}
  with ckpt_lib.Checkpointer(
    workdir, _config(), keep=2, best_metric="eval/loss"
  ) as ckpt:
    for step, loss in losses.items():
      ckpt.save(step, _make_state(step), metrics={"eval/loss": loss})
    ckpt.wait()
    assert _step_dirs(workdir / "checkpoints") == [4, 5]
    assert _step_dirs(workdir / "best") == [2]
    assert ckpt.best_step() == 2
    assert ckpt.best_value == 1.0

  # The best survives a restart, value included.
  with ckpt_lib.Checkpointer(
    workdir, _config(), keep=2, best_metric="eval/loss"
  ) as ckpt:
    assert ckpt.best_value == 1.0
    state, _, step = ckpt.restore_best(_make_state())
    assert step == 2
    _assert_bit_equal(state, _make_state(2))
    assert ckpt.restore(_make_state())[2] == 5


def test_best_mode_max(workdir):
  with ckpt_lib.Checkpointer(
    workdir, _config(), keep=1, best_metric="acc", best_mode="max"
  ) as ckpt:
    for step, acc in [(1, 0.1), (2, 0.5), (3, 0.3), (4, float("nan"))]:
      ckpt.save(step, _make_state(step), metrics={"acc": acc, "loss": 1.0})
    # Saves without the metric do not touch the best.
    ckpt.save(5, _make_state(5), metrics={"loss": 0.0})
    ckpt.wait()
    assert ckpt.best_step() == 2
    assert ckpt.best_value == 0.5
    assert _step_dirs(workdir / "best") == [2]
    assert _step_dirs(workdir / "checkpoints") == [5]


def test_config_mismatch_names_the_field(workdir):
  ckpt_lib.Checkpointer(workdir, _config()).close()
  assert (workdir / "config.json").exists()
  # The same config, rebuilt, is accepted.
  ckpt_lib.Checkpointer(workdir, _config()).close()

  config = _config()
  config.model.hidden = 32
  with pytest.raises(ValueError) as info:
    ckpt_lib.Checkpointer(workdir, config)
  message = str(info.value)
  assert "config.model.hidden=64; this run has 32" in message
  assert str(workdir) in message and "new workdir" in message

  with pytest.raises(ValueError, match=r"config\.extra=<absent>; .* has 1"):
    ckpt_lib.Checkpointer(workdir, _config(extra=1))


def test_ignore_fields(workdir):
  ckpt_lib.Checkpointer(workdir, _config()).close()
  with pytest.raises(ValueError, match="config.num_epochs=10"):
    ckpt_lib.Checkpointer(workdir, _config(num_epochs=20))
  ckpt_lib.Checkpointer(
    workdir, _config(num_epochs=20), ignore_fields=("num_epochs",)
  ).close()

  # Ignoring a sub-config covers its fields, and nothing else.
  config = _config(seed=1)
  config.model.hidden = 8
  with pytest.raises(ValueError, match="config.seed=0"):
    ckpt_lib.Checkpointer(workdir, config, ignore_fields=("model",))
  # The saved config is the first run's, untouched.
  assert '"num_epochs": 10' in (workdir / "config.json").read_text()


def _truncate_data(step_dir: pathlib.Path) -> None:
  files = [p for p in (step_dir / "state").rglob("*") if p.parent.name == "d"]
  assert files
  for f in files:
    f.write_bytes(b"")


def _delete_item(step_dir: pathlib.Path) -> None:
  shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("damage", [_truncate_data, _delete_item])
def test_corrupt_latest_falls_back_with_warning(workdir, caplog, damage):
  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _make_state(step), extra={"step": step})
  damage(workdir / "checkpoints" / "3")

  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    with caplog.at_level(logging.WARNING):
      state, extra, step = ckpt.restore(_make_state())
    assert (step, extra) == (2, {"step": 2})
    _assert_bit_equal(state, _make_state(2))
    warnings = [r.getMessage() for r in caplog.records]
    assert any("step 3" in w and "failed to restore" in w for w in warnings)
    # Left on disk for inspection, and no longer counted as the latest.
    assert (workdir / "checkpoints" / "3").exists()
    assert ckpt.latest_step() == 2

    # Training resumes from 2; saving step 3 again moves the broken copy
    # aside instead of skipping the step or deleting it.
    ckpt.save(3, _make_state(33), extra={"step": 33})
    ckpt.wait()
    assert (workdir / "broken" / "checkpoints_3").is_dir()
    state, extra, step = ckpt.restore(_make_state())
    assert (step, extra) == (3, {"step": 33})
    _assert_bit_equal(state, _make_state(33))


def test_unfinished_save_is_invisible(workdir, caplog):
  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    ckpt.save(1, _make_state(1))
  # What a crash in the middle of orbax writing step 2 leaves behind.
  tmp = workdir / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "manifest.ocdbt").write_bytes(b"\0" * 7)

  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    assert ckpt.latest_step() == 1
    with caplog.at_level(logging.WARNING):
      _, _, step = ckpt.restore(_make_state())
    assert step == 1
    assert not any(
      "failed to restore" in r.getMessage() for r in caplog.records
    )
    # The run can save step 2 for real.
    ckpt.save(2, _make_state(2))
    ckpt.wait()
    assert ckpt.restore(_make_state())[2] == 2


def test_every_checkpoint_broken_raises(workdir):
  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    ckpt.save(1, _make_state(1))
  _truncate_data(workdir / "checkpoints" / "1")
  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    with pytest.raises(RuntimeError, match="step 1 failed"):
      ckpt.restore(_make_state())


def test_no_checkpoint(workdir):
  with ckpt_lib.Checkpointer(workdir, _config(), best_metric="loss") as ckpt:
    assert ckpt.restore(_make_state()) is None
    assert ckpt.restore_best(_make_state()) is None
    assert ckpt.latest_step() is None
    assert ckpt.best_step() is None
    assert ckpt.best_value is None
  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    assert ckpt.restore_best(_make_state()) is None
    with pytest.raises(ValueError, match="no checkpoint for step 4"):
      ckpt.restore(_make_state(), step=4)


def test_saving_an_existing_step_is_a_no_op(workdir):
  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    ckpt.save(5, _make_state(5), extra={"first": True})
    # Before the first save has finished, as a SIGTERM save might be.
    ckpt.save(5, _make_state(6), extra={"first": False}, force=True)
    ckpt.wait()
    ckpt.save(5, _make_state(7), force=True)
    ckpt.wait()
    state, extra, step = ckpt.restore(_make_state())
  assert (extra, step) == ({"first": True}, 5)
  _assert_bit_equal(state, _make_state(5))


def test_older_steps_need_force(workdir):
  with ckpt_lib.Checkpointer(workdir, _config(), keep=5) as ckpt:
    ckpt.save(5, _make_state(5))
    ckpt.save(3, _make_state(3))
    ckpt.wait()
    assert _step_dirs(workdir / "checkpoints") == [5]
    ckpt.save(3, _make_state(3), force=True)
    ckpt.wait()
    assert _step_dirs(workdir / "checkpoints") == [3, 5]
    state, _, step = ckpt.restore(_make_state(), step=3)
  assert step == 3
  _assert_bit_equal(state, _make_state(3))


def test_extra_must_be_json(workdir):
  with ckpt_lib.Checkpointer(workdir, _config()) as ckpt:
    with pytest.raises(TypeError):
      ckpt.save(1, _make_state(), extra={"bad": object()})
    # The caller may mutate its dict once `save` returns.
    extra = {"budget": [1, 2]}
    ckpt.save(2, _make_state(), extra=extra)
    extra["budget"].append(3)
    ckpt.wait()
    assert ckpt.restore(_make_state())[1] == {"budget": [1, 2]}
