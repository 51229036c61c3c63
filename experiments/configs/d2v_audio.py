r"""data2vec speech pretraining (Base, LibriSpeech recipe), and a tiny sibling.

  python -m experiments.pretrain_d2v \
    --config=experiments/configs/d2v_audio.py:base --workdir=/tmp/d2v_audio
  python -m experiments.pretrain_d2v \
    --config=experiments/configs/d2v_audio.py:tiny --workdir=/tmp/d2v_tiny

Variants:

* ``base`` (also the default): the Base model and the hyper-parameters of
  fairseq's ``config/audio/pretraining/base_librispeech.yaml`` (spec §4a and
  §5): 12 post-LN layers of width 768, spans of 10 frames started with
  probability 0.65 / 10, top-8 targets, EMA 0.999 -> 0.9999 over 30k
  updates, fairseq Adam with a tri-stage schedule peaking at 5e-4, 400k
  updates, no clipping.
* ``tiny``: two CNN blocks, 2 layers of width 16 and 800-sample clips, for a
  few steps; runs in seconds on a CPU and is what the tests train.

The data are *generated* waveforms by default (``config.data.source=
"synthetic"``, see `experiments.data.pretrain_batches`); ``source="speech"``
reads real clips instead, cropped to ``config.data.num_samples``:

  python -m experiments.pretrain_d2v \
    --config=experiments/configs/d2v_audio.py:tiny --workdir=/tmp/d2v_sp \
    --config.data.source=speech --config.data.speech_sets=tuxpaint
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` picks the variant ("base" or "tiny")."""
  variant = arg or "base"
  if variant not in ("base", "tiny"):
    raise ValueError(f"unknown variant {arg!r} of d2v_audio; use base or tiny")
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.modality = "audio"

  c.model = common.pretrain_model(
    "audio",
    feature_dropout_rate=0.0,  # fairseq dropout_input
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
    activation_dropout_rate=0.0,
    layerdrop=0.05,
    top_k=8,  # average_top_k_layers
  )

  # fairseq compute_mask_indices: mask_selection static, overlaps allowed.
  c.mask = ml_collections.ConfigDict()
  c.mask.mask_prob = 0.65
  c.mask.mask_length = 10
  c.mask.min_masks = 1
  c.mask.require_same_masks = True
  c.mask.mask_dropout = 0.0

  c.ema = common.ema_config(start=0.999, end=0.9999, anneal_steps=30_000)

  # The tri-stage schedule warms up over 3% of the updates (12k of 400k);
  # make_optimizer ignores warmup_steps for audio. Weight decay is on every
  # parameter, as in fairseq v1; fairseq's default is no clipping.
  c.optim = common.pretrain_optim(
    peak_lr=5e-4, warmup_steps=None, weight_decay=0.01, clip_norm=0.0
  )

  # The reference packs 3.8M samples per GPU on 16 GPUs (~63 minutes of
  # audio per update, crop-to-shortest batches). Shapes here are static:
  # 176 clips of 20 s (11 per GPU of the reference) are ~59 minutes.
  c.train = common.train_config(batch_size=176, steps=400_000)
  # The student encoder is saved to <workdir>/encoder/ at the end; these
  # fractions of the run add <workdir>/encoder-<step>/ (d2vjax.encoder_io).
  c.train.export_encoder_at = ()

  c.data = ml_collections.ConfigDict()
  # "synthetic": generated waveforms; "speech": crops of the sets of
  # experiments.data.speech_corpus (experiments.data.pretrain_batches).
  c.data.source = "synthetic"
  # max_sample_size: 20 s at 16 kHz. With source="speech" also the shortest
  # clip used (min_sample_size): about 2-4 s suits the spoken sentences
  # (6 s on average), 1 s the Tux Paint clips.
  c.data.num_samples = 320_000
  c.data.sample_rate = 16_000
  # source="speech": comma-separated sets (spoken_sentences, tuxpaint) built
  # or found under data_dir ("" = the cache), or built folders in path.
  c.data.speech_sets = "spoken_sentences"
  c.data.speech_limit = 0  # spoken sentences to build; 0 = all
  c.data.path = ""
  c.data.data_dir = ""

  # fsdp: devices that shard each parameter; 1 = replicate.
  c.mesh = common.mesh_config(fsdp=1)

  if variant == "tiny":
    common.shrink_pretraining(c)
    c.mask.mask_length = 5
    c.optim.peak_lr = 1e-3
    c.data.num_samples = 800
  return c
