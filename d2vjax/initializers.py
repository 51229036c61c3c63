"""PyTorch's default initialisations as Flax initializers.

Layers that fairseq and HF leave at PyTorch's defaults (the speech front
end's convolutions and feature projection, the audio regression head, the
sentence-classification head) start from the same distributions here, so a
model trained from scratch starts where the reference does. Transformer
blocks use BERT or BEiT init instead (`d2vjax.encoder`).

PyTorch's defaults, per layer:

* `nn.Linear` and `nn.ConvNd` weights: `kaiming_uniform_(w, a=sqrt(5))`,
  which is `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` (`torch_default_kernel_init`;
  `fan_in` counts the kernel taps of a convolution);
* their biases: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` with the fan-in of the
  layer's weight (`torch_default_bias_init`; the bias shape alone does not
  tell the fan-in, so it is passed in);
* `kaiming_normal_(w)` as fairseq calls it on the speech CNN: gain
  `sqrt(2)`, fan-in, untruncated normal (`torch_kaiming_normal_init`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = nn.initializers.Initializer


def torch_default_kernel_init() -> Initializer:
  """PyTorch's default `nn.Linear` / `nn.ConvNd` weight init.

  `kaiming_uniform_(w, a=sqrt(5))` has bound `gain * sqrt(3 / fan_in)` with
  `gain = sqrt(2 / (1 + a**2)) = sqrt(1 / 3)`: `U(±1/sqrt(fan_in))`, which is
  `variance_scaling(1/3, "fan_in", "uniform")` on Flax's kernel layout
  (`[..., in, out]`, receptive field included in the fan-in).

  Returns:
    A Flax initializer `(key, shape, dtype) -> array`.

  References:
    PyTorch `nn.Linear.reset_parameters`, `nn.modules.conv._ConvNd`.
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default `nn.Linear` / `nn.ConvNd` bias init.

  Args:
    fan_in: the fan-in of the layer's weight (input features, times the
      kernel size for a convolution, divided by the groups).

  Returns:
    A Flax initializer drawing `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.

  References:
    PyTorch `nn.Linear.reset_parameters`, `nn.modules.conv._ConvNd`.
  """
  # A Python float, as PyTorch computes the bound; `uniform` rounds it once
  # to the parameter dtype.
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_kaiming_normal_init() -> Initializer:
  """PyTorch's `kaiming_normal_` with its defaults (a=0, fan_in, ReLU gain).

  `N(0, 2 / fan_in)`, not truncated (Flax's `he_normal` truncates, so it
  is a different distribution).

  Returns:
    A Flax initializer `(key, shape, dtype) -> array`.

  References:
    He et al., "Delving Deep into Rectifiers", 2015; fairseq
    `ConvFeatureExtractionModel` (`nn.init.kaiming_normal_`).
  """
  return nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_linear_init(fan_in: int) -> dict[str, Initializer]:
  """`nn.Dense` keyword arguments that reproduce PyTorch's `nn.Linear` init.

  Use as `nn.Dense(features, **torch_linear_init(x.shape[-1]))`.

  Args:
    fan_in: the input width of the layer.

  Returns:
    `{"kernel_init": ..., "bias_init": ...}`.
  """
  return {
    "kernel_init": torch_default_kernel_init(),
    "bias_init": torch_default_bias_init(fan_in),
  }
