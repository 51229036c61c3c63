"""`predict`: samples in, predictions out, for notebooks."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mtagjax import batching
from mtagjax import model as model_lib


def _as_sample(item: Any) -> batching.Sample:
  if isinstance(item, batching.Sample):
    return item
  return batching.Sample(features=list(item))


@functools.lru_cache(maxsize=16)
def _jitted_apply(config_json: str):
  # One jitted forward per model config, so repeated predict() calls (a
  # notebook loop) reuse compilations instead of tracing a new lambda.
  model = model_lib.create_model(
    ml_collections.ConfigDict(json.loads(config_json))
  )
  return jax.jit(lambda v, b: model.apply(v, b, train=False)[0])


def predict(
  params: Mapping[str, Any],
  config: ml_collections.ConfigDict,
  samples: Sequence[Any],
  *,
  batch_size: int = 32,
) -> np.ndarray:
  """Predictions for a list of samples, in eval mode.

  Args:
    params: the model's `params` tree, or its full variables
      (`{"params": ..., "constants": ...}`, e.g. from
      `mtagjax.convert.from_official_state_dict`).
    config: the model config.
    samples: each a `mtagjax.batching.Sample` or a list of per-modality
      `[length, dim]` arrays (modalities in `config.modalities` order).
    batch_size: samples per batch. With the official batch-scope pruning a
      sample's output depends on the other samples of its batch, exactly as
      in the official code; use `config.prune_scope="graph"` for
      batch-independent outputs.

  Returns:
    `[len(samples)]` predictions when `config.output_dim == 1`, else
    `[len(samples), output_dim]`.
  """
  variables = dict(params) if "params" in params else {"params": params}
  samples = [_as_sample(s) for s in samples]
  if not samples:
    raise ValueError("predict: no samples given")
  leaf = jax.tree.leaves(variables["params"])[0]
  dtype = np.float64 if np.dtype(leaf.dtype) == np.float64 else np.float32
  size = min(batch_size, len(samples))
  batcher = batching.GraphBatcher(config, batch_size=size, dtype=dtype)
  apply = _jitted_apply(config.to_json_best_effort(sort_keys=True))
  outs = []
  for start in range(0, len(samples), size):
    chunk = samples[start : start + size]
    batch = batcher(chunk)
    out = np.asarray(apply(variables, batch))[0]
    if config.empty_samples == "drop" and batch.num_graphs != len(chunk):
      raise ValueError(
        "predict: a sample with every modality empty has no prediction; "
        "remove it first"
      )
    outs.append(out[: len(chunk)])
  out = np.concatenate(outs)
  return out[:, 0] if config.output_dim == 1 else out
