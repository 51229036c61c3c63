"""Tests for mtagjax.losses: closed forms, masking, normalisation, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtagjax import losses

RTOL = 1e-6

# Jitted once per module: eager dispatch of many small ops is ~10x slower to
# warm up on CPU than one compiled function. Eager use is checked below.
smooth_l1 = jax.jit(losses.smooth_l1, static_argnames="beta")
l1 = jax.jit(losses.l1)
mse = jax.jit(losses.mse)
normalize_loss = jax.jit(losses.normalize_loss)
iemocap_cross_entropy = jax.jit(losses.iemocap_cross_entropy)


def _grad(f):
  return jax.jit(jax.grad(f))


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------- regression


def test_smooth_l1_closed_form():
  pred = jnp.array([0.0, 0.5, 2.0, -3.0])
  target = jnp.zeros(4)
  # Per element: 0, 0.5*0.25, 2-0.5, 3-0.5.
  expected = (0.0 + 0.125 + 1.5 + 2.5) / 4
  np.testing.assert_allclose(smooth_l1(pred, target), expected, RTOL)


@pytest.mark.parametrize("beta", [0.25, 1.0, 3.0])
def test_smooth_l1_pieces(beta):
  rng = np.random.default_rng(0)
  target = rng.normal(size=16).astype(np.float32)
  # Every |d| beyond beta: SmoothL1 == L1 - beta/2.
  d_out = rng.uniform(1.01, 4.0, 16) * beta * rng.choice([-1, 1], 16)
  pred = (target + d_out).astype(np.float32)
  np.testing.assert_allclose(
    smooth_l1(pred, target, beta=beta),
    l1(pred, target) - 0.5 * beta,
    rtol=1e-5,
  )
  # Every |d| inside beta: SmoothL1 == mean(0.5 d^2 / beta).
  d_in = rng.uniform(-0.99, 0.99, 16) * beta
  pred = (target + d_in).astype(np.float32)
  d = pred.astype(np.float64) - target
  np.testing.assert_allclose(
    smooth_l1(pred, target, beta=beta),
    np.mean(0.5 * d * d / beta),
    rtol=1e-5,
  )


def test_smooth_l1_is_continuous_at_beta():
  beta = 0.7
  a = smooth_l1(jnp.array(beta - 1e-4), jnp.array(0.0), beta=beta)
  b = smooth_l1(jnp.array(beta + 1e-4), jnp.array(0.0), beta=beta)
  np.testing.assert_allclose(a, 0.5 * beta, atol=2e-4)
  np.testing.assert_allclose(b, 0.5 * beta, atol=2e-4)


def test_smooth_l1_beta_zero_is_l1():
  pred = jnp.array([0.1, -2.0, 0.0, 5.0])
  target = jnp.array([0.0, 1.0, 0.0, 4.9])
  np.testing.assert_allclose(
    smooth_l1(pred, target, beta=0.0), l1(pred, target), RTOL
  )


def test_l1_and_mse_closed_form():
  pred = jnp.array([1.0, -1.0, 3.0])
  target = jnp.array([0.0, 1.0, 1.0])
  np.testing.assert_allclose(l1(pred, target), 5.0 / 3, RTOL)
  np.testing.assert_allclose(mse(pred, target), 9.0 / 3, RTOL)


@pytest.mark.parametrize("fn", [smooth_l1, l1, mse])
def test_regression_mask_ignores_padding(fn):
  rng = np.random.default_rng(1)
  pred = rng.normal(size=8).astype(np.float32) * 2
  target = rng.normal(size=8).astype(np.float32)
  mask = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
  # Garbage in the padded rows must not matter, not even NaN or inf.
  pred_pad = pred.copy()
  pred_pad[~mask] = [np.nan, np.inf, 1e30]
  got = fn(pred_pad, target, mask=mask)
  np.testing.assert_allclose(got, fn(pred[mask], target[mask]), RTOL)
  grad = _grad(lambda p: fn(p, target, mask=mask))(jnp.asarray(pred_pad))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


def test_regression_mask_trailing_dims_and_weights():
  rng = np.random.default_rng(2)
  pred = rng.normal(size=(5, 3)).astype(np.float32)
  target = rng.normal(size=(5, 3)).astype(np.float32)
  mask = np.array([True, False, True, True, False])
  np.testing.assert_allclose(
    mse(pred, target, mask=mask),
    np.mean((pred[mask] - target[mask]) ** 2),
    RTOL,
  )
  w = np.array([0.5, 0.0, 2.0, 1.0, 0.0], np.float32)
  per_sample = np.mean(np.abs(pred - target), axis=1)
  np.testing.assert_allclose(
    l1(pred, target, mask=w),
    np.sum(w * per_sample) / np.sum(w),
    rtol=1e-5,
  )


def test_all_padding_batch_gives_zero_loss_and_grad():
  pred = jnp.array([np.nan, 1.0])
  target = jnp.zeros(2)
  mask = jnp.zeros(2, bool)
  assert float(smooth_l1(pred, target, mask=mask)) == 0.0
  g = _grad(lambda p: smooth_l1(p, target, mask=mask))(pred)
  np.testing.assert_array_equal(g, 0.0)


def test_regression_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="pred and target"):
    smooth_l1(jnp.zeros(3), jnp.zeros((3, 1)))
  with pytest.raises(ValueError, match="mask"):
    l1(jnp.zeros(3), jnp.zeros(3), mask=jnp.ones(4, bool))
  with pytest.raises(ValueError, match="beta"):
    smooth_l1(jnp.zeros(3), jnp.zeros(3), beta=-1.0)


# ------------------------------------------------------------- normalisation


def test_normalize_loss_value_and_gradient():
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(rng.normal(size=6).astype(np.float32)) * 3
  target = jnp.asarray(rng.normal(size=6).astype(np.float32))
  f = lambda x: smooth_l1(x, target)
  np.testing.assert_allclose(normalize_loss(f(x0)), 1.0, RTOL)
  np.testing.assert_allclose(normalize_loss(-f(x0)), -1.0, RTOL)
  g_norm = _grad(lambda x: normalize_loss(f(x)))(x0)
  np.testing.assert_allclose(g_norm, _grad(f)(x0) / f(x0), rtol=1e-5, atol=1e-7)


def test_normalize_loss_zero_returns_loss_unchanged():
  target = jnp.array([1.0, 2.0])
  f = lambda x: mse(x, target)
  assert float(normalize_loss(f(target))) == 0.0
  g = _grad(lambda x: normalize_loss(f(x)))(target)
  np.testing.assert_array_equal(g, _grad(f)(target))


# ------------------------------------------------------------------- IEMOCAP


def _np_weighted_ce(logits, labels, cw, mask=None):
  """Hand-written loops: per emotion sum(w_y * nll) / sum(w_y), then mean."""
  logits = np.asarray(logits, np.float64).reshape(-1, 4, 2)
  mask = np.ones(len(labels), bool) if mask is None else mask
  per_emotion = []
  for e in range(4):
    num = den = 0.0
    for b in range(len(labels)):
      if not mask[b]:
        continue
      y = labels[b, e]
      nll = -_np_log_softmax(logits[b, e])[y]
      num += cw[e, y] * nll
      den += cw[e, y]
    per_emotion.append(num / den)
  return np.mean(per_emotion)


def test_iemocap_ce_uniform_logits_is_log2():
  labels = np.array([[0, 1, 1, 0], [1, 1, 0, 0]])
  got = iemocap_cross_entropy(jnp.zeros((2, 8)), labels)
  np.testing.assert_allclose(got, np.log(2.0), RTOL)


def test_iemocap_ce_matches_flat_view():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(5, 8)).astype(np.float32)
  labels = rng.integers(0, 2, size=(5, 4))
  # The official view(-1, 2): row 2e, 2e+1 of the 8 outputs is emotion e.
  flat = _np_log_softmax(logits.reshape(-1, 2).astype(np.float64))
  expected = -np.mean(flat[np.arange(20), labels.reshape(-1)])
  np.testing.assert_allclose(
    iemocap_cross_entropy(logits, labels), expected, RTOL
  )
  np.testing.assert_allclose(
    iemocap_cross_entropy(logits.reshape(5, 4, 2), labels),
    expected,
    RTOL,
  )


def test_iemocap_weighted_ce_hand_computed():
  # B=2, one emotion checked by hand: emotion 0, weights [0.25, 0.75];
  # logits (0, 0) label 0 -> nll ln2, w .25; logits (0, ln3) label 1 ->
  # p1 = 3/4, nll ln(4/3), w .75.
  logits = np.zeros((2, 4, 2), np.float32)
  logits[1, 0, 1] = np.log(3.0)
  labels = np.array([[0, 0, 0, 0], [1, 0, 0, 0]])
  cw = np.array([[0.25, 0.75], [1, 1], [1, 1], [1, 1]], np.float32)
  emo0 = (0.25 * np.log(2) + 0.75 * np.log(4 / 3)) / (0.25 + 0.75)
  # Emotions 1-3: uniform logits -> ln 2 whatever the weights.
  expected = (emo0 + 3 * np.log(2)) / 4
  got = iemocap_cross_entropy(logits, labels, class_weights=cw)
  np.testing.assert_allclose(got, expected, RTOL)


def test_iemocap_weighted_ce_random_and_mask():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(7, 8)).astype(np.float32) * 2
  labels = rng.integers(0, 2, size=(7, 4))
  cw = losses.iemocap_inverse_count_weights()
  got = iemocap_cross_entropy(logits, labels, class_weights=cw)
  np.testing.assert_allclose(got, _np_weighted_ce(logits, labels, cw), 1e-5)
  mask = np.array([1, 1, 0, 1, 1, 0, 1], bool)
  padded = logits.copy()
  padded[~mask] = np.nan
  got = iemocap_cross_entropy(padded, labels, class_weights=cw, mask=mask)
  np.testing.assert_allclose(
    got, _np_weighted_ce(logits, labels, cw, mask), 1e-5
  )
  got_plain = iemocap_cross_entropy(padded, labels, mask=mask)
  np.testing.assert_allclose(
    got_plain, iemocap_cross_entropy(logits[mask], labels[mask]), 1e-6
  )
  g = _grad(
    lambda x: iemocap_cross_entropy(x, labels, mask=mask, class_weights=cw)
  )(jnp.asarray(padded))
  assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(np.asarray(g)[~mask], 0.0)


def test_iemocap_uniform_class_weights_equal_plain_ce():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(6, 4, 2)).astype(np.float32)
  labels = rng.integers(0, 2, size=(6, 4))
  np.testing.assert_allclose(
    iemocap_cross_entropy(logits, labels, class_weights=np.full((4, 2), 0.3)),
    iemocap_cross_entropy(logits, labels),
    1e-6,
  )


def test_inverse_count_weights():
  w = losses.iemocap_inverse_count_weights()
  assert w.shape == (4, 2)
  np.testing.assert_allclose(w[:, 0], np.array([954, 338, 690, 735]) / 2717)
  np.testing.assert_allclose(w.sum(axis=1), 1.0)
  # The rarer class (positive for every emotion) gets the larger weight.
  assert np.all(w[:, 1] > w[:, 0])
  np.testing.assert_allclose(
    losses.iemocap_inverse_count_weights((1, 3), total=4),
    [[0.25, 0.75], [0.75, 0.25]],
  )
  with pytest.raises(ValueError, match="total"):
    losses.iemocap_inverse_count_weights(total=0)
  with pytest.raises(ValueError, match="positives"):
    losses.iemocap_inverse_count_weights((5000, 1, 1, 1))


def test_iemocap_bad_inputs_name_the_argument():
  labels = np.zeros((3, 4), np.int32)
  with pytest.raises(ValueError, match="logits"):
    iemocap_cross_entropy(jnp.zeros((3, 6)), labels)
  with pytest.raises(ValueError, match="labels"):
    iemocap_cross_entropy(jnp.zeros((3, 8)), labels[:2])
  with pytest.raises(ValueError, match="labels"):
    iemocap_cross_entropy(jnp.zeros((3, 8)), labels.astype(float))
  with pytest.raises(ValueError, match="class_weights"):
    iemocap_cross_entropy(jnp.zeros((3, 8)), labels, class_weights=np.ones(4))
  with pytest.raises(ValueError, match="mask"):
    iemocap_cross_entropy(jnp.zeros((3, 8)), labels, mask=np.ones(2, bool))


# ----------------------------------------------------------------------- jit


def test_jit_matches_eager():
  rng = np.random.default_rng(7)
  pred = jnp.asarray(rng.normal(size=9).astype(np.float32))
  target = jnp.asarray(rng.normal(size=9).astype(np.float32))
  mask = jnp.asarray(rng.random(9) > 0.3)
  logits = jnp.asarray(rng.normal(size=(9, 8)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 2, size=(9, 4)))
  cw = jnp.asarray(losses.iemocap_inverse_count_weights(), jnp.float32)

  def all_losses(pred, target, mask, logits, labels, cw):
    return jnp.stack(
      [
        losses.smooth_l1(pred, target, mask=mask),
        losses.l1(pred, target, mask=mask),
        losses.mse(pred, target, mask=mask),
        losses.normalize_loss(losses.smooth_l1(pred, target)),
        losses.iemocap_cross_entropy(logits, labels, mask=mask),
        losses.iemocap_cross_entropy(logits, labels, class_weights=cw),
      ]
    )

  args = (pred, target, mask, logits, labels, cw)
  np.testing.assert_allclose(
    jax.jit(all_losses)(*args), all_losses(*args), rtol=1e-6
  )


def test_bfloat16_inputs_are_computed_in_float32():
  pred = jnp.array([0.5, 2.0], jnp.bfloat16)
  out = losses.smooth_l1(pred, jnp.zeros(2, jnp.bfloat16))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, (0.125 + 1.5) / 2, RTOL)
