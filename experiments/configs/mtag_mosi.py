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

from mtagjax import config as model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ("tiny")."""
  c = ml_collections.ConfigDict()
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

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.batch_size = 32
  c.train.epochs = 15
  c.train.learning_rate = 1e-3
  c.train.weight_decay = 1e-2
  c.train.loss = "smooth_l1"
  c.train.loss_beta = 1.0
  c.train.normalize_loss = True
  c.train.plateau_factor = 0.5
  c.train.plateau_patience = 10
  c.train.plateau_threshold = 0.02
  c.train.log_every = 10
  c.train.checkpoint_every = 0  # steps; 0 = at the end of each epoch only
  c.train.keep_checkpoints = 3
  c.train.best_metric = "eval/valid/mae"
  c.train.best_mode = "min"
  # Batches built ahead on a background thread while the device steps
  # (experiments/runtime/prefetch.py); 0 = build each in the loop.
  c.train.prefetch = 2
  # Simulated preemption for tests: stop (and checkpoint) after this many
  # steps of this process; 0 = never.
  c.train.stop_after_steps = 0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the data axis; -1 = all
  # Graph shards per batch (a multiple of the data devices); 0 = one per
  # device. Fixing it makes runs on different device counts identical,
  # dropout included.
  c.mesh.shards = 0

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
