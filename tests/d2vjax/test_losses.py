"""Tests for d2vjax.losses: masked regression losses and collapse monitors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vjax import losses
from d2vjax.losses import (
  modality_loss,
  regression_loss,
  regression_loss_sum,
  variance_monitor,
)
from d2vjax.targets import modality_targets
from tests import helpers

MODALITIES = helpers.D2V_MODALITIES


@pytest.fixture(scope="module")
def fx():
  return dict(np.load(helpers.D2V_FIXTURES / "loss_small.npz"))


def _sum_kwargs(modality):
  kwargs = dict(losses.LOSS_RECIPES[modality])
  kwargs.pop("reduction")
  return kwargs


def test_recipes_match_spec():
  assert losses.LOSS_RECIPES == {
    "audio": dict(kind="l2", scale=None, reduction="per_token"),
    "text": dict(kind="smooth_l1", beta=4.0, scale=1.0, reduction="per_token"),
    "vision": dict(kind="smooth_l1", beta=2.0, reduction="per_element"),
  }


@pytest.mark.parametrize("x64", [True, False])
def test_fixture_values(fx, x64):
  dtype = np.float64 if x64 else np.float32
  tol = dict(rtol=1e-12, atol=0) if x64 else dict(rtol=1e-5, atol=0)
  with jax.enable_x64(x64):
    pred = fx["pred_dense"].astype(dtype)
    target = fx["target_dense"].astype(dtype)
    mask = fx["mask"]
    for modality in ("audio", "text"):
      loss_sum, size = regression_loss_sum(
        pred, target, mask, **_sum_kwargs(modality)
      )
      assert loss_sum.dtype == dtype
      np.testing.assert_allclose(loss_sum, fx[f"{modality}_loss_sum"], **tol)
      assert int(size) == int(fx[f"{modality}_sample_size"])
      np.testing.assert_allclose(
        modality_loss(pred, target, mask, modality),
        fx[f"{modality}_loss_per_token"],
        **tol,
      )
    np.testing.assert_allclose(
      modality_loss(pred, target, mask, "vision"), fx["vision_loss"], **tol
    )


def test_spec_toy_losses():
  # Spec §9.5: masked t in {1, 3} of the §9.4 toy targets.
  h1 = np.array([[1, 2, 0], [3, 4, 1], [5, 6, -1], [7, 9, 2]], np.float32)
  h2 = np.array([[0, 1, 1], [2, -1, 1], [1, 0, 3], [4, 2, 5]], np.float32)
  mask = np.array([[False, True, False, True]])
  pred = np.zeros((1, 4, 3), np.float32)
  pred[0, 1] = [0.5, -0.5, 0.0]
  pred[0, 3] = [1.0, 1.0, -1.0]
  ys = {
    m: modality_targets([h1[None], h2[None]], m, top_k=2) for m in MODALITIES
  }
  audio_sum, size = regression_loss_sum(
    pred, ys["audio"], mask, **_sum_kwargs("audio")
  )
  np.testing.assert_allclose(audio_sum, 3.956240, atol=2e-6)
  assert int(size) == 2
  np.testing.assert_allclose(
    modality_loss(pred, ys["audio"], mask, "audio"), 1.978120, atol=2e-6
  )
  text_sum, _ = regression_loss_sum(
    pred, ys["text"], mask, **_sum_kwargs("text")
  )
  np.testing.assert_allclose(text_sum, 0.375884, atol=2e-6)
  np.testing.assert_allclose(
    modality_loss(pred, ys["vision"], mask, "vision"), 0.216539, atol=2e-6
  )


def test_smooth_l1_branches_and_scale():
  pred = jnp.array([[[0.0, 0.0, 0.0, 0.0]]])
  target = jnp.array([[[1.0, -3.0, 5.0, 0.0]]])
  mask = jnp.array([[True]])
  # beta 4: 0.5*1/4 + 0.5*9/4 + (5 - 2) + 0 = 4.25.
  np.testing.assert_allclose(
    regression_loss(
      pred,
      target,
      mask,
      kind="smooth_l1",
      beta=4.0,
      scale=1.0,
      reduction="per_token",
    ),
    4.25,
  )
  # beta 0 is plain L1 (PyTorch), with finite gradients.
  l1 = lambda p: regression_loss(
    p,
    target,
    mask,
    kind="smooth_l1",
    beta=0.0,
    scale=1.0,
    reduction="per_element",
  )
  np.testing.assert_allclose(l1(pred), 9.0 / 4)
  assert np.all(np.isfinite(jax.grad(l1)(pred)))
  # l2 with the default 1/sqrt(C) scale.
  np.testing.assert_allclose(
    regression_loss(pred, target, mask, kind="l2", reduction="per_token"),
    35.0 / math.sqrt(4),
  )


@pytest.mark.parametrize("modality", MODALITIES)
def test_unmasked_garbage_changes_neither_value_nor_gradient(fx, modality):
  mask = fx["mask"]
  pred, target = np.array(fx["pred_dense"]), np.array(fx["target_dense"])
  dirty_pred, dirty_target = pred.copy(), target.copy()
  dirty_pred[~mask] = 1e30
  dirty_target[~mask] = -1e30
  fn = jax.jit(
    jax.value_and_grad(lambda p, y: modality_loss(p, y, mask, modality))
  )
  value, grad = fn(pred, target)
  dirty_value, dirty_grad = fn(dirty_pred, dirty_target)
  np.testing.assert_array_equal(value, dirty_value)
  np.testing.assert_array_equal(grad, dirty_grad)
  assert np.isfinite(value)
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)
  np.testing.assert_allclose(value, modality_loss(pred, target, mask, modality))


def test_jit_matches_eager(fx):
  args = (fx["pred_dense"], fx["target_dense"], fx["mask"])

  def everything(p, y, m):
    out = [modality_loss(p, y, m, mod) for mod in MODALITIES]
    return out + [variance_monitor(y, m)]

  eager = [modality_loss(*args, mod) for mod in MODALITIES]
  eager.append(variance_monitor(args[1], args[2]))
  for got, want in zip(jax.jit(everything)(*args), eager, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_empty_mask_gives_zero(fx):
  empty = np.zeros_like(fx["mask"])
  for modality in MODALITIES:
    loss = modality_loss(fx["pred_dense"], fx["target_dense"], empty, modality)
    assert float(loss) == 0.0


def test_half_precision_inputs_computed_in_float32(fx):
  pred = jnp.asarray(fx["pred_dense"], jnp.bfloat16)
  target = jnp.asarray(fx["target_dense"])
  assert modality_loss(pred, target, fx["mask"], "audio").dtype == jnp.float32


def test_variance_monitor(fx):
  mask = fx["mask"]
  x = np.array(fx["target_dense"])
  masked = x[mask].astype(np.float64)
  expected = np.mean(np.sqrt(masked.var(axis=0, ddof=1) + 1e-6))
  np.testing.assert_allclose(variance_monitor(x, mask), expected, rtol=1e-5)
  x[~mask] = 1e30  # Unmasked tokens do not count.
  np.testing.assert_allclose(variance_monitor(x, mask), expected, rtol=1e-5)
  # A collapsed (constant) input reports sqrt(1e-6).
  const = np.ones_like(x)
  np.testing.assert_allclose(variance_monitor(const, mask), 1e-3, rtol=1e-4)
  grad = jax.grad(lambda v: variance_monitor(v, mask))(jnp.asarray(x))
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(kind="l1", reduction="per_token"),
    dict(kind="l2", reduction="mean"),
    dict(kind="l2", scale=-1.0, reduction="per_token"),
    dict(kind="smooth_l1", beta=-1.0, reduction="per_token"),
  ],
)
def test_bad_arguments_raise(kwargs):
  x = jnp.ones((1, 2, 3))
  with pytest.raises(ValueError):
    regression_loss(x, x, jnp.ones((1, 2), bool), **kwargs)
  with pytest.raises(ValueError):
    regression_loss(
      x, x, jnp.ones((2, 1), bool), kind="l2", reduction="per_token"
    )
  with pytest.raises(ValueError):
    modality_loss(x, x, jnp.ones((1, 2), bool), "video")
