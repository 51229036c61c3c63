"""Metric writers for training loops: a JSONL file and TensorBoard events.

`MetricWriter` keeps two records of every call to `write_scalars`:

* ``workdir/metrics.jsonl``, one JSON object per call,
  ``{"step": 100, "time": 1718000000.5, "train/loss": 0.31, ...}``. The file
  is opened in append mode, so a run resumed from a checkpoint continues it.
  Such a run repeats the steps between its checkpoint and the point where the
  previous attempt stopped, so a step can appear more than once; readers
  should keep the most recent values per step, which is what
  ``read_jsonl(path, dedupe=True)`` does.
* TensorBoard event files under ``workdir/tensorboard``, written with
  `tensorboardX` so that TensorFlow is not needed.

Metric names are paths (``train/loss``, ``eval/valid/mae``) and become
TensorBoard tags unchanged. Only process 0 writes by default; the other
processes of a multi-host job get a writer that checks its arguments and
otherwise does nothing, so training code can call it unconditionally.
"""

from __future__ import annotations

import json
import math
import operator
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorboardX
from absl import logging
from ml_collections.config_dict import CustomJSONEncoder

METRICS_FILENAME = "metrics.jsonl"
CONFIG_FILENAME = "config_used.json"
TENSORBOARD_DIRNAME = "tensorboard"

# Keys every JSONL record carries; metrics may not use them as names.
_RESERVED_KEYS = frozenset({"step", "time"})


class _ConfigEncoder(CustomJSONEncoder):
  """JSON encoder for configs that also accepts numpy and jax values."""

  def default(self, obj: Any) -> Any:
    if isinstance(obj, np.generic | np.ndarray | jax.Array):
      return np.asarray(obj).tolist()
    if isinstance(obj, set | frozenset):
      return sorted(obj, key=repr)
    try:
      return super().default(obj)
    except TypeError:
      # A config may hold callables or other objects; a readable stand-in
      # beats failing the run over a log file.
      return repr(obj)


def _check_name(name: Any) -> None:
  if not isinstance(name, str) or not name:
    raise ValueError(f"Metric names must be non-empty strings, got {name!r}.")
  if name in _RESERVED_KEYS:
    raise ValueError(
      f"Metric name {name!r} is reserved for the JSONL record; use a path "
      "such as 'train/loss'."
    )


def _check_scalar_shape(name: str, value: Any) -> None:
  # `np.shape` reads `.shape` when present, so this needs no device transfer.
  shape = np.shape(value)
  if shape != ():
    raise ValueError(
      f"Metric {name!r} must be a scalar, got a value of shape {shape}."
    )


def _is_real(dtype: np.dtype) -> bool:
  # `jnp.issubdtype` also knows the ml_dtypes floats (bfloat16, float8_*),
  # whose numpy kind is "V".
  return dtype.kind in "biu" or jnp.issubdtype(dtype, jnp.floating)


def _to_float(name: str, value: Any) -> float:
  array = np.asarray(value)
  if array.shape != ():
    raise ValueError(
      f"Metric {name!r} must be a scalar, got a value of shape {array.shape}."
    )
  if not _is_real(array.dtype):
    raise ValueError(
      f"Metric {name!r} must be a real number, got dtype {array.dtype}."
    )
  return float(array)


def _ends_mid_line(path: pathlib.Path) -> bool:
  try:
    with open(path, "rb") as f:
      if f.seek(0, os.SEEK_END) == 0:
        return False
      f.seek(-1, os.SEEK_END)
      return f.read(1) != b"\n"
  except FileNotFoundError:
    return False


def _json_number(value: float) -> float | None:
  # Strict JSON has no NaN or infinity; null keeps every line parseable.
  return value if math.isfinite(value) else None


class MetricWriter:
  """Scalars to JSONL and TensorBoard event files; silent on processes other
  than 0.

  Example:

    with MetricWriter(workdir) as writer:
      writer.write_config(config)
      for step in range(1, num_steps + 1):
        state, metrics = train_step(state, batch)
        if step % log_every == 0:
          writer.write_scalars(step, {"train/loss": metrics["loss"]})

  Values may be Python numbers, numpy scalars or 0-d arrays, or scalar
  `jax.Array`s; the latter must be fully replicated (as the scalar outputs of
  a jitted step are) so that process 0 can read them. NaN and infinite values
  go to TensorBoard as they are and to the JSONL file as ``null``.

  Each JSONL line is flushed to the operating system when it is written, so a
  killed process loses no records; the TensorBoard writer flushes on its own
  schedule, on `flush` and on `close`.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    enabled: bool | None = None,
    tensorboard: bool = True,
  ) -> None:
    """Opens the writer.

    Args:
      workdir: Directory of the run, on the local file system. It is created
        if missing (by enabled writers only).
      enabled: Whether this process writes. `None` means "only on process 0".
      tensorboard: Whether to write TensorBoard event files as well.
    """
    self.workdir = pathlib.Path(workdir)
    self.enabled = (
      jax.process_index() == 0 if enabled is None else bool(enabled)
    )
    self.metrics_path = self.workdir / METRICS_FILENAME
    self._closed = False
    self._file = None
    self._summary_writer = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    torn = _ends_mid_line(self.metrics_path)
    self._file = open(self.metrics_path, "a", encoding="utf-8")
    if torn:
      # A job killed mid-write can leave a torn last line; start a new line
      # so that the first record of this run is not glued onto it.
      self._file.write("\n")
      self._file.flush()
    if tensorboard:
      self._summary_writer = tensorboardX.SummaryWriter(
        logdir=str(self.workdir / TENSORBOARD_DIRNAME), flush_secs=30
      )

  def _check_open(self) -> None:
    if self._closed:
      raise RuntimeError("MetricWriter is closed.")

  def write_scalars(
    self,
    step: int,
    scalars: Mapping[str, float | np.ndarray | jax.Array],
  ) -> None:
    """Writes one record of scalar metrics for `step`.

    Args:
      step: Training step the metrics belong to; any integer scalar,
        including a 0-d integer `jax.Array` such as `state.step`.
      scalars: Metric values keyed by path-like names (``train/loss``).

    Raises:
      ValueError: If a name is empty or reserved (``step``, ``time``), or a
        value is not a real scalar; the message names the metric.
      RuntimeError: If the writer was closed.
    """
    self._check_open()
    for name, value in scalars.items():
      _check_name(name)
      _check_scalar_shape(name, value)
    if not self.enabled:
      return
    step = operator.index(step)
    # One `device_get` fetches every jax value at once instead of one by one.
    host = jax.device_get(dict(scalars))
    values = {name: _to_float(name, value) for name, value in host.items()}
    record = {"step": step, "time": time.time()}
    record.update({k: _json_number(v) for k, v in values.items()})
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._summary_writer is not None:
      for name, value in values.items():
        self._summary_writer.add_scalar(name, value, step)

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    """Records the run's configuration.

    Writes ``workdir/config_used.json`` (replacing an earlier one, since a
    resumed run may override fields) and a text summary under the tag
    ``config`` in TensorBoard.

    Args:
      config: The configuration; numpy values are stored as numbers or lists
        and other non-JSON values as their `repr`.
    """
    self._check_open()
    if not self.enabled:
      return
    text = config.to_json(
      json_encoder_cls=_ConfigEncoder, indent=2, sort_keys=True
    )
    path = self.workdir / CONFIG_FILENAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    if self._summary_writer is not None:
      # Indenting makes a Markdown code block, which TensorBoard's text
      # plugin shows verbatim instead of reflowing.
      block = "\n".join("    " + line for line in text.splitlines())
      self._summary_writer.add_text("config", block, 0)

  def flush(self) -> None:
    """Pushes buffered records to disk."""
    if self._closed or not self.enabled:
      return
    self._file.flush()
    if self._summary_writer is not None:
      self._summary_writer.flush()

  def close(self) -> None:
    """Flushes and closes the files; later calls are no-ops."""
    if self._closed:
      return
    self._closed = True
    if self._file is not None:
      self._file.close()
    if self._summary_writer is not None:
      self._summary_writer.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def read_jsonl(
  path: str | os.PathLike, *, dedupe: bool = False
) -> list[dict[str, Any]]:
  """Reads the records of a ``metrics.jsonl`` file.

  Non-finite values come back as `None`, as they were written. Lines that do
  not parse (a write torn by a killed job) are skipped with a warning.

  With ``dedupe=True`` the result has one record per step, in increasing step
  order, holding the most recent value of every metric logged for that step:

  * Records of the same step are merged, later values winning, so that train
    and eval metrics written by separate calls at one step stay together.
  * A record whose step is lower than the one before it marks a resumed
    run: the records of the abandoned attempt from that step on are dropped,
    even steps the resumed run does not log again. This assumes, as a
    training loop does, that one run writes its steps in non-decreasing
    order.

  Args:
    path: The file, usually ``workdir/metrics.jsonl``.
    dedupe: Whether to collapse repeated steps as described above.

  Returns:
    The records as dicts with ``step``, ``time`` and one key per metric.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        logging.warning("Skipping unreadable line %d of %s.", lineno, path)
        continue
      records.append(record)
  if not dedupe:
    return records
  by_step: dict[int, dict[str, Any]] = {}
  last_step = None
  for record in records:
    step = record["step"]
    if last_step is not None and step < last_step:
      by_step = {s: r for s, r in by_step.items() if s < step}
    by_step.setdefault(step, {}).update(record)
    last_step = step
  return [by_step[s] for s in sorted(by_step)]
