"""Checkpoints for training runs: the last few steps plus the best one.

`Checkpointer` is the only place in the project that talks to orbax. A
workdir it manages looks like this::

  workdir/
    config.json         the run's config, written once by process 0
    checkpoints/<step>/ the newest `keep` checkpoints (orbax CheckpointManager)
    best/<step>/        the checkpoint with the best `best_metric` so far
    broken/             checkpoints that failed to restore, moved aside

Every checkpoint holds two items: ``state``, any pytree of jax or numpy
arrays (typed PRNG keys from `jax.random.key` included, which orbax stores
as their key data and wraps back on restore), and ``extra``, a JSON dict for
host-side loop state (data position, schedule state, budgets).

Restoring goes into a target tree. Give it abstract leaves
(`jax.ShapeDtypeStruct` with a `sharding`, e.g. `jax.eval_shape` of the
init function with the jit output shardings attached) and every restored
array comes back laid out with that sharding, read shard by shard.

A run refuses a workdir that holds a different config (apart from
`ignore_fields`), so two experiments never mix their checkpoints. If the
newest checkpoint cannot be read, `restore` logs a warning and falls back to
the one before. Nothing is deleted except by orbax's own pruning (steps
older than the last `keep`, and a best checkpoint once a better one is on
disk); an unreadable step is moved to ``broken/`` when its step is saved
again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from experiments.runtime import run_config

CONFIG_FILENAME = run_config.CONFIG_FILENAME
CHECKPOINTS_DIRNAME = "checkpoints"
BEST_DIRNAME = "best"
BROKEN_DIRNAME = "broken"

_ITEMS = ("state", "extra")


def _absolute(workdir: str | os.PathLike) -> str:
  """A local path made absolute: orbax refuses relative ones -- in its
  background thread, after the loop has moved on."""
  workdir = os.fspath(workdir)
  return workdir if "://" in workdir else os.path.abspath(workdir)


class Checkpointer:
  """Saves and restores a train state under a workdir with orbax.

  Two orbax `CheckpointManager`s do the work: one over
  ``workdir/checkpoints`` with ``max_to_keep=keep``, and, when `best_metric`
  is given, one over ``workdir/best`` with ``max_to_keep=1`` that ranks by
  that metric. `save` writes to ``best/`` only when the metric strictly
  improves on the best so far, so the best checkpoint survives however old
  it gets, and a worse step is never written there just to be pruned. A
  new best is therefore written twice, once in each directory; for the
  small models here that is cheaper than copying finished files around.

  Saves are asynchronous: `save` returns once the arrays are copied to the
  host (so the caller may donate or overwrite them), and the files are
  written in the background. Call `wait` before relying on them on disk, and
  `close` at the end of the run.

  All processes of a multi-host job construct a `Checkpointer` and call
  every method; orbax coordinates which process writes which shard.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    *,
    keep: int = 3,
    best_metric: str | None = None,
    best_mode: str = "min",
    ignore_fields: Sequence[str] = (),
    upgrade: Callable[[dict], dict] | None = None,
  ) -> None:
    """Opens (or starts) the run in `workdir`.

    Args:
      workdir: the run's directory; created if missing. Any path `etils.epath`
        understands (local, ``gs://``).
      config: the run's config. Written to ``workdir/config.json`` when that
        file is absent, else compared with it.
      keep: how many of the newest checkpoints to keep in ``checkpoints/``.
      best_metric: name of the metric (a key of `save`'s `metrics`) that
        picks the best checkpoint; None keeps no best checkpoint.
      best_mode: ``"min"`` or ``"max"``: whether lower or higher is better.
      ignore_fields: dotted config paths (``"num_epochs"``,
        ``"train.num_epochs"``) that may differ from the saved config, e.g.
        to train a finished run for longer. A path covers its sub-fields.
      upgrade: maps a saved config (parsed JSON) to how today's configs
        spell it, before the comparison: workdirs written before a field
        was added or renamed still resume.

    Raises:
      ValueError: if `workdir` holds a run whose config differs from `config`
        outside `ignore_fields`, or if `keep` or `best_mode` is invalid.
    """
    if keep < 1:
      raise ValueError(f"keep must be at least 1, got {keep}")
    if best_mode not in ("min", "max"):
      raise ValueError(f'best_mode must be "min" or "max", got {best_mode!r}')
    self._workdir = epath.Path(_absolute(workdir))
    self._best_metric = best_metric
    self._best_mode = best_mode
    # Steps that failed to restore in this process; see `_set_aside`.
    self._broken: set[int] = set()
    self._barriers = 0
    run_config.check_or_write(
      self._workdir, config, tuple(ignore_fields), upgrade
    )

    # The two managers save the same step concurrently; in a multi-process
    # run their barriers must have distinct names, or one manager's barrier
    # is met by the other's arrivals and the primary process finalizes a
    # checkpoint before the others have written their parts.
    self._ckpt = ocp.CheckpointManager(
      self._workdir / CHECKPOINTS_DIRNAME,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=CHECKPOINTS_DIRNAME
        ),
      ),
      item_names=_ITEMS,
    )
    self._best = None
    self._best_value = None
    if best_metric is not None:
      # A checkpoint without the metric (e.g. the metric was renamed between
      # runs) ranks worst instead of making orbax's ranking raise KeyError.
      worst = math.inf if best_mode == "min" else -math.inf
      self._best = ocp.CheckpointManager(
        self._workdir / BEST_DIRNAME,
        options=ocp.CheckpointManagerOptions(
          max_to_keep=1,
          best_fn=lambda m: float(m.get(best_metric, worst)),
          best_mode=best_mode,
          keep_checkpoints_without_metrics=False,
          create=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=BEST_DIRNAME
          ),
        ),
        item_names=_ITEMS,
      )
      step = self._best.best_step()
      if step is not None:
        value = (self._best.metrics(step) or {}).get(best_metric)
        self._best_value = None if value is None else float(value)

  # -- saving ---------------------------------------------------------------

  def save(
    self,
    step: int,
    state: Any,
    *,
    extra: dict | None = None,
    metrics: Mapping[str, float] | None = None,
    force: bool = False,
  ) -> None:
    """Checkpoints `state` and `extra` at `step`, and maybe as the best.

    A step already in ``checkpoints/`` (finished or still being written) is
    left alone, so saving the same step twice, e.g. a periodic save and then
    a SIGTERM save, is a no-op. The exception is a step that failed to
    restore earlier in this process: it is moved to ``workdir/broken/`` and
    written afresh. A step older than the newest readable one is skipped
    with a warning unless `force` is set, as orbax does, since it usually
    means a loop restarted its step count.

    Args:
      step: the training step, used as the checkpoint's name.
      state: a pytree of jax or numpy arrays (and Python scalars).
      extra: JSON-serialisable host state saved beside `state`; a copy is
        taken now, so the caller may mutate it afterwards.
      metrics: scalar metrics of this step. If they contain `best_metric`
        and it improves on the best so far, the step is also saved to
        ``best/``, whether or not ``checkpoints/`` already had it.
      force: save even if `step` is older than the newest checkpoint.

    Raises:
      TypeError: if `extra` is not JSON-serialisable.
    """
    step = int(step)
    # The round trip checks serialisability here rather than in orbax's
    # background thread, and snapshots the dict against later mutation.
    extra = json.loads(json.dumps(extra or {}))

    if step in self._ckpt.all_steps():
      if step in self._broken:
        self._set_aside(step)
        self._ckpt.save(step, args=self._save_args(state, extra), force=True)
      else:
        logging.info("Checkpoint for step %d already exists; not saved", step)
    else:
      newest = self.latest_step()
      if not force and newest is not None and step < newest:
        logging.warning(
          "Not saving step %d: older than the newest checkpoint (%d); pass "
          "force=True to save it anyway",
          step,
          newest,
        )
      else:
        # We have made the decision; orbax's own `should_save` would refuse
        # steps older than a broken newest checkpoint.
        self._ckpt.save(step, args=self._save_args(state, extra), force=True)

    value = self._metric_value(metrics)
    if value is not None and self._improves(value):
      if step not in self._best.all_steps():
        self._best.save(
          step,
          args=self._save_args(state, extra),
          metrics={k: float(v) for k, v in metrics.items()},
          force=True,
        )
        self._best_value = value

  def _save_args(self, state: Any, extra: dict) -> ocp.args.Composite:
    return ocp.args.Composite(
      state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)
    )

  def _metric_value(self, metrics: Mapping[str, float] | None) -> float | None:
    if self._best is None or not metrics or self._best_metric not in metrics:
      return None
    return float(metrics[self._best_metric])

  def _improves(self, value: float) -> bool:
    # NaN compares False both ways, so a diverged run never becomes the best.
    if self._best_value is None:
      return not math.isnan(value)
    if self._best_mode == "min":
      return value < self._best_value
    return value > self._best_value

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of orbax's sight instead of deleting it."""
    self._ckpt.wait_until_finished()
    src = ocp.step.build_step_path(
      self._ckpt.directory, ocp.step.standard_name_format(), step
    )
    dst = self._workdir / BROKEN_DIRNAME / f"{CHECKPOINTS_DIRNAME}_{step}"
    if jax.process_index() == 0:
      dst.parent.mkdir(parents=True, exist_ok=True)
      suffix = 0
      while dst.exists():
        suffix += 1
        dst = dst.parent / f"{CHECKPOINTS_DIRNAME}_{step}.{suffix}"
      logging.warning(
        "Moving unreadable checkpoint %s to %s before saving step %d again",
        src,
        dst,
        step,
      )
      src.rename(dst)
    self._barriers += 1
    ocp.multihost.sync_global_processes(
      f"Checkpointer:set_aside:{step}:{self._barriers}"
    )
    self._ckpt.reload()
    self._broken.discard(step)

  # -- restoring ------------------------------------------------------------

  def restore(
    self, target: Any, *, step: int | None = None
  ) -> tuple[Any, dict, int] | None:
    """Restores a checkpoint from ``checkpoints/`` into `target`'s layout.

    Without `step`, tries the newest checkpoint first and, if it cannot be
    read (files missing or corrupt), logs a warning naming the step and the
    error and tries the one before, and so on. Unreadable checkpoints stay
    on disk. Unfinished saves (orbax's temporary directories) are never
    candidates.

    Args:
      target: a pytree like the saved state whose leaves are arrays or
        `jax.ShapeDtypeStruct`s; restored arrays take their shapes, dtypes
        and shardings.
      step: restore exactly this step, with no fallback.

    Returns:
      ``(state, extra, step)``, or None if there is no checkpoint.

    Raises:
      RuntimeError: if checkpoints exist but none can be restored (for
        instance because `target` does not match their structure); starting
        over silently would then be wrong.
      ValueError: if `step` is given and no checkpoint has it.
    """
    return self._restore(self._ckpt, target, step, "checkpoints")

  def restore_best(self, target: Any) -> tuple[Any, dict, int] | None:
    """Restores the best checkpoint from ``best/`` into `target`'s layout.

    Args:
      target: as for `restore`.

    Returns:
      ``(state, extra, step)``, or None if there is no best checkpoint (or
      no `best_metric`).

    Raises:
      RuntimeError: if a best checkpoint exists but cannot be restored.
    """
    if self._best is None:
      return None
    return self._restore(self._best, target, None, "best")

  def _restore(
    self,
    manager: ocp.CheckpointManager,
    target: Any,
    step: int | None,
    name: str,
  ) -> tuple[Any, dict, int] | None:
    # A step still being written cannot be read back yet.
    self.wait()
    steps = list(manager.all_steps())
    if step is not None:
      if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {name}: {steps}")
      return self._restore_step(manager, target, step)
    if name == "best":
      best = manager.best_step()
      if best is not None:
        steps = [best] + [s for s in steps if s != best]
    else:
      steps = sorted(steps, reverse=True)
    # Each process decides on its own which step it can read. Damage that
    # only some processes see would make them disagree; orbax's commit
    # markers make that unlikely, and we do not add a cross-host vote.
    errors = []
    for candidate in steps:
      try:
        restored = self._restore_step(manager, target, candidate)
      except Exception as e:
        # Orbax and tensorstore report damage as KeyError, ValueError,
        # FileNotFoundError and more; any of them means unreadable here.
        errors.append((candidate, e))
        if manager is self._ckpt:
          self._broken.add(candidate)
        logging.warning(
          "Checkpoint at step %d in %s failed to restore (%s: %s); trying an "
          "older one. It is left on disk.",
          candidate,
          manager.directory,
          type(e).__name__,
          e,
        )
      else:
        if manager is self._ckpt:
          # An earlier failure may have been transient.
          self._broken.discard(candidate)
        return restored
    if errors:
      step0, error0 = errors[0]
      raise RuntimeError(
        f"none of the {len(errors)} checkpoints in {manager.directory} "
        f"restores; step {step0} failed with {type(error0).__name__}: "
        f"{error0}. If the state's structure changed, use a new workdir."
      ) from error0
    return None

  def _restore_step(
    self, manager: ocp.CheckpointManager, target: Any, step: int
  ) -> tuple[Any, dict, int]:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()
      ),
    )
    return restored.state, dict(restored.extra or {}), step

  # -- queries and lifetime ---------------------------------------------------

  def latest_step(self) -> int | None:
    """Returns the newest step in ``checkpoints/`` not known to be broken.

    A step counts as broken once `restore` failed to read it.
    """
    steps = [s for s in self._ckpt.all_steps() if s not in self._broken]
    return max(steps) if steps else None

  def best_step(self) -> int | None:
    """Returns the step of the best checkpoint, or None if there is none."""
    return None if self._best is None else self._best.best_step()

  @property
  def best_value(self) -> float | None:
    """The best `best_metric` saved so far, or None if none was."""
    return self._best_value

  def _managers(self) -> list[ocp.CheckpointManager]:
    return [m for m in (self._ckpt, self._best) if m is not None]

  def wait(self) -> None:
    """Blocks until every save started so far is on disk.

    Raises:
      Exception: whatever made a background save fail (orbax raises it
        here, or at the next save).
    """
    for manager in self._managers():
      manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases orbax's threads."""
    for manager in self._managers():
      manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()
