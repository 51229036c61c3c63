"""Tests for the metric writer and the console progress bar."""

import json
import math
import pathlib
import re
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from experiments.runtime import progress, writers


def _read_events(logdir: pathlib.Path) -> list[event_pb2.Event]:
  """Parses TFRecord framing: length, crc(length), data, crc(data)."""
  files = sorted(logdir.glob("events.out.tfevents.*"))
  assert files, f"no event file in {logdir}"
  events = []
  for path in files:
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      header = data[pos : pos + 8]
      (length,) = struct.unpack("<Q", header)
      (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
      assert header_crc == masked_crc32c(header)
      body = data[pos + 12 : pos + 12 + length]
      (body_crc,) = struct.unpack(
        "<I", data[pos + 12 + length : pos + 16 + length]
      )
      assert body_crc == masked_crc32c(body)
      events.append(event_pb2.Event.FromString(body))
      pos += 16 + length
  return events


def _scalars(events) -> dict[str, list[tuple[int, float]]]:
  out = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField("simple_value"):
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_jsonl_round_trip(tmp_path):
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write_scalars(1, {"train/loss": 0.5, "train/lr": 1e-3})
    w.write_scalars(2, {"train/loss": 0.25})
  records = writers.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2]
  assert records[0]["train/loss"] == 0.5 and records[0]["train/lr"] == 1e-3
  assert records[1].keys() == {"step", "time", "train/loss"}
  assert all(isinstance(r["time"], float) for r in records)
  assert not (tmp_path / "tensorboard").exists()


def test_resume_appends_and_dedupe_keeps_the_latest(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    for step in (10, 20, 30):
      w.write_scalars(step, {"train/loss": float(step)})
    w.write_scalars(30, {"eval/valid/mae": 3.0})
    w.write_scalars(40, {"train/loss": 40.0})
  # The job died after step 40 with its last checkpoint at step 20, leaving
  # a torn line behind; the resumed run logs 30 again but not 40.
  with open(path, "a") as f:
    f.write('{"step": 45, "train/lo')
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write_scalars(30, {"train/loss": -30.0})
    w.write_scalars(50, {"train/loss": -50.0})

  raw = writers.read_jsonl(path)
  assert [r["step"] for r in raw] == [10, 20, 30, 30, 40, 30, 50]
  deduped = writers.read_jsonl(path, dedupe=True)
  assert [r["step"] for r in deduped] == [10, 20, 30, 50]
  assert deduped[1]["train/loss"] == 20.0
  assert deduped[2]["train/loss"] == -30.0
  assert "eval/valid/mae" not in deduped[2]  # From the abandoned attempt.
  assert deduped[3]["train/loss"] == -50.0


def test_dedupe_merges_calls_at_one_step(tmp_path):
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write_scalars(5, {"train/loss": 1.0})
    w.write_scalars(5, {"eval/valid/mae": 2.0})
  (record,) = writers.read_jsonl(tmp_path / "metrics.jsonl", dedupe=True)
  assert record["train/loss"] == 1.0 and record["eval/valid/mae"] == 2.0


def test_tensorboard_events_are_readable(tmp_path):
  with writers.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(1, {"train/loss": 0.5, "eval/valid/mae": 0.75})
    w.write_scalars(2, {"train/loss": 0.25})
    w.write_config(ml_collections.ConfigDict({"lr": 1e-3}))
  events = _read_events(tmp_path / "tensorboard")
  assert _scalars(events) == {
    "train/loss": [(1, 0.5), (2, 0.25)],
    "eval/valid/mae": [(1, 0.75)],
  }
  texts = [v for e in events for v in e.summary.value if v.HasField("tensor")]
  assert [v.tag for v in texts] == ["config/text_summary"]
  assert b'"lr": 0.001' in texts[0].tensor.string_val[0]


def test_write_config_json(tmp_path):
  config = ml_collections.ConfigDict()
  config.model = {"hidden": 64, "sizes": (1, 2)}
  config.lr = np.float32(0.5)
  config.fn = len
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write_config(config)
  saved = json.loads((tmp_path / "config_used.json").read_text())
  assert saved["model"] == {"hidden": 64, "sizes": [1, 2]}
  assert saved["lr"] == 0.5
  assert "len" in saved["fn"]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with writers.MetricWriter(workdir, enabled=False) as w:
    w.write_scalars(1, {"train/loss": 1.0})
    w.write_config(ml_collections.ConfigDict({"a": 1}))
    w.flush()
    # Arguments are still checked, so a bug shows up on every process.
    with pytest.raises(ValueError, match="train/vec"):
      w.write_scalars(1, {"train/vec": np.zeros(3)})
  assert not workdir.exists()


def test_default_enabled_on_process_zero(tmp_path):
  with writers.MetricWriter(tmp_path, tensorboard=False) as w:
    assert w.enabled


def test_converts_jax_and_numpy_scalars(tmp_path):
  with writers.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(
      jnp.int32(3),
      {
        "a/jax": jnp.float32(1.5),
        "a/jax_0d": jnp.asarray(2.0, jnp.bfloat16),
        "a/np": np.float64(2.5),
        "a/np_0d": np.array(7, np.int64),
        "a/int": 4,
        "a/bool": True,
      },
    )
  (record,) = writers.read_jsonl(tmp_path / "metrics.jsonl")
  assert record == {
    "step": 3,
    "time": record["time"],
    "a/jax": 1.5,
    "a/jax_0d": 2.0,
    "a/np": 2.5,
    "a/np_0d": 7.0,
    "a/int": 4.0,
    "a/bool": 1.0,
  }
  assert all(type(v) is float for k, v in record.items() if k != "step")
  assert type(record["step"]) is int


def test_non_finite_values_are_null_in_json(tmp_path):
  with writers.MetricWriter(tmp_path, enabled=True) as w:
    w.write_scalars(1, {"train/loss": float("nan"), "train/g": np.inf})
  line = (tmp_path / "metrics.jsonl").read_text()
  assert "NaN" not in line and "Infinity" not in line
  (record,) = writers.read_jsonl(tmp_path / "metrics.jsonl")
  assert record["train/loss"] is None and record["train/g"] is None
  scalars = _scalars(_read_events(tmp_path / "tensorboard"))
  assert math.isnan(scalars["train/loss"][0][1])
  assert scalars["train/g"][0][1] == math.inf


@pytest.mark.parametrize(
  "value", [np.zeros(3), jnp.ones((1,)), np.zeros((2, 2)), "high", None]
)
def test_rejects_non_scalars_naming_the_metric(tmp_path, value):
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    with pytest.raises(ValueError, match="eval/valid/bad"):
      w.write_scalars(1, {"train/loss": 1.0, "eval/valid/bad": value})
  # Nothing of the rejected call reaches the file.
  assert writers.read_jsonl(tmp_path / "metrics.jsonl") == []


@pytest.mark.parametrize("name", ["step", "time", ""])
def test_rejects_reserved_names(tmp_path, name):
  with writers.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    with pytest.raises(ValueError, match="name"):
      w.write_scalars(1, {name: 1.0})


def test_closed_writer_refuses_writes(tmp_path):
  w = writers.MetricWriter(tmp_path, enabled=True, tensorboard=False)
  w.close()
  w.close()
  with pytest.raises(RuntimeError, match="closed"):
    w.write_scalars(1, {"train/loss": 1.0})


def test_progress_shows_rate_eta_and_metrics(capsys):
  bar = progress.Progress(100, initial_step=10, enabled=True, every=5)
  for step in range(11, 61):
    bar.update(step, {"train/loss": jnp.float32(1 / 3), "train/lr": 0.00123456})
  bar.close()
  err = capsys.readouterr().err
  # tqdm's "[elapsed<remaining, rate]" field, with a real time left.
  assert re.search(r"train: .*60/100 \[\d\d:\d\d<\d\d:\d\d, ", err)
  assert "step/s" in err
  assert "loss=0.3333" in err and "lr=0.001235" in err
  assert err.index("loss=") < err.index("lr=")


def test_progress_final_step_shows_last_metrics(capsys):
  with progress.Progress(3, enabled=True, every=100) as bar:
    for step in (1, 2, 3):
      bar.update(step, {"train/loss": float(step)})
  err = capsys.readouterr().err
  assert "3/3" in err and "loss=3" in err


def test_progress_disabled_is_silent(capsys):
  bar = progress.Progress(10, enabled=False)
  for step in range(1, 11):
    bar.update(step, {"train/loss": 1.0})
  bar.close()
  assert capsys.readouterr().err == ""


def test_progress_rejects_bad_arguments():
  with pytest.raises(ValueError, match="every"):
    progress.Progress(10, enabled=False, every=0)
  with pytest.raises(ValueError, match="total_steps"):
    progress.Progress(-1, enabled=False)
