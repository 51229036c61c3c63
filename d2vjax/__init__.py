"""data2vec (v1) in JAX: one self-supervised recipe for speech, vision and text.

A student encoder sees a masked input and regresses, at the masked
positions, the average of the top-K layer outputs of an EMA teacher that
sees the whole input (Baevski et al., "data2vec", ICML 2022). The pieces:

* encoders: `AudioEncoder` (`audio`, with the conv front end of `speech`),
  `VisionEncoder` (`vision`), `TextEncoder` (`text`), all built on the
  `TransformerEncoder` of `encoder`; PyTorch-default inits in
  `initializers`, counter-hash dropout in `dropout`;
* pretraining: host-side mask generators (`masking`), targets (`targets`),
  the EMA teacher (`ema`), losses (`losses`), optimisers and schedules
  (`optim`), and the model with its pure step (`pretrain`);
* HF checkpoints: `load_hf_checkpoint` and `from_hf` (`convert`), and
  back to HF: `to_hf` and `save_hf_checkpoint` (`hf_export`);
* trained encoders as self-describing folders: `encoder_io.save` and
  `encoder_io.load`;
* fine-tuning heads, losses and metrics: `finetune`;
* readers of real datasets: `datasets`, imported on first use (it needs
  scipy and soundfile, which the models do not).

Quick use::

  import d2vjax
  model = d2vjax.Data2Vec(encoder=d2vjax.VisionEncoder(), modality="vision")
  tx = d2vjax.make_optimizer("vision", total_steps=1000).tx
  ema = d2vjax.make_teacher_ema("vision", 0.9998)
  state = d2vjax.create_pretrain_state(rng, model, batch, tx, ema)
  state, metrics = d2vjax.pretrain_step(state, batch, model=model, tx=tx,
                                        ema=ema)
"""

import importlib
from typing import Any

from d2vjax import (
  audio,
  convert,
  dropout,
  ema,
  encoder,
  encoder_io,
  finetune,
  hf_export,
  initializers,
  losses,
  masking,
  optim,
  pretrain,
  speech,
  targets,
  text,
  tree_util,
  vision,
)
from d2vjax.audio import AudioEncoder
from d2vjax.convert import from_hf, load_hf_checkpoint
from d2vjax.ema import ema_decay_schedule, teacher_ema
from d2vjax.encoder import TransformerEncoder
from d2vjax.hf_export import save_hf_checkpoint, to_hf
from d2vjax.losses import modality_loss
from d2vjax.masking import (
  apply_text_mask,
  bert_mask,
  block_mask,
  block_masks,
  span_mask,
  text_span_mask,
)
from d2vjax.optim import make_optimizer
from d2vjax.pretrain import (
  Data2Vec,
  PretrainState,
  create_pretrain_state,
  make_teacher_ema,
  pretrain_step,
)
from d2vjax.targets import modality_targets
from d2vjax.text import TextEncoder
from d2vjax.vision import VisionEncoder

__all__ = [
  "AudioEncoder",
  "Data2Vec",
  "PretrainState",
  "TextEncoder",
  "TransformerEncoder",
  "VisionEncoder",
  "apply_text_mask",
  "audio",
  "bert_mask",
  "block_mask",
  "block_masks",
  "convert",
  "create_pretrain_state",
  "datasets",
  "dropout",
  "ema",
  "ema_decay_schedule",
  "encoder",
  "encoder_io",
  "finetune",
  "from_hf",
  "hf_export",
  "initializers",
  "load_hf_checkpoint",
  "losses",
  "make_optimizer",
  "make_teacher_ema",
  "masking",
  "modality_loss",
  "modality_targets",
  "optim",
  "pretrain",
  "pretrain_step",
  "save_hf_checkpoint",
  "span_mask",
  "speech",
  "targets",
  "teacher_ema",
  "text",
  "text_span_mask",
  "to_hf",
  "tree_util",
  "vision",
]

# Submodules imported on first attribute access (PEP 562).
_LAZY_SUBMODULES = ("datasets",)


def __getattr__(name: str) -> Any:
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"d2vjax.{name}")
  raise AttributeError(f"module 'd2vjax' has no attribute {name!r}")
