"""Tests for d2vjax.ema: the decay schedule and the EMA teacher update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d2vjax.ema import (
  EmaState,
  ema_decay_schedule,
  shared_by_prefix,
  teacher_ema,
)
from tests import helpers


@pytest.fixture(scope="module")
def fx():
  return dict(np.load(helpers.D2V_FIXTURES / "ema_small.npz"))


def _tree(fx, prefix, dtype):
  """Unflattens the fixture's '/'-joined keys under ``prefix`` into dicts."""
  out = {}
  for key, value in fx.items():
    if not key.startswith(prefix + "/"):
      continue
    *parents, leaf = key[len(prefix) + 1 :].split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    # Cast on the host: a device-side cast would compile per leaf shape.
    node[leaf] = jnp.asarray(np.asarray(value, dtype))
  return out


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): v for path, v in leaves}


def _fixture_state(fx, dtype):
  """The fixture's student and an EmaState holding its teacher at count 9."""
  student = _tree(fx, "student", dtype)
  # count 9 = nine updates done; the next update is the 10th and uses d(10),
  # the fixture's step_decay (index convention of spec §1.3).
  state = EmaState(
    count=jnp.asarray(int(fx["step_u"]) - 1, jnp.int32),
    teacher=_tree(fx, "teacher", dtype),
    decay=jnp.zeros((), jnp.float32),
  )
  return student, state


def _fixture_step(fx, dtype):
  sched = ema_decay_schedule(float(fx["d0"]), float(fx["d_end"]), int(fx["N"]))
  tx = teacher_ema(sched, shared=shared_by_prefix(list(fx["skip_keys"])))
  return jax.jit(tx.update)(*_fixture_state(fx, dtype))


def test_schedule_matches_fixture_x64(fx):
  with jax.enable_x64(True):
    sched = ema_decay_schedule(0.999, 0.9999, 30)
    np.testing.assert_allclose(
      sched(jnp.asarray(fx["u"])), fx["decay"], rtol=0, atol=1e-15
    )
    np.testing.assert_allclose(sched(10), fx["step_decay"], atol=1e-15)


def test_schedule_spec_audio_values():
  with jax.enable_x64(True):
    sched = ema_decay_schedule(0.999, 0.9999, 30_000)
    got = [float(sched(u)) for u in (0, 1, 15_000, 29_999, 30_000, 10**6)]
  np.testing.assert_allclose(
    got, [0.999, 0.99900003, 0.99945, 0.99989997, 0.9999, 0.9999], atol=1e-12
  )


def test_schedule_float32_is_jittable_and_an_optax_schedule():
  sched = ema_decay_schedule(0.999, 0.9999, 30)
  counts = jnp.arange(41, dtype=jnp.int32)
  jitted = jax.jit(sched)(counts)
  assert jitted.dtype == jnp.float32
  np.testing.assert_allclose(jitted, sched(counts), rtol=0, atol=1e-7)
  np.testing.assert_allclose(
    jax.jit(sched)(jnp.int32(15)), 0.99945, rtol=0, atol=1e-7
  )
  # It plugs into optax like any schedule, e.g. as a learning rate.
  tx = optax.sgd(learning_rate=sched)
  params = jnp.ones(2)
  updates, _ = tx.update(jnp.ones(2), tx.init(params), params)
  np.testing.assert_allclose(updates, -0.999, rtol=1e-6)


@pytest.mark.parametrize("args", [(0.9998, 0.9998, 0), (0.999, 0.9998, 0)])
def test_constant_schedule(args):
  sched = ema_decay_schedule(*args)
  np.testing.assert_allclose(
    jax.jit(sched)(jnp.arange(5)), np.full(5, args[1]), rtol=1e-7
  )


def test_fixture_update_x64(fx):
  with jax.enable_x64(True):
    new = _fixture_step(fx, np.float64)
    assert int(new.count) == 10
    np.testing.assert_allclose(new.decay, fx["step_decay"], rtol=1e-7)
    for key, value in _flat(new.teacher).items():
      assert value.dtype == jnp.float64
      np.testing.assert_allclose(
        value, fx[f"expected/{key}"], rtol=0, atol=1e-12, err_msg=key
      )


def test_fixture_update_f32(fx):
  new = _fixture_step(fx, np.float32)
  for key, value in _flat(new.teacher).items():
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(
      value, fx[f"expected_f32/{key}"], rtol=1e-6, atol=1e-7, err_msg=key
    )
    if key in fx["skip_keys"]:
      np.testing.assert_array_equal(value, fx[f"student/{key}"])


def test_constant_decay_reproduces_fairseq_float32_bitwise(fx):
  # With a Python-float decay, 1 - d is formed in float64 and each factor
  # is rounded once, as in torch's ema.mul_(d).add_(p, alpha=1 - d).
  tx = teacher_ema(
    float(fx["step_decay"]), shared=shared_by_prefix(list(fx["skip_keys"]))
  )
  # Eagerly, so that XLA cannot contract the multiply-add into an FMA (under
  # jit it may, and agreement is then ulp-level, see the test above).
  new = tx.update(*_fixture_state(fx, np.float32))
  assert int(new.count) == 10
  for key, value in _flat(new.teacher).items():
    np.testing.assert_array_equal(value, fx[f"expected_f32/{key}"])


def test_spec_toy_arithmetic():
  tx = teacher_ema(0.999)
  state = EmaState(
    jnp.zeros((), jnp.int32), {"w": jnp.array([1.0, -2.0])}, jnp.float32(0)
  )
  new = tx.update({"w": jnp.array([3.0, 0.0])}, state)
  np.testing.assert_allclose(new.teacher["w"], [1.002, -1.998], rtol=1e-6)


def _toy_params(scale):
  return {
    "encoder": {
      "pos_conv": {"kernel": jnp.full((3,), 1.0 * scale)},
      "layers_0": {"kernel": jnp.full((2, 2), 2.0 * scale)},
    },
    "rel_index": jnp.arange(4, dtype=jnp.int32) + int(scale),
  }


def test_init_copies_student_and_update_rules():
  tx = teacher_ema(0.5, shared=shared_by_prefix(["encoder/pos_conv"]))
  student0 = _toy_params(1)
  state = tx.init(student0)
  assert int(state.count) == 0
  for a, b in zip(
    jax.tree.leaves(state.teacher), jax.tree.leaves(student0), strict=True
  ):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  student1 = _toy_params(3)
  new = jax.jit(tx.update)(student1, state)
  assert int(new.count) == 1
  # Shared leaf: the student's value exactly; EMA'd leaf: the average.
  np.testing.assert_array_equal(
    new.teacher["encoder"]["pos_conv"]["kernel"],
    student1["encoder"]["pos_conv"]["kernel"],
  )
  np.testing.assert_array_equal(new.teacher["encoder"]["layers_0"]["kernel"], 4)
  # Integer leaf: copied, never averaged, dtype kept.
  assert new.teacher["rel_index"].dtype == jnp.int32
  np.testing.assert_array_equal(new.teacher["rel_index"], student1["rel_index"])
  np.testing.assert_array_equal(new.teacher["rel_index"], [3, 4, 5, 6])


def test_integer_leaves_untouched_when_student_keeps_them():
  tx = teacher_ema(0.9999)
  student = {"w": jnp.ones(3), "index": jnp.array([11, 12, 13], jnp.int32)}
  state = tx.init(student)
  for _ in range(3):
    state = tx.update(student, state)
  np.testing.assert_array_equal(state.teacher["index"], [11, 12, 13])


def test_count_increments_once_per_update_and_uses_new_count():
  # d(k) = k / (k + 1) makes the count each update used visible in decay.
  tx = teacher_ema(lambda count: count / (count + 1.0))
  state = tx.init({"w": jnp.zeros(2)})
  assert int(state.count) == 0 and float(state.decay) == 0.0
  teacher = 0.0
  for k in range(1, 4):
    state = tx.update({"w": jnp.ones(2)}, state)
    assert int(state.count) == k
    np.testing.assert_allclose(state.decay, k / (k + 1), rtol=1e-7)
    teacher = teacher * k / (k + 1) + 1 / (k + 1)
    np.testing.assert_allclose(state.teacher["w"], teacher, rtol=1e-6)


def test_decay_at_least_one_skips_the_step():
  student = {"w": jnp.ones(2), "shared": jnp.ones(2)}
  teacher = {"w": jnp.zeros(2), "shared": jnp.zeros(2)}
  share = shared_by_prefix(["shared"])
  for decay in (1.0, lambda count: jnp.where(count < 2, 1.0, 0.5)):
    tx = teacher_ema(decay, shared=share)
    state = EmaState(jnp.zeros((), jnp.int32), teacher, jnp.float32(0))
    state = jax.jit(tx.update)(student, state)
    assert int(state.count) == 1
    for leaf in jax.tree.leaves(state.teacher):
      np.testing.assert_array_equal(leaf, 0.0)
  # The traced schedule drops below 1 at count 2: the step happens then.
  state = jax.jit(tx.update)(student, state)
  np.testing.assert_array_equal(state.teacher["w"], 0.5)
  np.testing.assert_array_equal(state.teacher["shared"], 1.0)


def test_half_precision_student_gets_float32_teacher():
  tx = teacher_ema(0.9999)
  student = {"w": jnp.ones(4, jnp.bfloat16)}
  state = tx.init(student)
  assert state.teacher["w"].dtype == jnp.float32
  state = tx.update({"w": jnp.full(4, 2.0, jnp.bfloat16)}, state)
  assert state.teacher["w"].dtype == jnp.float32
  np.testing.assert_allclose(state.teacher["w"], 1.0001, rtol=1e-7)


def test_state_structure_is_stable_under_scan():
  tx = teacher_ema(ema_decay_schedule(0.9, 0.99, 5))
  student = _toy_params(1)
  state = tx.init(student)

  def body(s, _):
    return tx.update(student, s), None

  final, _ = jax.lax.scan(body, state, length=7)
  assert int(final.count) == 7
  np.testing.assert_allclose(final.decay, 0.99, rtol=1e-7)


def test_shared_by_prefix_paths():
  shared = shared_by_prefix(["encoder/pos_conv", "embed_tokens/"])
  assert shared(("encoder", "pos_conv_0", "kernel"), None)
  assert shared(("embed_tokens", "embedding"), None)
  assert not shared(("embed_tokens_extra", "w"), None)
  assert not shared(("encoder", "layers_0", "kernel"), None)
  assert shared_by_prefix("a")(("a", "b"), None)
