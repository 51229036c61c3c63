"""PyTorch-default initialisers: bounds, spreads and the draws themselves."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vjax import initializers


@pytest.mark.parametrize("fan_in", [16, 24, 300])
def test_bias_is_uniform_within_one_over_sqrt_fan_in(fan_in):
  key = jax.random.key(0)
  bias = initializers.torch_default_bias_init(fan_in)(key, (4096,))
  bound = 1.0 / math.sqrt(fan_in)
  # The same draw as PyTorch's `uniform_(-bound, bound)` written directly.
  want = jax.random.uniform(key, (4096,), jnp.float32, -bound, bound)
  np.testing.assert_array_equal(bias, want)
  assert bias.dtype == jnp.float32
  assert np.abs(bias).max() <= bound
  assert np.abs(bias).max() > 0.99 * bound


def test_kernel_bound_counts_the_receptive_field():
  init = initializers.torch_default_kernel_init()
  dense = init(jax.random.key(0), (300, 64))
  assert 0.99 / np.sqrt(300) < np.abs(dense).max() <= 1 / np.sqrt(300)
  conv = init(jax.random.key(1), (3, 64, 128))  # fan_in = 3 * 64
  assert 0.99 / np.sqrt(192) < np.abs(conv).max() <= 1 / np.sqrt(192)


def test_kaiming_normal_is_not_truncated():
  w = initializers.torch_kaiming_normal_init()(jax.random.key(0), (3, 64, 512))
  std = np.sqrt(2 / 192)
  np.testing.assert_allclose(np.std(w), std, rtol=0.02)
  assert np.abs(w).max() > 3.5 * std  # a truncated normal stops at 2 sigma


def test_linear_init_matches_a_dense_layer():
  layer = nn.Dense(8, **initializers.torch_linear_init(20))
  params = layer.init(jax.random.key(0), jnp.zeros((1, 20)))["params"]
  assert np.abs(params["kernel"]).max() <= 1 / np.sqrt(20)
  assert np.abs(params["bias"]).max() <= 1 / np.sqrt(20)
  assert np.abs(params["bias"]).min() > 0  # drawn, not zeros
