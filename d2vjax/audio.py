"""The data2vec audio encoder: speech front end + post-LN Transformer.

`AudioEncoder` chains `d2vjax.speech.SpeechFrontEnd` (conv feature encoder,
feature projection, mask embedding, positional convolution), the encoder's
pre-layer LayerNorm (`encoder.layer_norm` in fairseq/HF; with post-LN
layers it sits *before* the first layer and there is none after the last),
input dropout and the post-LN `TransformerEncoder`. The data2vec teacher
taps each layer's fc2 output (`tap="ffn"`).

Parameter layout: `front_end/...` (see `d2vjax.speech`),
`encoder_layer_norm/{scale,bias}`, `encoder/...` (see `d2vjax.encoder`).

Teacher note: data2vec's audio teacher reads the student's projected CNN
features and shares the positional convolution. Running this model in eval
mode with `mask=None` on the same waveform, with the teacher's
`encoder_layer_norm`/`encoder` and the student's `front_end` parameters,
computes exactly that (the front end has no randomness in eval mode).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vjax import encoder as encoder_lib
from d2vjax import speech

Array = jax.Array


class AudioEncoder(nn.Module):
  """data2vec speech encoder (defaults: the Base pretraining recipe).

  Attributes:
    conv_layers: CNN (channels, kernel, stride) per block.
    extractor_mode: "layer_norm" (data2vec) or "group_norm" (wav2vec 2.0).
    conv_bias: whether the CNN convolutions have a bias.
    pos_kernel_size: positional conv kernel (19).
    pos_groups: positional conv groups (16).
    pos_depth: stacked positional conv blocks (5).
    pos_kind: "stacked" (data2vec) or "single" (wav2vec 2.0).
    feature_dropout_rate: dropout on the projected features (fairseq
      `dropout_input`, 0 in the recipe).
    hidden: model width.
    num_layers: post-LN layers.
    heads: attention heads.
    mlp_dim: FFN inner width.
    layer_norm_eps: epsilon of the feature projection's LayerNorm, the
      encoder LayerNorm and the layers' LayerNorms (1e-5).
    dropout_rate: dropout on the layers' input, attention and FFN outputs.
    attention_dropout_rate: dropout on the attention probabilities.
    activation_dropout_rate: dropout after the FFN's GELU.
    layerdrop: probability of skipping a layer in train mode (0.05).
    remat: recompute layers in the backward pass.
    dtype: compute dtype (parameters float32).

  References:
    Baevski et al., "data2vec", 2022, sections 3 and 4.2; data2vec spec
    §4a.2–§4a.5.
  """

  conv_layers: tuple[tuple[int, int, int], ...] = speech.BASE_CONV_LAYERS
  extractor_mode: str = "layer_norm"
  conv_bias: bool = False
  pos_kernel_size: int = 19
  pos_groups: int = 16
  pos_depth: int = 5
  pos_kind: str = "stacked"
  feature_dropout_rate: float = 0.0
  hidden: int = 768
  num_layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-5
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  activation_dropout_rate: float = 0.0
  layerdrop: float = 0.05
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    waveform: Array,
    mask: Array | None = None,
    train: bool = False,
    *,
    attention_mask: Array | None = None,
    channel_mask: Array | None = None,
    features: Array | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """Encodes a batch of waveforms.

    Args:
      waveform: `[B, samples]` float (normalised per utterance upstream).
      mask: student mask over frames `[B, T]` bool, True = replaced by the
        mask embedding; None = no masking.
      train: enables dropout and LayerDrop (needs a `"dropout"` RNG).
      attention_mask: `[B, samples]`, 1 = real sample (HF style; real
        samples form a prefix of each row), or None = no padding.
      channel_mask: `[B, hidden]` bool, True = feature channel zeroed at
        every frame after the time mask (wav2vec 2.0 / data2vec fine-tuning
        `mask_channel_prob`); None = none.
      features: projected CNN features `[B, T, hidden]` (`aux["features"]`
        of another forward) to start from instead of `waveform`, which is
        then ignored: the teacher reads the student's features this way.

    Returns:
      `(last_hidden_state [B, T, C], aux)`. `aux` holds
      `layer_results` `[L, B, T, C]` (fc2 outputs), `hidden_states`
      `[L+1, B, T, C]` (entry 0 = after `encoder_layer_norm`),
      `padding_mask` `[B, T]` (True = padded frame) and the front end's
      intermediate tensors (`features` is the teacher's input in fairseq).
      Padded frames are computed, not zeroed.
    """
    x, front = speech.SpeechFrontEnd(
      conv_layers=self.conv_layers,
      extractor_mode=self.extractor_mode,
      conv_bias=self.conv_bias,
      hidden=self.hidden,
      layer_norm_eps=self.layer_norm_eps,
      pos_kernel_size=self.pos_kernel_size,
      pos_groups=self.pos_groups,
      pos_depth=self.pos_depth,
      pos_kind=self.pos_kind,
      dropout_rate=self.feature_dropout_rate,
      dtype=self.dtype,
      name="front_end",
    )(
      waveform,
      attention_mask=attention_mask,
      mask=mask,
      channel_mask=channel_mask,
      features=features,
      train=train,
    )
    norm = encoder_lib.layer_norm(self.layer_norm_eps, "encoder_layer_norm")
    x = encoder_lib.layer_norm_rows(norm, x).astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x, aux = encoder_lib.post_ln_encoder(self)(
      x, padding_mask=front["padding_mask"], train=train
    )
    return x, {**front, **aux}
