r"""Fine-tunes a data2vec encoder: speech CTC, image classes or GLUE text.

  python -m experiments.finetune_d2v \
    --config=experiments/configs/d2v_finetune.py:image_tiny \
    --workdir=/tmp/ft_image
  python -m experiments.finetune_d2v \
    --config=experiments/configs/d2v_finetune.py:speech \
    --config.init=pretrain:/tmp/d2v_audio --workdir=/tmp/ft_speech
  python -m experiments.finetune_d2v \
    --config=experiments/configs/d2v_finetune.py:text_rte \
    --config.init=hf:/models/data2vec-text-base --workdir=/tmp/ft_rte

The variant picks the task and recipe (`:speech`, `:image`, `:text_<glue
task>`, `:<task>_tiny`); `--config.init` the starting encoder (`scratch`,
`pretrain:<pretraining workdir>`, `hf:<checkpoint folder>`). Config fields
override from the command line (`--config.train.steps=100`); unknown fields
fail. Re-running with the same workdir resumes the run. Notebook use:
`experiments.finetune_d2v.run(config, workdir)` returns the final
`experiments.finetune_loop.FinetuneState`.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import finetune_loop
from experiments.runtime import distributed

FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined when run as a program, not on import: the other entry points
  # also own a --config flag, and tests import several of them.
  config_flags.DEFINE_config_file(
    "config", None, "Fine-tuning config (a file:variant).", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
  flags.mark_flags_as_required(["config", "workdir"])


def run(
  config: ml_collections.ConfigDict, workdir: str
) -> finetune_loop.FinetuneState:
  """Fine-tunes (or resumes) in `workdir`; returns the final state."""
  return finetune_loop.finetune(config, workdir)


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
