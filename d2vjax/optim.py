"""Optimisers and learning-rate schedules for data2vec pretraining.

data2vec trains its three modalities with two different optimiser recipes
(spec §5):

======== ============================== ======= ========================= ====
modality update rule                    peak lr schedule                  clip
======== ============================== ======= ========================= ====
audio    fairseq Adam (0.9, 0.98) 1e-6, 5e-4    tri-stage 3/90/7 %,       none
         wd 0.01 on every parameter             from and to 0.01 * peak
text     fairseq Adam (0.9, 0.98) 1e-6, 2e-4    10k linear warm-up from   5.0
         wd 0.01 on every parameter             0, cosine to 0
vision   torch AdamW (0.9, 0.999) 1e-8, 2e-3    10/800 of training linear 3.0
         wd 0.05 on matrices only               warm-up, cosine to 1e-5
======== ============================== ======= ========================= ====

Both rules decay weights *decoupled*: ``p <- p - lr * wd * p`` next to the
Adam step, which is what ``optax.add_decayed_weights`` placed between the
Adam scaling and the learning-rate scaling computes. fairseq's Adam differs
from optax's in where ε goes (on the uncorrected ``sqrt(v)``), so it has its
own transform here, :func:`scale_by_fairseq_adam`.

Steps are counted in optimizer updates from 0: the k-th update (k >= 1) uses
``schedule(k - 1)``, as the schedule state of optax counts. This equals the
references, which set the learning rate from the number of updates done so
far (fairseq ``lr_step_update(num_updates)``, data2vec_vision
``lr_schedule_values[it]``).

:func:`make_optimizer` returns an :class:`Optimizer` holding the optax
transform and its schedule; the transform is wrapped in
``optax.inject_hyperparams``, so the learning rate of the last update can be
read from the optimizer state with :func:`current_learning_rate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2vjax import tree_util

Array = jax.Array
PyTree = Any


# ---------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------


def tri_stage_schedule(
  peak_lr: float,
  total_steps: int,
  *,
  phase_ratio: Sequence[float] = (0.03, 0.9, 0.07),
  init_lr_scale: float = 0.01,
  final_lr_scale: float = 0.01,
) -> optax.Schedule:
  """fairseq's tri-stage schedule: linear warm-up, hold, exponential decay.

  With ``W, H, D = int(total_steps * r)`` for the three ratios ``r`` (Python
  ``int`` truncation, as fairseq computes them):

  * ``step < W``: ``init + (peak - init) * step / W`` with
    ``init = init_lr_scale * peak``;
  * ``W <= step < W + H``: ``peak``;
  * ``W + H <= step <= W + H + D``: ``peak * exp(-f * (step - W - H))`` with
    ``f = -ln(final_lr_scale) / D``, reaching ``final_lr_scale * peak`` at
    the end of the decay;
  * afterwards: ``final_lr_scale * peak``.

  With ``D == 0`` (fairseq would divide by zero) the decay stage is the
  single step ``W + H`` at ``peak``.

  Args:
    peak_lr: learning rate of the hold stage.
    total_steps: number of optimizer updates the phases are fractions of.
    phase_ratio: fractions of ``total_steps`` for warm-up, hold and decay;
      must sum to 1.
    init_lr_scale: warm-up start as a fraction of ``peak_lr``.
    final_lr_scale: decay end (and the value afterwards) as a fraction of
      ``peak_lr``; must be positive.

  Returns:
    A jittable schedule from update count to learning rate (float32).

  References:
    Baevski et al., "data2vec", 2022, section 4.2 (speech setup); fairseq
    ``fairseq/optim/lr_scheduler/tri_stage_lr_scheduler.py`` (data2vec spec
    §5); Park et al., "SpecAugment", 2019 (the schedule's origin).
  """
  if len(phase_ratio) != 3 or abs(sum(phase_ratio) - 1.0) > 1e-6:
    raise ValueError(
      f"phase_ratio must be 3 numbers summing to 1: {phase_ratio}"
    )
  if final_lr_scale <= 0:
    raise ValueError(f"final_lr_scale must be positive, got {final_lr_scale}")
  warmup, hold, decay = (int(total_steps * r) for r in phase_ratio)
  init_lr = init_lr_scale * peak_lr
  final_lr = final_lr_scale * peak_lr
  rate = (peak_lr - init_lr) / warmup if warmup else 0.0
  factor = -math.log(final_lr_scale) / decay if decay else 0.0
  decay_start = warmup + hold

  def schedule(step: Array | int) -> Array:
    step = jnp.asarray(step, jnp.float32)
    warm = init_lr + rate * step
    decayed = peak_lr * jnp.exp(-factor * (step - decay_start))
    lr = jnp.where(step <= decay_start + decay, decayed, final_lr)
    lr = jnp.where(step < decay_start, peak_lr, lr)
    return jnp.where(step < warmup, warm, lr).astype(jnp.float32)

  return schedule


def warmup_cosine_schedule(
  peak_lr: float,
  total_steps: int,
  warmup_steps: int,
  *,
  init_lr: float = 0.0,
  end_lr: float = 0.0,
  linspace_warmup: bool = False,
) -> optax.Schedule:
  """Linear warm-up, then a half cosine down to ``end_lr`` at ``total_steps``.

  * ``step < W``: ``init + (peak - init) * step / W``;
  * ``W <= step``: ``end + (peak - end) / 2 * (1 + cos(pi * t / (T - W)))``
    with ``t = min(step - W, T - W)``, so ``end_lr`` from ``total_steps`` on.

  This is fairseq's ``cosine`` scheduler with one period and no shrinking
  (text), and ``optax.warmup_cosine_decay_schedule(init, peak, W, T, end)``
  up to rounding. It is written out here so that ``end_lr`` is exact (optax
  goes through ``alpha = end / peak``) and to offer BEiT's warm-up variant:
  data2vec_vision builds the warm-up with ``numpy.linspace(init, peak, W)``,
  which includes the end point, so it rises by ``(peak - init) / (W - 1)``
  per step and reaches ``peak`` one step early (``linspace_warmup=True``).

  Args:
    peak_lr: learning rate at the end of the warm-up.
    total_steps: number of optimizer updates; the cosine ends here.
    warmup_steps: length ``W`` of the linear warm-up (0 for none).
    init_lr: learning rate at step 0.
    end_lr: learning rate at and after ``total_steps``.
    linspace_warmup: use BEiT/data2vec_vision's end-point-inclusive warm-up.

  Returns:
    A jittable schedule from update count to learning rate (float32).

  References:
    Baevski et al., "data2vec", 2022, sections 4.1 and 4.3; fairseq
    ``cosine_lr_scheduler.py`` and data2vec_vision ``utils.cosine_scheduler``
    (data2vec spec §5, §4b.5); Loshchilov & Hutter, "SGDR", 2017.
  """
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(
      f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, "
      f"{total_steps}"
    )
  if linspace_warmup:
    denom = max(warmup_steps - 1, 1)
  else:
    denom = max(warmup_steps, 1)
  slope = (peak_lr - init_lr) / denom
  cosine_steps = max(total_steps - warmup_steps, 1)

  def schedule(step: Array | int) -> Array:
    step = jnp.asarray(step, jnp.float32)
    warm = init_lr + slope * step
    t = jnp.clip(step - warmup_steps, 0, cosine_steps)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * t / cosine_steps))
    decayed = end_lr + (peak_lr - end_lr) * cosine
    return jnp.where(step < warmup_steps, warm, decayed).astype(jnp.float32)

  return schedule


def polynomial_warmup_schedule(
  peak_lr: float,
  total_steps: int,
  warmup_steps: int,
  *,
  end_lr: float = 0.0,
  power: float = 1.0,
) -> optax.Schedule:
  """Linear warm-up from 0, then polynomial decay to ``end_lr``.

  fairseq's ``polynomial_decay`` scheduler (RoBERTa/GLUE fine-tuning):

  * ``step <= W``: ``peak * step / W``;
  * ``W < step < T``: ``end + (peak - end) * (1 - (step - W) / (T - W))**p``;
  * ``step >= T``: ``end_lr``.

  Args:
    peak_lr: learning rate at the end of the warm-up.
    total_steps: update ``T`` at which ``end_lr`` is reached.
    warmup_steps: length ``W`` of the warm-up (0 for none); for GLUE 6 % of
      ``total_steps``.
    end_lr: final learning rate.
    power: exponent ``p`` of the decay (1 = linear).

  Returns:
    A jittable schedule from update count to learning rate (float32).

  References:
    Liu et al., "RoBERTa", 2019, appendix C; fairseq
    ``polynomial_decay_schedule.py`` (data2vec spec §6.3).
  """
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(
      f"need 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}"
    )
  decay_steps = total_steps - warmup_steps

  def schedule(step: Array | int) -> Array:
    step = jnp.asarray(step, jnp.float32)
    warm = peak_lr * step / max(warmup_steps, 1)
    remaining = jnp.clip(1.0 - (step - warmup_steps) / decay_steps, 0.0, 1.0)
    decayed = end_lr + (peak_lr - end_lr) * remaining**power
    lr = jnp.where(step >= total_steps, end_lr, decayed)
    if warmup_steps > 0:
      lr = jnp.where(step <= warmup_steps, warm, lr)
    return lr.astype(jnp.float32)

  return schedule


# ---------------------------------------------------------------------------
# fairseq Adam.
# ---------------------------------------------------------------------------


class ScaleByFairseqAdamState(NamedTuple):
  """State of :func:`scale_by_fairseq_adam`.

  Attributes:
    count: int32 scalar, number of updates done.
    mu: float32 first-moment estimates, shaped like the parameters.
    nu: float32 second-moment estimates, shaped like the parameters.
  """

  count: Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_fairseq_adam(
  b1: float = 0.9, b2: float = 0.98, eps: float = 1e-6
) -> optax.GradientTransformation:
  """Adam's update direction as fairseq's ``Adam`` computes it.

  At update ``t`` (from 1) with ``m, v`` the usual biased moment estimates
  the output is ``sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)``: ε is
  added to the *uncorrected* ``sqrt(v)``. ``optax.scale_by_adam`` instead
  adds ε to ``sqrt(v / (1 - b2**t))``, i.e. it uses an effective ε larger by
  ``1 / sqrt(1 - b2**t)``; the two agree once ``b2**t`` is negligible. The
  moments and the arithmetic are float32 (fairseq keeps fp32 master weights
  and optimizer state under fp16 training); the output has the gradients'
  dtype. Chain with ``optax.add_decayed_weights`` and
  ``optax.scale_by_learning_rate`` for fairseq's full step.

  Args:
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to ``sqrt(v)`` in the denominator.

  Returns:
    An ``optax.GradientTransformation`` with :class:`ScaleByFairseqAdamState`.

  References:
    Kingma & Ba, "Adam", 2015, algorithm 1; fairseq
    ``fairseq/optim/adam.py`` (data2vec spec §5).
  """

  def init_fn(params: optax.Params) -> ScaleByFairseqAdamState:
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    return ScaleByFairseqAdamState(
      count=jnp.zeros((), jnp.int32),
      mu=jax.tree.map(zeros, params),
      nu=jax.tree.map(zeros, params),
    )

  def update_fn(
    updates: optax.Updates,
    state: ScaleByFairseqAdamState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, ScaleByFairseqAdamState]:
    del params
    grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), updates)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    count = optax.safe_int32_increment(state.count)
    t = count.astype(jnp.float32)
    step_size = jnp.sqrt(1 - jnp.float32(b2) ** t) / (1 - jnp.float32(b1) ** t)
    new_updates = jax.tree.map(
      lambda m, v, g: (step_size * m / (jnp.sqrt(v) + eps)).astype(
        jnp.result_type(g)
      ),
      mu,
      nu,
      updates,
    )
    return new_updates, ScaleByFairseqAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------
# Weight-decay masks.
# ---------------------------------------------------------------------------


def _is_float(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    dtype = np.result_type(leaf)
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def decay_all(params: PyTree) -> PyTree:
  """Weight-decay mask of fairseq data2vec v1: every parameter is decayed.

  fairseq v1 puts all parameters in one group, so LayerNorm gains and
  biases, conv biases and the audio ``mask_emb`` are decayed too. Only
  non-float leaves (which are not trained) get ``False``.

  Args:
    params: a parameter pytree (arrays or ``jax.ShapeDtypeStruct``).

  Returns:
    A pytree of bools with the structure of ``params``, for
    ``optax.add_decayed_weights(mask=...)`` or ``optax.masked``.

  References:
    fairseq ``fairseq/optim/adam.py`` with a single param group (data2vec
    spec §5, §10).
  """
  return jax.tree.map(_is_float, params)


def decay_matrices_only(
  params: PyTree,
  *,
  exclude_names: Sequence[str] = ("cls_token", "pos_embed"),
) -> PyTree:
  """Weight-decay mask of data2vec_vision: no decay on vectors and biases.

  A leaf is decayed unless it has at most one dimension (LayerNorm scales
  and biases, layer-scale γ), its name is ``bias``, or its name is in
  ``exclude_names``, mirroring BEiT's ``get_parameter_groups`` with the
  model's ``no_weight_decay()`` set ``{cls_token, pos_embed}``. Note that the
  ``mask_token`` (shape (1, 1, D)) and the ``relative_position_bias_table``
  are matrices and *are* decayed, as in the reference. (``pos_embed`` is
  absent from data2vec models, which use relative positions only.)

  Args:
    params: a parameter pytree (arrays or ``jax.ShapeDtypeStruct``); leaf
      names are the last key of each path (Flax: ``kernel``, ``bias``,
      ``scale``, ``embedding``, ``cls_token``, ...).
    exclude_names: leaf names that are never decayed.

  Returns:
    A pytree of bools with the structure of ``params``.

  References:
    Bao et al., "BEiT", 2021; data2vec_vision ``optim_factory.py``
    ``get_parameter_groups`` (data2vec spec §4b.5, §10).
  """
  excluded = set(exclude_names)

  def decayed(path: tuple[Any, ...], leaf: Any) -> bool:
    name = tree_util.path_name(path[-1:])  # the leaf's own name
    return (
      _is_float(leaf)
      and len(np.shape(leaf)) > 1
      and name != "bias"
      and name not in excluded
    )

  return jax.tree_util.tree_map_with_path(decayed, params)


# ---------------------------------------------------------------------------
# Per-modality optimisers.
# ---------------------------------------------------------------------------


class Optimizer(NamedTuple):
  """An optax transform together with its learning-rate schedule.

  Attributes:
    tx: the transform (`make_optimizer` wraps it in
      ``optax.inject_hyperparams``); use it as any optax transform
      (``tx.init(params)``, ``tx.update(g, s, params)``; ``params`` are
      required for the weight decay).
    schedule: the learning rate as a function of the update count (the
      k-th update uses ``schedule(k - 1)``), e.g. for logging.
  """

  tx: optax.GradientTransformation
  schedule: optax.Schedule


class _Recipe(NamedTuple):
  peak_lr: float
  weight_decay: float
  clip_norm: float | None


_RECIPES = {
  "audio": _Recipe(peak_lr=5e-4, weight_decay=0.01, clip_norm=None),
  "text": _Recipe(peak_lr=2e-4, weight_decay=0.01, clip_norm=5.0),
  "vision": _Recipe(peak_lr=2e-3, weight_decay=0.05, clip_norm=3.0),
}


def make_optimizer(
  modality: str,
  *,
  total_steps: int,
  peak_lr: float | None = None,
  warmup_steps: int | None = None,
  weight_decay: float | None = None,
  clip_norm: float | None = None,
) -> Optimizer:
  """The data2vec Base pretraining optimiser of one modality (spec §5).

  The chain is ``clip_by_global_norm`` (on the raw gradients; omitted when
  the clip norm is None or 0, fairseq's "no clipping"), the Adam direction,
  ``add_decayed_weights(weight_decay, mask)``, ``scale_by_learning_rate``,
  so one update is ``p <- p - lr * (adam + wd * p)`` as in torch AdamW and
  fairseq Adam.

  * ``audio``: fairseq Adam (0.9, 0.98, 1e-6), wd 0.01 on all parameters,
    :func:`tri_stage_schedule` with phases (0.03, 0.9, 0.07) from and to
    0.01 * peak, peak 5e-4, no clipping. ``warmup_steps`` is ignored (the
    phases are fractions of ``total_steps``).
  * ``text``: fairseq Adam (0.9, 0.98, 1e-6), wd 0.01 on all parameters,
    peak 2e-4, :func:`warmup_cosine_schedule` from 0 to 0, clip 5.0. The
    reference warms up for 10k of 1M updates; by default the warm-up is
    ``min(10000, total_steps // 10)`` so that short runs still decay.
  * ``vision``: AdamW (0.9, 0.999, 1e-8; torch/optax ε placement, float32
    first moment), wd 0.05 with :func:`decay_matrices_only`, peak 2e-3,
    :func:`warmup_cosine_schedule` from 0 to 1e-5 with BEiT's linspace
    warm-up, clip 3.0. The default warm-up is 10 of 800 epochs,
    ``total_steps * 10 // 800``.

  Gradient clipping uses optax's ``g * c / |g|`` when ``|g| > c``; fairseq
  and torch divide by ``|g| + 1e-6``, a relative difference of ~1e-6/c.

  Args:
    modality: ``"audio"``, ``"text"`` or ``"vision"``.
    total_steps: number of optimizer updates of the run.
    peak_lr: overrides the modality's peak learning rate.
    warmup_steps: overrides the warm-up length (text, vision).
    weight_decay: overrides the decoupled weight-decay coefficient.
    clip_norm: overrides the global-norm clipping threshold (0 disables).

  Returns:
    An :class:`Optimizer` ``(tx, schedule)``; after an update,
    :func:`current_learning_rate` of the state is the learning rate used.

  References:
    Baevski et al., "data2vec", 2022, section 4; data2vec spec §5 and
    §4b.5 (fairseq ``adam.py``, data2vec_vision ``run_cyclical.py``).
  """
  if modality not in _RECIPES:
    raise ValueError(f"unknown modality {modality!r}; use one of {_RECIPES}")
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  recipe = _RECIPES[modality]
  lr = recipe.peak_lr if peak_lr is None else peak_lr
  wd = recipe.weight_decay if weight_decay is None else weight_decay
  clip = recipe.clip_norm if clip_norm is None else clip_norm

  mask: Callable[[PyTree], PyTree]
  if modality == "audio":
    schedule = tri_stage_schedule(lr, total_steps)
    adam = scale_by_fairseq_adam(0.9, 0.98, 1e-6)
    mask = decay_all
  elif modality == "text":
    if warmup_steps is None:
      warmup_steps = min(10_000, total_steps // 10)
    schedule = warmup_cosine_schedule(lr, total_steps, warmup_steps)
    adam = scale_by_fairseq_adam(0.9, 0.98, 1e-6)
    mask = decay_all
  else:
    if warmup_steps is None:
      warmup_steps = total_steps * 10 // 800
    schedule = warmup_cosine_schedule(
      lr, total_steps, warmup_steps, end_lr=1e-5, linspace_warmup=True
    )
    adam = optax.scale_by_adam(0.9, 0.999, 1e-8, mu_dtype=jnp.float32)
    mask = decay_matrices_only

  def chain(learning_rate: Array) -> optax.GradientTransformation:
    parts = []
    if clip:
      parts.append(optax.clip_by_global_norm(clip))
    parts.append(adam)
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask=mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)

  tx = optax.inject_hyperparams(chain, hyperparam_dtype=jnp.float32)(
    learning_rate=schedule
  )
  return Optimizer(tx=tx, schedule=schedule)


def current_learning_rate(opt_state: Any) -> Array:
  """The learning rate of the last update of a :func:`make_optimizer` state.

  Args:
    opt_state: the state of ``make_optimizer(...).tx``.

  Returns:
    A float32 scalar: ``schedule(k - 1)`` after k updates (``schedule(0)``
    right after ``init``).
  """
  return opt_state.hyperparams["learning_rate"]
