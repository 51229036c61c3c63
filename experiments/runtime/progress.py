"""A console progress bar for training loops, built on `tqdm`.

    progress = Progress(config.num_steps, initial_step=int(state.step))
    for step in range(int(state.step) + 1, config.num_steps + 1):
      state, metrics = train_step(state, next(batches))
      progress.update(step, {"train/loss": metrics["loss"]})
    progress.close()

The bar goes to stderr and shows the step, steps per second, the elapsed time
and the estimated time left, followed by the metrics given to `update`. It
is cheap to call on every step: metric values, which may be `jax.Array`s
still being computed, are only read (and so waited for) when the bar is about
to be redrawn. On a terminal it redraws in place at most twice a second; when
stderr is not a terminal, as in a batch job's log, tqdm writes a new state at
most every 30 seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

# Minimum seconds between redraws on a terminal and between lines in a log.
_TTY_INTERVAL_S = 0.5
_LOG_INTERVAL_S = 30.0


def _format_value(value: Any) -> str:
  array = np.asarray(jax.device_get(value))
  real = array.dtype.kind in "biu" or jnp.issubdtype(array.dtype, jnp.floating)
  if array.shape == () and real:
    return f"{float(array):.4g}"
  return str(value)


class Progress:
  """Console progress bar for a training loop: step, steps/s, ETA and a few
  metrics; silent when disabled or not process 0.

  Metric names that start with ``desc + "/"`` are shown without that prefix,
  so ``train/loss`` reads ``loss`` on a bar described as ``train``. ``loss``
  comes first, then the other metrics in the order given, each to four
  significant digits.
  """

  def __init__(
    self,
    total_steps: int,
    *,
    initial_step: int = 0,
    desc: str = "train",
    enabled: bool | None = None,
    every: int = 1,
  ) -> None:
    """Creates the bar and, when enabled, draws it once.

    Args:
      total_steps: Step at which training ends.
      initial_step: Step training starts from, e.g. a restored checkpoint's;
        speed and time left count only the steps taken by this process.
      desc: Label in front of the bar.
      enabled: Whether to show the bar. `None` means "only on process 0".
      every: Only metrics given on steps divisible by this (and on the last
        step) are shown. Values are read from the device when the bar is
        redrawn, never on other steps.

    Raises:
      ValueError: If `total_steps` is negative or `every` is below 1.
    """
    if total_steps < 0:
      raise ValueError(f"total_steps must be >= 0, got {total_steps}.")
    if every < 1:
      raise ValueError(f"every must be >= 1, got {every}.")
    self.enabled = (
      jax.process_index() == 0 if enabled is None else bool(enabled)
    )
    self.total_steps = int(total_steps)
    self.every = int(every)
    self._prefix = f"{desc}/"
    self._pending: Mapping[str, Any] | None = None
    self._bar = None
    if not self.enabled:
      return
    stream = sys.stderr
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    self._bar = tqdm(
      total=self.total_steps,
      initial=int(initial_step),
      desc=desc,
      unit="step",
      file=stream,
      dynamic_ncols=True,
      mininterval=_TTY_INTERVAL_S if is_tty else _LOG_INTERVAL_S,
      # A fixed count keeps tqdm's redraw test a pure time check, which
      # `update` mirrors; the adaptive default also stalls the bar when steps
      # slow down after a fast burst.
      miniters=1,
      smoothing=0.1,
    )

  def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
    """Moves the bar to `step` (an absolute step, not an increment).

    Args:
      step: The step just finished.
      metrics: Values to show; numbers, numpy or jax scalars.
    """
    if self._bar is None:
      return
    step = int(step)
    if metrics and (step % self.every == 0 or step >= self.total_steps):
      # Keep a reference only; reading jax values would wait for the device.
      self._pending = dict(metrics)
    # Mirrors tqdm's own test for redrawing, so that the values are read
    # only when they are about to be shown.
    if time.time() - self._bar.last_print_t >= self._bar.mininterval:
      self._show_pending()
    if step > self._bar.n:
      self._bar.update(step - self._bar.n)

  def _show_pending(self) -> None:
    if self._pending is not None:
      self._bar.set_postfix_str(self._format(self._pending), refresh=False)
      self._pending = None

  def _format(self, metrics: Mapping[str, Any]) -> str:
    names = sorted(metrics, key=lambda n: self._short(n) != "loss")
    return ", ".join(
      f"{self._short(n)}={_format_value(metrics[n])}" for n in names
    )

  def _short(self, name: str) -> str:
    return name.removeprefix(self._prefix)

  def close(self) -> None:
    """Draws the final state of the bar, with the latest metrics, and
    releases it."""
    if self._bar is not None:
      self._show_pending()
      self._bar.close()
      self._bar = None

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
