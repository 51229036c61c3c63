"""The data2vec vision encoder (ViT with BEiT blocks, data2vec_vision code).

Patch embedding (a convolution with kernel = stride = patch size), a learned
mask token that replaces the student's masked patches, a prepended CLS
token, pre-LN blocks with layer scale and one shared relative-position bias,
and a final LayerNorm over all tokens. The data2vec teacher taps block
outputs (`tap="end"`); the targets drop the CLS token.

Parameter layout: `patch_embed/{kernel,bias}`, `cls_token`, `mask_token`,
`pos_embed` (only with `use_abs_pos_emb`), `encoder/...` (see
`d2vjax.encoder`), `norm/{scale,bias}`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2vjax import encoder as encoder_lib

Array = jax.Array


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class VisionEncoder(nn.Module):
  """ViT/BEiT encoder as trained by data2vec_vision (defaults: ViT-B/16).

  Attributes:
    image_size: input height and width (an int means square). Fixes the
      patch grid and hence the size of the relative-position table.
    patch_size: patch side in pixels.
    hidden: model width.
    num_layers: number of blocks.
    heads: attention heads.
    mlp_dim: FFN inner width.
    layer_norm_eps: LayerNorm epsilon in the blocks and the final norm
      (BEiT 1e-6; HF `Data2VecVisionConfig` defaults to 1e-12).
    dropout_rate: dropout on the attention and FFN outputs.
    attention_dropout_rate: dropout on the attention probabilities.
    drop_path_rate: stochastic depth at the last block (linear from 0).
    layer_scale_init: init of γ1/γ2 (data2vec README 1e-4), None = off.
    use_mask_token: whether a learned mask token exists (needed for `mask`).
    use_abs_pos_emb: add a learned absolute position embedding (BEiT's
      option, off in data2vec).
    use_rel_pos_bias: one relative-position bias table shared by all blocks.
    use_final_norm: apply the final LayerNorm to all tokens (False for HF
      checkpoints with mean pooling, whose norm sits in the pooler).
    tap: the per-block tensor exposed as `layer_results`: "end" (block
      output, the released data2vec_vision targets) or "ffn" (FFN output
      before the residual, the paper's description).
    remat: recompute blocks in the backward pass.
    dtype: compute dtype (parameters float32).

  References:
    Baevski et al., "data2vec", 2022, section 4.1; Bao et al., "BEiT", 2021;
    data2vec spec §4b.3.
  """

  image_size: int | tuple[int, int] = 224
  patch_size: int = 16
  hidden: int = 768
  num_layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.05
  drop_path_rate: float = 0.25
  layer_scale_init: float | None = 1e-4
  use_mask_token: bool = True
  use_abs_pos_emb: bool = False
  use_rel_pos_bias: bool = True
  use_final_norm: bool = True
  tap: str = "end"
  remat: bool = False
  dtype: Any = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    """Patches per column and per row of the configured image size."""
    h, w = _pair(self.image_size)
    _check_divisible(h, w, self.patch_size)
    return h // self.patch_size, w // self.patch_size

  @nn.compact
  def __call__(
    self, images: Array, mask: Array | None = None, train: bool = False
  ) -> tuple[Array, dict[str, Array]]:
    """Encodes a batch of images.

    Args:
      images: `[B, H, W, C]` (NHWC; transpose PyTorch's NCHW first).
      mask: student mask over patches `[B, N]` bool (N = number of patches,
        row-major), True = replaced by the mask token; None = no masking.
      train: enables dropout and stochastic depth (needs a `"dropout"` RNG).

    Returns:
      `(last_hidden_state [B, 1+N, C], aux)` with `aux["layer_results"]`
      `[L, B, 1+N, C]` (block outputs, CLS first) and
      `aux["hidden_states"]` `[L+1, B, 1+N, C]` (entry 0 the embeddings).

    Raises:
      ValueError: if H or W is not a multiple of the patch size or differs
        from `image_size`, or if `mask` has the wrong shape.
    """
    b, h, w, _ = images.shape
    _check_divisible(h, w, self.patch_size)
    if (h, w) != _pair(self.image_size):
      raise ValueError(
        f"image is {h}x{w} (HxW) but the model was built for image_size "
        f"{_pair(self.image_size)}; the relative-position table is sized "
        "for that patch grid"
      )
    init = encoder_lib.truncated_normal_one_sigma()
    p = self.patch_size
    x = nn.Conv(
      self.hidden,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      kernel_init=init,
      bias_init=nn.initializers.zeros,
      name="patch_embed",
    )(images.astype(self.dtype))
    x = x.reshape(b, -1, self.hidden)  # patches in row-major order
    n = x.shape[1]
    if mask is not None:
      if not self.use_mask_token:
        raise ValueError("mask given but the model has no mask token")
      if mask.shape != (b, n):
        raise ValueError(f"mask must have shape {(b, n)}, got {mask.shape}")
    if self.use_mask_token:
      token = self.param("mask_token", init, (1, 1, self.hidden), jnp.float32)
      if mask is not None:
        weight = mask[..., None].astype(self.dtype)
        x = x * (1 - weight) + token.astype(self.dtype) * weight
    cls = self.param("cls_token", init, (1, 1, self.hidden), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.hidden))
    x = jnp.concatenate([cls, x], axis=1)
    if self.use_abs_pos_emb:
      pos = self.param("pos_embed", init, (1, n + 1, self.hidden), jnp.float32)
      x = x + pos.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x, aux = encoder_lib.encoder_for(
      self,
      block="pre_ln",
      activation_dropout_rate=self.dropout_rate,
      drop_path_rate=self.drop_path_rate,
      layer_scale_init=self.layer_scale_init,
      key_bias=False,
      relative_position_grid=self.grid if self.use_rel_pos_bias else None,
      tap=self.tap,
    )(x, train=train)
    if self.use_final_norm:
      norm = encoder_lib.layer_norm(self.layer_norm_eps, "norm")
      x = norm(x).astype(self.dtype)
    return x, aux


def _check_divisible(h: int, w: int, patch: int) -> None:
  if h % patch or w % patch:
    raise ValueError(
      f"image height {h} and width {w} must both be multiples of the patch "
      f"size {patch}"
    )
