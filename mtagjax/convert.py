"""Official MTAG PyTorch checkpoints to Flax variables.

The official `state_dict` (as numpy arrays, keys as the official code names
them) maps onto `mtagjax.model.MTAG` as follows:

| official key                          | Flax path                        |
|---------------------------------------|----------------------------------|
| `dgnn.{m}_fc.0.weight` / `.bias`      | `proj_{m}/dense_0/dense/kernel`ᵀ |
| `dgnn.{m}_fc.2.*` (use_ffn=1 only)    | `proj_{m}/dense_1/dense/...`     |
| `dgnn.gats.{2l}.lin_l` (= `lin_r`)    | `mtgat_{l}/kernel` (type, in, out) |
| `dgnn.gats.{2l}.att_l` / `att_r`      | `mtgat_{l}/att_src` / `att_dst`  |
| `dgnn.gats.{2l}.bias`                 | `mtgat_{l}/bias`                 |
| `finalW.{0,2,4}.weight` / `.bias`     | `head_{0,1,2}/dense/kernel`ᵀ     |
| `dgnn.{m}_pe.pe` (buffer)             | `constants/pe` `[max_len, D]`    |
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import ml_collections
import numpy as np

from mtagjax import graph as graph_lib
from mtagjax.config import MOSI_MODALITIES, default_config

_GAT = re.compile(r"dgnn\.gats\.(\d+)\.(lin_l|lin_r|att_l|att_r|bias)$")


def _dense(state, prefix):
  return {
    "dense": {
      "kernel": np.asarray(state[f"{prefix}.weight"]).T,
      "bias": np.asarray(state[f"{prefix}.bias"]),
    }
  }


def _require(state, key):
  if key not in state:
    raise KeyError(
      f"official state_dict has no {key!r}; is this an MTAG checkpoint "
      "(model with use_conv1d=0, modalities vision/text/audio)?"
    )
  return np.asarray(state[key])


def from_official_state_dict(
  state_dict: Mapping[str, np.ndarray],
  modalities: tuple[str, ...] = MOSI_MODALITIES,
) -> dict:
  """Converts an official MTAG `state_dict` to Flax variables.

  Args:
    state_dict: parameter name -> numpy array (e.g.
      `{k: v.numpy() for k, v in torch_model.state_dict().items()}`).
    modalities: the modality names, in the official node order.

  Returns:
    `{"params": ..., "constants": {"pe": [max_len, D]}}`, ready for
    `model.apply` and `mtagjax.predict`. Array dtypes are kept (float64 in,
    float64 out), so an x64 check is exact.

  Raises:
    KeyError: a required key is missing.
    ValueError: `lin_l` and `lin_r` differ (they are one shared parameter
      in the official code), or the positional-encoding buffers differ.
  """
  params = {}
  for m in modalities:
    _require(state_dict, f"dgnn.{m}_fc.0.weight")
    proj = {"dense_0": _dense(state_dict, f"dgnn.{m}_fc.0")}
    if f"dgnn.{m}_fc.2.weight" in state_dict:
      proj["dense_1"] = _dense(state_dict, f"dgnn.{m}_fc.2")
    params[f"proj_{m}"] = proj

  gat_ids = sorted(
    {int(mt.group(1)) for k in state_dict if (mt := _GAT.match(k))}
  )
  if not gat_ids:
    raise KeyError("official state_dict has no dgnn.gats.* entries")
  for layer, idx in enumerate(gat_ids):
    pre = f"dgnn.gats.{idx}"
    lin_l = _require(state_dict, f"{pre}.lin_l")
    if f"{pre}.lin_r" in state_dict and not np.array_equal(
      lin_l, state_dict[f"{pre}.lin_r"]
    ):
      raise ValueError(
        f"{pre}.lin_l and {pre}.lin_r differ; the official layer shares one "
        "parameter between them"
      )
    params[f"mtgat_{layer}"] = {
      "kernel": lin_l,
      "att_src": _require(state_dict, f"{pre}.att_l")[0],
      "att_dst": _require(state_dict, f"{pre}.att_r")[0],
      "bias": _require(state_dict, f"{pre}.bias"),
    }
  for i, idx in enumerate((0, 2, 4)):
    _require(state_dict, f"finalW.{idx}.weight")
    params[f"head_{i}"] = _dense(state_dict, f"finalW.{idx}")

  variables = {"params": params}
  tables = [
    np.asarray(state_dict[f"dgnn.{m}_pe.pe"])
    for m in modalities
    if f"dgnn.{m}_pe.pe" in state_dict
  ]
  if tables:
    if any(not np.array_equal(t, tables[0]) for t in tables[1:]):
      raise ValueError("the per-modality positional-encoding buffers differ")
    variables["constants"] = {"pe": tables[0][:, 0, :]}
  return variables


def config_from_state_dict(
  state_dict: Mapping[str, np.ndarray],
  base: ml_collections.ConfigDict | None = None,
  modalities: tuple[str, ...] = MOSI_MODALITIES,
) -> ml_collections.ConfigDict:
  """A model config whose sizes are read off an official `state_dict`.

  Feature sizes, hidden size, heads, layers, output size, projection kind and
  the positional-encoding length come from the arrays; everything else from
  `base` (default: `mtagjax.config.default_config()`).
  """
  c = default_config() if base is None else base.copy_and_resolve_references()
  c.modalities = tuple(modalities)
  c.feature_dims = tuple(
    int(_require(state_dict, f"dgnn.{m}_fc.0.weight").shape[1])
    for m in modalities
  )
  c.projection = (
    "ffn" if f"dgnn.{modalities[0]}_fc.2.weight" in state_dict else "linear"
  )
  att = _require(state_dict, "dgnn.gats.0.att_l")
  c.heads = int(att.shape[2])
  c.hidden = int(att.shape[2] * att.shape[3])
  c.num_layers = sum(1 for k in state_dict if _GAT.match(k) and "att_l" in k)
  num_types = int(att.shape[1])
  schemes = [
    s
    for s in graph_lib.EDGE_TYPE_SCHEMES
    if graph_lib.num_edge_types(len(modalities), s) == num_types
  ]
  if not schemes:
    raise ValueError(f"no edge-type scheme has {num_types} types")
  c.edge_types = schemes[0]
  c.output_dim = int(_require(state_dict, "finalW.4.weight").shape[0])
  pe_key = f"dgnn.{modalities[0]}_pe.pe"
  if pe_key in state_dict:
    c.max_positions = int(np.asarray(state_dict[pe_key]).shape[0])
  return c
