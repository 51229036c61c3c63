"""The hashed-mask dropout: same law as nn.Dropout, cheap masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2vjax import dropout


def _apply(rate, x, seed, deterministic=False):
  module = dropout.Dropout(rate)
  return module.apply(
    {}, x, deterministic, rngs={"dropout": jax.random.key(seed)}
  )


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keeps_the_right_fraction_and_rescales(rate):
  x = jnp.ones((64, 128, 96), jnp.float32)
  y = np.asarray(_apply(rate, x, 0))
  kept = y != 0
  n = kept.size
  # Binomial: 5 standard deviations.
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)


def test_masks_are_deterministic_per_key_and_differ_across_keys():
  x = jnp.ones((32, 257), jnp.float32)
  a, b, c = (np.asarray(_apply(0.5, x, s)) != 0 for s in (1, 1, 2))
  np.testing.assert_array_equal(a, b)
  assert 0.4 < (a != c).mean() < 0.6  # independent masks disagree half the time


def test_neighbouring_entries_are_uncorrelated():
  bits = np.asarray(dropout.keep_mask(jax.random.key(3), (512, 512), 0.5))
  bits = bits.astype(np.float64) - bits.mean()
  for axis in (0, 1):
    lagged = np.roll(bits, 1, axis=axis)
    corr = (bits * lagged).mean() / bits.var()
    assert abs(corr) < 0.01, (axis, corr)
  # Every output bit of the word is balanced too (no weak low bits).
  words = np.asarray(dropout.uniform_bits(jax.random.key(4), (1 << 16,)))
  ones = [((words >> i) & 1).mean() for i in range(32)]
  assert max(abs(p - 0.5) for p in ones) < 0.01


def test_deterministic_and_edge_rates():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(_apply(0.5, x, 0, deterministic=True), x)
  np.testing.assert_array_equal(_apply(0.0, x, 0), x)
  np.testing.assert_array_equal(_apply(1.0, x, 0), jnp.zeros_like(x))
  assert _apply(0.3, x.astype(jnp.bfloat16), 0).dtype == jnp.bfloat16
