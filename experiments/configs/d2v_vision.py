r"""data2vec image pretraining (ViT-B/16, data2vec_vision recipe), and tiny.

  python -m experiments.pretrain_d2v \
    --config=experiments/configs/d2v_vision.py:base --workdir=/tmp/d2v_vision
  python -m experiments.pretrain_d2v \
    --config=experiments/configs/d2v_vision.py:tiny --workdir=/tmp/d2v_tiny

Variants:

* ``base`` (also the default): ViT-B/16 with BEiT blocks and the command line
  of the data2vec_vision README (spec §4b and §5): block masking of 120 of
  the 196 patches, top-6 block outputs as targets, a constant EMA decay of
  0.9998, AdamW peaking at 2e-3 after 10 of 800 epochs of warm-up, batch
  2048, clipping at 3.0.
* ``fmnist``: the recipe scaled to Fashion-MNIST on a CPU (the results
  table of `experiments.tables.d2v_vision`): 28x28 images in 4x4 patches (a
  7x7 grid), 6 blocks of width 128, 60 % of the patches masked in blocks,
  the top-3 block outputs as targets, an EMA decay annealed from 0.998 to
  0.9995, 3,000 steps of batch 128 (6.4 epochs of the 60k training
  images, about an hour on 2 CPU cores) in float32, which is faster than
  bfloat16 on a CPU.
* ``tiny``: 16x16 images in 4x4 patches, 2 blocks of width 16, for a few
  steps; runs in seconds on a CPU and is what the tests train.

The data are *generated* images by default (``config.data.source=
"synthetic"``, see `experiments.data.pretrain_batches`); ``--config.data.source=
fashion_mnist`` trains on Fashion-MNIST (fetched from Debian, or read from
``--config.data.path``), resized to the model's image size.
"""

import ml_collections

from experiments.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg` picks the variant: base, fmnist or tiny."""
  variant = arg or "base"
  if variant not in ("base", "fmnist", "tiny"):
    raise ValueError(
      f"unknown variant {arg!r} of d2v_vision; use base, fmnist or tiny"
    )
  c = ml_collections.ConfigDict()
  c.task = "pretrain"
  c.modality = "vision"

  c.model = common.pretrain_model(
    "vision",
    dropout_rate=0.0,
    attention_dropout_rate=0.05,
    drop_path_rate=0.25,
    layer_scale_init=1e-4,  # the README's value, not argparse's 0.1
    # Block outputs, as the released code (the paper: ffn). Also
    # "ffn_residual" (= "end" in these pre-LN blocks) and "attention", the
    # teacher features of the paper's Table 4 (d2vjax.encoder.TAPS).
    tap="end",
    top_k=6,  # --target_layers [6..11]
  )

  # BEiT MaskingGenerator with the README's flags.
  c.mask = ml_collections.ConfigDict()
  c.mask.num_masking_patches = 120
  c.mask.min_num_patches = 16
  c.mask.max_num_patches = 196
  c.mask.min_aspect = 0.3

  # The README passes --ema_decay 0.9998 --ema_start_at 0: the code anneals
  # only while the step is below ema_start_at, i.e. never, so the decay is
  # 0.9998 from the first update (ema_decay_init 0.999 is never used).
  c.ema = common.ema_config(start=0.9998, end=0.9998, anneal_steps=0)

  # Warm-up over 10 of 800 epochs; weight decay on matrices only (not 1-D
  # parameters, biases, cls).
  c.optim = common.pretrain_optim(
    peak_lr=2e-3, warmup_steps=6_250, weight_decay=0.05, clip_norm=3.0
  )

  # 16 GPUs x 128; 800 epochs of ImageNet-1k at 2048 are ~500k updates.
  c.train = common.train_config(batch_size=2048, steps=500_000)
  # The student encoder is saved to <workdir>/encoder/ at the end; these
  # fractions of the run add <workdir>/encoder-<step>/ (d2vjax.encoder_io).
  c.train.export_encoder_at = ()

  c.data = ml_collections.ConfigDict()
  # "synthetic": generated images (experiments.data.pretrain_batches);
  # "fashion_mnist": the real training images, augmented and resized to
  # config.model.image_size (grey, repeated to 3 channels). Image size and
  # patches come from config.model.
  c.data.source = "synthetic"
  # Folder of the Fashion-MNIST IDX files; "" = fetch the Debian package
  # dataset-fashion-mnist into data_dir ("" = the user's cache).
  c.data.path = ""
  c.data.data_dir = ""
  c.data.split = "train"
  # data2vec_vision's augmentations (spec §4b.1): random resized crop with
  # BEiT's scale and ratio ranges, horizontal flip, colour jitter 0.4
  # (brightness and contrast on grey images); augment=False resizes the
  # whole image.
  c.data.augment = True
  c.data.crop_scale = (0.08, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.jitter = 0.4
  # Fashion-MNIST pixel statistics (the recipe's ImageNet ones are for RGB).
  c.data.mean = 0.2860
  c.data.std = 0.3530

  # fsdp: devices that shard each parameter; 1 = replicate.
  c.mesh = common.mesh_config(fsdp=1)

  if variant == "tiny":
    common.shrink_pretraining(c)
    c.model.drop_path_rate = 0.1
    c.mask.num_masking_patches = 8
    c.mask.min_num_patches = 2
    c.mask.max_num_patches = 16
    c.optim.warmup_steps = 1
  elif variant == "fmnist":
    fashion_mnist_recipe(c)
  return c


def fashion_mnist_recipe(c: ml_collections.ConfigDict) -> None:
  """Scales the Base recipe down to Fashion-MNIST on a CPU, in place."""
  c.model.update(
    image_size=28,
    patch_size=4,
    hidden=128,
    num_layers=6,
    heads=4,
    mlp_dim=512,
    top_k=3,  # half the blocks, as top-6 of ViT-B's 12
    drop_path_rate=0.1,
    dtype="float32",
  )
  # 29 of the 49 patches: BEiT's 120 of 196 (61 %), in blocks of >= 4.
  c.mask.num_masking_patches = 29
  c.mask.min_num_patches = 4
  c.mask.max_num_patches = 49
  # A 3,000-step run needs a teacher that follows faster than 0.9998 (a
  # time constant of 5,000 updates): 500 updates at first, 2,000 at the end.
  c.ema = common.ema_config(start=0.998, end=0.9995, anneal_steps=2_000)
  c.optim.peak_lr = 1.5e-3
  c.optim.warmup_steps = 200
  c.train.batch_size = 128
  c.train.steps = 3_000
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.prefetch = 2
  # Encoders after a quarter and half of the run: the table's pretraining
  # length ablation fine-tunes them.
  c.train.export_encoder_at = (0.25, 0.5)
  c.data.source = "fashion_mnist"
  # 28x28 crops of at least 35 % of the image: 8 % leaves too few pixels.
  c.data.crop_scale = (0.35, 1.0)
