"""Dropout whose mask comes from a counter-based hash instead of the PRNG.

`jax.random.bernoulli` runs the threefry block cipher for every element; on
CPU that costs ~12 ns a value, and the attention-probability dropout of a
Base encoder draws `layers × heads × T²` of them (80 M for one 15 s clip:
about a second of a speech step). `Dropout` here draws one 64-bit seed
from the module's `dropout` rng and turns each element's flat index into a
uniform 32-bit word with a few integer multiplies and shifts (one fused
elementwise pass). The law is the same as `flax.linen.Dropout`'s: keep
with probability `1 - rate`, scale kept values by `1 / (1 - rate)`; the
masks themselves differ (as PyTorch's differ from both).

The mixer is the degski/Wellons "lowbias32" integer hash: bijective on 32
bits, with every input bit affecting every output bit about half the time.
Flat indices wrap at 2**32 elements, far above any activation here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _lowbias32(x: Array) -> Array:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def uniform_bits(key: Array, shape: Sequence[int]) -> Array:
  """Uniform `uint32` words of `shape`, a pure function of `key` and index."""
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _lowbias32(_lowbias32(index ^ seed[0]) + seed[1])


def keep_mask(key: Array, shape: Sequence[int], keep_prob: float) -> Array:
  """Booleans of `shape`, each True with probability `keep_prob`."""
  threshold = min(int(round(keep_prob * 2.0**32)), 2**32 - 1)
  return uniform_bits(key, shape) < jnp.uint32(threshold)


class Dropout(nn.Module):
  """Inverted dropout with a hashed mask; a drop-in for `nn.Dropout`.

  Attributes:
    rate: probability of zeroing an element.
    rng_collection: the rng stream the seed is drawn from.
  """

  rate: float
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep_prob = 1.0 - self.rate
    keep = keep_mask(self.make_rng(self.rng_collection), x.shape, keep_prob)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), 0).astype(
      x.dtype
    )
