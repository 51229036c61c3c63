"""`d2vjax` encoders to HuggingFace data2vec checkpoints (`convert` reversed).

`to_hf(model, params)` gives the state dict and the `config.json` dict of
HF's bare `Data2VecAudioModel`, `Data2VecVisionModel` or
`Data2VecTextModel` (spec §8): the keys `save_pretrained` writes for the
bare model (no `data2vec_*.` prefix), PyTorch layouts (Linear weights
transposed back, Conv1d kernels `(out, in/groups, k)`, Conv2d kernels
`(out, in, kh, kw)`), float32. The names come from the very tables
`d2vjax.convert` loads with, so `convert.from_hf(*to_hf(model, params))`
returns `model` and bit-identical params for every encoder in the form
`from_hf` builds.

`save_hf_checkpoint(folder, model, params)` writes `config.json` and
`model.safetensors` into a hidden sibling folder and renames it into place
only when both are complete, so a crash never leaves a folder that
`load_hf_checkpoint` (or `from_pretrained`) would trust.

HF has no name for some module fields; `to_hf` handles them as HF's own
fairseq converter did, or refuses:

* dropped (training or computation only, not weights): `remat`, `dtype`,
  vision `tap`; text `activation_dropout_rate` and `layerdrop`. A square
  vision `image_size` is written as an int and reads back as a pair.
* text `type_vocab_size=0` (fairseq, pretraining here): exported as one
  all-zero token-type row (`type_vocab_size=1`), which adds exactly 0.
* text `zero_pad_embeddings=True` (fairseq): HF does not zero pad rows;
  outputs at real tokens are the same, pad rows differ.
* ValueError: audio `extractor_mode="group_norm"` or `pos_kind="single"`
  (wav2vec 2.0 layouts: `Data2VecAudioModel` always has LayerNorm conv
  blocks and a stacked positional conv), and vision `layer_scale_init <= 0`
  (HF creates the layer-scale vectors only for a positive init).
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import safetensors.numpy

from d2vjax import convert, speech_hf, tree_util
from d2vjax.audio import AudioEncoder
from d2vjax.text import TextEncoder
from d2vjax.vision import VisionEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

Path = tuple[str, ...]

# Flax kernel -> PyTorch weight, by rank: Linear (in, out) -> (out, in);
# Conv1d (k, in/groups, out) -> (out, in/groups, k); Conv2d (kh, kw, in,
# out) -> (out, in, kh, kw). The inverses of `convert._to_flax` and
# `speech_hf._conv_kernel`.
_TORCH_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (3, 2, 0, 1)}


def _header(model_type: str, architecture: str, model: nn.Module) -> dict:
  """Fields the three HF configs share (spelled alike in all of them)."""
  return {
    "model_type": model_type,
    "architectures": [architecture],
    "hidden_size": int(model.hidden),
    "num_hidden_layers": int(model.num_layers),
    "num_attention_heads": int(model.heads),
    "intermediate_size": int(model.mlp_dim),
    "hidden_act": "gelu",  # exact erf GELU, as every d2vjax encoder
    "layer_norm_eps": float(model.layer_norm_eps),
  }


def audio_config_to_hf(model: AudioEncoder) -> dict[str, Any]:
  """The HF `Data2VecAudioConfig` dict of an `AudioEncoder`.

  Args:
    model: the encoder.

  Returns:
    A `config.json` dict that `convert.audio_config_from_hf` maps back to
    `model`.

  Raises:
    ValueError: for the wav2vec 2.0 layouts `Data2VecAudioModel` lacks
      (`extractor_mode="group_norm"`, `pos_kind="single"`).
  """
  if model.extractor_mode != "layer_norm":
    raise ValueError(
      f"extractor_mode={model.extractor_mode!r}: HF's Data2VecAudioModel "
      "always has LayerNorm conv blocks ('layer_norm'); the group_norm "
      "layout is wav2vec 2.0's"
    )
  if model.pos_kind != "stacked":
    raise ValueError(
      f"pos_kind={model.pos_kind!r}: HF's Data2VecAudioModel has a stacked "
      "positional convolution only; the single weight-normed one is "
      "wav2vec 2.0's"
    )
  dims, kernels, strides = (
    [int(v) for v in column] for column in zip(*model.conv_layers, strict=True)
  )
  return {
    **_header("data2vec-audio", "Data2VecAudioModel", model),
    "conv_dim": dims,
    "conv_kernel": kernels,
    "conv_stride": strides,
    "conv_bias": bool(model.conv_bias),
    "num_feat_extract_layers": len(dims),
    "feat_extract_activation": "gelu",
    "conv_pos_kernel_size": int(model.pos_kernel_size),
    "num_conv_pos_embeddings": int(model.pos_depth),  # stacked conv layers
    "num_conv_pos_embedding_groups": int(model.pos_groups),
    "feat_proj_dropout": float(model.feature_dropout_rate),
    "hidden_dropout": float(model.dropout_rate),
    "attention_dropout": float(model.attention_dropout_rate),
    "activation_dropout": float(model.activation_dropout_rate),
    "layerdrop": float(model.layerdrop),
    "add_adapter": False,
  }


def vision_config_to_hf(
  model: VisionEncoder, num_channels: int = 3
) -> dict[str, Any]:
  """The HF `Data2VecVisionConfig` dict of a `VisionEncoder`.

  Args:
    model: the encoder.
    num_channels: input channels (the patch embedding's in-features).

  Returns:
    A `config.json` dict that `convert.vision_config_from_hf` maps back to
    `model` (a square `image_size` comes back as a pair, `tap` as "end").

  Raises:
    ValueError: for `layer_scale_init <= 0` (HF then has no layer-scale
      vectors) or an image size that is not a multiple of the patch size.
  """
  scale = model.layer_scale_init
  if scale is not None and not scale > 0:
    raise ValueError(
      f"layer_scale_init={scale}: HF creates the layer-scale vectors "
      "(lambda_1, lambda_2) only when layer_scale_init_value > 0; use "
      "None for no layer scale"
    )
  _ = model.grid  # raises ValueError for sizes the patches do not divide
  h, w = convert._pair(model.image_size)
  return {
    **_header("data2vec-vision", "Data2VecVisionModel", model),
    "image_size": h if h == w else [h, w],
    "patch_size": int(model.patch_size),
    "num_channels": int(num_channels),
    "hidden_dropout_prob": float(model.dropout_rate),
    "attention_probs_dropout_prob": float(model.attention_dropout_rate),
    "drop_path_rate": float(model.drop_path_rate),
    "layer_scale_init_value": 0.0 if scale is None else float(scale),
    "use_mask_token": bool(model.use_mask_token),
    "use_absolute_position_embeddings": bool(model.use_abs_pos_emb),
    "use_relative_position_bias": False,  # per-block tables: not modelled
    "use_shared_relative_position_bias": bool(model.use_rel_pos_bias),
    # Without the final norm HF's LayerNorm moves into the mean pooler.
    "use_mean_pooling": not model.use_final_norm,
  }


def text_config_to_hf(model: TextEncoder) -> dict[str, Any]:
  """The HF `Data2VecTextConfig` dict of a `TextEncoder`.

  Args:
    model: the encoder.

  Returns:
    A `config.json` dict that `convert.text_config_from_hf` maps back to
    `model` when `type_vocab_size >= 1` and `zero_pad_embeddings=False`;
    `type_vocab_size=0` is written as 1 (see `to_hf`).
  """
  return {
    **_header("data2vec-text", "Data2VecTextModel", model),
    "vocab_size": int(model.vocab_size),
    "max_position_embeddings": int(model.max_positions),
    # HF always adds a token-type row; fairseq's converter added a zero one.
    "type_vocab_size": max(1, int(model.type_vocab_size)),
    "pad_token_id": int(model.pad_id),
    "hidden_dropout_prob": float(model.dropout_rate),
    "attention_probs_dropout_prob": float(model.attention_dropout_rate),
    "position_embedding_type": "absolute",
  }


def _audio_keys(model: AudioEncoder) -> Callable[[Path], str]:
  """Flax path -> HF key, with the front end's names from `speech_hf`."""
  kwargs = {
    "conv_layers": model.conv_layers,
    "conv_bias": model.conv_bias,
    "extractor_mode": model.extractor_mode,
    "pos_kind": model.pos_kind,
    "pos_depth": model.pos_depth,
  }
  front_end = {
    ("front_end", *path.split("/")): key
    for path, key, _ in speech_hf._key_map(kwargs, {}, "")
  }
  return lambda path: front_end.get(path) or convert._audio_key(path)


def _to_torch(value: np.ndarray, path: Path) -> np.ndarray:
  """Flax layout -> PyTorch layout, float32 and C-contiguous."""
  if path[-1] == "kernel":
    value = value.transpose(_TORCH_AXES[value.ndim])
  return np.ascontiguousarray(value, dtype=np.float32)


def _flat(tree: Any) -> dict[Path, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tree_util.path_names(path): leaf for path, leaf in leaves}


def _check_params(flat: Mapping[Path, np.ndarray], model, channels) -> None:
  """Raises ValueError unless `flat` has exactly the model's leaves."""
  want = {
    path: tuple(leaf.shape)
    for path, leaf in _flat(convert._expected_shapes(model, channels)).items()
  }
  missing = sorted("/".join(p) for p in want.keys() - flat.keys())
  extra = sorted("/".join(p) for p in flat.keys() - want.keys())
  wrong = sorted(
    f"{'/'.join(p)} has shape {flat[p].shape}, the model's is {want[p]}"
    for p in want.keys() & flat.keys()
    if flat[p].shape != want[p]
  )
  if missing or extra or wrong:
    raise ValueError(
      f"params do not fit {type(model).__name__}: missing {missing}, "
      f"unexpected {extra}, wrong shapes {wrong}"
    )


def to_hf(
  model: nn.Module, params: Any
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """An encoder as an HF data2vec state dict and `config.json` dict.

  Args:
    model: an `AudioEncoder`, `VisionEncoder` or `TextEncoder` (for a
      pretraining `Data2Vec` model pass its `encoder` and
      `params["encoder"]`).
    params: its `params` collection (any arrays, on any device); a
      `{"params": ...}` variables dict is unwrapped.

  Returns:
    `(state_dict, config)`: HF key -> float32 numpy array in the PyTorch
    layout, as HF's bare model's `state_dict()` names it (no pooler), and
    the config dict (`model_type`, `architectures` and every field that
    `convert.*_config_from_hf` reads). `convert.from_hf(state_dict,
    config)` rebuilds the encoder; see the module docstring for the fields
    HF cannot hold.

  Raises:
    ValueError: for another module, a configuration HF cannot express, or
      params whose leaves or shapes do not fit `model`.

  References:
    data2vec spec §8 (HF layouts).
  """
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  flat = {path: np.asarray(leaf) for path, leaf in _flat(params).items()}
  channels = 3
  if isinstance(model, AudioEncoder):
    config, key_fn = audio_config_to_hf(model), _audio_keys(model)
  elif isinstance(model, VisionEncoder):
    kernel = flat.get(("patch_embed", "kernel"))
    channels = kernel.shape[2] if kernel is not None and kernel.ndim == 4 else 3
    config = vision_config_to_hf(model, channels)
    key_fn = convert._vision_key
  elif isinstance(model, TextEncoder):
    config, key_fn = text_config_to_hf(model), convert._text_key
  else:
    raise ValueError(
      f"to_hf exports AudioEncoder, VisionEncoder or TextEncoder, not "
      f"{type(model).__name__}"
    )
  _check_params(flat, model, channels)
  state = {key_fn(path): _to_torch(value, path) for path, value in flat.items()}
  if isinstance(model, TextEncoder) and model.type_vocab_size == 0:
    # What HF's converter stores for fairseq's models: a row that adds 0.
    zeros = np.zeros((1, model.hidden), np.float32)
    state["embeddings.token_type_embeddings.weight"] = zeros
  return state, config


def _fsync(path: pathlib.Path) -> None:
  """Flushes a file or folder to disk (folders only where the OS can)."""
  flags = os.O_RDONLY
  if path.is_dir():
    flags |= getattr(os, "O_DIRECTORY", 0)
  try:
    fd = os.open(path, flags)
  except OSError:  # e.g. folders on Windows
    return
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def save_hf_checkpoint(
  folder: str | os.PathLike, model: nn.Module, params: Any
) -> pathlib.Path:
  """Writes an encoder as an HF checkpoint folder, atomically.

  The folder holds `config.json` and `model.safetensors` (float32, metadata
  `{"format": "pt"}` as transformers expects) and loads with
  `convert.load_hf_checkpoint` or HF's `Data2Vec*Model.from_pretrained`
  (which initialises the pooler it adds, if any). Both files are written
  into a hidden sibling folder that is renamed to `folder` once complete.

  Args:
    folder: the checkpoint folder to create (it may exist if empty).
    model: an `AudioEncoder`, `VisionEncoder` or `TextEncoder`.
    params: its `params` collection.

  Returns:
    The folder.

  Raises:
    FileExistsError: if `folder` exists and is not an empty folder.
    ValueError: as `to_hf`.
  """
  folder = pathlib.Path(folder)
  if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
    raise FileExistsError(
      f"{folder} exists and is not empty; remove it or pick another folder"
    )
  state, config = to_hf(model, params)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = folder.parent / f".{folder.name}.tmp-{secrets.token_hex(4)}"
  tmp.mkdir()
  try:
    safetensors.numpy.save_file(
      state, tmp / WEIGHTS_NAME, metadata={"format": "pt"}
    )
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (tmp / CONFIG_NAME).write_text(text)
    for path in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME, tmp):
      _fsync(path)
    if folder.exists():
      folder.rmdir()  # empty (checked above); rename needs the name free
    os.rename(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _fsync(folder.parent)
  return folder
