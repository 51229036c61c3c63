"""Trained encoders as small, self-describing folders.

A pretraining checkpoint holds the whole run -- student, EMA teacher,
regression head, optimizer moments -- in the layout of one config. What a
user hands on is the encoder alone: `save` writes a folder with

* ``encoder.json``: the format and its version, the modality, the
  encoder's constructor fields (architecture and regularisation, not its
  compute dtype), the parameter count, and free-form ``metadata`` (where
  the weights came from);
* ``params.msgpack``: the float32 parameters (`flax.serialization`).

`load` reads it back as ``(module, params)``, ready for a fine-tuning head
(`d2vjax.finetune.with_pretrained_encoder`) or for features::

  encoder, params = d2vjax.encoder_io.load("pretrained/fmnist")
  tokens, _ = encoder.apply({"params": params}, images)
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import serialization

from d2vjax import audio, text, vision

FORMAT = "d2vjax-encoder"
VERSION = 1
CONFIG_FILE = "encoder.json"
PARAMS_FILE = "params.msgpack"

ENCODERS: dict[str, type[nn.Module]] = {
  "audio": audio.AudioEncoder,
  "vision": vision.VisionEncoder,
  "text": text.TextEncoder,
}

PyTree = Any


def _fields(module: nn.Module) -> dict[str, Any]:
  """A module's constructor fields as JSON values (dtype left out)."""
  out = {}
  for f in module.__dataclass_fields__:
    if f in ("parent", "name", "dtype"):
      continue
    value = getattr(module, f)
    out[f] = json.loads(json.dumps(value, default=list))
  return out


def save(
  folder: str | os.PathLike,
  encoder: nn.Module,
  params: PyTree,
  metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes `encoder` and its `params` to `folder` (created or replaced).

  Args:
    folder: the output folder.
    encoder: an `AudioEncoder`, `VisionEncoder` or `TextEncoder`.
    params: its parameters (any arrays; stored as float32 numpy).
    metadata: JSON-able notes kept in ``encoder.json`` (source, step).

  Returns:
    The folder.

  Raises:
    TypeError: for a module that is not one of the three encoders.
    ValueError: for parameters that hold NaN or inf (a diverged run).
  """
  modality = next(
    (m for m, cls in ENCODERS.items() if isinstance(encoder, cls)), None
  )
  if modality is None:
    raise TypeError(
      f"{type(encoder).__name__} is not a data2vec encoder; save one of "
      f"{[c.__name__ for c in ENCODERS.values()]}"
    )
  host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  bad = [
    jax.tree_util.keystr(path)
    for path, x in jax.tree_util.tree_leaves_with_path(host)
    if not np.all(np.isfinite(x))
  ]
  if bad:
    raise ValueError(
      f"encoder parameters {bad[:3]} hold NaN or inf: the run diverged; "
      "export an earlier checkpoint"
    )
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  info = {
    "format": FORMAT,
    "version": VERSION,
    "modality": modality,
    "fields": _fields(encoder),
    "num_params": int(sum(x.size for x in jax.tree.leaves(host))),
    "metadata": dict(metadata or {}),
  }
  # Parameters first, the description last: a folder with encoder.json is
  # complete.
  for name, data in (
    (PARAMS_FILE, serialization.msgpack_serialize(host)),
    (CONFIG_FILE, (json.dumps(info, indent=1) + "\n").encode()),
  ):
    tmp = folder / (name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)
  return folder


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples module fields hold (hashable)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def read_info(folder: str | os.PathLike) -> dict[str, Any]:
  """The ``encoder.json`` of a saved encoder, checked."""
  path = pathlib.Path(folder) / CONFIG_FILE
  try:
    info = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"{path} not found: {folder} is not a saved encoder (write one with "
      "d2vjax.encoder_io.save or experiments.export_encoder)"
    ) from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): re-export it") from e
  if info.get("format") != FORMAT or info.get("version") != VERSION:
    raise ValueError(
      f"{path}: format {info.get('format')!r} version "
      f"{info.get('version')!r}; this reader takes {FORMAT!r} version "
      f"{VERSION}"
    )
  if info.get("modality") not in ENCODERS:
    raise ValueError(
      f"{path}: modality {info.get('modality')!r}; one of {list(ENCODERS)}"
    )
  return info


def load(
  folder: str | os.PathLike, **overrides: Any
) -> tuple[nn.Module, PyTree]:
  """The encoder saved in `folder` and its parameters.

  Args:
    folder: a folder written by `save`.
    **overrides: module fields to change (dropouts, ``dtype``).

  Returns:
    ``(encoder, params)``: the module and a float32 numpy parameter tree.

  Raises:
    FileNotFoundError: for a folder without ``encoder.json``.
    ValueError: for another format, a corrupt or truncated parameter file,
      or a parameter count that does not match the description.
  """
  info = read_info(folder)
  fields = {k: _tuples(v) for k, v in info["fields"].items()}
  encoder = ENCODERS[info["modality"]](**(fields | overrides))
  path = pathlib.Path(folder) / PARAMS_FILE
  try:
    params = serialization.msgpack_restore(path.read_bytes())
  except FileNotFoundError as e:
    raise FileNotFoundError(
      f"{path} not found: the export is incomplete"
    ) from e
  except Exception as e:  # msgpack raises several kinds on bad bytes
    raise ValueError(f"{path} is corrupt ({e}): re-export the encoder") from e
  count = sum(np.size(x) for x in jax.tree.leaves(params))
  if count != info["num_params"]:
    raise ValueError(
      f"{path} holds {count} parameters, {CONFIG_FILE} says "
      f"{info['num_params']}: the files do not belong together; re-export"
    )
  return encoder, params
