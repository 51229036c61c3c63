"""Tests for d2vjax.targets: normalisations and per-modality targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vjax import targets
from d2vjax.targets import (
  build_targets,
  instance_norm_time,
  layer_norm_channels,
  modality_targets,
)
from tests import helpers

MODALITIES = helpers.D2V_MODALITIES

# Spec §9.4: K = 2 toy layers, B = 1, T = 4, C = 3, and the expected targets
# (6 decimals, from the torch reference).
H1 = np.array([[1, 2, 0], [3, 4, 1], [5, 6, -1], [7, 9, 2]], np.float32)
H2 = np.array([[0, 1, 1], [2, -1, 1], [1, 0, 3], [4, 2, 5]], np.float32)
TOY_EXPECTED = {
  "audio": [
    [-1.262426, -0.404772, -0.675872],
    [-0.139091, -0.912502, -0.228660],
    [-0.029939, -0.078596, -0.520062],
    [1.431457, 1.395869, 1.424595],
  ],
  "text": [
    [-0.707091, 0.965913, -0.258822],
    [0.668151, -0.133630, -0.534521],
    [0.135952, -0.103190, -0.032762],
    [0.303472, -0.158627, -0.144845],
  ],
  "vision": [
    [-0.999983, 1.366014, -0.366032],
    [1.336280, -0.267256, -1.069023],
    [1.354238, -1.027892, -0.326346],
    [1.413574, -0.738885, -0.674690],
  ],
}


@pytest.fixture(scope="module")
def fx():
  return dict(np.load(helpers.D2V_FIXTURES / "targets_small.npz"))


def test_recipes_match_spec():
  assert targets.TARGET_RECIPES == {
    "audio": dict(top_k=8, layer_norm="instance", final_norm="none"),
    "text": dict(top_k=10, layer_norm="layer", final_norm="none"),
    "vision": dict(top_k=6, layer_norm="layer", final_norm="layer"),
  }


@pytest.mark.parametrize("modality", MODALITIES)
def test_targets_match_fixture_x64(fx, modality):
  with jax.enable_x64(True):
    layers = fx["layers"].astype(np.float64)
    y = modality_targets(layers, modality, top_k=3)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, fx[f"{modality}_target"], rtol=0, atol=1e-10)
    np.testing.assert_allclose(
      np.asarray(y)[fx["mask"]],
      fx[f"{modality}_target_at_mask"],
      rtol=0,
      atol=1e-10,
    )


@pytest.mark.parametrize("modality", MODALITIES)
def test_targets_match_fixture_f32(fx, modality):
  y = modality_targets(fx["layers"], modality, top_k=3)
  assert y.dtype == jnp.float32 and y.shape == (2, 7, 8)
  np.testing.assert_allclose(y, fx[f"{modality}_target_f32"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(y, fx[f"{modality}_target"], rtol=0, atol=1e-5)


def test_list_and_stacked_layers_agree(fx):
  as_list = list(fx["layers"])
  np.testing.assert_array_equal(
    modality_targets(as_list, "vision", top_k=3),
    modality_targets(fx["layers"], "vision", top_k=3),
  )


def test_per_layer_norms_match_fixture_x64(fx):
  with jax.enable_x64(True):
    layers = fx["layers"].astype(np.float64)
    np.testing.assert_allclose(
      instance_norm_time(layers), fx["audio_per_layer"], atol=1e-10
    )
    np.testing.assert_allclose(
      layer_norm_channels(layers), fx["text_per_layer"], atol=1e-10
    )
    np.testing.assert_allclose(
      layer_norm_channels(layers), fx["vision_per_layer"], atol=1e-10
    )


def test_masked_statistics_variant_x64(fx):
  pad = fx["padding_mask"]
  with jax.enable_x64(True):
    layers = fx["layers"].astype(np.float64)
    per_layer = instance_norm_time(layers, padding_mask=pad)
    np.testing.assert_allclose(
      per_layer, fx["audio_per_layer_masked_stats"], atol=1e-10
    )
    y = modality_targets(layers, "audio", top_k=3, padding_mask=pad)
    np.testing.assert_allclose(y, fx["audio_target_masked_stats"], atol=1e-10)
    # The unpadded sample agrees with fairseq's all-frame statistics.
    np.testing.assert_allclose(y[0], fx["audio_target"][0], atol=1e-10)
    np.testing.assert_array_equal(np.asarray(y)[pad], 0.0)


def test_masked_statistics_ignore_padded_garbage_and_jit(fx):
  pad = fx["padding_mask"]
  layers = np.array(fx["layers"])
  garbage = layers.copy()
  garbage[:, pad] = 1e30
  clean = modality_targets(layers, "audio", top_k=3, padding_mask=pad)
  dirty = modality_targets(garbage, "audio", top_k=3, padding_mask=pad)
  np.testing.assert_array_equal(clean, dirty)
  # Eager (itself jitted inside) and under an outer jit agree.
  outer = jax.jit(
    lambda r, p: modality_targets(r, "audio", top_k=3, padding_mask=p)
  )
  np.testing.assert_allclose(outer(garbage, pad), clean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("modality", MODALITIES)
def test_spec_toy_targets(modality):
  y = modality_targets([H1[None], H2[None]], modality, top_k=2)
  np.testing.assert_allclose(y[0], TOY_EXPECTED[modality], rtol=0, atol=2e-6)


def test_top_k_uses_the_top_layers(fx):
  layers = fx["layers"]
  y = build_targets(layers, top_k=2, layer_norm="layer", final_norm="none")
  expected = layer_norm_channels(layers[1:]).sum(axis=0) / 2
  np.testing.assert_allclose(y, expected, atol=1e-6)


def test_half_precision_input_is_computed_in_float32(fx):
  layers = jnp.asarray(fx["layers"], jnp.bfloat16)
  y = modality_targets(layers, "audio", top_k=3)
  assert y.dtype == jnp.float32


def test_jit_matches_eager(fx):
  def all_modalities(r):
    return [modality_targets(r, m, top_k=3) for m in MODALITIES]

  jitted = jax.jit(all_modalities)(fx["layers"])
  for modality, y in zip(MODALITIES, jitted, strict=True):
    np.testing.assert_allclose(
      y, modality_targets(fx["layers"], modality, top_k=3), rtol=0, atol=1e-6
    )


def test_no_gradient_flows_through_targets(fx):
  def objective(r):
    total = jnp.sum(jnp.square(instance_norm_time(r)))
    total += jnp.sum(jnp.square(layer_norm_channels(r)))
    for modality in MODALITIES:
      y = modality_targets(r, modality, top_k=3)
      total += jnp.sum(jnp.square(y)) + jnp.sum(jnp.sin(y))
    return total

  grad = jax.jit(jax.grad(objective))(jnp.asarray(fx["layers"]))
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(top_k=0),
    dict(top_k=4),
    dict(top_k=2, layer_norm="batch"),
    dict(top_k=2, final_norm="group"),
  ],
)
def test_bad_arguments_raise(fx, kwargs):
  with pytest.raises(ValueError):
    build_targets(fx["layers"], **kwargs)


def test_unknown_modality_raises(fx):
  with pytest.raises(ValueError):
    modality_targets(fx["layers"], "video")
