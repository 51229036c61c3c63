r"""MTAG on CMU-MOSI with the official run.sh values.

  python -m experiments.train_mtag \
    --config=experiments/configs/mtag_mosi.py --workdir=/tmp/mtag_mosi
  python -m experiments.train_mtag \
    --config=experiments/configs/mtag_mosi.py:tiny --workdir=/tmp/mtag_tiny

Variants: "" (run.sh: 15 epochs, batch 32, AdamW 1e-3 / 1e-2, plateau
halving, normalised SmoothL1) and "tiny" (a small model on generated data
that trains in seconds; used by the tests).
"""

import ml_collections

from experiments.configs import common
from mtagjax import config as model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ("tiny")."""
  c = ml_collections.ConfigDict()
  c.task = "mtag"
  c.model = model_config.default_config()

  c.data = ml_collections.ConfigDict()
  # "synthetic": generated data (mtagjax.synthetic); "pickle": a MulT-style
  # pickle (e.g. mosi_data_noalign.pkl) read by mtagjax.datasets.
  c.data.source = "synthetic"
  # The .pkl file for source "pickle"; its feature dims and padded lengths
  # must match config.model.feature_dims / padded_lengths.
  c.data.path = ""
  c.data.num_train = 1284  # MOSI split sizes
  c.data.num_valid = 229
  c.data.num_test = 686

  c.train = common.train_config(
    batch_size=32,
    epochs=15,
    learning_rate=1e-3,
    weight_decay=1e-2,
    loss="smooth_l1",
    loss_beta=1.0,
    normalize_loss=True,
    plateau_factor=0.5,
    plateau_patience=10,
    plateau_threshold=0.02,
    log_every=10,
    checkpoint_every=0,  # steps; 0 = at the end of each epoch only
    best_metric="eval/valid/mae",
    best_mode="min",
    prefetch=2,
  )

  # Graph shards per batch (a multiple of the data devices); 0 = one per
  # device. Fixing it makes runs on different device counts identical,
  # dropout included.
  c.mesh = common.mesh_config(shards=0)

  if arg == "tiny":
    c.model.feature_dims = (6, 7, 5)
    c.model.padded_lengths = (30, 15, 25)
    c.model.hidden, c.model.heads, c.model.num_layers = 16, 2, 2
    c.data.num_train, c.data.num_valid, c.data.num_test = 48, 16, 16
    c.train.batch_size = 8
    c.train.epochs = 2
    c.train.log_every = 1
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of mtag_mosi; use '' or 'tiny'")
  return c
