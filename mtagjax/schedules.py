"""The official MTAG learning-rate rule: reduce on plateau, stepped per epoch.

This is a pure-Python re-statement of the documented semantics of PyTorch's
``torch.optim.lr_scheduler.ReduceLROnPlateau``, with the defaults set to the
values the official MTAG code passes (mode 'min', factor 0.5, patience 10,
threshold 0.02 relative; cooldown 0, min_lr 0 and eps 1e-8 left at PyTorch's
defaults). Note that PyTorch's own defaults differ (factor 0.1, threshold
1e-4), and so do optax's ``contrib.reduce_on_plateau`` semantics, which is why
it is not used here.

The rule runs on the host once per epoch, on the validation MAE (MOSI) or the
mean validation loss (IEMOCAP). The state is an immutable ``NamedTuple`` of
Python numbers, not a jitted pytree: the learning rate it carries is a
Python float that the training loop writes into an optimizer built with
``optax.inject_hyperparams``, e.g.::

  tx = optax.inject_hyperparams(optax.adamw)(
      learning_rate=1e-3, weight_decay=1e-2)
  sched = plateau_init(1e-3)
  for epoch in range(15):
    ...  # train, then evaluate valid_mae
    sched = plateau_update(sched, valid_mae)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(sched.lr)

References:
  Yang et al., "MTAG: Modal-Temporal Attention Graph for Unaligned Human
  Multimodal Language Sequences", NAACL 2021; official ``main.py`` builds
  ``ReduceLROnPlateau(optimizer, factor=0.5, patience=10, threshold=0.02)``
  and steps it on the valid MAE / loss each epoch (spec ``mtag.md`` §7).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

__all__ = [
  "PlateauState",
  "plateau_init",
  "plateau_schedule",
  "plateau_update",
]

_MODES = ("min", "max")
_THRESHOLD_MODES = ("rel", "abs")


class PlateauState(NamedTuple):
  """State of the reduce-on-plateau rule after some number of epochs.

  Attributes:
    lr: The learning rate in force now (a Python float).
    best: The best metric value seen so far; +inf ('min') or -inf ('max')
      before the first step, as in PyTorch.
    num_bad_epochs: Consecutive steps without a significant improvement
      (reset by an improvement, a reduction, or during cooldown).
    cooldown_counter: Steps left in which bad epochs are not counted.
    last_epoch: Number of steps taken.
    mode: 'min' or 'max', fixed at ``plateau_init``.
  """

  lr: float
  best: float
  num_bad_epochs: int
  cooldown_counter: int
  last_epoch: int
  mode: str


def _check_mode(mode: str) -> None:
  if mode not in _MODES:
    raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")


def plateau_init(lr: float, *, mode: str = "min") -> PlateauState:
  """Creates the state before the first epoch.

  Args:
    lr: The initial learning rate (the official run uses 1e-3).
    mode: 'min' if a lower metric is better (the official use), 'max'
      otherwise. It fixes the initial ``best`` (+inf or -inf).

  Returns:
    A fresh ``PlateauState``.

  Raises:
    ValueError: If ``mode`` is unknown or ``lr`` is negative.

  References:
    PyTorch ``ReduceLROnPlateau`` as configured by the official MTAG code.
  """
  _check_mode(mode)
  lr = float(lr)
  if not lr >= 0:
    raise ValueError(f"lr must be >= 0, got {lr}")
  worst = math.inf if mode == "min" else -math.inf
  return PlateauState(
    lr=lr,
    best=worst,
    num_bad_epochs=0,
    cooldown_counter=0,
    last_epoch=0,
    mode=mode,
  )


def _is_better(
  value: float, best: float, mode: str, threshold_mode: str, threshold: float
) -> bool:
  # NaN compares False, so a NaN metric is a bad epoch, as in PyTorch.
  if mode == "min":
    if threshold_mode == "rel":
      return value < best * (1.0 - threshold)
    return value < best - threshold
  if threshold_mode == "rel":
    return value > best * (1.0 + threshold)
  return value > best + threshold


def plateau_update(
  state: PlateauState,
  value: float,
  *,
  factor: float = 0.5,
  patience: int = 10,
  threshold: float = 0.02,
  threshold_mode: str = "rel",
  mode: str | None = None,
  cooldown: int = 0,
  min_lr: float = 0.0,
  eps: float = 1e-8,
) -> PlateauState:
  """Applies one epoch's metric and returns the new state.

  The step, in PyTorch's order:

  1. ``value`` is an improvement if ``value < best * (1 - threshold)``
     ('min', 'rel'), ``value < best - threshold`` ('min', 'abs'),
     ``value > best * (1 + threshold)`` ('max', 'rel') or
     ``value > best + threshold`` ('max', 'abs'). An improvement sets
     ``best = value`` and zeroes the bad-epoch count; anything else
     (a gain smaller than the threshold, or NaN) adds one bad epoch.
  2. During cooldown the counter is decremented and bad epochs are zeroed.
  3. If ``num_bad_epochs > patience``: ``new = max(lr * factor, min_lr)``,
     applied only if ``lr - new > eps`` (so a rate at or near ``min_lr``
     stays put); cooldown restarts and bad epochs are zeroed, whether or not
     the rate changed.

  With the official settings and a flat metric, the rate halves at the 11th
  non-improving step after the best one, then every 11 steps.

  Args:
    state: The current state.
    value: This epoch's metric (a Python number or a scalar array).
    factor: Multiplier of the rate on a reduction; must be < 1.
    patience: Bad epochs tolerated before a reduction.
    threshold: Minimum significant change, relative or absolute.
    threshold_mode: 'rel' or 'abs'.
    mode: Must equal ``state.mode`` if given; None means ``state.mode``.
    cooldown: Steps after a reduction in which bad epochs are ignored.
    min_lr: Lower bound of the rate.
    eps: Reductions smaller than this are skipped.

  Returns:
    The new ``PlateauState``; ``.lr`` is the rate for the next epoch.

  Raises:
    ValueError: On an unknown ``mode``/``threshold_mode``, ``factor >= 1``,
      or a ``mode`` that disagrees with the state.

  References:
    PyTorch ``ReduceLROnPlateau.step`` as documented; official MTAG
    ``main.py`` settings (spec §7).
  """
  if mode is not None:
    _check_mode(mode)
    if mode != state.mode:
      raise ValueError(
        f"mode={mode!r} disagrees with the state's mode {state.mode!r}; "
        "pass mode to plateau_init instead"
      )
  _check_mode(state.mode)
  if threshold_mode not in _THRESHOLD_MODES:
    raise ValueError(
      f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}"
    )
  if factor >= 1.0:
    raise ValueError(f"factor must be < 1.0, got {factor}")

  current = float(value)
  best, bad = state.best, state.num_bad_epochs
  if _is_better(current, best, state.mode, threshold_mode, threshold):
    best, bad = current, 0
  else:
    bad += 1

  cool = state.cooldown_counter
  if cool > 0:
    cool -= 1
    bad = 0

  lr = state.lr
  if bad > patience:
    new_lr = max(lr * factor, min_lr)
    if lr - new_lr > eps:
      lr = new_lr
    cool = cooldown
    bad = 0

  return PlateauState(
    lr=lr,
    best=best,
    num_bad_epochs=bad,
    cooldown_counter=cool,
    last_epoch=state.last_epoch + 1,
    mode=state.mode,
  )


def plateau_schedule(
  values: Iterable[float], lr: float, **kwargs: Any
) -> list[float]:
  """Replays a metric sequence and lists the rate after each step.

  Args:
    values: One metric value per epoch.
    lr: The initial learning rate.
    **kwargs: ``mode`` (passed to ``plateau_init``) and the other keyword
      arguments of ``plateau_update``.

  Returns:
    ``out[i]`` is the learning rate in force after the step on
    ``values[i]``, i.e. the rate used for epoch ``i + 1``.

  References:
    PyTorch ``ReduceLROnPlateau`` as configured by the official MTAG code.
  """
  mode = kwargs.pop("mode", "min")
  state = plateau_init(lr, mode=mode)
  out = []
  for v in values:
    state = plateau_update(state, v, **kwargs)
    out.append(state.lr)
  return out
