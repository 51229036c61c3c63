r"""Trains MTAG and reports the test metrics of its best validation epoch.

  python -m experiments.train_mtag \
    --config=experiments/configs/mtag_mosi.py:tiny --workdir=/tmp/mtag

Config fields override from the command line (`--config.train.epochs=5`);
unknown fields fail. Re-running with the same workdir resumes the run.
Notebook use: `experiments.train_mtag.run(config, workdir)` returns the
final `mtagjax.train.TrainState`. The task is `experiments.tasks.mtag`.
"""

from absl import app

from experiments.runtime import cli

run = cli.run

if __name__ == "__main__":
  cli.define_run_flags("Training config (a file:variant).")
  app.run(cli.main)
