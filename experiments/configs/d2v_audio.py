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
* ``small``: the recipe scaled to a CPU (the results table of
  `experiments.tables.d2v_speech`): the wav2vec 2.0 CNN with 128 channels
  (still 320 samples a frame), 4 post-LN layers of width 256 (4 heads, FFN
  1,024), 2 s crops (fairseq's shortest clip) of the Tux Paint recordings
  and of 6,000 spoken sentences (the train split of their speaker-disjoint
  split), top-3 targets (Base's two thirds of the layers), EMA 0.996 ->
  0.999 over two thirds of the run, the tri-stage schedule peaking at 1e-3,
  3,000 steps of batch 16 in float32.
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

VARIANTS = ("base", "small", "tiny")
# The CNN of ``small``: wav2vec 2.0's kernels and strides (320 samples a
# frame, 400 of receptive field) with 128 channels instead of 512.
SMALL_CONV_LAYERS = ((128, 10, 5),) + ((128, 3, 2),) * 4 + ((128, 2, 2),) * 2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` picks the variant ("base" or "tiny")."""
  variant = arg or "base"
  if variant not in VARIANTS:
    raise ValueError(
      f"unknown variant {arg!r} of d2v_audio; use one of {VARIANTS}"
    )
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
  # The spoken set's speaker-disjoint split (its train split, the one read
  # here, hears no voice of its valid and test splits): pretraining for
  # fine-tuning that is scored on those speakers.
  c.data.speaker_disjoint = False
  c.data.path = ""
  c.data.data_dir = ""

  # fsdp: devices that shard each parameter; 1 = replicate.
  c.mesh = common.mesh_config(fsdp=1)

  if variant == "tiny":
    common.shrink_pretraining(c)
    c.mask.mask_length = 5
    c.optim.peak_lr = 1e-3
    c.data.num_samples = 800
  elif variant == "small":
    small_speech_recipe(c)
  return c


def small_speech_recipe(c: ml_collections.ConfigDict) -> None:
  """Scales the Base recipe down to the speech sets on a CPU, in place."""
  c.model.update(
    conv_layers=SMALL_CONV_LAYERS,
    hidden=256,
    num_layers=4,
    heads=4,
    mlp_dim=1_024,
    top_k=3,
    dtype="float32",
  )
  c.train.batch_size = 16
  c.train.steps = 3_000
  c.ema = common.ema_config(start=0.996, end=0.999, anneal_steps=2_000)
  c.optim.peak_lr = 1e-3
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.prefetch = 2
  c.data.source = "speech"
  # 2 s crops: 15 % of the Tux Paint clips (1.1 of its 2.96 h) are that
  # long, 98 % of the spoken sentences (6.9 h in the train split of 6,000).
  c.data.num_samples = 32_000
  c.data.speech_sets = "tuxpaint,spoken_sentences"
  c.data.speech_limit = 6_000
  c.data.speaker_disjoint = True
