"""What a task tells the run driver: its data, state, steps and metrics.

A task is one experiment family (MTAG training, data2vec pretraining, each
fine-tuning family). The driver (`experiments.runtime.driver`) owns the
loop every run shares -- restore or start, step, log, evaluate on
schedule, checkpoint, stop on SIGTERM -- and asks the task for the rest
through the methods below. A new experiment is a subclass in one module of
`experiments/tasks/` plus a config whose ``task`` field names it in
`experiments.tasks.TASKS`.

The life of a task in a run::

  task = Task(config)
  mesh = task.make_mesh()
  state = task.setup(mesh)                 # fresh state, placed on `mesh`
  task.restore_extra(extra, state)         # when resuming
  for item in task.train_items(step):      # one item per step, lazily
    batch, marker = task.build_batch(item) # on the host, maybe ahead
    state, metrics = task.train_step(state, place(batch), step)
    if task.eval_due(step + 1):
      scores = task.evaluate(state, "valid")
      state = task.after_evaluation(state, scores)
    extra = task.checkpoint_extra(step + 1, marker)   # on every save
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding

from experiments.runtime import distributed
from experiments.runtime import mesh as mesh_lib

# Fields that may change between a run and its resumption: when to stop,
# log and save, and the device layout (orbax restores into any sharding).
RESUMABLE_FIELDS = (
  "train.stop_after_steps",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.prefetch",
  # What a run writes besides checkpoints, not how it trains.
  "train.export_encoder_at",
  "mesh",
)


ProcessRows = distributed.ProcessRows


class Task(abc.ABC):
  """One experiment family; subclasses fill in the abstract methods.

  Attributes:
    name: the registry key, shown on the progress bar.
    resumable_fields: config fields that may differ between a run and its
      resumption in the same workdir.
    legacy_fields: ``{dotted field: value}`` for fields added to the
      configs after workdirs of this task were first written; a saved
      config without them is read as having these values (the ones that
      reproduce what such runs did), so older workdirs still resume.
    final_splits: splits scored on the best checkpoint when the run ends
      (logged as ``eval/<split>/<metric>`` and printed).
  """

  name: str = ""
  resumable_fields: tuple[str, ...] = RESUMABLE_FIELDS
  legacy_fields: Mapping[str, Any] = {}
  final_splits: tuple[str, ...] = ()

  def __init__(self, config: ml_collections.ConfigDict) -> None:
    self.config = config
    self.mesh: Mesh | None = None

  # -- devices ---------------------------------------------------------------

  def make_mesh(self) -> Mesh:
    """The run's mesh; the default splits ``config.train.batch_size``."""
    return mesh_lib.make_mesh(self.config, self.config.train.batch_size)

  @property
  def batch_sharding(self) -> NamedSharding:
    """How a placed batch is laid out: its leading axis over all devices."""
    return mesh_lib.batch_sharding(self.mesh)

  def process_rows(self, size: int) -> tuple[int, int]:
    """The rows ``(lo, hi)`` of a `size`-row batch this process holds."""
    return distributed.process_rows(self.batch_sharding, size)

  # -- state -----------------------------------------------------------------

  @abc.abstractmethod
  def setup(self, mesh: Mesh) -> Any:
    """Builds data, model, optimizer and jitted steps; returns a fresh state.

    The state must be placed on `mesh` (e.g. created under `jax.jit` with
    ``out_shardings``), since its shardings are the restore target.
    """

  @property
  @abc.abstractmethod
  def total_steps(self) -> int:
    """The step at which training ends."""

  def restore_extra(self, extra: dict[str, Any], state: Any) -> None:
    """Takes back the host state saved with a restored checkpoint."""
    if extra.get("step") != int(state.step):
      raise RuntimeError(
        f"checkpoint extra {extra} does not match state step {int(state.step)}"
      )

  def checkpoint_extra(self, step: int, marker: Any) -> dict[str, Any]:
    """JSON host state to save beside the state after `step` steps.

    Args:
      step: steps done.
      marker: what `build_batch` returned with the last batch stepped on.
    """
    del marker
    return {"step": step}

  def upgrade_saved_config(self, saved: dict[str, Any]) -> dict[str, Any]:
    """A workdir's saved config as today's configs spell it.

    Fills in `legacy_fields` that an older ``config.json`` lacks; a task
    that renamed values overrides this (and calls it).
    """
    saved = dict(saved)
    for dotted, value in self.legacy_fields.items():
      node = saved
      *parents, leaf = dotted.split(".")
      for key in parents:
        node = node.setdefault(key, {})
      node.setdefault(leaf, value)
    return saved

  # -- data ------------------------------------------------------------------

  @abc.abstractmethod
  def train_items(self, step: int) -> Iterator[Any]:
    """What the batches from `step` on are built from, one item a step.

    Cheap to produce (indices, a step number); `build_batch` does the work,
    possibly ahead of the loop on another thread, in this order.
    """

  @abc.abstractmethod
  def build_batch(self, item: Any) -> tuple[Any, Any]:
    """``(batch, marker)``: a host batch (or `ProcessRows`) and a marker.

    The marker is passed back to `checkpoint_extra` when a checkpoint is
    saved after this batch's step (e.g. a batcher's state after building
    it, which batches built ahead have already moved on from).
    """

  # -- steps -----------------------------------------------------------------

  @abc.abstractmethod
  def train_step(
    self, state: Any, batch: Any, step: int
  ) -> tuple[Any, Mapping[str, jax.Array]]:
    """One update on a placed batch; `step` is the steps done before it."""

  def eval_due(self, step: int) -> bool:
    """Whether validation runs after `step` steps (never, by default)."""
    del step
    return False

  def evaluate(self, state: Any, split: str) -> dict[str, float]:
    """Metrics of `state` on `split` (names without the ``eval/`` path)."""
    raise NotImplementedError(f"{type(self).__name__} does not evaluate")

  @property
  def best_metric(self) -> tuple[str, str] | None:
    """``(name, "min" | "max")`` of the metric that picks ``best/``."""
    return None

  def after_evaluation(self, state: Any, scores: Mapping[str, float]) -> Any:
    """The state after validation (e.g. a learning rate set from it)."""
    del scores
    return state

  def save_artifacts(self, state: Any, step: int, workdir: str) -> None:
    """Writes what the run hands on after `step` (e.g. a trained encoder).

    Called after every step, on every process, once its checkpoint (if
    any) is saved; most steps write nothing.
    """
    del state, step, workdir
