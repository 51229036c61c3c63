"""The experiments the run driver knows, by the name a config's ``task`` gives.

A plain dict from name to module; each module defines a `Task` subclass
named ``Task`` (see `experiments.tasks.base`). Modules are imported when a
run asks for them, so a run pulls in only its own dependencies.
"""

from __future__ import annotations

import importlib

import ml_collections

from experiments.tasks import base

TASKS = {
  # MTAG regression (MOSI-style ratings) or IEMOCAP emotions.
  "mtag": "experiments.tasks.mtag",
  # data2vec pretraining of an audio, vision or text encoder.
  "pretrain": "experiments.tasks.pretrain",
  # Fine-tuning families of data2vec encoders.
  "ctc": "experiments.tasks.ctc",
  "image_classification": "experiments.tasks.image_classification",
  "text_classification": "experiments.tasks.text_classification",
}


def get(name: str) -> type[base.Task]:
  """The task class registered under `name`."""
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}; use one of {tuple(TASKS)}")
  return importlib.import_module(TASKS[name]).Task


def create(config: ml_collections.ConfigDict) -> base.Task:
  """The task that ``config.task`` names, built from `config`."""
  return get(config.task)(config)
