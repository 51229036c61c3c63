"""HuggingFace weights for the data2vec audio front end (`SpeechFrontEnd`).

`front_end_config_from_hf` reads an HF `Data2VecAudio` or `Wav2Vec2` config
into `SpeechFrontEnd` keyword arguments; `front_end_params_from_hf` maps the
HF state dict onto the parameter tree listed in `d2vjax.speech` (conv
kernels transposed (2, 1, 0), Dense kernels transposed, weight-normed
positional convolutions kept as `weight_g`/`weight_v`). `d2vjax.convert`
uses both for whole audio models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from d2vjax import speech


def front_end_config_from_hf(hf_config: Mapping[str, Any]) -> dict:
  """`SpeechFrontEnd` constructor kwargs from an HF config dict.

  Data2VecAudio (`model_type` "data2vec-audio"): `num_conv_pos_embeddings`
  is the number of *stacked* positional conv layers and
  `conv_pos_kernel_size` their kernel. Wav2Vec2 configs (no
  `conv_pos_kernel_size`) use one weight-normed conv whose kernel is
  `num_conv_pos_embeddings`.

  Args:
    hf_config: e.g. `json.loads(config_json)` or `config.to_dict()`.

  Returns:
    Keyword arguments for `SpeechFrontEnd`.
  """
  c = hf_config
  # Data2VecAudioConfig has no `feat_extract_norm` (always LayerNorm blocks);
  # Wav2Vec2Config has it ("group" for Base, "layer" for Large-LV60).
  feat_norm = c.get("feat_extract_norm", "layer")
  norm = {"layer": "layer_norm", "group": "group_norm"}
  if feat_norm not in norm:
    raise ValueError(f"unknown feat_extract_norm {feat_norm!r}")
  kwargs = {
    "conv_layers": tuple(
      (int(d), int(k), int(s))
      for d, k, s in zip(
        c["conv_dim"], c["conv_kernel"], c["conv_stride"], strict=True
      )
    ),
    "extractor_mode": norm[feat_norm],
    "conv_bias": bool(c["conv_bias"]),
    "hidden": int(c["hidden_size"]),
    "layer_norm_eps": float(c["layer_norm_eps"]),
    "pos_groups": int(c["num_conv_pos_embedding_groups"]),
    "dropout_rate": float(c.get("feat_proj_dropout", 0.0)),
  }
  if "conv_pos_kernel_size" in c:
    kwargs.update(
      pos_kernel_size=int(c["conv_pos_kernel_size"]),
      pos_depth=int(c["num_conv_pos_embeddings"]),
      pos_kind="stacked",
    )
  else:
    kwargs.update(
      pos_kernel_size=int(c["num_conv_pos_embeddings"]),
      pos_depth=1,
      pos_kind="single",
    )
  return kwargs


def _infer_config(sd: Mapping[str, Any], prefix: str) -> dict:
  """Constructor kwargs read off the state dict's own shapes.

  Strides do not change parameter shapes, so 1 stands in for them: the result
  only serves to build the expected parameter shapes.
  """
  has = lambda key: prefix + key in sd
  shape = lambda key: np.shape(_get(sd, prefix, key))
  fe, pos = "feature_extractor.conv_layers", "encoder.pos_conv_embed"
  layers = []
  while has(f"{fe}.{len(layers)}.conv.weight"):
    out, _, k = shape(f"{fe}.{len(layers)}.conv.weight")
    layers.append((out, k, 1))
  if not layers:
    shape(f"{fe}.0.conv.weight")  # raises the KeyError
  hidden = shape("feature_projection.projection.weight")[0]
  group_norm = len(layers) > 1 and not has(f"{fe}.1.layer_norm.weight")
  kwargs = {
    "conv_layers": tuple(layers),
    "extractor_mode": "group_norm" if group_norm else "layer_norm",
    "conv_bias": has(f"{fe}.0.conv.bias"),
    "hidden": hidden,
    "pos_kind": "stacked" if has(f"{pos}.layers.0.conv.weight") else "single",
  }
  if kwargs["pos_kind"] == "stacked":
    depth = 0
    while has(f"{pos}.layers.{depth}.conv.weight"):
      depth += 1
    _, per_group, k = shape(f"{pos}.layers.0.conv.weight")
  else:
    depth = 1
    _, per_group, k = shape(_weight_norm_keys(sd, prefix)[2])
  kwargs.update(pos_depth=depth, pos_kernel_size=k)
  kwargs["pos_groups"] = max(1, hidden // per_group)
  return kwargs


def _weight_norm_keys(sd, prefix) -> tuple[str, str, str]:
  """(bias, g, v) HF keys of the single pos conv, for either weight-norm API
  (`weight_g`/`weight_v`, or torch parametrizations `original0`/`original1`).
  """
  base = "encoder.pos_conv_embed.conv"
  if prefix + f"{base}.parametrizations.weight.original0" in sd:
    w = f"{base}.parametrizations.weight"
    return f"{base}.bias", f"{w}.original0", f"{w}.original1"
  return f"{base}.bias", f"{base}.weight_g", f"{base}.weight_v"


def _get(sd: Mapping[str, Any], prefix: str, key: str) -> np.ndarray:
  if prefix + key not in sd:
    raise KeyError(f"HF state dict has no {prefix + key!r}")
  return np.asarray(sd[prefix + key])


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  # torch (out, in/groups, k) -> Flax (k, in/groups, out)
  return w.transpose(2, 1, 0)


def _key_map(kwargs: dict, sd: Mapping[str, Any], prefix: str) -> list:
  """[(Flax path, HF key, layout change)] for a `SpeechFrontEnd` config."""
  same = lambda w: w
  fe, fp = "feature_extractor.conv_layers", "feature_projection"
  rows = [("mask_embedding", "masked_spec_embed", same)]
  for j in range(len(kwargs["conv_layers"])):
    path = f"feature_extractor/conv_layers_{j}"
    rows.append((f"{path}/conv/kernel", f"{fe}.{j}.conv.weight", _conv_kernel))
    if kwargs["conv_bias"]:
      rows.append((f"{path}/conv/bias", f"{fe}.{j}.conv.bias", same))
    if kwargs["extractor_mode"] == "layer_norm" or j == 0:
      # HF names the block-0 GroupNorm `layer_norm` too.
      norm = f"{path}/{kwargs['extractor_mode']}"
      rows.append((f"{norm}/scale", f"{fe}.{j}.layer_norm.weight", same))
      rows.append((f"{norm}/bias", f"{fe}.{j}.layer_norm.bias", same))
  rows += [
    (f"{fp}/layer_norm/scale", f"{fp}.layer_norm.weight", same),
    (f"{fp}/layer_norm/bias", f"{fp}.layer_norm.bias", same),
    (f"{fp}/projection/kernel", f"{fp}.projection.weight", np.transpose),
    (f"{fp}/projection/bias", f"{fp}.projection.bias", same),
  ]
  if kwargs["pos_kind"] == "stacked":
    for i in range(kwargs["pos_depth"]):
      hf = f"encoder.pos_conv_embed.layers.{i}.conv"
      path = f"pos_conv/layers_{i}/conv"
      rows.append((f"{path}/kernel", f"{hf}.weight", _conv_kernel))
      rows.append((f"{path}/bias", f"{hf}.bias", same))
  else:
    bias, g, v = _weight_norm_keys(sd, prefix)
    rows += [
      ("pos_conv/conv/bias", bias, same),
      ("pos_conv/conv/weight_g", g, lambda w: w.reshape(-1)),  # (1, 1, k)
      ("pos_conv/conv/weight_v", v, _conv_kernel),
    ]
  return rows


def front_end_params_from_hf(
  state_dict: Mapping[str, np.ndarray],
  prefix: str = "",
  *,
  config: Mapping[str, Any] | None = None,
) -> dict:
  """HF `Data2VecAudioModel` (or `Wav2Vec2Model`) weights to `SpeechFrontEnd`.

  Shapes are checked against `jax.eval_shape` of `SpeechFrontEnd.init` with
  the kwargs from `front_end_config_from_hf(config)`; without `config` the
  kwargs are read off the state dict's own shapes, which still catches
  inconsistent tensors (e.g. a conv whose input channels do not match the
  previous layer). Keys of other modules (the transformer) are ignored.
  Array dtypes are kept (float64 in, float64 out).

  Args:
    state_dict: HF key -> array (e.g. `{k: v.numpy() for k, v in
      model.state_dict().items()}`).
    prefix: prepended to every HF key (e.g. "data2vec_audio." for the CTC
      head model).
    config: optional HF config dict defining the expected shapes.

  Returns:
    The `params` collection of `SpeechFrontEnd` (wrap as
    `{"params": tree}` for `apply`).

  Raises:
    KeyError: naming an HF key that the model needs and the dict lacks.
    ValueError: naming the HF key, the Flax path and both shapes when a
      tensor does not have the expected shape.
  """
  if config is None:
    kwargs = _infer_config(state_dict, prefix)
  else:
    kwargs = front_end_config_from_hf(config)
  model = speech.SpeechFrontEnd(**kwargs)
  wave = jax.ShapeDtypeStruct(
    (1, speech.receptive_field(kwargs["conv_layers"])), float
  )
  expected = jax.eval_shape(lambda w: model.init(jax.random.key(0), w), wave)
  expected = traverse_util.flatten_dict(expected["params"], sep="/")

  flat = {}
  for path, key, layout in _key_map(kwargs, state_dict, prefix):
    flat[path] = layout(_get(state_dict, prefix, key))
    want = tuple(expected[path].shape)
    if flat[path].shape != want:
      raise ValueError(
        f"{prefix + key} -> {path}: got shape {flat[path].shape} (Flax "
        f"layout), expected {want}"
      )
  # Every parameter of the model must have come from some HF key.
  assert set(flat) == set(expected), set(flat) ^ set(expected)
  return traverse_util.unflatten_dict(flat, sep="/")
