r"""Pretrains data2vec on speech, images or text.

  python -m experiments.pretrain_d2v \
    --config=experiments/configs/d2v_vision.py:tiny --workdir=/tmp/d2v
  python -m experiments.pretrain_d2v \
    --config=experiments/configs/d2v_audio.py:base --workdir=/tmp/d2v_audio \
    --config.mesh.fsdp=4

The config file picks the modality (`d2v_audio.py`, `d2v_vision.py`,
`d2v_text.py`) and its variant (`:base`, `:tiny`). Config fields override
from the command line (`--config.train.steps=100`); unknown fields fail.
Re-running with the same workdir resumes the run. On a cluster (Slurm, Open
MPI, `JAX_COORDINATOR_ADDRESS`) every process runs this same command.
Notebook use: `experiments.pretrain_d2v.run(config, workdir)` returns the
final `d2vjax.pretrain.PretrainState`.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from d2vjax import pretrain
from experiments import d2v_loop
from experiments.runtime import distributed

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined when run as a program, not on import: every entry point owns a
  # --config flag, and a test process imports several of them.
  config_flags.DEFINE_config_file(
    "config", None, "Pretraining config (a file:variant).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
  flags.mark_flags_as_required(["config", "workdir"])


def run(
  config: ml_collections.ConfigDict, workdir: str
) -> pretrain.PretrainState:
  """Pretrains (or resumes) in `workdir`; returns the final state."""
  return d2v_loop.pretrain(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before anything asks for the devices, which would fix a one-process
  # view of them.
  distributed.maybe_initialize_distributed()
  logging.info("devices: %s", jax.devices())
  run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
