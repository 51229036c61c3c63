r"""MTAG on SpokenReviews: rated review sentences, spoken and "seen".

  python -m experiments.train_mtag \
    --config=experiments/configs/mtag_spoken.py --workdir=/tmp/mtag_spoken
  python -m experiments.train_mtag \
    --config=experiments/configs/mtag_spoken.py:tiny --workdir=/tmp/mtag_tiny

The set (`experiments/data/spoken_reviews.py`) is built on first use into the
data directory (`config.data.data_dir`, "" = the user's cache). Its three
unaligned streams become MTAG's modalities in the official order: vision
(6 articulatory channels, pooled from 30 to 5 fps), text (token ids
through a learned embedding) and audio (40 log-mel bands, pooled from 100
to 6.25 Hz), i.e. about two frames per spoken word. Pooling keeps the
graphs small: a sentence of 22 words gives about 95 nodes instead of 860,
and its cross-modal edges shrink by about 70x.

Variants:

* "" (default): a 600-sentence slice, a small MTAG (width 64, 2 layers)
  trained for 10 epochs with the official recipe; a few minutes on 2 CPU
  cores. `experiments.quickstart` trains it and its text-only ablation
  (`--config.model.modalities=text` with matching per-modality fields).
* "tiny": a handful of sentences, width 8, one layer, one epoch; what the
  tests run.
"""

import ml_collections

from experiments.configs import mtag_mosi

VOCAB_SIZE = 2048  # the rarest train words beyond this become <unk>


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` selects a variant ("" or "tiny")."""
  if arg not in (None, "", "tiny"):
    raise ValueError(
      f"unknown variant {arg!r} of mtag_spoken; use '' or 'tiny'"
    )
  c = mtag_mosi.get_config()
  m = c.model
  m.modalities = ("vision", "text", "audio")
  # Text is a token modality: [L, 1] ids into a learned embedding.
  m.feature_dims = (6, 1, 40)
  m.vocab_sizes = (0, VOCAB_SIZE, 0)
  # Positions count frames within each modality: the streams have no
  # common padded length to align them by.
  m.pe = "within_modality"
  m.hidden, m.heads, m.num_layers, m.head_hidden = 64, 4, 2, 16
  m.backend = "segment"

  c.data = ml_collections.ConfigDict()
  c.data.source = "spoken_reviews"
  # A built set's folder; "" = build (or find in the cache) the one below.
  c.data.path = ""
  c.data.data_dir = ""  # "" = the user's cache (experiments.data.fetch)
  c.data.archive = ""  # a vaderSentiment sdist instead of the fetched one
  c.data.seed = 0
  c.data.limit = 600  # sentences (70/10/20 train/valid/test); 0 = all
  c.data.speaker_disjoint = False
  c.data.workers = 2  # synthesis processes
  c.data.audio_pool = 16  # 100 Hz -> 6.25 Hz
  c.data.vision_pool = 6  # 30 fps -> 5 fps

  c.train.batch_size = 16
  c.train.epochs = 10
  # 3x the official rate: the embedding learns from a few hundred
  # sentences in a few epochs (valid corr 0.35 vs 0.0 after 8 epochs).
  c.train.learning_rate = 3e-3
  c.train.log_every = 1
  c.train.keep_checkpoints = 1

  if arg == "tiny":
    m.hidden, m.heads, m.num_layers, m.head_hidden = 8, 2, 1, 4
    c.data.limit = 8
    c.data.workers = 1
    c.data.audio_pool, c.data.vision_pool = 25, 10
    c.train.batch_size = 8  # divides over the 8 simulated test devices
    c.train.epochs = 1
  return c
