r"""MTAG on IEMOCAP (4 emotions x 2 logits), run.sh values otherwise.

The official repository ships no IEMOCAP command; its README says unlisted
hyperparameters are main.py's defaults, which is what this config uses
(plain cross-entropy; `train.loss="iemocap_weighted_ce"` gives the
inverse-count weighting). The plateau rule follows the mean valid loss.
"""

import ml_collections

from experiments.configs import mtag_mosi
from mtagjax import config as model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ("tiny")."""
  c = mtag_mosi.get_config(arg)
  tiny = arg == "tiny"
  c.model = model_config.iemocap_config()
  if tiny:
    c.model.feature_dims = (6, 7, 5)
    c.model.padded_lengths = (30, 15, 25)
    c.model.hidden, c.model.heads, c.model.num_layers = 16, 2, 2
  else:
    c.data.num_train, c.data.num_valid, c.data.num_test = 2717, 798, 938
  c.train.loss = "iemocap_ce"
  c.train.best_metric = "eval/valid/loss"
  c.train.best_mode = "min"
  return c
