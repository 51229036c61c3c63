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
task>`, `:<variant>_tiny`); `--config.init` the starting encoder
(`scratch`, `pretrain:<pretraining workdir>`, `hf:<checkpoint folder>`).
Config fields override from the command line (`--config.train.steps=100`);
unknown fields fail. Re-running with the same workdir resumes the run.
Notebook use: `experiments.finetune_d2v.run(config, workdir)` returns the
final `experiments.tasks.finetune.FinetuneState`. The tasks are
`experiments.tasks.{ctc,image_classification,text_classification}`.
"""

from absl import app

from experiments.runtime import cli

run = cli.run

if __name__ == "__main__":
  cli.define_run_flags("Fine-tuning config (a file:variant).")
  app.run(cli.main)
