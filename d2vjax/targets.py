"""data2vec regression targets built from the teacher's per-layer outputs.

The teacher (an EMA copy of the student, run on the unmasked input) exposes
one tensor ``r_l`` per block. The target is the average of the top ``K`` of
them, each normalised without learned parameters, optionally normalised again:

* audio:  ``y = mean_l IN_time(r_l)``            (K = 8)
* text:   ``y = mean_l LN_chan(r_l)``            (K = 10)
* vision: ``y = LN_chan(mean_l LN_chan(r_l))``   (K = 6)

where ``IN_time`` normalises each (sample, channel) over time and ``LN_chan``
each token over channels; both use the biased variance with ``eps`` inside the
square root, as PyTorch's ``instance_norm`` / ``layer_norm`` do. Which tensor
``r_l`` is (FFN output before the residual for audio/text, end-of-block
residual stream without the CLS token for vision) is the model's business.

Everything here is computed in at least float32 (fairseq casts each layer
result with ``.float()`` before normalising, even under fp16 training), and
the inputs are wrapped in ``jax.lax.stop_gradient``: the reference builds the
targets under ``torch.no_grad()``, so no gradient may reach the teacher.

References:
  Baevski et al., "data2vec: A General Framework for Self-supervised Learning
  in Speech, Vision and Language", ICML 2022 (arXiv 2202.03555), method
  section, "Targets". fairseq ``examples/data2vec/models/data2vec_audio.py``
  and ``data2vec_text.py`` (target construction); ``data2vec_vision``
  ``beit/engine_for_cyclical.py`` (per-layer LN, mean, final LN). Spec
  ``data2vec.md`` §2.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
  "TARGET_RECIPES",
  "build_targets",
  "instance_norm_time",
  "layer_norm_channels",
  "modality_targets",
]

# The released v1 recipes (spec §2.1-2.2). ``top_k`` counts blocks from the
# top of the encoder; the Base models have 12 blocks.
TARGET_RECIPES: dict[str, dict[str, Any]] = {
  "audio": dict(top_k=8, layer_norm="instance", final_norm="none"),
  "text": dict(top_k=10, layer_norm="layer", final_norm="none"),
  "vision": dict(top_k=6, layer_norm="layer", final_norm="layer"),
}

_NORMS = ("instance", "layer", "none")


def _as_float(x: jax.Array) -> jax.Array:
  """Casts to at least float32 (float64 stays float64) and cuts gradients."""
  x = jnp.asarray(x)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return jax.lax.stop_gradient(x.astype(dtype))


def _standardise(x: jax.Array, axis: int, eps: float) -> jax.Array:
  """``(x - mean) / sqrt(var + eps)`` along ``axis``, biased variance."""
  mean = jnp.mean(x, axis=axis, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=axis, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


# The public functions are jitted like jax.nn's: an eager call then compiles
# one fused program instead of every primitive separately.
@functools.partial(jax.jit, static_argnames=("eps",))
def instance_norm_time(
  x: jax.Array,
  *,
  padding_mask: jax.Array | None = None,
  eps: float = 1e-5,
) -> jax.Array:
  """Normalises each (sample, channel) over time, without affine parameters.

  Args:
    x: Layer outputs ``[..., T, C]`` (typically ``[B, T, C]``; extra leading
      axes such as a layer axis are allowed).
    padding_mask: Optional bool ``[B, T]`` (broadcastable against
      ``x.shape[:-1]``), True at padded frames. When given, the mean and
      variance use valid frames only and padded frames are set to 0 in the
      output. When None, all frames count, which is fairseq's behaviour
      (its audio pretraining batches are cropped, never padded).
    eps: Added to the variance inside the square root.

  Returns:
    ``(x - mean_t) / sqrt(var_t + eps)`` with the biased variance, in at
    least float32, shape of ``x``, gradient-free.

  References:
    fairseq ``data2vec_audio.py`` (``instance_norm_target_layer``:
    ``F.instance_norm`` on the (B, C, T) layout); spec ``data2vec.md`` §2.2.
    The masked-statistics variant is ours (spec §2.2 "Padding").
  """
  x = _as_float(x)
  if padding_mask is None:
    return _standardise(x, -2, eps)
  valid = jnp.logical_not(jnp.asarray(padding_mask, bool))[..., None]
  # Select rather than multiply so that inf/NaN in padded frames never
  # reaches the statistics.
  x = jnp.where(valid, x, 0.0)
  # A fully padded sample would give 0/0; its output is zeroed anyway.
  count = jnp.maximum(jnp.sum(valid, axis=-2, keepdims=True), 1).astype(x.dtype)
  mean = jnp.sum(x, axis=-2, keepdims=True) / count
  centred = jnp.where(valid, x - mean, 0.0)
  var = jnp.sum(jnp.square(centred), axis=-2, keepdims=True) / count
  return centred * jax.lax.rsqrt(var + eps)


@functools.partial(jax.jit, static_argnames=("eps",))
def layer_norm_channels(x: jax.Array, *, eps: float = 1e-5) -> jax.Array:
  """Normalises each token over channels, without affine parameters.

  Args:
    x: Layer outputs ``[..., C]``.
    eps: Added to the variance inside the square root.

  Returns:
    ``(x - mean_c) / sqrt(var_c + eps)`` with the biased variance, in at
    least float32, shape of ``x``, gradient-free.

  References:
    fairseq ``data2vec_text.py`` (``layer_norm_target_layer``:
    ``F.layer_norm`` without weight/bias); ``data2vec_vision``
    ``engine_for_cyclical.py``; spec ``data2vec.md`` §2.2.
  """
  return _standardise(_as_float(x), -1, eps)


def _normalise(
  x: jax.Array, kind: str, padding_mask: jax.Array | None, eps: float
) -> jax.Array:
  if kind == "instance":
    return instance_norm_time(x, padding_mask=padding_mask, eps=eps)
  if kind == "layer":
    return layer_norm_channels(x, eps=eps)
  return _as_float(x)


@functools.partial(
  jax.jit, static_argnames=("top_k", "layer_norm", "final_norm", "eps")
)
def build_targets(
  layer_results: Sequence[jax.Array] | jax.Array,
  *,
  top_k: int,
  layer_norm: str = "instance",
  final_norm: str = "none",
  padding_mask: jax.Array | None = None,
  eps: float = 1e-5,
) -> jax.Array:
  """Builds data2vec targets: normalise the top-K layers, average, renorm.

  Args:
    layer_results: The teacher's per-block taps, bottom to top: a sequence
      of ``[B, T, C]`` arrays or one stacked ``[L, B, T, C]`` array. Only the
      last ``top_k`` are used.
    top_k: Number of top blocks to average (K); ``1 <= top_k <= L``.
    layer_norm: Per-layer normalisation: "instance" (over time, per sample
      and channel), "layer" (over channels, per token) or "none".
    final_norm: Normalisation of the average: "none", "layer" or
      "instance".
    padding_mask: Optional bool ``[B, T]``, True at padded frames. Instance
      norms then use valid frames only, and padded frames of the result are
      set to 0 (they must be excluded from the loss anyway). None keeps
      fairseq's all-frame statistics.
    eps: Epsilon of every normalisation (1e-5 in all reference recipes).

  Returns:
    Targets ``[B, T, C]`` in at least float32, gradient-free. For vision
    drop the CLS token before (or after) calling: the data2vec_vision
    recipe regresses patch tokens only (channel norms are per token, so the
    order does not matter).

  Raises:
    ValueError: On an unknown norm name or an out-of-range ``top_k``.

  References:
    Baevski et al. 2022, method section ("Targets"); fairseq
    ``data2vec_audio.py`` / ``data2vec_text.py`` (the average is
    ``sum(layers) / K``); spec ``data2vec.md`` §2.2.
  """
  for name, value in (("layer_norm", layer_norm), ("final_norm", final_norm)):
    if value not in _NORMS:
      raise ValueError(f"{name} must be one of {_NORMS}, got {value!r}")
  num_layers = len(layer_results)
  if not 1 <= top_k <= num_layers:
    raise ValueError(f"top_k must be in [1, {num_layers}], got {top_k}")
  # Stacking lets one normalisation call cover all K layers: the norms act on
  # the last two axes and the padding mask broadcasts over the layer axis.
  stacked = jnp.stack([jnp.asarray(r) for r in layer_results[-top_k:]])
  per_layer = _normalise(stacked, layer_norm, padding_mask, eps)
  y = jnp.sum(per_layer, axis=0) / top_k
  y = _normalise(y, final_norm, padding_mask, eps)
  if padding_mask is not None:
    y = jnp.where(jnp.asarray(padding_mask, bool)[..., None], 0.0, y)
  return jax.lax.stop_gradient(y)


def modality_targets(
  layer_results: Sequence[jax.Array] | jax.Array,
  modality: str,
  **overrides: Any,
) -> jax.Array:
  """Builds targets with a modality's released recipe.

  Args:
    layer_results: As in :func:`build_targets`.
    modality: "audio", "text" or "vision" (a key of ``TARGET_RECIPES``).
    **overrides: Keyword arguments of :func:`build_targets` that replace
      the recipe's (e.g. ``top_k`` for a shallow test model,
      ``padding_mask``, ``eps``).

  Returns:
    Targets ``[B, T, C]``, as :func:`build_targets`.

  Raises:
    ValueError: On an unknown modality.

  References:
    Spec ``data2vec.md`` §2.1-2.2 (K and norms of each released recipe).
  """
  if modality not in TARGET_RECIPES:
    raise ValueError(
      f"modality must be one of {sorted(TARGET_RECIPES)}, got {modality!r}"
    )
  kwargs = {**TARGET_RECIPES[modality], **overrides}
  return build_targets(layer_results, **kwargs)
