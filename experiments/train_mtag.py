r"""Trains MTAG and reports the test metrics of its best validation epoch.

  python -m experiments.train_mtag \
    --config=experiments/configs/mtag_mosi.py:tiny --workdir=/tmp/mtag

Config fields override from the command line (`--config.train.epochs=5`);
unknown fields fail. Re-running with the same workdir resumes the run.
Notebook use: `experiments.train_mtag.run(config, workdir)` returns the
final `mtagjax.train.TrainState`.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import mtag_loop
from experiments.runtime import distributed
from mtagjax import train

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined when run as a program, not on import: every entry point owns a
  # --config flag, and a test process imports several of them.
  config_flags.DEFINE_config_file(
    "config", None, "Training config (a file:variant).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
  flags.mark_flags_as_required(["config", "workdir"])


def run(config: ml_collections.ConfigDict, workdir: str) -> train.TrainState:
  """Trains (or resumes) in `workdir`; returns the final state."""
  return mtag_loop.train_and_evaluate(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before anything asks for the devices (a cluster launch runs this same
  # command in every process).
  distributed.maybe_initialize_distributed()
  logging.info("devices: %s", jax.devices())
  run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
