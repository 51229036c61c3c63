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
final `d2vjax.pretrain.PretrainState`. The task is
`experiments.tasks.pretrain`.
"""

from absl import app

from experiments.runtime import cli

run = cli.run

if __name__ == "__main__":
  cli.define_run_flags("Pretraining config (a file:variant).")
  app.run(cli.main)
