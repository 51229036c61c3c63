"""HuggingFace data2vec checkpoints to `d2vjax` models and Flax params.

`from_hf(state_dict, hf_config)` builds the model that matches
`hf_config["model_type"]` and converts the weights of HF's
`Data2VecAudioModel`, `Data2VecVisionModel` or `Data2VecTextModel` (spec §8).
State dicts of the task models (`…ForCTC`, `…ForImageClassification`,
`…ForMaskedLM`, …) work too: their encoder keys carry a `data2vec_audio.` /
`data2vec_vision.` / `data2vec_text.` prefix, which is detected.

Every Flax parameter of the model is looked up by translating its path to
the HF key (PyTorch Linear weights are transposed, Conv2d weights go from
`(out, in, kh, kw)` to `(kh, kw, in, out)`), and its shape is checked against
`jax.eval_shape` of `model.init`. Keys of heads the encoder does not have
(pooler, classifier, LM/CTC heads, segmentation heads) and non-persistent
buffers of older checkpoints (`position_ids`, `relative_position_index`) are
ignored on purpose; any other unused key is reported in a warning.

`load_hf_checkpoint(folder)` reads `config.json` and `model.safetensors`
(with the `safetensors` library, no torch needed; sharded
`model.safetensors.index.json` too) or `pytorch_model.bin` (needs torch).
The way back, encoders to HF checkpoints, is `d2vjax.hf_export`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from d2vjax import speech, speech_hf, tree_util
from d2vjax.audio import AudioEncoder
from d2vjax.text import TextEncoder
from d2vjax.vision import VisionEncoder

PREFIXES = {
  "data2vec-audio": "data2vec_audio.",
  "data2vec-vision": "data2vec_vision.",
  "data2vec-text": "data2vec_text.",
}

# Keys that belong to heads or buffers, not to the encoder (relative to the
# encoder prefix, or absolute for head keys of the task models).
_IGNORED = re.compile(
  r"^(pooler\.|classifier\.|lm_head\.|projector\.|qa_outputs\.|"
  r"decode_head\.|auxiliary_head\.|fpn\d\.|"
  r"embeddings\.position_ids$|embeddings\.token_type_ids$|"
  r".*relative_position_index$)"
)

_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}

Path = tuple[str, ...]


def _require_gelu(cfg: Mapping[str, Any], *keys: str) -> None:
  for key in keys:
    if key in cfg and cfg[key] != "gelu":
      raise NotImplementedError(
        f"{key}={cfg[key]!r}: only the exact (erf) 'gelu' is implemented"
      )


def _pair(v: Any) -> tuple[int, int]:
  return (int(v), int(v)) if np.ndim(v) == 0 else tuple(int(x) for x in v)


def _transformer_config(cfg: Mapping[str, Any]) -> dict[str, int]:
  """The Transformer sizes, named alike in the three HF configs."""
  return {
    "hidden": int(cfg["hidden_size"]),
    "num_layers": int(cfg["num_hidden_layers"]),
    "heads": int(cfg["num_attention_heads"]),
    "mlp_dim": int(cfg["intermediate_size"]),
  }


def _bert_norm_and_dropout(
  cfg: Mapping[str, Any], dropout: float
) -> dict[str, float]:
  """LayerNorm eps and dropouts under HF's BERT-style names (vision, text).

  `dropout` is the HF config class's default for both dropout rates (0 for
  vision, 0.1 for text); the eps default is 1e-12 for both.
  """
  return {
    "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
    "dropout_rate": float(cfg.get("hidden_dropout_prob", dropout)),
    "attention_dropout_rate": float(
      cfg.get("attention_probs_dropout_prob", dropout)
    ),
  }


def vision_config_from_hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`VisionEncoder` kwargs from an HF `Data2VecVisionConfig` dict.

  Args:
    cfg: the parsed `config.json`.

  Returns:
    Keyword arguments for `d2vjax.vision.VisionEncoder`.

  Raises:
    NotImplementedError: for per-block relative-position tables
      (`use_relative_position_bias`, fine-tuned checkpoints) or a non-GELU
      activation.
  """
  _require_gelu(cfg, "hidden_act")
  if cfg.get("use_relative_position_bias", False):
    raise NotImplementedError(
      "per-block relative position bias (use_relative_position_bias=True) "
      "is not implemented; only the shared table of data2vec pretraining"
    )
  scale = float(cfg.get("layer_scale_init_value", 0.1))
  return {
    "image_size": _pair(cfg.get("image_size", 224)),
    "patch_size": int(cfg.get("patch_size", 16)),
    **_transformer_config(cfg),
    **_bert_norm_and_dropout(cfg, dropout=0.0),
    "drop_path_rate": float(cfg.get("drop_path_rate", 0.1)),
    "layer_scale_init": scale if scale > 0 else None,
    "use_mask_token": bool(cfg.get("use_mask_token", False)),
    "use_abs_pos_emb": bool(cfg.get("use_absolute_position_embeddings", False)),
    "use_rel_pos_bias": bool(
      cfg.get("use_shared_relative_position_bias", False)
    ),
    # With mean pooling HF's final norm lives in the pooler, not here.
    "use_final_norm": not bool(cfg.get("use_mean_pooling", True)),
  }


def text_config_from_hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`TextEncoder` kwargs from an HF `Data2VecTextConfig` dict.

  HF does not zero pad-token embeddings (fairseq does), so the converted
  model uses `zero_pad_embeddings=False` to reproduce HF exactly; outputs at
  real tokens are the same either way.

  Args:
    cfg: the parsed `config.json`.

  Returns:
    Keyword arguments for `d2vjax.text.TextEncoder`.
  """
  _require_gelu(cfg, "hidden_act")
  if cfg.get("position_embedding_type", "absolute") != "absolute":
    raise NotImplementedError(
      f"position_embedding_type={cfg['position_embedding_type']!r}"
    )
  return {
    "vocab_size": int(cfg["vocab_size"]),
    **_transformer_config(cfg),
    "max_positions": int(cfg["max_position_embeddings"]),
    "pad_id": int(cfg.get("pad_token_id", 1)),
    "type_vocab_size": int(cfg.get("type_vocab_size", 0)),
    **_bert_norm_and_dropout(cfg, dropout=0.1),
    "activation_dropout_rate": 0.0,
    "zero_pad_embeddings": False,
  }


def audio_config_from_hf(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """`AudioEncoder` kwargs from an HF `Data2VecAudioConfig` dict.

  Args:
    cfg: the parsed `config.json`.

  Returns:
    Keyword arguments for `d2vjax.audio.AudioEncoder`.
  """
  _require_gelu(cfg, "hidden_act", "feat_extract_activation")
  if cfg.get("add_adapter", False):
    raise NotImplementedError("add_adapter=True (HF adapter layers)")
  # Data2VecAudioConfig has no `feat_extract_norm`: its CNN always uses
  # LayerNorm in every block.
  front = speech_hf.front_end_config_from_hf(
    {"feat_extract_norm": "layer", **cfg}
  )
  return {
    "conv_layers": front["conv_layers"],
    "extractor_mode": front["extractor_mode"],
    "conv_bias": front["conv_bias"],
    "pos_kernel_size": front["pos_kernel_size"],
    "pos_groups": front["pos_groups"],
    "pos_depth": front["pos_depth"],
    "pos_kind": front["pos_kind"],
    "feature_dropout_rate": front.get("dropout_rate", 0.0),
    **_transformer_config(cfg),
    "layer_norm_eps": float(cfg.get("layer_norm_eps", 1e-5)),
    "dropout_rate": float(cfg.get("hidden_dropout", 0.1)),
    "attention_dropout_rate": float(cfg.get("attention_dropout", 0.1)),
    "activation_dropout_rate": float(cfg.get("activation_dropout", 0.0)),
    "layerdrop": float(cfg.get("layerdrop", 0.0)),
  }


# --------------------------------------------------------------------------
# Flax path -> HF key, per modality


def _leaf(name: str) -> str:
  return _LEAF.get(name, name)


def _layer(path: Path) -> tuple[int, Path]:
  return int(path[1].removeprefix("layers_")), path[2:]


def _layer_key(path: Path, layers: str, table: Mapping[Path, str]) -> str:
  """`encoder/layers_{i}/<module>/<leaf>` -> `{layers}.{i}.<HF name>.<leaf>`."""
  i, rest = _layer(path)
  return f"{layers}.{i}.{table[rest[:-1]]}.{_leaf(rest[-1])}"


def _bert_layer(attention: str, norms: dict[Path, str]) -> dict[Path, str]:
  """HF's BERT-style layer names (text, vision): Flax path -> HF module."""
  return {
    ("attention", "q_proj"): f"attention.{attention}.query",
    ("attention", "k_proj"): f"attention.{attention}.key",
    ("attention", "v_proj"): f"attention.{attention}.value",
    ("attention", "out_proj"): "attention.output.dense",
    ("fc1",): "intermediate.dense",
    ("fc2",): "output.dense",
    **norms,
  }


_TEXT_LAYER = _bert_layer(
  "self",
  {
    ("attn_layer_norm",): "attention.output.LayerNorm",
    ("final_layer_norm",): "output.LayerNorm",
  },
)

_VISION_LAYER = _bert_layer(
  "attention",
  {("norm_before",): "layernorm_before", ("norm_after",): "layernorm_after"},
)

_AUDIO_LAYER = {
  ("attention", "q_proj"): "attention.q_proj",
  ("attention", "k_proj"): "attention.k_proj",
  ("attention", "v_proj"): "attention.v_proj",
  ("attention", "out_proj"): "attention.out_proj",
  ("attn_layer_norm",): "layer_norm",
  ("fc1",): "feed_forward.intermediate_dense",
  ("fc2",): "feed_forward.output_dense",
  ("final_layer_norm",): "final_layer_norm",
}


def _text_key(path: Path) -> str:
  if path[0] == "encoder":
    return _layer_key(path, "encoder.layer", _TEXT_LAYER)
  if path[0] == "embedding_layer_norm":
    return f"embeddings.LayerNorm.{_leaf(path[1])}"
  return f"embeddings.{path[0]}.weight"  # the three embedding tables


def _vision_key(path: Path) -> str:
  if path[0] == "encoder":
    if path[1] == "relative_position_bias_table":
      return "encoder.relative_position_bias.relative_position_bias_table"
    i, rest = _layer(path)
    if rest[0] in ("gamma_1", "gamma_2"):
      return f"encoder.layer.{i}.lambda_{rest[0][-1]}"
    return _layer_key(path, "encoder.layer", _VISION_LAYER)
  if path[0] == "patch_embed":
    return f"embeddings.patch_embeddings.projection.{_leaf(path[1])}"
  if path[0] == "norm":
    return f"layernorm.{_leaf(path[1])}"
  return {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
  }[path[0]]


def _audio_key(path: Path) -> str:
  if path[0] == "encoder":
    return _layer_key(path, "encoder.layers", _AUDIO_LAYER)
  if path[0] == "encoder_layer_norm":
    return f"encoder.layer_norm.{_leaf(path[1])}"
  raise KeyError(path)  # front_end/... is converted by d2vjax.speech


_AUDIO_FRONT_END = re.compile(
  r"^(masked_spec_embed$|feature_extractor\.|feature_projection\.|"
  r"encoder\.pos_conv_embed\.)"
)


def _to_flax(value: np.ndarray, path: Path) -> np.ndarray:
  """PyTorch layout -> Flax layout, float32 for floating arrays."""
  if path[-1] == "kernel" and value.ndim == 2:  # Linear (out, in)
    value = value.T
  elif path[-1] == "kernel" and value.ndim == 4:  # Conv2d (out, in, kh, kw)
    value = value.transpose(2, 3, 1, 0)
  if np.issubdtype(value.dtype, np.floating) or value.dtype.kind == "V":
    value = value.astype(np.float32)
  return np.ascontiguousarray(value)


def _expected_shapes(model: nn.Module, channels: int) -> dict:
  """Parameter shapes of `model` via `jax.eval_shape` (nothing computed)."""
  if isinstance(model, VisionEncoder):
    h, w = _pair(model.image_size)
    dummy = jax.ShapeDtypeStruct((1, h, w, channels), jnp.float32)
  elif isinstance(model, TextEncoder):
    t = max(1, min(8, model.max_positions - model.pad_id - 1))
    dummy = jax.ShapeDtypeStruct((1, t), jnp.int32)
  else:
    samples = speech.receptive_field(model.conv_layers)
    dummy = jax.ShapeDtypeStruct((1, samples), jnp.float32)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  return jax.eval_shape(lambda x: model.init(rngs, x), dummy)["params"]


def _detect_prefix(state_dict: Mapping[str, Any], model_type: str) -> str:
  prefix = PREFIXES[model_type]
  return prefix if any(k.startswith(prefix) for k in state_dict) else ""


def from_hf(
  state_dict: Mapping[str, np.ndarray], hf_config: Mapping[str, Any]
) -> tuple[nn.Module, dict]:
  """Builds the `d2vjax` model for an HF data2vec checkpoint and its params.

  Args:
    state_dict: HF parameter name -> array (numpy, or anything
      `np.asarray` accepts), as in `model.state_dict()`; an optional
      `data2vec_{audio,vision,text}.` prefix (task models) is detected.
    hf_config: the parsed `config.json`; `model_type` selects the modality.

  Returns:
    `(model, params)`; run with `model.apply({"params": params}, inputs,
    mask=None, train=False)` (plus `attention_mask=` for audio and text).
    Vision inputs are NHWC.

  Raises:
    KeyError: naming a checkpoint key the model needs but the dict lacks.
    ValueError: naming the parameter and both shapes on a shape mismatch,
      or for an unknown `model_type`.

  References:
    data2vec spec §8 (HF layouts).
  """
  model_type = hf_config.get("model_type")
  builders: dict[str, tuple[Callable, type, Callable]] = {
    "data2vec-audio": (audio_config_from_hf, AudioEncoder, _audio_key),
    "data2vec-vision": (vision_config_from_hf, VisionEncoder, _vision_key),
    "data2vec-text": (text_config_from_hf, TextEncoder, _text_key),
  }
  if model_type not in builders:
    raise ValueError(
      f"model_type {model_type!r} is not one of {sorted(builders)}"
    )
  config_fn, model_cls, key_fn = builders[model_type]
  model = model_cls(**config_fn(hf_config))
  prefix = _detect_prefix(state_dict, model_type)
  expected = _expected_shapes(model, int(hf_config.get("num_channels", 3)))

  used: set[str] = set()
  front_end = None
  if model_type == "data2vec-audio":
    front_config = {"feat_extract_norm": "layer", **hf_config}
    front_end = speech_hf.front_end_params_from_hf(
      state_dict, prefix, config=front_config
    )
    used.update(
      k
      for k in state_dict
      if k.startswith(prefix) and _AUDIO_FRONT_END.match(k[len(prefix) :])
    )

  params: dict = {}
  flat = jax.tree_util.tree_flatten_with_path(expected)[0]
  for key_path, want in flat:
    path = tree_util.path_names(key_path)
    if path[0] == "front_end":
      # Already in the Flax layout (and shape-checked by d2vjax.speech).
      hf_key, raw = "/".join(path), front_end
      for name in path[1:]:
        raw = raw[name]
      raw = np.asarray(raw)
      value = raw.astype(np.float32)
    else:
      hf_key = prefix + key_fn(path)
      if hf_key not in state_dict:
        raise KeyError(
          f"checkpoint has no {hf_key!r} (needed for Flax parameter "
          f"{'/'.join(path)})"
        )
      raw = np.asarray(state_dict[hf_key])
      used.add(hf_key)
      value = _to_flax(raw, path)
    if value.shape != tuple(want.shape):
      raise ValueError(
        f"shape mismatch for {hf_key!r} (Flax parameter {'/'.join(path)}): "
        f"checkpoint {raw.shape} gives {value.shape} in the Flax layout, "
        f"the model expects {tuple(want.shape)}"
      )
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value

  leftover = sorted(
    k
    for k in state_dict
    if k not in used
    and not _IGNORED.match(k[len(prefix) :] if k.startswith(prefix) else k)
  )
  if leftover:
    warnings.warn(
      f"{len(leftover)} checkpoint keys were not used: {', '.join(leftover)}",
      stacklevel=2,
    )
  return model, params


# --------------------------------------------------------------------------
# Reading checkpoints from disk

# safetensors dtype names -> numpy. `safetensors.numpy` maps bfloat16 in
# recent versions only, so the names are mapped here for every version.
_SAFETENSORS_DTYPES = {
  "F64": "<f8",
  "F32": "<f4",
  "F16": "<f2",
  "C64": "<c8",
  "I64": "<i8",
  "I32": "<i4",
  "I16": "<i2",
  "I8": "i1",
  "U64": "<u8",
  "U32": "<u4",
  "U16": "<u2",
  "U8": "u1",
  "BOOL": "?",
}


def _numpy_dtype(name: str) -> np.dtype:
  if name in _SAFETENSORS_DTYPES:
    return np.dtype(_SAFETENSORS_DTYPES[name])
  import ml_dtypes  # a dependency of jax; numpy itself has no bfloat16

  extra = {
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
  }
  if name not in extra:
    raise ValueError(f"unsupported safetensors dtype {name!r}")
  return np.dtype(extra[name])


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `.safetensors` file into numpy arrays (no torch needed).

  The `safetensors` library parses and checks the file (header, offsets,
  sizes); only the dtype names are mapped here, so that bfloat16 and float8
  tensors load with every supported `safetensors` version.

  Args:
    path: the file.

  Returns:
    name -> array (owning its memory, in the stored dtype; bfloat16 via
    `ml_dtypes`).

  Raises:
    FileNotFoundError: if there is no such file.
    ValueError: naming the file, if it is not a valid safetensors file
      (a bad or truncated header, offsets that do not fit) or holds a
      dtype numpy cannot represent.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    tensors = safetensors.deserialize(data)
  except safetensors.SafetensorError as e:
    raise ValueError(f"{path}: not a valid safetensors file: {e}") from e
  out = {}
  for name, info in tensors:
    try:
      dtype = _numpy_dtype(info["dtype"])
    except ValueError as e:
      raise ValueError(f"{path}: tensor {name!r}: {e}") from e
    value = np.frombuffer(info["data"], dtype).reshape(info["shape"])
    # Recent versions hand out a fresh bytearray per tensor (writable, no
    # copy needed); older ones immutable bytes.
    out[name] = value if value.flags.writeable else value.copy()
  return out


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"{path} is a PyTorch pickle and reading it needs torch, which is not "
      "installed; install torch, or convert the checkpoint to "
      "model.safetensors"
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  # numpy has no bfloat16: widen every floating tensor to float32.
  return {
    k: (v.float() if v.is_floating_point() else v).numpy()
    for k, v in state.items()
  }


def load_hf_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
  """Loads a local HF data2vec checkpoint folder.

  Args:
    path: a folder with `config.json` and one of `model.safetensors`,
      `model.safetensors.index.json` (+ shards) or `pytorch_model.bin`.

  Returns:
    `(model, params)` as from `from_hf`.

  Raises:
    FileNotFoundError: if the folder lacks a config or weights.
    ImportError: for a `pytorch_model.bin` when torch is missing.
  """
  path = os.fspath(path)
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} not found")
  with open(config_path) as f:
    config = json.load(f)
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  torch_bin = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(single):
    state = read_safetensors(single)
  elif os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for shard in shards:
      state.update(read_safetensors(os.path.join(path, shard)))
  elif os.path.exists(torch_bin):
    state = _read_torch_bin(torch_bin)
  else:
    raise FileNotFoundError(
      f"{path} has none of model.safetensors, model.safetensors.index.json, "
      "pytorch_model.bin"
    )
  return from_hf(state, config)
