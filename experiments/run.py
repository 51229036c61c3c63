r"""Runs any experiment: the task is the one the config's ``task`` names.

  python -m experiments.run \
    --config=experiments/configs/mtag_mosi.py:tiny --workdir=/tmp/mtag

`train_mtag`, `pretrain_d2v` and `finetune_d2v` are this same command under
the names their configs are documented with. The tasks are listed in
`experiments.tasks.TASKS`.
"""

from absl import app

from experiments.runtime import cli

run = cli.run

if __name__ == "__main__":
  cli.define_run_flags("Run config (a file:variant).")
  app.run(cli.main)
