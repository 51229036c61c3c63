"""Model configuration for MTAG, with the official run.sh values as defaults.

One `ml_collections.ConfigDict` describes the model and how samples become
graphs; the batcher, the model and `predict` all read it, so a saved config
is enough to rebuild everything. Experiment configs extend it.
"""

from __future__ import annotations

import ml_collections

MOSI_MODALITIES = ("vision", "text", "audio")


def default_config() -> ml_collections.ConfigDict:
  """The official MOSI configuration (run.sh with the data's feature sizes).

  Returns:
    A `ConfigDict` whose fields are documented inline. Modalities are ordered
    vision, text, audio, as in the official code; every per-modality tuple
    follows that order.

  References:
    Yang et al., "MTAG: Modal-Temporal Attention Graph for Unaligned Human
    Multimodal Language Sequences", NAACL 2021; the official run.sh.
  """
  c = ml_collections.ConfigDict()
  # Modalities, in node order. `feature_dims` are the raw frame sizes and
  # `padded_lengths` the lengths of the left-padded arrays the features came
  # from (used for the official positional-encoding positions).
  c.modalities = MOSI_MODALITIES
  c.feature_dims = (20, 300, 5)
  c.padded_lengths = (500, 50, 375)
  # Token modalities: V > 0 makes that modality's frames token ids in
  # [0, V) (given as `[length, 1]` arrays, with feature_dims 1) embedded by a
  # learned table instead of projected feature vectors (e.g. text where no
  # word vectors exist). 0 = feature vectors (the official inputs).
  c.vocab_sizes = (0, 0, 0)

  # Graph construction (spec section 3).
  c.alignment = "official"  # or "paper": pseudo-alignment window rule
  c.edge_types = "modal_temporal"  # "temporal", "modal", "none": ablations
  c.intra = "adjacent"  # or "all_to_all"

  # Node features.
  c.projection = "linear"  # "ffn": Linear-ReLU-Linear-ReLU (use_ffn=1)
  c.hidden = 64
  c.pe = "padded"  # "within_modality" (the paper) or "none"
  c.max_positions = 5000
  c.pe_dropout = 0.1

  # MTGAT layers and pruning (spec sections 4 and 5).
  c.num_layers = 6
  c.heads = 4
  c.attention_dropout = 0.1
  c.negative_slope = 0.2
  c.prune = True
  c.prune_keep = 0.8
  c.prune_scope = "batch"  # "graph", "node" (the paper's Algorithm 1)
  c.prune_type = "topk"  # "random": a uniformly random subset of size k

  # Readout head (spec section 6).
  c.head_hidden = 16
  c.output_dim = 1  # 8 for IEMOCAP (4 emotions x 2 logits)

  # Batching: static budgets are rounded up on geometric ladders so that an
  # epoch compiles a handful of times. Edge memory dominates, so its ladder
  # is finer.
  c.node_growth = 2.0
  c.edge_growth = 1.25
  c.max_nodes = 1 << 20
  c.max_edges = 1 << 25
  c.empty_samples = "error"  # or "drop" (the official code, with a warning)

  # MTGAT backend (both compute the same function from the same parameters):
  # "segment" runs over padded edge lists; "dense" over per-modality node
  # blocks with one edge table per modality pair (fast when graphs are nearly
  # complete across modalities, as the official cross-modal edges make
  # them). Dense batches put graphs of similar lengths into `dense_groups`
  # groups, each padded to per-modality budgets on a ladder of ratio
  # `dense_node_growth`; `dense_remat` recomputes each layer in the backward
  # pass instead of storing its [B, H, N_r, N_s] intermediates.
  c.backend = "segment"
  c.dense_groups = 8
  c.dense_node_growth = 1.125
  c.dense_remat = True

  c.dtype = "float32"  # compute dtype; parameters stay float32
  return c


# The defaults, read-only. A config saved before a field existed lacks it;
# code reading such a field falls back to `DEFAULTS.<field>`, never to a
# literal of its own, so every default lives in `default_config` alone.
DEFAULTS = ml_collections.FrozenConfigDict(default_config())


def vocab_sizes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """`config.vocab_sizes`, one per modality (all 0 when none is a token one).

  An all-zero setting fits any number of modalities, so configs that change
  `modalities` without token inputs need not touch it.
  """
  vocab = tuple(int(v) for v in config.get("vocab_sizes", ()) or ())
  count = len(config.modalities)
  if not any(vocab):
    return (0,) * count
  if len(vocab) != count:
    raise ValueError(
      "config.vocab_sizes must give one entry (0 = feature vectors) per "
      f"modality of {tuple(config.modalities)}; got {vocab}"
    )
  return vocab


def iemocap_config() -> ml_collections.ConfigDict:
  """run.sh values with IEMOCAP's feature sizes and 8 logits."""
  c = default_config()
  c.feature_dims = (35, 300, 74)
  c.padded_lengths = (500, 20, 400)
  c.output_dim = 8
  return c
