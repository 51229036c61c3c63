r"""Fine-tuning data2vec encoders: speech CTC, image classes, GLUE-style text.

  python -m experiments.finetune_d2v \
    --config=experiments/configs/d2v_finetune.py:speech \
    --config.init=pretrain:/tmp/d2v_audio --workdir=/tmp/ft_speech
  python -m experiments.finetune_d2v \
    --config=experiments/configs/d2v_finetune.py:image_tiny \
    --workdir=/tmp/ft_image_tiny

Variants (spec §6):

* ``speech`` (= ``speech_10h``) and ``speech_{10m,1h,10h,100h,960h}``: a
  linear CTC layer over the 32 letters of fairseq's LibriSpeech dictionary
  (blank = ``<s>`` = 0) on the data2vec audio encoder. The CNN is frozen
  throughout and, for the first ``optim.freeze_finetune_updates`` updates,
  the whole encoder (only the CTC layer trains). Time masking with spans of
  10 frames at probability 0.65 (0.5 for 960h) through the pretrained mask
  embedding. fairseq Adam (0.9, 0.98) ε 1e-8 without weight decay;
  tri-stage schedule (10 / 40 / 50 %) from and to 0.01 / 0.05 of the peak.
  Channel masking zeroes spans of 64 feature channels with
  ``mask_channel_prob`` 0.25 (10m, 1h), 0.5 (10h, 100h) or 0.1 (960h).
* ``speech_small``: ``speech_10m``'s recipe for the small encoder of
  ``d2v_audio.py:small`` on the spoken sentences (`experiments.tables.
  d2v_speech`): 6,000 sentences split by speaker, utterances of up to 10 s,
  batch 8, peak 5e-4, 600 updates of which the first 60 train only the CTC
  layer, validated on 200 utterances every 100 updates.
* ``image``: ViT-B/16, mean of the patch tokens, new ``fc_norm`` and a head
  initialised ×0.001; AdamW (0.9, 0.999) ε 1e-8 with layer-wise decay 0.65,
  peak 4e-3 for batch 1024, 10 of 100 epochs of warm-up then cosine to
  1e-6, weight decay 0 (0.05 for ViT-L, which also uses 50 epochs, lr 5e-3
  and drop path 0.25), drop path 0.2, Mixup 0.8 / CutMix 1.0 with label
  smoothing 0.1.
* ``image_fmnist``: that recipe for the small ViT of
  ``d2v_vision.py:fmnist`` on 600 labelled Fashion-MNIST images (1 %),
  5,000 training images held out for validation: batch 64, peak 1e-3,
  layer decay 0.75, weight decay 0.05, drop path 0.1, 1,000 updates.
* ``image_fmnist_plain``: the same without augmentation (no Mixup/CutMix,
  crops or flips; label smoothing kept) at peak 3e-3, picked on the
  validation split for the model from scratch (seed 0, 600 labels, 1,000
  updates): 0.640 this way (0.612 at peak 1e-3), 0.439 with the augmented
  recipe above; the pretrained encoder: 0.761 and 0.687.
* ``text`` (= ``text_sst2``) and ``text_{cola,mnli,mrpc,qnli,qqp,rte,sst2,
  stsb}``: RoBERTa's GLUE recipe, a tanh head on ``<s>``; fairseq Adam (0.9,
  0.98) ε 1e-6 with weight decay 0.1, 6 % linear warm-up then linear decay
  to 0 (the per-task lr, batch and updates of the RoBERTa yamls).
  ``model.num_labels == 1`` makes it a regression (STS-B: MSE, Pearson).
* ``text_vader``: that recipe for the small encoder of ``d2v_text.py:small``
  regressing the VADER movie ratings (``sentiment`` source, 8,483 training
  sentences, validated on 1,060, the 1,060 test ones scored once on the
  best checkpoint): batch 32, peak 1e-4, 1,000 updates; ``data.labels``
  keeps a random subset of the training sentences.
* ``<task>_tiny``: a small encoder on generated data that runs in seconds on
  a CPU; the tests train these.

``config.init`` picks the starting encoder: ``"scratch"`` (random, with the
architecture in ``config.model.encoder``), ``"pretrain:<workdir>"`` (the
student encoder of a `experiments.pretrain_d2v` run; the architecture is
the pretraining config's), ``"encoder:<folder>"`` (an encoder saved by
`d2vjax.encoder_io`, e.g. the ``encoder/`` folder a pretraining run
leaves in its workdir) or ``"hf:<folder>"`` (an HF data2vec checkpoint
folder read by `d2vjax.convert.load_hf_checkpoint`; the architecture is the
checkpoint's). ``config.model.overrides`` (dropouts, drop path, LayerDrop,
dtype) applies on top in every case.

Data are *generated* by default (``config.data.source="synthetic"``, see
the task modules `experiments.tasks.{ctc,image_classification,
text_classification}`): speech is a sequence of tones, one pitch per
letter of a random transcript; an image's class is the hue sector of its
mean colour; a text's label is the most frequent token group (regression:
the share of one group, scaled to STS-B's 0-5). Real sources:
``spoken_sentences`` (espeak-spoken VADER sentences, letter CTC),
``fashion_mnist`` (``model.num_classes=10``) and ``sentiment``
(``vader_movie`` rating regression or sign, ``rt_polarity``), e.g.

  python -m experiments.finetune_d2v \
    --config=experiments/configs/d2v_finetune.py:image_tiny \
    --config.data.source=fashion_mnist --config.model.num_classes=10 \
    --workdir=/tmp/ft_fmnist
"""

import ml_collections

from experiments.configs import common, d2v_audio, d2v_text, d2v_vision

# split: (peak lr, updates, freeze_finetune_updates, mask_prob,
# mask_channel_prob, layerdrop), from fairseq's base_<split>.yaml.
_SPEECH_SPLITS = {
  "10m": (5e-5, 13_000, 10_000, 0.65, 0.25, 0.1),
  "1h": (5e-5, 13_000, 10_000, 0.65, 0.25, 0.1),
  "10h": (5e-5, 20_000, 10_000, 0.65, 0.5, 0.05),
  "100h": (3e-5, 80_000, 0, 0.65, 0.5, 0.1),
  "960h": (1e-4, 320_000, 0, 0.5, 0.1, 0.1),
}

# task: (num_labels, peak lr, batch size, updates, warm-up updates)
_GLUE_TASKS = {
  "cola": (2, 1e-5, 16, 5_336, 320),
  "mnli": (3, 1e-5, 32, 123_873, 7_432),
  "mrpc": (2, 1e-5, 16, 2_296, 137),
  "qnli": (2, 1e-5, 32, 33_112, 1_986),
  "qqp": (2, 1e-5, 32, 113_272, 28_318),
  "rte": (2, 2e-5, 16, 2_036, 122),
  "sst2": (2, 1e-5, 32, 20_935, 1_256),
  "stsb": (1, 2e-5, 16, 3_598, 214),
}


def _variants() -> list[str]:
  names = ["speech", "image", "image_fmnist", "image_fmnist_plain", "text"]
  names += ["text_vader", "speech_small"]
  names += [f"speech_{s}" for s in _SPEECH_SPLITS]
  names += [f"text_{t}" for t in _GLUE_TASKS]
  return names + [f"{t}_tiny" for t in ("speech", "image", "text")]


def _common(task: str, modality: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.modality = modality  # the encoder's
  c.init = "scratch"

  c.model = ml_collections.ConfigDict()
  # Architecture, used only with init="scratch": the pretraining configs'.
  c.model.encoder = common.encoder(modality)
  # Fine-tuning regularisation and compute settings, applied to the
  # encoder whatever its origin.
  c.model.overrides = ml_collections.ConfigDict()
  c.model.overrides.dtype = "float32"
  c.model.overrides.remat = False

  c.optim = ml_collections.ConfigDict()
  c.optim.clip_norm = 0.0  # 0 = no clipping (all three recipes)

  c.train = common.train_config(
    eval_every=1_000,  # steps; the last step is always evaluated
    # "" = the task's metric: eval/valid/wer (min) for speech,
    # eval/valid/accuracy (max) for classes, eval/valid/pearson (max) for
    # regression.
    best_metric="",
  )

  c.data = ml_collections.ConfigDict()
  # "synthetic": generated examples; real ones per task: "spoken_sentences"
  # (speech), "fashion_mnist" (image), "sentiment" (text); see
  # experiments.data.finetune_batches and the task modules.
  c.data.source = "synthetic"
  # Validation examples (synthetic), or the cap on a real validation split
  # (0 = all of it).
  c.data.num_valid = 1_024
  # Real sources: a built set (or IDX folder) to read, else data_dir ("" =
  # the cache) where it is fetched or built.
  c.data.path = ""
  c.data.data_dir = ""

  c.mesh = common.mesh_config()
  return c


def _speech(split: str) -> ml_collections.ConfigDict:
  lr, steps, freeze, mask_prob, channel_prob, layerdrop = _SPEECH_SPLITS[split]
  c = _common("ctc", "audio")
  o = c.model.overrides
  o.dropout_rate = 0.0
  o.attention_dropout_rate = 0.0
  o.activation_dropout_rate = 0.1
  o.feature_dropout_rate = 0.0  # fairseq dropout_input
  o.layerdrop = layerdrop
  c.model.final_dropout = 0.0
  c.model.freeze_feature_extractor = True  # fairseq feature_grad_mult 0

  # fairseq compute_mask_indices as data2vec_audio's apply_mask calls it.
  c.mask = ml_collections.ConfigDict()
  c.mask.mask_prob = mask_prob
  c.mask.mask_length = 10
  c.mask.min_masks = 1
  c.mask.require_same_masks = True
  # Channel masking: spans of feature channels zeroed for the whole clip
  # (min_masks 0 and same count per row, as fairseq draws it).
  c.mask.mask_channel_prob = channel_prob
  c.mask.mask_channel_length = 64

  c.optim.peak_lr = lr
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-8
  c.optim.weight_decay = 0.0
  c.optim.phase_ratio = (0.1, 0.4, 0.5)
  c.optim.init_lr_scale = 0.01
  c.optim.final_lr_scale = 0.05
  c.optim.freeze_finetune_updates = freeze

  # 3.2M samples x 2 GPUs x update_freq 4 = 25.6M samples per update: 80
  # clips of up to 20 s, padded.
  c.train.batch_size = 80
  c.train.steps = steps

  c.data.num_samples = 320_000  # padded clip length
  c.data.sample_rate = 16_000
  c.data.min_samples = 32_000  # shorter transcripts end in silence
  # Samples per letter (and per word break) of a clip, drawn per clip: 4 to
  # 8 frames, so that every transcript fits its CTC alignment.
  c.data.min_letter_samples = 1_280
  c.data.max_letter_samples = 2_560
  # Generated transcripts: words of these letters, one tone per letter.
  c.data.letters = "ETAONIHSRDLU"
  c.data.max_words = 12
  c.data.max_word_length = 8
  c.data.max_label_length = 120  # labels are padded to this many letters
  # source="spoken_sentences": sentences to build (0 = all) and whether
  # valid and test hold out whole speakers.
  c.data.speech_limit = 0
  c.data.speaker_disjoint = False
  # source="spoken_sentences": minutes of labelled training audio, a random
  # draw of the train split's utterances by subset_seed (0 = all of them;
  # a larger budget keeps a smaller one's). The test split is scored on the
  # best checkpoint; with tuxpaint_check, so are the English Tux Paint
  # recordings (real voices), from the tuxpaint_path folder ("" = built or
  # found in data_dir's cache).
  c.data.label_minutes = 0.0
  c.data.subset_seed = 0
  c.data.tuxpaint_check = False
  c.data.tuxpaint_path = ""
  return c


def _speech_small() -> ml_collections.ConfigDict:
  c = _speech("10m")
  c.model.encoder.update(
    conv_layers=d2v_audio.SMALL_CONV_LAYERS,
    hidden=256,
    num_layers=4,
    heads=4,
    mlp_dim=1_024,
  )
  c.model.overrides.layerdrop = 0.05
  c.optim.peak_lr = 5e-4
  # fairseq trains only the CTC layer for 10k of 13k updates; here the
  # first 10 %, which a random encoder (from scratch) can spare.
  c.train.steps = 600
  c.optim.freeze_finetune_updates = 60
  c.train.batch_size = 8
  c.train.eval_every = c.train.checkpoint_every = 100
  c.train.log_every = 25
  c.train.prefetch = 2
  c.data.source = "spoken_sentences"
  c.data.speech_limit = 6_000
  c.data.speaker_disjoint = True
  # Utterances of up to 10 s (90 % of them) and 256 letters.
  c.data.num_samples = 160_000
  c.data.max_label_length = 256
  c.data.num_valid = 200
  return c


def _image() -> ml_collections.ConfigDict:
  c = _common("image_classification", "vision")
  c.model.encoder.layer_scale_init = 0.1
  o = c.model.overrides
  o.dropout_rate = 0.0
  o.attention_dropout_rate = 0.0
  o.drop_path_rate = 0.2
  c.model.num_classes = 1_000
  c.model.init_scale = 0.001

  c.optim.peak_lr = 4e-3
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.weight_decay = 0.0  # 0.05 for ViT-L; matrices only
  c.optim.layer_decay = 0.65
  # 100 epochs of ImageNet-1k (1 281 167 images) at batch 1024.
  c.optim.warmup_steps = 12_511  # 10 epochs
  c.optim.end_lr = 1e-6

  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.8
  c.mixup.cutmix_alpha = 1.0
  c.mixup.switch_prob = 0.5
  c.mixup.prob = 1.0
  c.mixup.smoothing = 0.1

  # source="fashion_mnist": training images held out for validation (the
  # same in every run; 0 = validate on the test images), and labelled
  # training images kept of the rest, class-balanced, drawn by subset_seed
  # (0 = all). The test images are scored on the best checkpoint.
  c.data.valid_size = 5_000
  c.data.labels = 0
  c.data.subset_seed = 0
  # source="fashion_mnist": training augmentations (ImageLoader).
  c.data.augment = True
  c.data.crop_scale = (0.25, 1.0)
  c.data.flip = True
  c.data.jitter = 0.0

  c.train.batch_size = 1_024
  c.train.steps = 125_114
  return c


def _image_fmnist() -> ml_collections.ConfigDict:
  """BEiT's recipe for the small ViT of ``d2v_vision.py:fmnist``."""
  c = _image()
  c.model.num_classes = 10
  arch = d2v_vision.get_config("fmnist").model
  c.model.encoder.update({k: arch[k] for k in c.model.encoder if k in arch})
  c.model.overrides.drop_path_rate = 0.1
  c.optim.peak_lr = 1e-3
  c.optim.layer_decay = 0.75  # 6 blocks, not 12
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 100
  c.data.source = "fashion_mnist"
  # 600 labelled images (1 %); the results table sets 6,000 and all.
  c.data.labels = 600
  c.data.num_valid = 0  # all 5,000 held-out images
  c.data.crop_scale = (0.35, 1.0)  # as in pretraining
  c.train.batch_size = 64
  c.train.steps = 1_000
  c.train.eval_every = 250
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 1
  c.train.prefetch = 2
  return c


def _image_fmnist_plain() -> ml_collections.ConfigDict:
  """``image_fmnist`` without augmentation, at the peak picked on valid."""
  c = _image_fmnist()
  c.mixup.prob = 0.0  # soft targets still carry the label smoothing
  c.data.augment = False
  c.optim.peak_lr = 3e-3
  return c


def _text(task: str) -> ml_collections.ConfigDict:
  num_labels, lr, batch_size, steps, warmup = _GLUE_TASKS[task]
  c = _common("text_classification", "text")
  o = c.model.overrides
  o.dropout_rate = 0.1
  o.attention_dropout_rate = 0.1
  o.activation_dropout_rate = 0.0
  o.layerdrop = 0.0
  c.model.num_labels = num_labels  # 1 = regression (MSE)
  c.model.pooler_dropout = 0.0

  c.optim.peak_lr = lr  # the data2vec README sweeps 1e-5, 2e-5, 4e-5, 6e-5
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
  c.optim.weight_decay = 0.1
  c.optim.warmup_steps = warmup  # 6 % of the updates

  c.train.batch_size = batch_size
  c.train.steps = steps

  c.data.seq_len = 512  # padded length, <s> and </s> included
  c.data.min_len = 8
  c.data.bos_id, c.data.eos_id, c.data.num_special = 0, 2, 4
  # source="sentiment": the set of experiments.data.sentiment_sets, and the
  # text_corpus folder whose tokenizer builds it (unless data.path names a
  # built one). vader_movie: num_labels 1 = rating, 2 = its sign.
  c.data.sentiment_task = "vader_movie"
  c.data.corpus = ""
  # source="sentiment": labelled training sentences kept, a random draw by
  # subset_seed (0 = all); the test split is scored on the best checkpoint.
  c.data.labels = 0
  c.data.subset_seed = 0
  return c


def _text_vader() -> ml_collections.ConfigDict:
  """RoBERTa's GLUE recipe for the small encoder of ``d2v_text.py:small``."""
  c = _text("stsb")
  arch = d2v_text.get_config("small").model
  c.model.encoder.update({k: arch[k] for k in c.model.encoder if k in arch})
  c.model.num_labels = 1  # the rating
  # A 4-layer encoder of width 256 takes a larger step than Base's 2e-5.
  c.optim.peak_lr = 1e-4
  c.optim.warmup_steps = 60  # 6 % of the updates
  c.data.source = "sentiment"
  c.data.seq_len = 64  # the sets' length; 2 % of the sentences are cut
  c.data.num_valid = 0  # all 1,060 valid sentences
  c.train.batch_size = 32
  # About 4 epochs of the 8,483 training sentences; the results table sets
  # its own updates per label budget.
  c.train.steps = 1_000
  c.train.eval_every = 250
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 1
  c.train.prefetch = 2
  return c


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config so that its run takes seconds on a CPU."""
  e, t = c.model.encoder, c.train
  e.update(common.encoder(c.modality, tiny=True))
  t.log_every, t.checkpoint_every = 1, 4
  c.data.num_valid = 32
  if c.modality == "audio":
    e.num_layers, e.pos_depth = 1, 1
    c.model.overrides.layerdrop = 0.0
    c.mask.mask_length = 4
    c.mask.mask_channel_length = 4  # of 16 channels
    c.optim.peak_lr = 2e-3
    c.optim.freeze_finetune_updates = 3  # both step variants run
    t.batch_size, t.steps, t.eval_every = 8, 8, 4
    c.data.num_samples, c.data.min_samples = 1_000, 300
    c.data.min_letter_samples, c.data.max_letter_samples = 40, 120
    c.data.letters = "ETAO"
    c.data.max_words, c.data.max_word_length = 2, 3
    c.data.max_label_length = 8
  elif c.modality == "vision":
    c.model.num_classes = 3
    c.optim.peak_lr = 3e-3
    c.optim.warmup_steps = 2
    t.batch_size, t.steps, t.eval_every = 16, 24, 12
  else:
    e.num_layers = 1
    c.optim.peak_lr = 1e-3
    c.optim.warmup_steps = 1
    t.batch_size, t.steps, t.eval_every = 8, 8, 4
    c.data.seq_len, c.data.min_len = 16, 6
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of a variant, e.g. "speech", "image_tiny".

  Args:
    arg: the variant; ``task:tiny`` is accepted for ``task_tiny``.

  Returns:
    The config.

  Raises:
    ValueError: for an unknown variant.
  """
  variant = (arg or "").replace(":", "_")
  if variant not in _variants():
    raise ValueError(
      f"unknown variant {arg!r} of d2v_finetune; use one of {_variants()}"
    )
  tiny = variant.endswith("_tiny")
  base = variant.removesuffix("_tiny")
  if base == "speech_small":
    c = _speech_small()
  elif base.startswith("speech"):
    c = _speech(base.partition("_")[2] or "10h")
  elif base == "image":
    c = _image()
  elif base == "image_fmnist":
    c = _image_fmnist()
  elif base == "image_fmnist_plain":
    c = _image_fmnist_plain()
  elif base == "text_vader":
    c = _text_vader()
  else:
    c = _text(base.partition("_")[2] or "sst2")
  return _tiny(c) if tiny else c
