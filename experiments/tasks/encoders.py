"""The encoder a fine-tuning run starts from (``config.init``).

* ``scratch``: the architecture of ``config.model.encoder``, randomly
  initialised;
* ``pretrain:<workdir>``: the student encoder of a data2vec pretraining
  run (`experiments.tasks.pretrain`), its EMA teacher and regression head
  dropped (spec §3.1);
* ``encoder:<folder>``: an encoder saved by `d2vjax.encoder_io` (what a
  pretraining run leaves in ``<workdir>/encoder/``), architecture
  included;
* ``hf:<folder>``: a HuggingFace checkpoint folder
  (`d2vjax.convert.load_hf_checkpoint`), architecture included.

Every encoder then takes the fine-tuning regularisation of
``config.model.overrides`` and whatever its task head needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from d2vjax import convert, encoder_io
from d2vjax import finetune as ft
from experiments.runtime import checkpoint as ckpt_lib
from experiments.runtime import driver
from experiments.runtime import mesh as mesh_lib
from experiments.tasks import pretrain

PyTree = Any


def _pretrained_encoder(
  workdir: str, modality: str, mesh: Mesh
) -> tuple[nn.Module, PyTree]:
  """The student encoder of a data2vec pretraining run and its parameters.

  The pretraining state is rebuilt abstractly from the run's `config.json`
  (as today's configs spell it) with `experiments.tasks.pretrain.build`
  and restored, replicated on `mesh`, from the newest readable step; the
  EMA teacher and the regression head are then dropped (spec §3.1). The
  whole state, optimizer moments included, is read once.
  """
  path = epath.Path(workdir) / ckpt_lib.CONFIG_FILENAME
  saved = json.loads(path.read_text())
  ptask = pretrain.Task(ml_collections.ConfigDict(saved))
  ptask.config = ml_collections.ConfigDict(ptask.upgrade_saved_config(saved))
  if ptask.config.modality != modality:
    raise ValueError(
      f"{workdir} pretrained a {ptask.config.modality} encoder; the task "
      f"needs {modality}"
    )
  pretrainer = pretrain.build(ptask.config)
  abstract = jax.eval_shape(pretrainer.init, jax.random.key(0))
  replicated = mesh_lib.replicated(mesh)
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
    abstract,
  )
  with driver.open_checkpoints(ptask, workdir) as checkpoints:
    restored = checkpoints.restore(target)
  if restored is None:
    raise FileNotFoundError(f"{workdir} holds no pretraining checkpoint")
  state, _, step = restored
  logging.info("encoder from pretraining step %d of %s", step, workdir)
  params = ft.encoder_params_from_pretrained(state.params)
  return pretrainer.model.encoder, params


def load(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  head_overrides: Mapping[str, Any] = MappingProxyType({}),
) -> tuple[nn.Module, PyTree | None]:
  """The encoder of ``config.init`` for ``config.modality``, and its weights.

  Args:
    config: a fine-tuning config.
    mesh: where pretraining checkpoints are restored to.
    head_overrides: encoder fields the task head needs, applied after
      ``config.model.overrides``.

  Returns:
    ``(encoder, params)``: the encoder with the overrides applied, and its
    pretrained parameter tree (None from scratch).

  Raises:
    ValueError: for an unknown ``config.init`` or an encoder of another
      modality.
  """
  wanted = pretrain.ENCODERS[config.modality]
  kind, _, where = config.init.partition(":")
  params = None
  if kind == "scratch" and not where:
    arch = config.model.encoder.to_dict()
    if "conv_layers" in arch:
      # Module attributes must be hashable; JSON and flags give lists.
      arch["conv_layers"] = tuple(tuple(x) for x in arch["conv_layers"])
    encoder = wanted(**arch)
  elif kind == "pretrain" and where:
    encoder, params = _pretrained_encoder(where, config.modality, mesh)
  elif kind == "encoder" and where:
    encoder, params = encoder_io.load(where)
  elif kind == "hf" and where:
    encoder, params = convert.load_hf_checkpoint(where)
  else:
    raise ValueError(
      f"config.init={config.init!r}; use 'scratch', 'pretrain:<workdir>', "
      "'encoder:<folder>' or 'hf:<folder>'"
    )
  if not isinstance(encoder, wanted):
    raise ValueError(
      f"config.init={config.init!r} holds a {type(encoder).__name__}; the "
      f"{config.task} task needs a {wanted.__name__}"
    )
  overrides = config.model.overrides.to_dict()
  overrides["dtype"] = jnp.dtype(overrides["dtype"])
  overrides.update(head_overrides)
  return encoder.clone(parent=None, **overrides), params
