"""The data2vec EMA teacher: decay schedule and an optax-style update.

The teacher's weights are an exponential moving average of the student's,
``teacher <- d * teacher + (1 - d) * student``, with the decay ``d`` annealed
linearly from ``d_0`` to ``d_end`` over the first ``N`` optimizer updates and
held at ``d_end`` afterwards. Some parameters are not averaged but shared:
the teacher always uses the student's current value for them.

What the teacher is, per modality (spec §1.2):

======== =============================== ====================== ==============
modality EMA'd                           shared (copied)        not in teacher
======== =============================== ====================== ==============
audio    ``encoder.layer_norm`` and all  the positional conv    CNN feature
         transformer layers              stack (``pos_conv``)   extractor,
                                                                feature LN,
                                                                projection,
                                                                mask embedding,
                                                                ``final_proj``
text     the transformer layers          token and position     the regression
                                         embeddings, the        head
                                         embedding LayerNorm
vision   everything (patch embedding,    nothing                nothing
         CLS/mask tokens, relative
         position bias, blocks, final
         norm, head)
======== =============================== ====================== ==============

The audio teacher consumes the *student's* projected CNN features, so the
feature extractor needs no teacher copy. Build the ``shared`` predicate with
:func:`shared_by_prefix`, e.g. ``shared_by_prefix(["encoder/pos_conv"])``
for audio. Integer leaves (index tables) are never averaged: data2vec_vision
truncates an averaged int64 ``relative_position_index`` and corrupts it at
d = 0.9999 (spec quirk 1.5.4); here they are copied from the student.

Timing: call :meth:`TeacherEMA.update` once per optimizer update, right after
it, with the new student parameters ``params_k``; the k-th call (k counted
from 1) uses ``d(k)``. fairseq instead steps the EMA at the start of the next
training step, with the same ``d(k)`` and ``params_k`` (and copies the initial
student at update 0), so every forward sees the same teacher. We deliberately
do *not* reproduce fairseq v1's stepping once per micro-batch under gradient
accumulation (an effective decay ``d**k``, quirk 1.5.1); with accumulation,
still call ``update`` once per optimizer update.

References:
  Baevski et al., "data2vec: A General Framework for Self-supervised Learning
  in Speech, Vision and Language", ICML 2022 (arXiv 2202.03555), method section,
  "Teacher parameterization". fairseq ``fairseq/modules/ema_module.py`` and
  ``examples/data2vec/models/data2vec_audio.py`` (schedule, skip keys).
  Spec ``data2vec.md`` §1.2, §1.3, §1.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from d2vjax import tree_util

__all__ = [
  "EmaState",
  "TeacherEMA",
  "ema_decay_schedule",
  "shared_by_prefix",
  "teacher_ema",
]

SharedFn = Callable[[tuple[str, ...], Any], bool]


def ema_decay_schedule(
  start: float, end: float, anneal_steps: int
) -> optax.Schedule:
  """The data2vec decay schedule: linear from ``start`` to ``end``, then flat.

  ``d(u) = end - (end - start) * (1 - u / N)`` for ``u < N``, else ``end``.

  Args:
    start: Decay at update 0 (``ema_decay``; 0.999 for audio and text).
    end: Final decay (``ema_end_decay``; 0.9999 for audio and text).
    anneal_steps: N (``ema_anneal_end_step``; 30 000 audio, 300 000 text).
      With ``start == end`` or ``anneal_steps == 0`` the schedule is the
      constant ``end`` (data2vec_vision's released recipe: 0.9998).

  Returns:
    An optax schedule mapping a (possibly traced, possibly batched) integer
    count to the decay, in the default float dtype (float64 under x64).
    In float32 the spacing of representable numbers near 1 is ~6e-8, so
    neighbouring values of a long anneal may round to the same decay (e.g.
    d(0) == d(1) for N = 30 000); the reference computes in float64.

  Raises:
    ValueError: If ``anneal_steps`` is negative.

  References:
    fairseq ``data2vec_audio.py`` (``get_annealed_rate``); spec
    ``data2vec.md`` §1.3.
  """
  if anneal_steps < 0:
    raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps}")

  if start == end or anneal_steps == 0:

    def constant(count: jax.typing.ArrayLike) -> jax.Array:
      return jnp.full(jnp.shape(count), end, dtype=jnp.result_type(float))

    return constant

  span = end - start  # Python float64, rounded once when it meets the count.

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    u = jnp.asarray(count).astype(jnp.result_type(float))
    annealed = end - span * (1.0 - u / anneal_steps)
    return jnp.where(u < anneal_steps, annealed, end)

  return schedule


class EmaState(NamedTuple):
  """State of the EMA teacher.

  Attributes:
    count: int32 scalar, number of updates applied (= optimizer updates).
    teacher: The teacher parameters, same structure as the student's; float
      leaves are kept in at least float32 (fairseq's ``ema_fp32``).
    decay: float32 scalar, the decay used by the last update (``d(0)``
      after ``init``, the value fairseq would log before any step).
  """

  count: jax.Array
  teacher: Any
  decay: jax.Array


class TeacherEMA(NamedTuple):
  """An optax-style pair of pure functions for the EMA teacher.

  Attributes:
    init: ``init(student_params) -> EmaState``.
    update: ``update(student_params, state) -> EmaState``.
  """

  init: Callable[[Any], EmaState]
  update: Callable[[Any, EmaState], EmaState]


def shared_by_prefix(prefixes: Sequence[str]) -> SharedFn:
  """Returns a ``shared`` predicate that matches '/'-joined path prefixes.

  A leaf is shared when ``"/".join(path)`` starts with one of ``prefixes``.
  This is a plain string prefix: ``"encoder/pos_conv"`` also matches
  ``"encoder/pos_conv_0/kernel"``; end a prefix with '/' to match whole path
  components only.

  Args:
    prefixes: Path prefixes, e.g. ``["encoder/pos_conv"]`` (audio) or
      ``["embed_tokens", "embed_positions", "layernorm_embedding"]`` (text).

  Returns:
    A callable ``shared(path, leaf) -> bool``.

  References:
    fairseq ``data2vec_audio.py`` / ``data2vec_text.py`` (``skip_keys``);
    spec ``data2vec.md`` §1.2.
  """
  if isinstance(prefixes, str):
    # A bare string would otherwise be read as a sequence of characters.
    prefixes = (prefixes,)
  prefixes = tuple(prefixes)

  def shared(path: tuple[str, ...], leaf: Any) -> bool:
    del leaf
    return "/".join(path).startswith(prefixes)

  return shared


def _is_float(x: jax.Array) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _teacher_dtype(x: jax.Array) -> jnp.dtype:
  # bf16/fp16 students get an fp32 teacher: with d ~ 0.9999 the increment
  # (1 - d) * (student - teacher) is below half precision's resolution.
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def teacher_ema(
  decay: float | optax.Schedule,
  *,
  shared: SharedFn | None = None,
) -> TeacherEMA:
  """Creates the EMA teacher update of data2vec.

  Each update increments ``count`` to k and sets, leaf by leaf,

  * float leaves: ``teacher * d(k) + student * (1 - d(k))``, computed in the
    teacher's dtype (at least float32) in fairseq's operation order;
  * leaves with ``shared(path, leaf)`` True: the student's value;
  * non-float (integer, bool) leaves: the student's value, never averaged;

  and leaves the whole teacher unchanged when ``d(k) >= 1`` (fairseq skips
  the EMA step then; ``count`` still advances).

  Args:
    decay: A constant decay (Python float) or a schedule of the update
      count, e.g. :func:`ema_decay_schedule`. With a Python float, ``1 - d``
      is formed in float64 before it meets float32 parameters, exactly as
      PyTorch's ``add_(p, alpha=1 - d)``; with a schedule it is formed in
      the schedule's dtype.
    shared: Optional predicate ``shared(path, leaf) -> bool``; ``path`` is
      the tuple of key names (strings) of the leaf, ``leaf`` the student's
      value. See :func:`shared_by_prefix`.

  Returns:
    A :class:`TeacherEMA` of pure, jittable ``init`` and ``update``. They
    are not jitted themselves: call them inside the jitted train step.
    Eagerly, a float32 update reproduces PyTorch bit for bit; under jit XLA
    may contract the multiply-add into an FMA, a difference of one ulp.

  Example::

    ema = teacher_ema(
      ema_decay_schedule(0.999, 0.9999, 30_000),
      shared=shared_by_prefix(["encoder/pos_conv"]),
    )
    ema_state = ema.init(params["encoder"])
    ...  # in the train step, after the optimizer update:
    params = optax.apply_updates(params, updates)
    ema_state = ema.update(params["encoder"], ema_state)

  References:
    Baevski et al. 2022 ("Teacher parameterization"); fairseq
    ``ema_module.py`` (``step``: ``ema.mul_(d).add_(p, alpha=1 - d)``, skip
    keys copied) and ``fairseq_task.py`` (EMA stepped before each forward
    with ``d(u)``); spec ``data2vec.md`` §1.3 "JAX equivalent".
  """
  if callable(decay):
    schedule = decay
    const = None
  else:
    const = float(decay)
    schedule = lambda count: jnp.full(jnp.shape(count), const)

  def init(student_params: Any) -> EmaState:
    def copy(x):
      x = jnp.asarray(x)
      dtype = _teacher_dtype(x) if _is_float(x) else x.dtype
      # jnp.array copies, so the teacher never aliases a student buffer
      # (which would break buffer donation of a state holding both).
      return jnp.array(x, dtype=dtype)

    teacher = jax.tree.map(copy, student_params)
    return EmaState(
      count=jnp.zeros((), jnp.int32),
      teacher=teacher,
      decay=jnp.asarray(schedule(0), jnp.float32),
    )

  def update(student_params: Any, state: EmaState) -> EmaState:
    count = state.count + 1
    d = schedule(count)
    if const is not None and const >= 1.0:
      # Statically skipped: nothing to trace.
      return EmaState(count, state.teacher, jnp.asarray(d, jnp.float32))
    skip = None if const is not None else d >= 1.0

    def step(path, s, t):
      s = jnp.asarray(s)
      names = tree_util.path_names(path)
      if not _is_float(t) or (shared is not None and shared(names, s)):
        new = jnp.array(s, dtype=t.dtype)
      elif const is not None:
        # As torch's mul_(d).add_(p, alpha=1 - d): 1 - d is formed in
        # float64 and each factor is rounded once to the parameter dtype.
        new = t * const + s.astype(t.dtype) * (1.0 - const)
      else:
        dt = jnp.asarray(d, t.dtype)
        new = t * dt + s.astype(t.dtype) * (1 - dt)
      if skip is not None:
        new = jnp.where(skip, t, new)
      return new

    teacher = jax.tree_util.tree_map_with_path(
      step, student_params, state.teacher
    )
    return EmaState(count, teacher, jnp.asarray(d, jnp.float32))

  return TeacherEMA(init=init, update=update)
