"""Command lines of the run entry points: one way to define and read flags.

Every runnable module of `experiments` defines its absl flags in a
function called under ``if __name__ == "__main__":`` rather than on
import: several modules own flags of the same name (``--config``,
``--data_dir``), and a test or notebook process imports many of them. A
training entry point is then three lines::

  if __name__ == "__main__":
    cli.define_run_flags("Training config (a file:variant).")
    app.run(cli.main)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import tasks
from experiments.runtime import distributed, driver

FLAGS = flags.FLAGS


def define_run_flags(help_text: str) -> None:
  """``--config`` (a config file with its ``:variant``) and ``--workdir``.

  Call it from the program's ``__main__`` block: ``--help`` lists the
  flags as the program's own.
  """
  config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
  # absl's --help lists the main module's flags, filed under its path.
  for name in ("config", "workdir"):
    FLAGS.register_flag_by_module(sys.argv[0], FLAGS[name])
  flags.mark_flags_as_required(["config", "workdir"])


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Runs (or resumes) the task ``config.task`` names; the final state."""
  return driver.run(tasks.create(config), workdir)


def main(argv: Sequence[str]) -> None:
  """An entry point's `main`: the task the config names, in the workdir."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before anything asks for the devices (a cluster launch runs this same
  # command in every process).
  distributed.maybe_initialize_distributed()
  logging.info("devices: %s", jax.devices())
  run(FLAGS.config, FLAGS.workdir)
