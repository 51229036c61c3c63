"""The run driver: the loop every training run shares, for any task.

`run(task, workdir)` turns a task (`experiments.tasks.base.Task`) into a
run in `workdir`:

* the task's mesh and fresh state, then the newest readable checkpoint of
  the workdir if there is one (a run started again resumes);
* batches built on the host from the task's items, `config.train.prefetch`
  of them ahead on a background thread, and placed on the mesh (each
  process hands over only the rows its devices hold);
* the task's jitted step; ``train/*`` metrics to ``metrics.jsonl`` and
  TensorBoard every ``train.log_every`` steps (only process 0 writes) and
  a progress bar;
* validation when the task says it is due, logged as ``eval/valid/*``,
  with a checkpoint that may become ``best/`` by the task's metric;
* the last ``train.keep_checkpoints`` checkpoints, every
  ``train.checkpoint_every`` steps and at the end;
* SIGTERM (or ``train.stop_after_steps``): checkpoint and return;
* at the end, the task's final splits scored on the best checkpoint.

Nothing here knows a model: a run's results depend only on the task, so a
resumed run logs the same losses, bit for bit, as an uninterrupted one
whenever the task's batches are a function of the step it resumes from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

from experiments.runtime import checkpoint as ckpt_lib
from experiments.runtime import distributed, prefetch, writers
from experiments.runtime import mesh as mesh_lib
from experiments.runtime import preemption as preemption_lib
from experiments.runtime import progress as progress_lib
from experiments.tasks import base


def _prefixed(prefix: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
  return {f"{prefix}/{k}": v for k, v in metrics.items()}


def open_checkpoints(task: base.Task, workdir: str) -> ckpt_lib.Checkpointer:
  """The task's checkpoints in `workdir` (refusing another config's run)."""
  best = task.best_metric
  return ckpt_lib.Checkpointer(
    workdir,
    task.config,
    keep=task.config.train.keep_checkpoints,
    best_metric=best[0] if best else None,
    best_mode=best[1] if best else "min",
    ignore_fields=task.resumable_fields,
    upgrade=task.upgrade_saved_config,
  )


def report_final(
  task: base.Task,
  checkpoints: ckpt_lib.Checkpointer,
  state: Any,
  writer: writers.MetricWriter,
) -> None:
  """Scores the task's final splits on the best checkpoint and prints them."""
  best = checkpoints.restore_best(mesh_lib.abstract(state))
  if best is None:
    scored, step, which = state, int(state.step), "last"
  else:
    scored, _, step = best
    which = "best"
  for split in task.final_splits:
    scores = task.evaluate(scored, split)
    writer.write_scalars(int(state.step), _prefixed(f"eval/{split}", scores))
    if jax.process_index() == 0:
      print(f"\n{split} metrics of the {which} checkpoint (step {step}):")
      for name, value in scores.items():
        print(f"  {name:<16}{value:9.4f}")


def run(task: base.Task, workdir: str) -> Any:
  """Trains `task` in `workdir` (or resumes it) and returns the final state.

  Args:
    task: the experiment, built from its config.
    workdir: where checkpoints, ``config.json``, ``metrics.jsonl`` and
      TensorBoard files go; a run of the same config there is resumed.

  Returns:
    The state after ``task.total_steps`` steps; on SIGTERM or after
    ``train.stop_after_steps``, the state at the stop.

  Raises:
    ValueError: at start, for a config the task rejects or a workdir that
      holds another config's run.
  """
  distributed.maybe_initialize_distributed()
  t = task.config.train

  # Devices, data and a fresh state; then the workdir's newest checkpoint.
  task.mesh = task.make_mesh()
  state = task.setup(task.mesh)
  checkpoints = open_checkpoints(task, workdir)
  restored = checkpoints.restore(mesh_lib.abstract(state))
  if restored is not None:
    state, extra, _ = restored
    task.restore_extra(extra, state)
    logging.info("resumed at step %d", int(state.step))

  preemption = preemption_lib.Preemption()
  preemption.install()
  writer = writers.MetricWriter(workdir)
  writer.write_config(task.config)
  step = int(state.step)
  total = task.total_steps
  progress = progress_lib.Progress(total, initial_step=step, desc=task.name)
  steps_this_process = 0
  try:
    batches = prefetch.build_ahead(
      task.build_batch, task.train_items(step), t.prefetch
    )
    # Closed on every way out: no build thread outlives the loop.
    with contextlib.closing(batches):
      for batch, marker in batches:
        placed = distributed.place(batch, task.batch_sharding)
        state, metrics = task.train_step(state, placed, step)
        step += 1
        steps_this_process += 1
        if step % t.log_every == 0 or step == total:
          writer.write_scalars(step, _prefixed("train", metrics))
        progress.update(step, {"train/loss": metrics["loss"]})
        if task.eval_due(step):
          scores = _prefixed("eval/valid", task.evaluate(state, "valid"))
          writer.write_scalars(step, scores)
          logging.info("step %d: %s", step, scores)
          state = task.after_evaluation(state, scores)
          # Before any stop below: a resumed run starts after this step.
          checkpoints.save(
            step,
            state,
            extra=task.checkpoint_extra(step, marker),
            metrics=scores,
            force=True,
          )
        stop = preemption.reached(step) or (
          t.stop_after_steps and steps_this_process >= t.stop_after_steps
        )
        periodic = t.checkpoint_every and step % t.checkpoint_every == 0
        if stop or periodic or step == total:
          checkpoints.save(
            step, state, extra=task.checkpoint_extra(step, marker), force=stop
          )
        task.save_artifacts(state, step, workdir)
        if stop:
          checkpoints.wait()
          return state
    checkpoints.wait()
    if task.final_splits:
      report_final(task, checkpoints, state, writer)
    elif checkpoints.best_step() is not None:
      logging.info(
        "best %s = %s at step %d",
        task.best_metric[0],
        checkpoints.best_value,
        checkpoints.best_step(),
      )
    return state
  finally:
    progress.close()
    writer.close()
    checkpoints.close()
    preemption.uninstall()
