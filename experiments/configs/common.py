"""Sub-configs that several experiment configs must spell the same way.

The data2vec pretraining configs (`d2v_audio`, `d2v_vision`, `d2v_text`)
and the fine-tuning one (`d2v_finetune`) build the same Base encoders and
the same tiny ones, and every config (MTAG's too) gives the run driver the
same bookkeeping fields. Those live here, once. What makes a recipe -- its
masking, EMA, optimiser, regularisation, batch and steps -- stays in the
recipe's own file, written out where a reader looks for it.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from d2vjax import speech

MODALITIES = ("audio", "vision", "text")

# The Base transformer of all three data2vec modalities (spec §5).
_BASE_WIDTH = {"hidden": 768, "num_layers": 12, "heads": 12, "mlp_dim": 3072}
# Small enough that a run of a few steps takes seconds on a CPU.
_TINY_WIDTH = {"hidden": 16, "num_layers": 2, "heads": 2, "mlp_dim": 32}

# Per modality, the architecture fields besides the transformer's width.
_BASE_FRONT_ENDS = {
  "audio": {
    "conv_layers": speech.BASE_CONV_LAYERS,
    "pos_kernel_size": 19,  # conv_pos 95 // pos_conv_depth 5
    "pos_groups": 16,
    "pos_depth": 5,
  },
  # ViT-B/16 with BEiT's blocks.
  "vision": {"image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6},
  "text": {
    "vocab_size": 50_265,  # GPT-2 BPE in the fairseq dictionary
    "max_positions": 514,  # 512 + padding id + 1
    "pad_id": 1,
  },
}
_TINY_FRONT_ENDS = {
  "audio": {
    # 10 samples a frame: 800-sample clips are 79 frames.
    "conv_layers": ((16, 10, 5), (16, 3, 2)),
    "pos_kernel_size": 4,
    "pos_groups": 2,
    "pos_depth": 2,
  },
  "vision": {"image_size": 16, "patch_size": 4},  # a 4x4 patch grid
  "text": {"vocab_size": 50, "max_positions": 40},
}


def encoder(modality: str, tiny: bool = False) -> ml_collections.ConfigDict:
  """The architecture of a data2vec encoder (no regularisation, no dtype).

  Pretraining and fine-tuning from scratch must build the same encoder, so
  both take it from here.

  Args:
    modality: "audio" (the wav2vec 2.0 CNN and convolutional positions),
      "vision" (ViT-B/16) or "text" (RoBERTa's embeddings).
    tiny: 2 layers of width 16 and a matching small front end (a few CNN
      channels, 16x16 images or a 50-token vocabulary) instead of Base.

  Returns:
    The architecture fields, ready to receive the recipe's others.

  Raises:
    ValueError: for an unknown modality.
  """
  if modality not in MODALITIES:
    raise ValueError(f"modality {modality!r}; use one of {MODALITIES}")
  if tiny:
    fields = _BASE_FRONT_ENDS[modality] | _TINY_FRONT_ENDS[modality]
    return ml_collections.ConfigDict(fields | _TINY_WIDTH)
  return ml_collections.ConfigDict(_BASE_FRONT_ENDS[modality] | _BASE_WIDTH)


def pretrain_model(modality: str, **fields: Any) -> ml_collections.ConfigDict:
  """``config.model`` of a pretraining config: the Base encoder and `fields`.

  Computes in bfloat16 without rematerialisation; a tiny config switches to
  float32 (`shrink_pretraining`).

  Args:
    modality: the encoder's, as for `encoder`.
    **fields: the recipe's regularisation and target fields (dropouts,
      LayerDrop, ``top_k``, ...).

  Returns:
    The model sub-config.
  """
  c = encoder(modality)
  c.update(fields)
  # Compute dtype; parameters, the teacher, targets and losses stay float32.
  c.dtype = "bfloat16"
  c.remat = False
  return c


def ema_config(
  start: float, end: float, anneal_steps: int
) -> ml_collections.ConfigDict:
  """``config.ema``: the teacher's EMA decay, annealed linearly.

  Args:
    start: the decay at step 0 (fairseq ``ema_decay``).
    end: the decay from `anneal_steps` on (``ema_end_decay``).
    anneal_steps: updates over which it moves from `start` to `end`
      (``ema_anneal_end_step``); 0 = `end` throughout.

  Returns:
    The EMA sub-config.
  """
  return ml_collections.ConfigDict(
    {"start": start, "end": end, "anneal_steps": anneal_steps}
  )


def pretrain_optim(
  *,
  peak_lr: float,
  warmup_steps: int | None,
  weight_decay: float,
  clip_norm: float,
) -> ml_collections.ConfigDict:
  """``config.optim`` of a pretraining config (`d2vjax.optim`'s fields).

  Args:
    peak_lr: the schedule's highest learning rate.
    warmup_steps: linear warm-up updates; None where the modality's
      schedule sets its own (audio's tri-stage one), left an unset int
      field that ``--config.optim.warmup_steps`` can still fill.
    weight_decay: decoupled weight decay.
    clip_norm: the global gradient norm to clip to; 0 = no clipping.

  Returns:
    The optimiser sub-config.
  """
  if warmup_steps is None:
    warmup_steps = config_dict.placeholder(int)
  return ml_collections.ConfigDict(
    {
      "peak_lr": peak_lr,
      "warmup_steps": warmup_steps,
      "weight_decay": weight_decay,
      "clip_norm": clip_norm,
    }
  )


def train_config(**fields: Any) -> ml_collections.ConfigDict:
  """``config.train``: the run driver's fields, then the config's `fields`.

  The driver (`experiments.runtime.driver`) reads the fields below for
  every task; `fields` overrides them and adds the task's own (batch size,
  steps or epochs, loss, ...).

  Args:
    **fields: overrides and additions.

  Returns:
    The training sub-config.
  """
  defaults = {
    "seed": 0,
    "log_every": 100,  # steps
    "checkpoint_every": 5_000,  # steps
    "keep_checkpoints": 3,
    # Batches built ahead on a background thread while the device steps
    # (experiments/runtime/prefetch.py); 0 = build each in the loop.
    "prefetch": 0,
    # Simulated preemption for tests: checkpoint and return after this
    # many steps of this process; 0 = never.
    "stop_after_steps": 0,
  }
  return ml_collections.ConfigDict(defaults | fields)


def mesh_config(**axes: int) -> ml_collections.ConfigDict:
  """``config.mesh``: devices on the data axis (-1 = all), then `axes`.

  With an ``fsdp`` axis of n devices, ``data=-1`` takes all devices
  divided by n.

  Args:
    **axes: further sizes (``fsdp``, MTAG's graph ``shards``).

  Returns:
    The mesh sub-config.
  """
  return ml_collections.ConfigDict({"data": -1} | axes)


def shrink_pretraining(c: ml_collections.ConfigDict) -> None:
  """Makes a pretraining config tiny, in place: seconds on a CPU.

  The tiny encoder of ``c.modality`` averaging its top 2 layers in
  float32, an EMA annealed over 10 steps, and 6 steps of batch 8, logged
  every step and checkpointed every 3 (so that the tests can resume one
  mid-run). Masking, optimiser and data are the caller's to shrink.

  Args:
    c: a config from `pretrain_model`, `ema_config` and `train_config`.
  """
  c.model.update(encoder(c.modality, tiny=True))
  c.model.top_k = 2
  c.model.dtype = "float32"
  c.ema = ema_config(0.99, 0.999, 10)
  c.train.batch_size = 8
  c.train.steps = 6
  c.train.log_every = 1
  c.train.checkpoint_every = 3
