r"""data2vec text pretraining (Base, RoBERTa-style recipe), small and tiny.

  python -m experiments.pretrain_d2v \
    --config=experiments/configs/d2v_text.py:base --workdir=/tmp/d2v_text
  python -m experiments.pretrain_d2v \
    --config=experiments/configs/d2v_text.py:tiny --workdir=/tmp/d2v_tiny

Variants:

* ``base`` (also the default): the Base encoder and fairseq's
  ``config/text/pretraining/base.yaml`` (spec §4c and §5): 12 post-LN layers
  of width 768 over 512-token sequences, spans of 4 tokens with probability
  0.35 all replaced by ``<mask>``, top-10 targets, EMA 0.999 -> 0.9999 over
  300k updates, fairseq Adam peaking at 2e-4 after 10k warm-up updates,
  cosine to 0 over 1M updates, batch 256, clipping at 5.0.
* ``small``: the recipe scaled to the English corpus on a CPU (the results
  table of `experiments.tables.d2v_text`): its 8,192-id BPE, 128-token
  blocks, 4 post-LN layers of width 256 (4 heads, FFN 1,024), the released
  span masking, top-2 targets, EMA 0.996 -> 0.999 over 1,000 updates,
  fairseq Adam peaking at 5e-4 after 150 warm-up updates, 1,500 steps of
  batch 64 (one epoch of the 12.1M tokens, about an hour on 2 CPU cores)
  in float32.
* ``tiny``: a 50-token vocabulary, 24-token sequences, 2 layers of width 16,
  for a few steps; runs in seconds on a CPU and is what the tests train.

Two switches choose between the paper and the released code (spec
Appendix A): ``config.mask.style`` is "span" (the released config) or
"bert" (the paper: 15% of tokens, 80/10/10); the teacher reads the whole
uncorrupted sequence (the paper) unless
``config.model.teacher_sees_only_masked`` reproduces the released code,
whose teacher reads only the masked tokens (fairseq issue #4881).

The data are *generated* token sequences by default (``config.data.source=
"synthetic"``, see `experiments.data.pretrain_batches`);
``--config.data.source=corpus``
trains on blocks of real English (GCIDE, WordNet glosses, fortunes) with a
byte-level BPE built by `experiments.data.text_corpus`, e.g. with
``--config.model.vocab_size=8192 --config.mask.mask_id=8191``.
"""

import ml_collections

from experiments.configs import common

VARIANTS = ("base", "small", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` picks the variant: base, small or tiny."""
  variant = arg or "base"
  if variant not in VARIANTS:
    raise ValueError(
      f"unknown variant {arg!r} of d2v_text; use one of {VARIANTS}"
    )
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.modality = "text"

  c.model = common.pretrain_model(
    "text",
    dropout_rate=0.1,
    attention_dropout_rate=0.1,
    activation_dropout_rate=0.0,
    layerdrop=0.0,
    top_k=10,
    # False: the teacher encodes the whole original sequence (the paper);
    # True: only the masked tokens, positions renumbered (released code).
    teacher_sees_only_masked=False,
  )

  c.mask = ml_collections.ConfigDict()
  # "span": fairseq MaskTokensDataset with the released yaml (spans of
  # span_length tokens, start probability mask_prob / span_length, every
  # selected token becomes <mask>); "bert": each ordinary token selected
  # with bert_prob, then 80% <mask>, 10% random, 10% unchanged, the loss on
  # all selected tokens.
  c.mask.style = "span"
  c.mask.mask_prob = 0.35
  c.mask.span_length = 4  # mask_multiple_length
  c.mask.bert_prob = 0.15
  c.mask.bert_random_token_prob = 0.1
  c.mask.bert_leave_unmasked_prob = 0.1
  c.mask.mask_id = 50_264  # <mask>, the last entry of the dictionary

  c.ema = common.ema_config(start=0.999, end=0.9999, anneal_steps=300_000)

  # Weight decay on every parameter, as in fairseq v1.
  c.optim = common.pretrain_optim(
    peak_lr=2e-4, warmup_steps=10_000, weight_decay=0.01, clip_norm=5.0
  )

  # 16 GPUs x 8192 tokens = 256 x 512.
  c.train = common.train_config(batch_size=256, steps=1_000_000)
  # The student encoder is saved to <workdir>/encoder/ at the end; these
  # fractions of the run add <workdir>/encoder-<step>/ (d2vjax.encoder_io).
  c.train.export_encoder_at = ()

  c.data = ml_collections.ConfigDict()
  # "synthetic": generated token sequences (experiments.data.pretrain_batches);
  # "corpus": packed blocks of real English (experiments.data.text_corpus) with
  # its byte-level BPE, whose size must equal config.model.vocab_size (and
  # <mask> = vocab_size - 1 = config.mask.mask_id).
  c.data.source = "synthetic"
  # A corpus folder from experiments.data.text_corpus; "" = find or build the
  # one with this vocab_size under data_dir ("" = the user's cache), of
  # max_words words (0 = all, about 6.7M). Blocks are repacked to seq_len.
  c.data.path = ""
  c.data.data_dir = ""
  c.data.max_words = 0
  c.data.seq_len = 512  # tokens_per_sample, <s> included
  # Generated sequences are between min_len and seq_len tokens long and
  # padded to seq_len, so that padding is exercised as in real batches.
  c.data.min_len = 256
  c.data.bos_id = 0
  c.data.eos_id = 2
  c.data.num_special = 4  # <s>, <pad>, </s>, <unk>: never generated inside

  # fsdp: devices that shard each parameter; 1 = replicate.
  c.mesh = common.mesh_config(fsdp=1)

  if variant == "tiny":
    common.shrink_pretraining(c)
    c.mask.mask_id = 49
    c.optim.peak_lr = 1e-3
    c.optim.warmup_steps = 1
    c.data.seq_len, c.data.min_len = 24, 12
  elif variant == "small":
    english_corpus_recipe(c)
  return c


def english_corpus_recipe(c: ml_collections.ConfigDict) -> None:
  """Scales the Base recipe down to the English corpus on a CPU, in place."""
  c.model.update(
    vocab_size=8_192,  # the corpus's byte-level BPE, <mask> last
    max_positions=130,  # 128 + padding id + 1
    hidden=256,
    num_layers=4,
    heads=4,
    mlp_dim=1_024,
    # Half the layers, as the small ViT of d2v_vision.py:fmnist (3 of 6).
    top_k=2,
    dtype="float32",
  )
  c.mask.mask_id = 8_191
  # 30 steps measured 4.5 s/step on 2 shared cores (load 5-6: two other
  # trainings ran); d2v_vision.py:fmnist ran 1.6 s/step beside them against
  # 0.95 s/step alone, so about 2.7 s/step alone: 1,500 steps take about
  # 1.1 h (1.9 h as shared). 1,500 x 64 blocks of 128 are one epoch.
  c.train.batch_size = 64
  c.train.steps = 1_500
  # The teacher's time constant grows from 250 to 1,000 updates over the
  # first two thirds of the run, the fractions of d2v_vision.py:fmnist.
  c.ema = common.ema_config(start=0.996, end=0.999, anneal_steps=1_000)
  # Base's 2e-4 is for width 768 and batch 256; post-LN warms up over 10 %.
  c.optim.peak_lr = 5e-4
  c.optim.warmup_steps = 150
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.prefetch = 2
  c.data.source = "corpus"
  c.data.seq_len = 128  # the corpus's 512-token blocks, repacked
