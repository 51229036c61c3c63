"""The data2vec audio front end: waveform to the transformer's input frames.

Pipeline (spec §4a): a stack of strided 1-D convolutions turns 16 kHz samples
into 50 Hz frames (`ConvFeatureExtractor`); a LayerNorm and a linear map bring
them to the model width (`FeatureProjection`); masked frames are replaced by a
learned vector; padded frames are zeroed; and a convolutional relative
position signal is added (`ConvPositionalEmbedding`). `SpeechFrontEnd` chains
these and stops just before the transformer's own pre-layer LayerNorm
(`encoder.layer_norm`), which belongs to the encoder because data2vec's EMA
teacher tracks it while it shares (copies) the positional convolution.

Parameter tree of `SpeechFrontEnd` (`d2vjax.speech_hf` builds it from
HF `Data2VecAudioModel` keys; conv kernels are torch weights transposed
(2, 1, 0), Dense kernels transposed):

  mask_embedding                       <- masked_spec_embed
  feature_extractor/conv_layers_{j}/
    conv/{kernel,bias}                 <- feature_extractor.conv_layers.{j}.conv
    layer_norm/{scale,bias}            <- ...conv_layers.{j}.layer_norm
    (group_norm/ in block 0 only, "group_norm" mode)
  feature_projection/{layer_norm,projection}
                                       <- feature_projection.*
  pos_conv/layers_{l}/conv/{kernel,bias}
                                       <- encoder.pos_conv_embed.layers.{l}.conv
  pos_conv/conv/{weight_g,weight_v,bias} (kind "single", wav2vec 2.0)
                                       <- encoder.pos_conv_embed.conv

Padding convention: `padding_mask` is True at padded frames (fairseq); HF's
`attention_mask` is 1 at real samples.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2vjax import encoder as encoder_lib
from d2vjax import initializers

Array = jax.Array
ConvLayers = Sequence[tuple[int, int, int]]

# (channels, kernel, stride) of the wav2vec 2.0 / data2vec Base CNN.
BASE_CONV_LAYERS: tuple[tuple[int, int, int], ...] = (
  ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
)

# fairseq and HF build the CNN's norms with the PyTorch default eps, whatever
# `layer_norm_eps` says; only the feature projection's LayerNorm reads it.
_CNN_NORM_EPS = 1e-5
_POS_NORM_EPS = 1e-5


def _gelu(x: Array) -> Array:
  # fairseq and HF use the exact erf GELU; Flax's default is the tanh form.
  return jax.nn.gelu(x, approximate=False)


def feature_lengths(lengths: Any, conv_layers: ConvLayers = BASE_CONV_LAYERS):
  """Number of frames the conv stack makes from `lengths` samples.

  Applies `L <- floor((L - k) / s) + 1` per layer. Integer floor division
  keeps it exact for Python/numpy ints and for `jnp` integer arrays alike.

  Args:
    lengths: sample counts (int, numpy or jnp integer array).
    conv_layers: (channels, kernel, stride) per layer.

  Returns:
    Frame counts, same type as `lengths` (negative when too short).

  References:
    Baevski et al., "wav2vec 2.0", NeurIPS 2020, §2 (feature encoder);
    fairseq `Wav2Vec2Model._get_feat_extract_output_lengths`.
  """
  for _, kernel, stride in conv_layers:
    lengths = (lengths - kernel) // stride + 1
  return lengths


def receptive_field(conv_layers: ConvLayers = BASE_CONV_LAYERS) -> int:
  """Samples seen by one output frame (400 for Base); the minimum input.

  An input yields at least one frame exactly when it is this long, because
  each layer needs `(frames_out - 1) * stride + kernel` inputs.
  """
  field = 1
  for _, kernel, stride in reversed(tuple(conv_layers)):
    field = (field - 1) * stride + kernel
  return int(field)


def frame_padding_mask(
  attention_mask: Array, conv_layers: ConvLayers = BASE_CONV_LAYERS
) -> Array:
  """Frame-level padding mask from a sample-level attention mask.

  Args:
    attention_mask: `[B, samples]`, 1 (or True) at real samples, HF style;
      real samples are assumed to form a prefix of each row.
    conv_layers: (channels, kernel, stride) per layer.

  Returns:
    `[B, T]` bool, **True at padded frames** (fairseq convention), where
    frame t is padded iff t >= feature_lengths(number of real samples).
  """
  attention_mask = jnp.asarray(attention_mask)
  num_frames = int(feature_lengths(attention_mask.shape[-1], conv_layers))
  valid = feature_lengths(attention_mask.astype(jnp.int32).sum(-1), conv_layers)
  return jnp.arange(num_frames)[None, :] >= valid[:, None]


class _FeatureConvBlock(nn.Module):
  """Conv1d (VALID, strided) -> optional norm -> GELU."""

  channels: int
  kernel: int
  stride: int
  norm: str  # "layer_norm", "group_norm" or "none"
  conv_bias: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1] * self.kernel
    x = nn.Conv(
      self.channels,
      kernel_size=(self.kernel,),
      strides=(self.stride,),
      padding="VALID",
      use_bias=self.conv_bias,
      kernel_init=initializers.torch_kaiming_normal_init(),
      bias_init=initializers.torch_default_bias_init(fan_in),
      dtype=self.dtype,
      name="conv",
    )(x)
    # Two-pass variance (`use_fast_variance=False`) for float64 parity with
    # the reference; statistics are float32 or wider either way, like
    # fairseq's Fp32LayerNorm / Fp32GroupNorm.
    kw = dict(dtype=self.dtype, use_fast_variance=False, name=self.norm)
    if self.norm == "layer_norm":
      # As `[B * T, C]` rows (`layer_norm_rows`): over `[1, T, C]` the first
      # block's scale gradient took 1.4 s of a 15 s clip's step.
      x = encoder_lib.layer_norm_rows(nn.LayerNorm(_CNN_NORM_EPS, **kw), x)
    elif self.norm == "group_norm":
      # One group per channel: each channel is normalised over time.
      x = nn.GroupNorm(self.channels, epsilon=_CNN_NORM_EPS, **kw)(x)
    return _gelu(x)


class ConvFeatureExtractor(nn.Module):
  """Raw waveform `[B, samples]` to conv features `[B, T, C]`.

  Attributes:
    conv_layers: (channels, kernel, stride) per block.
    mode: "layer_norm" (data2vec: LayerNorm over channels in every block) or
      "group_norm" (wav2vec 2.0 "default": per-channel GroupNorm in the first
      block only).
    conv_bias: whether the convolutions have a bias.
    dtype: computation dtype (None: inferred from inputs and params).

  References:
    Baevski et al., "data2vec", ICML 2022, §3 and Appendix (speech encoder);
    spec §4a.2; fairseq `ConvFeatureExtractionModel`.
  """

  conv_layers: ConvLayers = BASE_CONV_LAYERS
  mode: str = "layer_norm"
  conv_bias: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, waveform: Array) -> Array:
    if self.mode not in ("layer_norm", "group_norm"):
      raise ValueError(
        f"mode must be 'layer_norm' or 'group_norm', got {self.mode!r}"
      )
    if waveform.ndim != 2:
      raise ValueError(
        f"waveform must be [batch, samples], got shape {waveform.shape}"
      )
    need = receptive_field(self.conv_layers)
    if waveform.shape[1] < need:
      raise ValueError(
        f"waveform has {waveform.shape[1]} samples, fewer than the conv "
        f"stack's receptive field of {need} samples (no frame would result)"
      )
    x = waveform[..., None]  # the first conv sees one input channel
    for j, (channels, kernel, stride) in enumerate(self.conv_layers):
      if self.mode == "layer_norm":
        norm = "layer_norm"
      else:
        norm = "group_norm" if j == 0 else "none"
      x = _FeatureConvBlock(
        channels,
        kernel,
        stride,
        norm,
        self.conv_bias,
        self.dtype,
        name=f"conv_layers_{j}",
      )(x)
    return x


class FeatureProjection(nn.Module):
  """LayerNorm -> Dense to the model width (-> dropout when training).

  Attributes:
    hidden: output width.
    layer_norm_eps: epsilon of the LayerNorm.
    dropout_rate: dropout on the projected features in train mode.
    dtype: computation dtype.

  Returns from `__call__`: `(projected, normed)`; `normed` is HF's
  `extract_features`.

  References:
    spec §4a.3; fairseq `Data2VecAudioModel.layer_norm`/`post_extract_proj`.
  """

  hidden: int
  layer_norm_eps: float = 1e-5
  dropout_rate: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> tuple[Array, Array]:
    norm = nn.LayerNorm(
      self.layer_norm_eps,
      dtype=self.dtype,
      use_fast_variance=False,
      name="layer_norm",
    )
    normed = encoder_lib.layer_norm_rows(norm, x)
    # fairseq's `post_extract_proj` is a plain nn.Linear: PyTorch init.
    projected = nn.Dense(
      self.hidden,
      dtype=self.dtype,
      name="projection",
      **initializers.torch_linear_init(x.shape[-1]),
    )(normed)
    projected = nn.Dropout(self.dropout_rate)(
      projected, deterministic=not train
    )
    return projected, normed


def _same_pad_trim(x: Array, kernel_size: int) -> Array:
  # Padding k//2 on both sides gives T + 1 frames when k is even; fairseq's
  # SamePad (and HF) drop the last one to keep T.
  return x[:, :-1] if kernel_size % 2 == 0 else x


def _lax_grouped_conv1d(x: Array, kernel: Array, groups: int, pad: int):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(1,),
    padding=[(pad, pad)],
    dimension_numbers=("NWC", "WIO", "NWC"),
    feature_group_count=groups,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def grouped_conv1d(x: Array, kernel: Array, groups: int, pad: int) -> Array:
  """Stride-1 grouped 1-D convolution with a fast kernel gradient (no bias).

  The value is `lax.conv_general_dilated(x, kernel, (1,), [(pad, pad)],
  ("NWC", "WIO", "NWC"), feature_group_count=groups)`: `x` `[B, T, C]`,
  `kernel` `[k, C // groups, C_out]` (output channel `o` in group
  `o // (C_out // groups)`). Only the kernel's gradient is computed
  differently: XLA on CPU lowers the weight gradient of a grouped
  convolution to a slow loop (for the data2vec positional convolution,
  706 ms against 9 ms for the forward), so it is taken here as one small
  batched matmul per kernel tap, `sum_t x[t + j]^T dy[t]` per group
  (25 ms). The input gradient stays XLA's.
  """
  return _lax_grouped_conv1d(x, kernel, groups, pad)


def _grouped_conv1d_fwd(x, kernel, groups, pad):
  return _lax_grouped_conv1d(x, kernel, groups, pad), (x, kernel)


def _grouped_conv1d_bwd(groups, pad, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(
    lambda x: _lax_grouped_conv1d(x, kernel, groups, pad), x
  )
  (dx,) = input_vjp(dy)
  k, per_group, out = kernel.shape
  batch, frames = dy.shape[:2]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
  xp = xp.reshape(batch, xp.shape[1], groups, per_group)
  dy = dy.reshape(batch, frames, groups, out // groups)
  taps = [
    jnp.einsum(
      "btgi,btgo->igo",
      xp[:, j : j + frames],
      dy,
      preferred_element_type=jnp.promote_types(x.dtype, jnp.float32),
    )
    for j in range(k)
  ]
  dw = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dw


grouped_conv1d.defvjp(_grouped_conv1d_fwd, _grouped_conv1d_bwd)


class _GroupedConv(nn.Module):
  """`nn.Conv(feature_group_count=groups, padding=k // 2)`, faster backward.

  Same parameters (`kernel` `[k, C // groups, C_out]`, `bias`), values and
  gradients as the Flax module it stands in for; see `grouped_conv1d`.
  """

  features: int
  kernel_size: int
  groups: int
  kernel_init: nn.initializers.Initializer
  bias_init: nn.initializers.Initializer
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (self.kernel_size, x.shape[-1] // self.groups, self.features)
    kernel = self.param("kernel", self.kernel_init, shape)
    bias = self.param("bias", self.bias_init, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = grouped_conv1d(x, kernel, self.groups, self.kernel_size // 2)
    return y + bias


class _PosConvLayer(nn.Module):
  """Grouped conv (bias) -> trim -> LayerNorm without affine -> GELU."""

  hidden: int
  kernel_size: int
  groups: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = (self.hidden // self.groups) * self.kernel_size
    x = _GroupedConv(
      self.hidden,
      self.kernel_size,
      self.groups,
      kernel_init=initializers.torch_default_kernel_init(),
      bias_init=initializers.torch_default_bias_init(fan_in),
      dtype=self.dtype,
      name="conv",
    )(x)
    x = _same_pad_trim(x, self.kernel_size)
    x = nn.LayerNorm(
      _POS_NORM_EPS,
      use_scale=False,
      use_bias=False,
      dtype=self.dtype,
      use_fast_variance=False,
    )(x)
    return _gelu(x)


class _WeightNormConv(nn.Module):
  """Grouped conv with PyTorch `weight_norm(dim=2)` reparametrisation.

  `weight_v` has the Flax kernel layout `(k, in/groups, out)`; `weight_g`
  has shape `(k,)`: one scale per kernel tap, and the norm of `weight_v` is
  taken over all other axes (PyTorch dim=2 is the kernel axis).
  """

  hidden: int
  kernel_size: int
  groups: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, per_group = self.kernel_size, self.hidden // self.groups
    # fairseq `make_conv_pos`: N(0, sqrt(4 / (k * C))), zero bias; at init
    # weight_g equals the norm of weight_v, so the weight starts at weight_v.
    std = np.sqrt(4.0 / (k * self.hidden))
    v = self.param(
      "weight_v", nn.initializers.normal(std), (k, per_group, self.hidden)
    )
    g = self.param(
      "weight_g", lambda _, shape: jnp.sqrt((v**2).sum(axis=(1, 2))), (k,)
    )
    bias = self.param("bias", nn.initializers.zeros, (self.hidden,))
    kernel = g[:, None, None] * v / jnp.sqrt((v**2).sum((1, 2), keepdims=True))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return grouped_conv1d(x, kernel, self.groups, k // 2) + bias


class ConvPositionalEmbedding(nn.Module):
  """Convolutional relative positional signal; the caller adds it to `x`.

  Attributes:
    hidden: model width C (input and output channels).
    kernel_size: conv kernel size k (padding k//2 both sides; the extra frame
      of an even k is dropped).
    groups: conv groups.
    depth: number of stacked blocks (kind "stacked" only).
    kind: "stacked" (data2vec audio: `depth` blocks of conv -> LayerNorm
      without affine -> GELU) or "single" (wav2vec 2.0: one weight-normalised
      conv -> GELU).
    dtype: computation dtype.

  References:
    Baevski et al., "data2vec", ICML 2022, §3 (speech: 5 conv layers of
    kernel 19 for relative positions); spec §4a.5; fairseq
    `wav2vec2.make_conv_pos` and the `pos_conv_depth > 1` branch.
  """

  hidden: int
  kernel_size: int
  groups: int
  depth: int = 5
  kind: str = "stacked"
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.hidden % self.groups:
      raise ValueError(f"hidden {self.hidden} not divisible by {self.groups}")
    if self.kind == "stacked":
      for i in range(self.depth):
        x = _PosConvLayer(
          self.hidden,
          self.kernel_size,
          self.groups,
          self.dtype,
          name=f"layers_{i}",
        )(x)
      return x
    if self.kind == "single":
      x = _WeightNormConv(
        self.hidden, self.kernel_size, self.groups, self.dtype, name="conv"
      )(x)
      return _gelu(_same_pad_trim(x, self.kernel_size))
    raise ValueError(f"kind must be 'stacked' or 'single', got {self.kind!r}")


class SpeechFrontEnd(nn.Module):
  """Waveform to the (pre-LayerNorm) input of the data2vec audio encoder.

  Attributes:
    conv_layers: CNN (channels, kernel, stride) per block.
    extractor_mode: "layer_norm" (data2vec) or "group_norm" (wav2vec 2.0).
    conv_bias: CNN conv bias.
    hidden: model width.
    layer_norm_eps: eps of the feature projection's LayerNorm.
    pos_kernel_size: positional conv kernel (19 for data2vec Base).
    pos_groups: positional conv groups (16).
    pos_depth: stacked positional conv blocks (5).
    pos_kind: "stacked" or "single".
    dropout_rate: fairseq `dropout_input` / HF `feat_proj_dropout`, applied in
      train mode after the teacher copy (`aux["features"]`) is taken.
    dtype: computation dtype.

  `__call__(waveform, *, attention_mask=None, mask=None, channel_mask=None,
  train=False)` returns `(x, aux)`: `x = h + pos_conv(h)` `[B, T, hidden]`
  where `h` is the projected features with `mask` frames (True = masked)
  replaced by `mask_embedding`, `channel_mask` channels (`[B, hidden]`, True
  = masked; fine-tuning only) zeroed at every frame, and padded frames
  zeroed. `aux` holds `conv_features`,
  `extract_features`, `projected_features`, `features` (the projected
  features before dropout and masking: the data2vec teacher input),
  `pos_conv_input` (h), `pos_conv_output` and `padding_mask` (True = padded).

  With `features=` (`[B, T, hidden]`, the `features` of an earlier call)
  the CNN and the projection are skipped and `waveform` is ignored (pass
  None): this is how the data2vec teacher reads the student's features;
  `conv_features` and `extract_features` are then None.

  References:
    Baevski et al., "data2vec", ICML 2022, §3 and §4.2; spec §1.2, §4a.
  """

  conv_layers: ConvLayers = BASE_CONV_LAYERS
  extractor_mode: str = "layer_norm"
  conv_bias: bool = False
  hidden: int = 768
  layer_norm_eps: float = 1e-5
  pos_kernel_size: int = 19
  pos_groups: int = 16
  pos_depth: int = 5
  pos_kind: str = "stacked"
  dropout_rate: float = 0.0
  dtype: Any = None

  @nn.compact
  def __call__(
    self,
    waveform: Array | None,
    *,
    attention_mask: Array | None = None,
    mask: Array | None = None,
    channel_mask: Array | None = None,
    features: Array | None = None,
    train: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    if features is None:
      conv_features = ConvFeatureExtractor(
        self.conv_layers,
        self.extractor_mode,
        self.conv_bias,
        self.dtype,
        name="feature_extractor",
      )(waveform)
      projected, normed = FeatureProjection(
        self.hidden,
        self.layer_norm_eps,
        dtype=self.dtype,
        name="feature_projection",
      )(conv_features, train=train)
    else:
      if features.ndim != 3 or features.shape[-1] != self.hidden:
        raise ValueError(
          f"features must be [batch, frames, {self.hidden}] (the front "
          f"end's aux['features']), got shape {features.shape}"
        )
      conv_features = normed = None
      projected = features
    x = nn.Dropout(self.dropout_rate)(projected, deterministic=not train)

    batch, frames = x.shape[:2]
    if attention_mask is None:
      padding_mask = jnp.zeros((batch, frames), bool)
    else:
      padding_mask = frame_padding_mask(attention_mask, self.conv_layers)

    # Created unconditionally so that `init` without a mask has the param.
    mask_embedding = self.param(
      "mask_embedding", nn.initializers.uniform(1.0), (self.hidden,)
    )
    if mask is not None:
      if mask.shape != (batch, frames):
        raise ValueError(f"mask shape {mask.shape} != frames {(batch, frames)}")
      x = jnp.where(mask[..., None], mask_embedding.astype(x.dtype), x)
    if channel_mask is not None:
      # fairseq apply_mask (mask_channel_before=False): after the time mask,
      # the chosen channels are zeroed at every frame.
      if channel_mask.shape != (batch, self.hidden):
        raise ValueError(
          f"channel_mask shape {channel_mask.shape} != (batch, hidden) "
          f"{(batch, self.hidden)}"
        )
      x = jnp.where(channel_mask[:, None, :], jnp.zeros((), x.dtype), x)
    # fairseq/HF zero padded frames so they do not leak into valid ones
    # through the positional convolution.
    x = jnp.where(padding_mask[..., None], jnp.zeros((), x.dtype), x)
    pos = ConvPositionalEmbedding(
      self.hidden,
      self.pos_kernel_size,
      self.pos_groups,
      self.pos_depth,
      self.pos_kind,
      self.dtype,
      name="pos_conv",
    )(x)
    aux = {
      "conv_features": conv_features,
      "extract_features": normed,
      "projected_features": projected,
      "features": projected,
      "pos_conv_input": x,
      "pos_conv_output": pos,
      "padding_mask": padding_mask,
    }
    return x + pos, aux
