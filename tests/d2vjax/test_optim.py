"""Tests for d2vjax.optim: schedules, fairseq Adam, wd masks, optimisers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from d2vjax import optim, tree_util
from d2vjax.vision import VisionEncoder

# ----------------------------------------------------------------- schedules


def _check_steps(schedule, expect, **tol):
  """Evaluates ``schedule`` at the keys of ``expect`` in one call."""
  steps = np.asarray(list(expect))
  got = np.asarray(jax.jit(schedule)(jnp.asarray(steps)))
  for step, value, want in zip(steps, got, expect.values(), strict=True):
    np.testing.assert_allclose(value, want, err_msg=f"step {step}", **tol)


def _fairseq_tri_stage(step, peak, total, ratio, init_scale, final_scale):
  """fairseq's stage logic, one step at a time in float64."""
  w, h, d = (int(total * r) for r in ratio)
  init, final = init_scale * peak, final_scale * peak
  if step < w:
    return init + (peak - init) / w * step
  if step < w + h:
    return peak
  if step <= w + h + d:
    return peak * math.exp(math.log(final_scale) / d * (step - w - h))
  return final


def test_tri_stage_key_steps():
  peak = 5e-4
  s = optim.tri_stage_schedule(peak, 1000)  # W, H, D = 30, 900, 70
  expect = {
    0: 0.01 * peak,
    15: 0.01 * peak + (peak - 0.01 * peak) * 15 / 30,
    29: 0.01 * peak + (peak - 0.01 * peak) * 29 / 30,
    30: peak,
    500: peak,
    929: peak,
    930: peak,  # decay starts at peak
    965: peak * 0.1,  # half-way in log space: sqrt(0.01)
    1000: 0.01 * peak,
    1001: 0.01 * peak,
    10**6: 0.01 * peak,
  }
  _check_steps(s, expect, rtol=1e-5)


@pytest.mark.parametrize(
  "total,ratio,init_scale,final_scale",
  [
    (1000, (0.03, 0.9, 0.07), 0.01, 0.01),
    (97, (0.1, 0.4, 0.5), 0.5, 0.05),
    (400_000, (0.03, 0.9, 0.07), 0.01, 0.01),
  ],
)
def test_tri_stage_matches_fairseq_stage_logic(
  total, ratio, init_scale, final_scale
):
  s = optim.tri_stage_schedule(
    2.0,
    total,
    phase_ratio=ratio,
    init_lr_scale=init_scale,
    final_lr_scale=final_scale,
  )
  steps = np.unique(np.linspace(0, total + 10, 2000).astype(np.int64))
  got = np.asarray(jax.jit(s)(jnp.asarray(steps)))
  want = [
    _fairseq_tri_stage(t, 2.0, total, ratio, init_scale, final_scale)
    for t in steps
  ]
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_tri_stage_rejects_bad_ratios():
  with pytest.raises(ValueError):
    optim.tri_stage_schedule(1.0, 100, phase_ratio=(0.1, 0.1, 0.1))


def test_warmup_cosine_key_steps():
  peak, init, end = 1.0, 0.1, 0.01
  s = optim.warmup_cosine_schedule(peak, 110, 10, init_lr=init, end_lr=end)
  expect = {
    0: init,
    5: init + (peak - init) * 0.5,
    10: peak,
    35: end + (peak - end) * 0.5 * (1 + math.cos(math.pi / 4)),
    60: (peak + end) / 2,
    110: end,
    500: end,
  }
  _check_steps(s, expect, rtol=1e-6)
  # optax's version computes the same curve.
  ref = optax.warmup_cosine_decay_schedule(init, peak, 10, 110, end)
  steps = jnp.arange(120)
  np.testing.assert_allclose(
    jax.jit(s)(steps), jax.jit(ref)(steps), rtol=1e-5, atol=1e-7
  )


def test_warmup_cosine_linspace_matches_beit():
  """data2vec_vision's numpy schedule (linspace warm-up, per-step cosine)."""
  peak, end, total, warmup = 2e-3, 1e-5, 200, 20
  warm = np.linspace(0.0, peak, warmup)
  i = np.arange(total - warmup)
  cos = end + 0.5 * (peak - end) * (1 + np.cos(np.pi * i / len(i)))
  want = np.concatenate([warm, cos])
  s = optim.warmup_cosine_schedule(
    peak, total, warmup, end_lr=end, linspace_warmup=True
  )
  np.testing.assert_allclose(jax.jit(s)(jnp.arange(total)), want, rtol=1e-5)
  np.testing.assert_allclose(float(s(warmup - 1)), peak, rtol=1e-6)


def test_polynomial_warmup_key_steps():
  peak = 1e-5
  s = optim.polynomial_warmup_schedule(peak, 106, 6)
  expect = {0: 0.0, 3: peak / 2, 6: peak, 56: peak / 2, 81: peak / 4}
  expect.update({106: 0.0, 200: 0.0})
  _check_steps(s, expect, rtol=1e-6, atol=1e-12)
  s2 = optim.polynomial_warmup_schedule(1.0, 106, 6, end_lr=0.1, power=2.0)
  np.testing.assert_allclose(float(s2(56)), 0.1 + 0.9 * 0.25, rtol=1e-6)
  np.testing.assert_allclose(float(s2(106)), 0.1, rtol=1e-6)


# ---------------------------------------------------------- numpy references


def _grads(seed, params, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(scale * rng.normal(size=p.shape), jnp.float32),
    params,
  )


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _clip_np(grads, max_norm):
  norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
  if max_norm and norm > max_norm:
    return {k: g * max_norm / norm for k, g in grads.items()}
  return grads


def _fairseq_adam_np(params, grads_seq, lrs, wd, b1=0.9, b2=0.98, eps=1e-6):
  """fairseq Adam (spec §5), every parameter decayed (v1)."""
  p = dict(params)
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
    for k, g in grads.items():
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
      p[k] = p[k] - lr * wd * p[k]
      p[k] = p[k] - step_size * m[k] / (np.sqrt(v[k]) + eps)
  return p


def _torch_adamw_np(params, grads_seq, lrs, wd, decay, b1, b2, eps):
  """torch.optim.AdamW with a per-parameter weight-decay switch."""
  p = dict(params)
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
    for k, g in grads.items():
      if decay[k]:
        p[k] = p[k] * (1 - lr * wd)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g * g
      m_hat = m[k] / (1 - b1**t)
      v_hat = v[k] / (1 - b2**t)
      p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
  return p


def _run(tx, params, grads_seq, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


PARAMS = {
  "kernel": jnp.asarray(np.arange(6.0).reshape(3, 2) / 5 - 0.4, jnp.float32),
  "scale": jnp.asarray([1.0, 0.5], jnp.float32),  # 1-D: decayed in v1
}


@pytest.mark.parametrize("grad_scale", [1.0, 1e-6])
def test_fairseq_adam_with_decoupled_wd_matches_formula(grad_scale):
  # At grad scale 1e-6 sqrt(v) ~ eps, so the eps placement matters.
  lr, wd = 1e-2, 0.1
  tx = optax.chain(
    optim.scale_by_fairseq_adam(0.9, 0.98, 1e-6),
    optax.add_decayed_weights(wd, mask=optim.decay_all),
    optax.scale_by_learning_rate(lr),
  )
  grads_seq = [_grads(s, PARAMS, grad_scale) for s in range(3)]
  got, state = _run(tx, PARAMS, grads_seq)
  want = _fairseq_adam_np(
    _np(PARAMS), [_np(g) for g in grads_seq], [lr] * 3, wd
  )
  for k in PARAMS:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert state[0].mu[k].dtype == jnp.float32
  assert int(state[0].count) == 3
  # The 1-D gain moved by the decay too: without it the result differs.
  no_wd = _fairseq_adam_np(
    _np(PARAMS), [_np(g) for g in grads_seq], [lr] * 3, 0.0
  )
  assert np.abs(np.asarray(got["scale"]) - no_wd["scale"]).max() > 1e-4
  if grad_scale < 1:
    # optax's eps placement gives a visibly different step here.
    ref = optax.chain(
      optax.scale_by_adam(0.9, 0.98, 1e-6),
      optax.add_decayed_weights(wd),
      optax.scale_by_learning_rate(lr),
    )
    other, _ = _run(ref, PARAMS, grads_seq)
    assert np.abs(np.asarray(other["kernel"]) - want["kernel"]).max() > 1e-4


def test_audio_optimizer_matches_fairseq():
  opt = optim.make_optimizer("audio", total_steps=100)  # W=3, H=90, D=7
  grads_seq = [_grads(s, PARAMS, 50.0) for s in range(5)]  # never clipped
  got, state = _run(opt.tx, PARAMS, grads_seq)
  lrs = [float(opt.schedule(k)) for k in range(5)]
  np.testing.assert_allclose(
    lrs[:4], [5e-6, 5e-6 + 4.95e-4 / 3, 5e-6 + 9.9e-4 / 3, 5e-4], rtol=1e-5
  )
  want = _fairseq_adam_np(_np(PARAMS), [_np(g) for g in grads_seq], lrs, 0.01)
  for k in PARAMS:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(optim.current_learning_rate(state), lrs[-1])


def test_text_optimizer_matches_fairseq_with_clipping():
  opt = optim.make_optimizer("text", total_steps=100, peak_lr=1e-2)
  assert float(opt.schedule(10)) == pytest.approx(1e-2)  # warm-up 100 // 10
  assert float(opt.schedule(5)) == pytest.approx(5e-3)
  # Step 1 is far above the clip norm 5, the others below it.
  grads_seq = [_grads(0, PARAMS, 40.0)] + [_grads(s, PARAMS) for s in (1, 2)]
  lrs = [float(opt.schedule(k)) for k in (0, 1, 2)]
  got, _ = _run(opt.tx, PARAMS, grads_seq)
  clipped = [_clip_np(_np(g), 5.0) for g in grads_seq]
  want = _fairseq_adam_np(_np(PARAMS), clipped, lrs, 0.01)
  for k in PARAMS:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
  unclipped = _fairseq_adam_np(
    _np(PARAMS), [_np(g) for g in grads_seq], lrs, 0.01
  )
  assert np.abs(np.asarray(got["kernel"]) - unclipped["kernel"]).max() > 1e-4


def test_clipping_acts_on_raw_gradients():
  """The first moment after one update is (1 - b1) * clip(raw gradient)."""
  opt = optim.make_optimizer("text", total_steps=100, clip_norm=1.0)
  grads = _grads(3, PARAMS, 10.0)
  norm = float(optax.tree.norm(grads))
  assert norm > 1.0
  _, state = _run(opt.tx, PARAMS, [grads])
  adam_state = state.inner_state[1]
  for k in PARAMS:
    np.testing.assert_allclose(
      adam_state.mu[k], 0.1 * np.asarray(grads[k]) / norm, rtol=1e-5
    )
  # Audio has no clipping: the raw gradient reaches Adam.
  opt = optim.make_optimizer("audio", total_steps=100)
  _, state = _run(opt.tx, PARAMS, [grads])
  np.testing.assert_allclose(
    state.inner_state[0].mu["kernel"], 0.1 * grads["kernel"], rtol=1e-6
  )


def test_vision_optimizer_matches_torch_adamw():
  params = {
    "kernel": PARAMS["kernel"],
    "bias": jnp.asarray([0.3, -0.2], jnp.float32),
    "cls_token": jnp.full((1, 1, 2), 0.7, jnp.float32),
    "mask_token": jnp.full((1, 1, 2), -0.7, jnp.float32),
  }
  decay = {"kernel": True, "bias": False, "cls_token": False}
  decay["mask_token"] = True
  opt = optim.make_optimizer(
    "vision", total_steps=50, warmup_steps=3, weight_decay=0.5
  )
  lrs = [float(opt.schedule(k)) for k in range(4)]
  np.testing.assert_allclose(lrs[:3], [0.0, 1e-3, 2e-3], rtol=1e-6)
  grads_seq = [_grads(s, params, 3.0) for s in range(4)]  # some > 3.0
  got, _ = _run(opt.tx, params, grads_seq)
  clipped = [_clip_np(_np(g), 3.0) for g in grads_seq]
  want = _torch_adamw_np(
    _np(params), clipped, lrs, 0.5, decay, 0.9, 0.999, 1e-8
  )
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_default_warmups():
  text = optim.make_optimizer("text", total_steps=10**6, peak_lr=1.0).schedule
  assert float(text(5000)) == pytest.approx(0.5)
  assert float(text(10_000)) == pytest.approx(1.0)
  vision = optim.make_optimizer("vision", total_steps=1600).schedule
  # 10 of 800 epochs = 20 steps; linspace reaches the peak at step 19.
  assert float(vision(19)) == pytest.approx(2e-3)
  assert float(vision(1600)) == pytest.approx(1e-5)
  with pytest.raises(ValueError):
    optim.make_optimizer("video", total_steps=10)


# ---------------------------------------------------------------- wd masks


def test_decay_matrices_only_on_vision_encoder():
  model = VisionEncoder(
    image_size=32, patch_size=16, hidden=8, num_layers=2, heads=2, mlp_dim=16
  )
  shapes = jax.eval_shape(
    model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )["params"]
  flat = {
    tree_util.path_name(path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(
      optim.decay_matrices_only(shapes)
    )
  }
  names = {key.rsplit("/", 1)[-1] for key in flat}
  assert {"cls_token", "mask_token", "relative_position_bias_table"} <= names
  for key, decayed in flat.items():
    name = key.rsplit("/", 1)[-1]
    if name in ("mask_token", "relative_position_bias_table", "kernel"):
      assert decayed, key
    if name in ("bias", "scale", "cls_token") or name.startswith("gamma"):
      assert not decayed, key
  assert all(jax.tree.leaves(optim.decay_all(shapes)))


def test_mask_rules_on_toy_tree():
  params = {
    "embed": {"embedding": jnp.zeros((5, 4))},
    "dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros((4,))},
    "pos_embed": jnp.zeros((1, 3, 4)),
    "scalar": jnp.zeros(()),
    "index": jnp.zeros((3, 3), jnp.int32),
  }
  mask = optim.decay_matrices_only(params)
  assert mask["embed"]["embedding"] and mask["dense"]["kernel"]
  assert not mask["dense"]["bias"] and not mask["scalar"]
  assert not mask["pos_embed"] and not mask["index"]
  mask = optim.decay_matrices_only(params, exclude_names=("embedding",))
  assert not mask["embed"]["embedding"] and mask["pos_embed"]
  mask = optim.decay_all(params)
  assert mask["dense"]["bias"] and mask["scalar"] and not mask["index"]


# --------------------------------------------------------------------- jit


@pytest.mark.parametrize("modality", ["audio", "text", "vision"])
def test_update_jit_matches_eager(modality):
  opt = optim.make_optimizer(modality, total_steps=40, warmup_steps=2)
  grads_seq = [_grads(s, PARAMS, 4.0) for s in range(3)]
  eager, eager_state = _run(opt.tx, PARAMS, grads_seq, jit=False)
  jitted, jit_state = _run(opt.tx, PARAMS, grads_seq, jit=True)
  for k in PARAMS:
    np.testing.assert_allclose(eager[k], jitted[k], rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(
    optim.current_learning_rate(jit_state),
    optim.current_learning_rate(eager_state),
  )
  np.testing.assert_allclose(
    optim.current_learning_rate(jit_state), opt.schedule(2), rtol=1e-6
  )
