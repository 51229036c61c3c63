"""Tests of the experiment configs: every variant builds and says its task."""

import importlib
import json
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import configs
from experiments.configs import common

_GLUE = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
_SPEECH = ("10m", "1h", "10h", "100h", "960h")
_FINETUNE = (
  ["speech", "image", "text"]
  + [f"speech_{s}" for s in _SPEECH]
  + [f"text_{t}" for t in _GLUE]
)
_FINETUNE += [f"{v}_tiny" for v in ("speech", "image", "text")]

# (config file, variant, config.task, config.modality or None).
VARIANTS = [
  (name, arg, "mtag", None)
  for name in ("mtag_mosi", "mtag_iemocap", "mtag_spoken")
  for arg in (None, "tiny")
] + [
  (f"d2v_{modality}", arg, "pretrain", modality)
  for modality in common.MODALITIES
  for arg in (None, "base", "tiny")
]
# Fine-tuning variants are named by recipe; the task is the family's
# registry name, the modality its encoder's.
_FAMILIES = {
  "speech": ("ctc", "audio"),
  "image": ("image_classification", "vision"),
  "text": ("text_classification", "text"),
}
VARIANTS += [
  ("d2v_finetune", v, *_FAMILIES[v.partition("_")[0]]) for v in _FINETUNE
]


def _get(name, arg):
  module = importlib.import_module(f"experiments.configs.{name}")
  return module.get_config(arg)


@pytest.mark.parametrize(
  "name, arg, task, modality",
  VARIANTS,
  ids=[f"{v[0]}:{v[1]}" for v in VARIANTS],
)
def test_every_variant_builds_and_names_its_task(name, arg, task, modality):
  c = _get(name, arg)
  assert c.task == task
  if modality is not None:
    assert c.modality == modality
  # What the run driver writes to the workdir (and tables print) is JSON.
  json.dumps(c.to_dict())
  # The fields read with a fallback are declared with the fallback's value
  # (MTAG builds its batches ahead by default).
  assert c.train.prefetch == (2 if task == "mtag" else 0)


def test_unknown_variants_fail():
  for name in ("mtag_mosi", "mtag_spoken", "d2v_audio", "d2v_finetune"):
    with pytest.raises(ValueError, match="unknown variant"):
      _get(name, "huge")


@pytest.mark.parametrize("tiny", [False, True])
def test_finetuning_from_scratch_builds_the_pretraining_encoder(tiny):
  for family, (_, modality) in _FAMILIES.items():
    pretrain = _get(f"d2v_{modality}", "tiny" if tiny else "base")
    finetune = _get("d2v_finetune", f"{family}_tiny" if tiny else family)
    encoder = finetune.model.encoder.to_dict()
    # Tiny fine-tuning runs shallower (and audio's positions with it).
    skip = {"num_layers", "pos_depth"} if tiny else set()
    for field, value in encoder.items():
      if field not in skip and field != "layer_scale_init":
        assert pretrain.model[field] == value, (family, field)


def test_config_files_load_by_path_with_overrides():
  # As the entry points read them: by path, locked, fields overridden.
  folder = pathlib.Path(configs.__file__).parent
  argv = [
    "prog",
    f"--config={folder / 'd2v_audio.py'}:tiny",
    # A placeholder: audio's warm-up is the tri-stage schedule's.
    "--config.optim.warmup_steps=5",
    "--config.train.prefetch=1",
  ]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", flag_values=values, sys_argv=argv, lock_config=True
  )
  values(argv)
  assert values.config.optim.warmup_steps == 5
  assert values.config.train.prefetch == 1
  assert values.config.model.hidden == 16


def test_small_text_recipe_and_its_fine_tuning_agree():
  pretrain = _get("d2v_text", "small")
  finetune = _get("d2v_finetune", "text_vader")
  for c in (pretrain, finetune):
    json.dumps(c.to_dict())
  assert finetune.task == "text_classification"
  assert finetune.model.num_labels == 1  # the rating
  for field, value in finetune.model.encoder.items():
    assert pretrain.model[field] == value, field
  # <mask> is the corpus tokenizer's last id; sentences fit the positions.
  assert pretrain.mask.mask_id == pretrain.model.vocab_size - 1
  assert pretrain.data.seq_len + 2 <= pretrain.model.max_positions
  assert finetune.data.seq_len + 2 <= pretrain.model.max_positions
  assert pretrain.optim.warmup_steps < pretrain.train.steps
  assert pretrain.ema.anneal_steps <= pretrain.train.steps
