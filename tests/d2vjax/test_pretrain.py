"""The data2vec pretraining step: one jit, teacher rules, 8-device equality."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d2vjax import ema, masking, pretrain, tree_util
from tests import helpers


def _audio(rng, batch=8):
  encoder = helpers.tiny_audio_encoder(num_layers=3, pos_depth=2)
  wave = rng.standard_normal((batch, 800)).astype(np.float32)
  mask = masking.span_mask((batch, 79), mask_prob=0.65, mask_length=5, rng=rng)
  return encoder, {"inputs": wave, "mask": mask}


def _vision(rng, batch=8):
  encoder = helpers.tiny_vision_encoder()
  images = rng.standard_normal((batch, 16, 16, 3)).astype(np.float32)
  mask = masking.block_masks(
    batch, (4, 4), num_masking_patches=8, min_num_patches=2, rng=rng
  )
  return encoder, {"inputs": images, "mask": mask}


def _text(rng, batch=8):
  encoder = helpers.tiny_text_encoder(num_layers=3)
  ids = rng.integers(4, 49, (batch, 20)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 0, 2
  ids[1, 15:] = 1  # padding
  mask = masking.text_span_mask(ids, mask_prob=0.35, rng=rng) & (ids != 1)
  mask[:, 3] = True
  corrupted = masking.apply_text_mask(
    ids, mask, mask_id=49, rng=rng, vocab_size=50
  )
  attention = (ids != 1).astype(np.int32)
  return encoder, {
    "inputs": corrupted,
    "mask": mask,
    "attention_mask": attention,
    "targets_ids": ids,
  }


BUILDERS = {"audio": _audio, "vision": _vision, "text": _text}


def _setup(modality, seed=0):
  rng = np.random.default_rng(seed)
  encoder, batch = BUILDERS[modality](rng)
  model = pretrain.Data2Vec(encoder=encoder, modality=modality, top_k=2)
  tx = optax.adamw(1e-3)
  teacher = pretrain.make_teacher_ema(
    modality, ema.ema_decay_schedule(0.99, 0.999, 10)
  )
  state = pretrain.create_pretrain_state(
    jax.random.key(seed), model, batch, tx, teacher
  )
  return model, tx, teacher, state, batch


def _leaves(tree):
  return {
    tree_util.path_name(path): np.asarray(x)
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.mark.parametrize("modality", ["audio", "vision", "text"])
def test_step_compiles_once_and_follows_teacher_rules(modality):
  model, tx, teacher, state, batch = _setup(modality)
  traces = []

  def fn(state, batch):
    traces.append(1)
    return pretrain.pretrain_step(state, batch, model=model, tx=tx, ema=teacher)

  step = jax.jit(fn)
  decays = []
  for _ in range(3):
    state, metrics = step(state, batch)
    decays.append(float(metrics["ema_decay"]))
    assert all(np.isfinite(float(v)) for v in metrics.values())
  assert len(traces) == 1
  # Update k uses d(k): 0.99 + 0.009 * k / 10.
  np.testing.assert_allclose(decays, [0.9909, 0.9918, 0.9927], rtol=1e-6)
  assert int(state.step) == 3 and int(state.teacher.count) == 3

  student = _leaves(state.params["encoder"])
  teach = _leaves(state.teacher.teacher)
  assert student.keys() == teach.keys()
  prefixes = pretrain.SHARED_PREFIXES[modality]
  for key, value in student.items():
    if key.startswith(prefixes) and prefixes:
      np.testing.assert_array_equal(teach[key], value, err_msg=key)
  # Averaged leaves lag behind the student.
  layers = [k for k in student if k.startswith("encoder/")]
  assert any(not np.allclose(teach[k], student[k]) for k in layers)


@pytest.mark.parametrize("modality", ["audio", "vision", "text"])
def test_targets_are_deterministic_and_carry_no_gradient(modality):
  model, _, _, state, batch = _setup(modality)
  a = pretrain.teacher_targets(model, state.teacher.teacher, batch)
  b = pretrain.teacher_targets(model, state.teacher.teacher, batch)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == jnp.float32
  assert a.shape[:2] == batch["mask"].shape

  def f(teacher_params):
    return pretrain.teacher_targets(model, teacher_params, batch).sum()

  grads = jax.grad(f)(state.teacher.teacher)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


def test_audio_teacher_reads_the_student_features():
  model, tx, teacher, state, batch = _setup("audio")
  step = jax.jit(
    functools.partial(pretrain.pretrain_step, model=model, tx=tx, ema=teacher)
  )
  for _ in range(2):  # the teacher's layers now lag the student's
    state, _ = step(state, batch)

  def features(params):
    _, aux = model.apply({"params": params}, batch["inputs"], None, train=False)
    return aux["features"]

  teacher_params = state.teacher.teacher
  rerun = pretrain.teacher_targets(model, teacher_params, batch)
  shared = pretrain.teacher_targets(
    model, teacher_params, batch, features=features(state.params)
  )
  # The front end is shared, so reading the student's features is the same
  # as running the teacher's copy of the CNN again.
  np.testing.assert_allclose(shared, rerun, rtol=1e-5, atol=1e-5)
  other = pretrain.teacher_targets(
    model, teacher_params, batch, features=2 * features(state.params)
  )
  assert not np.allclose(other, shared)

  def f(params):
    y = pretrain.teacher_targets(
      model, teacher_params, batch, features=features(params)
    )
    return y.sum()

  grads = jax.grad(f)(state.params)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="features"):
    pretrain.teacher_targets(
      model, teacher_params, batch, features=features(state.params)[..., :3]
    )


def test_text_teacher_input_switch():
  model, _, _, state, batch = _setup("text")
  full = pretrain.teacher_targets(model, state.teacher.teacher, batch)
  only = pretrain.teacher_targets(
    model, state.teacher.teacher, batch, text_teacher_sees_only_masked=True
  )
  # Different teacher inputs give different targets at masked positions.
  mask = batch["mask"]
  assert not np.allclose(np.asarray(full)[mask], np.asarray(only)[mask])


def test_eight_devices_equal_one_device():
  assert len(jax.devices()) == 8
  model, tx, teacher, state, batch = _setup("vision")
  fn = functools.partial(
    pretrain.pretrain_step, model=model, tx=tx, ema=teacher
  )
  one_state, one = jax.jit(fn)(state, batch)
  mesh = jax.make_mesh(
    (8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.jit(fn, in_shardings=(repl, data), out_shardings=(repl, repl))
  eight_state, eight = sharded(state, jax.device_put(batch, data))
  for k in one:
    np.testing.assert_allclose(one[k], eight[k], rtol=1e-5, atol=1e-6)
  for x, y in zip(
    jax.tree.leaves(one_state.params),
    jax.tree.leaves(eight_state.params),
    strict=True,
  ):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_gradients_fit_a_frozen_teacher():
  # With the teacher frozen (decay 1: every EMA step is skipped) the targets
  # are fixed, so the student's loss on one batch must fall.
  model, _, _, state, batch = _setup("text")
  frozen = pretrain.make_teacher_ema("text", 1.0)
  tx = optax.adam(1e-2)
  state = state.replace(opt_state=tx.init(state.params))
  step = jax.jit(
    functools.partial(pretrain.pretrain_step, model=model, tx=tx, ema=frozen)
  )
  before = state.teacher.teacher
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0]
  for x, y in zip(
    jax.tree.leaves(before), jax.tree.leaves(state.teacher.teacher), strict=True
  ):
    np.testing.assert_array_equal(x, y)


def test_rejects_unknown_modality():
  with pytest.raises(ValueError, match="modality 'video'"):
    pretrain.make_teacher_ema("video", 0.999)


def test_check_batch_rejects_degenerate_masks():
  rng = np.random.default_rng(0)
  _, batch = _vision(rng)
  pretrain.check_batch(batch, "vision")
  with pytest.raises(ValueError, match="masks nothing"):
    pretrain.check_batch({**batch, "mask": batch["mask"] & False}, "vision")
  full = batch["mask"].copy()
  full[2] = True
  with pytest.raises(ValueError, match="every valid position in row 2"):
    pretrain.check_batch({**batch, "mask": full}, "vision")
  with pytest.raises(ValueError, match=r"\[B, T\] boolean"):
    pretrain.check_batch({**batch, "mask": batch["mask"].astype(int)}, "vision")
  _, tbatch = _text(rng)
  with pytest.raises(ValueError, match="targets_ids"):
    pretrain.check_batch(
      {k: v for k, v in tbatch.items() if k != "targets_ids"}, "text"
    )
  padded = tbatch["mask"].copy()
  padded[1, -1] = True  # row 1 ends in padding
  with pytest.raises(ValueError, match="padding"):
    pretrain.check_batch({**tbatch, "mask": padded}, "text")


def test_vision_tap_switch_changes_the_targets():
  model, _, _, state, batch = _setup("vision")
  end = pretrain.teacher_targets(model, state.teacher.teacher, batch)
  ffn_model = model.clone(encoder=model.encoder.clone(tap="ffn"))
  ffn = pretrain.teacher_targets(ffn_model, state.teacher.teacher, batch)
  assert end.shape == ffn.shape
  assert not np.allclose(end, ffn)
