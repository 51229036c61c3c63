"""Starting fine-tuning from pretrained data2vec weights.

Every fine-tuning model here keeps its backbone under `encoder` in the
backbone's own layout, so initialising from pretraining is a subtree swap:

    encoder = encoder_params_from_pretrained(pretrain_state.params)
    params = model.init(rngs, example, train=False)["params"]
    params = with_pretrained_encoder(params, encoder)

For HuggingFace checkpoints `d2vjax.convert.from_hf` (or
`load_hf_checkpoint`) already returns a bare encoder tree; pass it as
`encoder_params`. The EMA teacher (`PretrainState.teacher`) is not used,
as fairseq drops `_ema` when it loads a data2vec checkpoint for
fine-tuning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import flax
import jax.numpy as jnp
from flax import traverse_util

PyTree = Any


def encoder_params_from_pretrained(
  pretrain_params: Mapping[str, Any],
) -> PyTree:
  """The student encoder of a `d2vjax.pretrain.Data2Vec` parameter tree.

  The regression `head` (fairseq `final_proj` / `regression_head`, DV
  `lm_head`) is dropped: fine-tuning replaces it with a task head.

  Args:
    pretrain_params: `{"encoder": ..., "head": ...}` (e.g.
      `PretrainState.params`).

  Returns:
    `pretrain_params["encoder"]`.

  Raises:
    KeyError: if there is no `encoder` subtree.

  References:
    data2vec spec §3.1 (heads dropped for fine-tuning), §6.
  """
  if "encoder" not in pretrain_params:
    raise KeyError(
      f"no 'encoder' subtree among {sorted(pretrain_params)}; expected the "
      "parameters of d2vjax.pretrain.Data2Vec"
    )
  return pretrain_params["encoder"]


def with_pretrained_encoder(
  params: Mapping[str, Any], encoder_params: Mapping[str, Any]
) -> dict:
  """Replaces `params["encoder"]` by pretrained values, checking the match.

  Pretrained entries that the fine-tuning encoder lacks are skipped with a
  warning: expected for the vision pretraining `norm` (mean pooling uses
  `fc_norm` instead) and for `mask_token` when the fine-tuning encoder has
  none. Every fine-tuning encoder entry must be present with the same
  shape; values are cast to the fine-tuning parameters' dtypes.

  Args:
    params: freshly initialised fine-tuning parameters with an `encoder`
      subtree (`CTCModel`, `ImageClassifier`, `SentenceClassifier`).
    encoder_params: the pretrained encoder tree.

  Returns:
    A new dict; the head parameters are kept as initialised.

  Raises:
    KeyError: naming fine-tuning encoder entries the pretrained tree lacks.
    ValueError: naming an entry whose shapes differ.
  """
  target = traverse_util.flatten_dict(
    flax.core.unfreeze(params["encoder"]), sep="/"
  )
  source = traverse_util.flatten_dict(
    flax.core.unfreeze(encoder_params), sep="/"
  )
  missing = sorted(set(target) - set(source))
  if missing:
    raise KeyError(f"pretrained encoder lacks {', '.join(missing)}")
  extra = sorted(set(source) - set(target))
  if extra:
    warnings.warn(
      f"pretrained entries not used by the fine-tuning encoder: "
      f"{', '.join(extra)}",
      stacklevel=2,
    )
  loaded = {}
  for key, init in target.items():
    value = source[key]
    if tuple(value.shape) != tuple(init.shape):
      raise ValueError(
        f"encoder/{key}: pretrained shape {tuple(value.shape)}, fine-tuning "
        f"model expects {tuple(init.shape)}"
      )
    loaded[key] = jnp.asarray(value, dtype=init.dtype)
  new = dict(flax.core.unfreeze(params))
  new["encoder"] = traverse_util.unflatten_dict(loaded, sep="/")
  return new
