"""data2vec regression losses and collapse monitors, on dense masked arrays.

The reference code gathers the masked positions (``x[mask]``, a ragged
``[N_masked, C]`` array) before the loss. Here predictions and targets stay
dense ``[B, T, C]`` with a bool ``[B, T]`` mask, so shapes are static under
``jit``; unmasked positions are *selected away* (not multiplied by zero)
before any arithmetic, so whatever they hold changes neither the value nor
the gradient.

Reductions, matching each modality's reference (spec §3.2):

* ``"per_token"`` (fairseq audio and text): the criterion returns
  ``sum_i sum_c l(e_ic) * scale`` and the trainer divides gradients by the
  number of masked tokens, so the effective objective is that sum over
  ``N_masked``. Audio: squared error, ``scale = 1/sqrt(C)``; text:
  smooth-L1 with beta 4, ``scale = 1``.
* ``"per_element"`` (data2vec_vision): ``F.smooth_l1_loss`` with its default
  ``reduction='mean'``, i.e. the mean over all ``N_masked * C`` elements,
  beta 2, no extra scale.

The heads that produce the predictions live with the models.

References:
  Baevski et al., "data2vec: A General Framework for Self-supervised Learning
  in Speech, Vision and Language", ICML 2022 (arXiv 2202.03555), method
  section, "Objective" (Smooth L1 regression). fairseq
  ``examples/data2vec/models/data2vec_audio.py`` / ``data2vec_text.py`` and
  ``fairseq/criterions/model_criterion.py``; ``data2vec_vision``
  ``beit/engine_for_cyclical.py``. Spec ``data2vec.md`` §3.2-3.3.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
  "LOSS_RECIPES",
  "modality_loss",
  "regression_loss",
  "regression_loss_sum",
  "variance_monitor",
]

# fairseq's audio ``loss_beta: 0`` selects the squared error (not L1); it is
# spelled as kind "l2" here. ``scale=None`` means the reduction's reference
# default (see ``regression_loss``).
LOSS_RECIPES: dict[str, dict[str, Any]] = {
  "audio": dict(kind="l2", scale=None, reduction="per_token"),
  "text": dict(kind="smooth_l1", beta=4.0, scale=1.0, reduction="per_token"),
  "vision": dict(kind="smooth_l1", beta=2.0, reduction="per_element"),
}

_KINDS = ("l2", "smooth_l1")
_REDUCTIONS = ("per_token", "per_element")


def _elementwise(e: jax.Array, kind: str, beta: float) -> jax.Array:
  if kind == "l2":
    return jnp.square(e)
  if kind != "smooth_l1":
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
  if beta < 0:
    raise ValueError(f"beta must be >= 0, got {beta}")
  abs_e = jnp.abs(e)
  if beta == 0:
    # PyTorch's smooth_l1 with beta 0 is L1; branching statically avoids a
    # 0/0 in the unused quadratic branch, whose gradient would be NaN.
    return abs_e
  return jnp.where(abs_e < beta, 0.5 * jnp.square(e) / beta, abs_e - 0.5 * beta)


def _masked_error(
  pred: jax.Array, target: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Returns ``pred - target`` (0 off the mask) in >= float32 and the mask."""
  pred = jnp.asarray(pred)
  target = jnp.asarray(target)
  dtype = jnp.promote_types(
    jnp.promote_types(pred.dtype, target.dtype), jnp.float32
  )
  mask = jnp.asarray(mask, bool)
  if mask.shape != pred.shape[:-1] or pred.shape != target.shape:
    raise ValueError(
      "expected pred and target [..., C] and mask [...], got "
      f"{pred.shape}, {target.shape}, {mask.shape}"
    )
  m = mask[..., None]
  # Select, don't multiply: the gradient of jnp.where w.r.t. the unselected
  # operand is exactly zero, whatever that operand holds.
  e = jnp.where(m, pred.astype(dtype), 0.0) - jnp.where(
    m, target.astype(dtype), 0.0
  )
  return e, mask


# Jitted like jax.nn's functions: an eager call then compiles one fused
# program instead of dispatching (and compiling) every primitive separately.
@functools.partial(jax.jit, static_argnames=("kind", "beta", "scale"))
def regression_loss_sum(
  pred: jax.Array,
  target: jax.Array,
  mask: jax.Array,
  *,
  kind: str,
  beta: float = 0.0,
  scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The unnormalised masked loss and its sample size, as fairseq logs them.

  Args:
    pred: Predictions ``[B, T, C]``.
    target: Targets ``[B, T, C]`` (already gradient-free).
    mask: Bool ``[B, T]``, True where the loss applies.
    kind: "l2" (``e**2``) or "smooth_l1" (``0.5 e**2 / beta`` if
      ``|e| < beta`` else ``|e| - 0.5 beta``; beta 0 gives L1).
    beta: Smooth-L1 threshold; ignored for "l2".
    scale: Multiplies the sum; None means ``1/sqrt(C)`` (fairseq's
      ``loss_scale: null``).

  Returns:
    ``(loss_sum, sample_size)``: ``sum_i sum_c l(e_ic) * scale`` over masked
    tokens (float32 at least) and the number of masked tokens (int32).

  References:
    fairseq ``data2vec_audio.py`` / ``data2vec_text.py`` (``loss.sum()``
    with ``sample_size = loss.size(0)``); spec ``data2vec.md`` §3.2.
  """
  e, mask = _masked_error(pred, target, mask)
  if scale is None:
    scale = 1.0 / math.sqrt(e.shape[-1])
  elif scale <= 0:
    raise ValueError(f"scale must be positive or None, got {scale}")
  # Off-mask errors are exactly 0 and every l(0) is 0, so summing over all
  # positions equals summing over the masked ones.
  loss_sum = jnp.sum(_elementwise(e, kind, beta)) * scale
  return loss_sum, jnp.sum(mask, dtype=jnp.int32)


@functools.partial(
  jax.jit, static_argnames=("kind", "beta", "scale", "reduction")
)
def regression_loss(
  pred: jax.Array,
  target: jax.Array,
  mask: jax.Array,
  *,
  kind: str,
  beta: float = 0.0,
  scale: float | None = None,
  reduction: str,
) -> jax.Array:
  """The data2vec regression objective over masked positions.

  Args:
    pred: Predictions ``[B, T, C]``.
    target: Targets ``[B, T, C]`` (already gradient-free).
    mask: Bool ``[B, T]``, True where the loss applies. An empty mask gives
      a loss of 0.
    kind: "l2" or "smooth_l1" (see :func:`regression_loss_sum`).
    beta: Smooth-L1 threshold; ignored for "l2".
    scale: Multiplies the per-token channel sum. None means the
      reference default of the reduction: ``1/sqrt(C)`` for "per_token"
      (fairseq ``loss_scale: null``) and 1 for "per_element"
      (data2vec_vision ``--loss_scale -1``).
    reduction: "per_token": the scaled sum divided by the number of masked
      tokens (fairseq's effective objective); "per_element": the scaled sum
      divided by the number of masked elements ``N_masked * C``.

  Returns:
    A scalar in at least float32.

  References:
    Baevski et al. 2022 ("Objective"); fairseq ``model_criterion.py`` and the
    trainer's division by ``sample_size``; ``data2vec_vision``
    ``engine_for_cyclical.py``; spec ``data2vec.md`` §3.2.
  """
  if reduction not in _REDUCTIONS:
    raise ValueError(
      f"reduction must be one of {_REDUCTIONS}, got {reduction!r}"
    )
  if scale is None and reduction == "per_element":
    scale = 1.0
  loss_sum, sample_size = regression_loss_sum(
    pred, target, mask, kind=kind, beta=beta, scale=scale
  )
  denom = sample_size.astype(loss_sum.dtype)
  if reduction == "per_element":
    denom = denom * pred.shape[-1]
  # With no masked token the sum is 0 and so is the loss (not 0/0).
  return loss_sum / jnp.maximum(denom, 1.0)


def modality_loss(
  pred: jax.Array,
  target: jax.Array,
  mask: jax.Array,
  modality: str,
  **overrides: Any,
) -> jax.Array:
  """The regression objective of a modality's released recipe.

  Args:
    pred: Predictions ``[B, T, C]``.
    target: Targets ``[B, T, C]``.
    mask: Bool ``[B, T]``, True where the loss applies.
    modality: "audio", "text" or "vision" (a key of ``LOSS_RECIPES``).
    **overrides: Keyword arguments of :func:`regression_loss` replacing
      the recipe's.

  Returns:
    A scalar in at least float32.

  Raises:
    ValueError: On an unknown modality.

  References:
    Spec ``data2vec.md`` §3.2 (per-modality table).
  """
  if modality not in LOSS_RECIPES:
    raise ValueError(
      f"modality must be one of {sorted(LOSS_RECIPES)}, got {modality!r}"
    )
  kwargs = {**LOSS_RECIPES[modality], **overrides}
  return regression_loss(pred, target, mask, **kwargs)


@jax.jit
def variance_monitor(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Collapse monitor: mean over channels of the per-channel std.

  The std of each channel is taken across the masked tokens, with the
  unbiased variance (PyTorch's ``Tensor.var`` default, also used by fairseq's
  distributed branch) and 1e-6 added inside the square root. Logged by
  fairseq as ``target_var`` (for the targets) and ``pred_var`` (for the
  predictions); a collapsing model drives it to 0.

  Args:
    x: Values ``[B, T, C]``.
    mask: Bool ``[B, T]``; the tokens to include.

  Returns:
    A gradient-free scalar in at least float32. With fewer than two masked
    tokens the variance is reported as 0 (PyTorch would give NaN).

  References:
    fairseq ``data2vec_audio.py`` (``compute_var``; training stops if
    ``target_var < 0.1`` or ``pred_var < 0.01`` after 5000 updates); spec
    ``data2vec.md`` §3.3.
  """
  x = jnp.asarray(x)
  x = jax.lax.stop_gradient(x.astype(jnp.promote_types(x.dtype, jnp.float32)))
  m = jnp.asarray(mask, bool)[..., None]
  n = jnp.sum(m, dtype=x.dtype)
  x = jnp.where(m, x, 0.0)
  mean = jnp.sum(x, axis=tuple(range(x.ndim - 1))) / jnp.maximum(n, 1.0)
  centred = jnp.where(m, x - mean, 0.0)
  var = jnp.sum(jnp.square(centred), axis=tuple(range(x.ndim - 1)))
  var = var / jnp.maximum(n - 1.0, 1.0)
  return jnp.mean(jnp.sqrt(var + 1e-6))
