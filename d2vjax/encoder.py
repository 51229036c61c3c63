"""The Transformer encoder shared by the three data2vec modalities.

One `TransformerEncoder` covers both block styles of data2vec v1:

* `post_ln` (speech and text, fairseq/BERT style): residual add, then
  LayerNorm; BERT init; optional LayerDrop (one draw per layer per step).
* `pre_ln` (vision, BEiT style): LayerNorm inside each branch, layer scale
  (γ1, γ2), per-sample stochastic depth, one relative-position bias table
  shared by all blocks; BEiT init (±1σ truncated normal, depth rescaling).

`__call__` returns the final residual stream and an `aux` dict with the
per-block tensor the data2vec teacher taps (`layer_results`) and every
hidden state, both stacked along a leading layer axis.

The modality models build their stack with `encoder_for` (or
`post_ln_encoder`, speech and text) from their own fields, and their
embedding and final norms with `layer_norm`, the blocks' LayerNorm.

Parameter layout (what `d2vjax.convert` fills in): `layers_{i}/` holds
`attention/{q_proj,k_proj,v_proj,out_proj}`, `fc1`, `fc2` and either
`attn_layer_norm`, `final_layer_norm` (post_ln) or `norm_before`,
`norm_after`, `gamma_1`, `gamma_2` (pre_ln); the shared bias table is
`relative_position_bias_table` at the top.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2vjax import dropout as dropout_lib

Array = jax.Array
Initializer = Callable[..., Array]

BLOCK_STYLES = ("post_ln", "pre_ln")
TAPS = ("ffn", "ffn_residual", "end", "attention")

BERT_INIT_STD = 0.02


def truncated_normal_one_sigma(stddev: float = BERT_INIT_STD) -> Initializer:
  """N(0, stddev²) truncated at ±1 stddev, *not* rescaled afterwards.

  BEiT (and data2vec_vision) call `trunc_normal_(w, std=s)` with bounds
  `a=-s, b=s`, so the draw is cut at one standard deviation and keeps the
  narrower spread: the empirical std is ≈ 0.54·stddev (0.0108 for 0.02).
  `jax.nn.initializers.truncated_normal` cuts at ±2σ and rescales, which is
  a different distribution.

  Args:
    stddev: standard deviation of the normal before truncation.

  Returns:
    A Flax initializer `(key, shape, dtype) -> array`.

  References:
    Bao et al., "BEiT", 2021 (init of the released code);
    data2vec_vision `beit/modeling_cyclical.py` (`trunc_normal_` with
    `a=-std, b=std`).
  """

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
    return stddev * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)

  return init


def scaled_init(base: Initializer, factor: float) -> Initializer:
  """`base` multiplied by a constant (BEiT's depth rescaling)."""

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
    return base(key, shape, dtype) * jnp.asarray(factor, dtype)

  return init


@functools.lru_cache(maxsize=16)
def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """BEiT's relative-position index table for a CLS token plus a patch grid.

  Token 0 is CLS, tokens 1… are the patches in row-major order. For patches
  a=(r_a, c_a), b=(r_b, c_b) the entry is
  `(r_a − r_b + h − 1)·(2w − 1) + (c_a − c_b + w − 1)`; with
  n = (2h−1)(2w−1) the CLS entries are: CLS query → any key n, patch query
  → CLS key n+1, CLS → CLS n+2. The table is a constant (never a parameter,
  so an EMA can never round it; spec §1.5 quirk 4).

  Args:
    grid: `(h, w)` patches per column and per row.

  Returns:
    int32 array `[h·w + 1, h·w + 1]` (read-only, cached).

  References:
    Bao et al., "BEiT", 2021, section 2.6 (relative position bias).
  """
  h, w = grid
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  d_row = rows[:, None] - rows[None, :] + h - 1
  d_col = cols[:, None] - cols[None, :] + w - 1
  n = (2 * h - 1) * (2 * w - 1)
  index = np.empty((h * w + 1, h * w + 1), np.int32)
  index[1:, 1:] = d_row * (2 * w - 1) + d_col
  index[0, :] = n
  index[1:, 0] = n + 1
  index[0, 0] = n + 2
  index.setflags(write=False)
  return index


def num_relative_positions(grid: tuple[int, int]) -> int:
  """Rows of the relative-position bias table: (2h−1)(2w−1) + 3."""
  h, w = grid
  return (2 * h - 1) * (2 * w - 1) + 3


def layer_norm(eps: float, name: str) -> nn.LayerNorm:
  """The LayerNorm of the data2vec models (blocks, embeddings, final norm).

  Statistics in float32 with the two-pass variance: the fast E[x²]−E[x]²
  form loses digits on the residual stream of deep pre-LN models.

  Args:
    eps: epsilon added to the variance.
    name: the submodule's (and its parameters') name.

  Returns:
    An `nn.LayerNorm` with a float32 output; cast back to the compute dtype.
  """
  return nn.LayerNorm(
    epsilon=eps, dtype=jnp.float32, use_fast_variance=False, name=name
  )


def layer_norm_rows(norm: nn.Module, x: Array) -> Array:
  """Applies a LayerNorm to `x` `[..., C]` viewed as `[rows, C]`.

  The same numbers as `norm(x)`. The gradient of the scale is then a 2-D
  column sum; over a `[1, T, C]` batch XLA on CPU reduces the middle axis
  with a kernel ~8x slower (3.2 ms against 0.4 ms for 512 × 768, 60x for
  the speech CNN's 48k frames).
  """
  return norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _drop_path(x: Array, rate: float, rng: Array) -> Array:
  """Per-sample stochastic depth: zero a whole sample's branch, rescale."""
  keep = 1.0 - rate
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(rng, keep, shape)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


@jax.custom_vjp
def gradient_barrier(x: Array) -> Array:
  """The identity, whose cotangent is materialised before it flows on.

  The gradient of a residual stream is a long chain of elementwise adds,
  one group per block. XLA on CPU fuses cheap elementwise producers into
  each of their consumers, duplicating them, so a consumer deep in the
  backward pass (a layer-scale gradient's transposed reduction, say)
  recomputed the whole chain from the top block down: quadratic in depth,
  ~0.35 s of a ViT-B/16 step. An optimization barrier would not stop it
  (XLA:CPU expands barriers before fusion), but a conditional is a fusion
  boundary, so the backward pass routes the cotangent through one whose
  branches both return it unchanged (bit for bit, signed zeros and NaN
  included). Placed at every block input.
  """
  return x


def _barrier_fwd(x):
  return x, None


def _barrier_bwd(_, g):
  flat = g.reshape(-1)
  # A data-dependent predicate that XLA cannot fold (x == x is False for
  # NaN), and two branches it cannot merge (the second negates twice).
  take_first = flat[0] == flat[0]
  return (
    jax.lax.cond(
      take_first, lambda y: y, lambda y: jnp.negative(jnp.negative(y)), g
    ),
  )


gradient_barrier.defvjp(_barrier_fwd, _barrier_bwd)


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections.

  Attributes:
    hidden: model width C.
    heads: number of heads (C must be divisible by it).
    key_bias: whether the key projection has a bias (BEiT's has none).
    attention_dropout_rate: dropout on the attention probabilities.
    kernel_init: init of q/k/v kernels.
    out_kernel_init: init of the output kernel.
    dtype: compute dtype; logits and softmax are float32.
  """

  hidden: int
  heads: int
  key_bias: bool = True
  attention_dropout_rate: float = 0.0
  kernel_init: Initializer = nn.initializers.normal(BERT_INIT_STD)
  out_kernel_init: Initializer = nn.initializers.normal(BERT_INIT_STD)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    padding_mask: Array | None,
    position_bias: Array | None,
    train: bool,
  ) -> Array:
    """Attends over `x` `[B, T, C]`; padded keys get no weight.

    Args:
      x: input `[B, T, C]`.
      padding_mask: `[B, T]` bool, True = padded, or None.
      position_bias: additive logits bias `[heads, T, T]` or None.
      train: enables attention dropout.

    Returns:
      `[B, T, C]` in the compute dtype.
    """
    if self.hidden % self.heads:
      raise ValueError(
        f"hidden={self.hidden} is not divisible by heads={self.heads}"
      )
    b, t, _ = x.shape
    head_dim = self.hidden // self.heads
    dense = functools.partial(
      nn.Dense,
      self.hidden,
      dtype=self.dtype,
      kernel_init=self.kernel_init,
      bias_init=nn.initializers.zeros,
    )
    split = lambda y: y.reshape(b, t, self.heads, head_dim)
    q = split(dense(name="q_proj")(x))
    k = split(dense(use_bias=self.key_bias, name="k_proj")(x))
    v = split(dense(name="v_proj")(x))
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    if position_bias is not None:
      logits = logits + position_bias.astype(jnp.float32)[None]
    if padding_mask is not None:
      # Replace (rather than add to) padded logits with the most negative
      # finite float: it stays finite whatever bias came before, and a row
      # whose keys are all padded gets a uniform softmax instead of NaN.
      logits = jnp.where(
        padding_mask[:, None, None, :], jnp.finfo(jnp.float32).min, logits
      )
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    probs = dropout_lib.Dropout(self.attention_dropout_rate)(
      probs, deterministic=not train
    )
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.hidden)
    return nn.Dense(
      self.hidden,
      dtype=self.dtype,
      kernel_init=self.out_kernel_init,
      bias_init=nn.initializers.zeros,
      name="out_proj",
    )(out)


class EncoderBlock(nn.Module):
  """One Transformer block, post-LN or pre-LN (see `TransformerEncoder`).

  Attributes:
    index: 1-based depth of the block (BEiT's init rescaling uses it).
    drop_path_rate: stochastic-depth rate of this block (pre_ln).
    tap: the tensor returned beside the block output (see
      `TransformerEncoder.tap`).
    Others: as in `TransformerEncoder`.
  """

  hidden: int
  heads: int
  mlp_dim: int
  block: str
  layer_norm_eps: float
  dropout_rate: float
  attention_dropout_rate: float
  activation_dropout_rate: float
  drop_path_rate: float
  layer_scale_init: float | None
  key_bias: bool
  index: int
  tap: str = "ffn"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: Array,
    padding_mask: Array | None,
    position_bias: Array | None,
    train: bool,
  ) -> tuple[Array, Array]:
    """Returns `(block output, tapped tensor)`, both `[B, T, C]`."""
    if self.block == "pre_ln":
      base = truncated_normal_one_sigma(BERT_INIT_STD)
      # BEiT `fix_init_weight`: the two kernels that write into the residual
      # stream are divided by √(2·depth), so deep blocks start smaller.
      residual_init = scaled_init(base, 1.0 / np.sqrt(2.0 * self.index))
    else:
      base = residual_init = nn.initializers.normal(BERT_INIT_STD)
    dense = functools.partial(
      nn.Dense, dtype=self.dtype, bias_init=nn.initializers.zeros
    )
    attention = SelfAttention(
      self.hidden,
      self.heads,
      key_bias=self.key_bias,
      attention_dropout_rate=self.attention_dropout_rate,
      kernel_init=base,
      out_kernel_init=residual_init,
      dtype=self.dtype,
      name="attention",
    )
    dropout = dropout_lib.Dropout(self.dropout_rate)
    act_dropout = dropout_lib.Dropout(self.activation_dropout_rate)
    det = not train

    def ffn(y):
      y = dense(self.mlp_dim, kernel_init=base, name="fc1")(y)
      y = nn.gelu(y, approximate=False)
      y = act_dropout(y, deterministic=det)
      return dense(self.hidden, kernel_init=residual_init, name="fc2")(y)

    def norm(y, name):
      norm = layer_norm(self.layer_norm_eps, name)
      return layer_norm_rows(norm, y).astype(self.dtype)

    if self.block == "post_ln":
      att = attention(x, padding_mask, position_bias, train)
      a = norm(x + dropout(att, deterministic=det), "attn_layer_norm")
      fc = ffn(a)
      summed = a + dropout(fc, deterministic=det)
      x = norm(summed, "final_layer_norm")
      taps = {"ffn": fc, "ffn_residual": summed, "end": x, "attention": att}
      return x, taps[self.tap]

    def scale(y, name):
      if self.layer_scale_init is None:
        return y
      gamma = self.param(
        name,
        nn.initializers.constant(self.layer_scale_init),
        (self.hidden,),
        jnp.float32,
      )
      return y * gamma.astype(self.dtype)

    def residual(y):
      if train and self.drop_path_rate > 0.0:
        return _drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
      return y

    att = attention(norm(x, "norm_before"), padding_mask, position_bias, train)
    h = scale(dropout(att, deterministic=det), "gamma_1")
    x = x + residual(h)
    fc = ffn(norm(x, "norm_after"))
    h = scale(dropout(fc, deterministic=det), "gamma_2")
    x = x + residual(h)
    # Without a final LayerNorm, FFN + residual is the block output.
    taps = {"ffn": fc, "ffn_residual": x, "end": x, "attention": att}
    return x, taps[self.tap]


class TransformerEncoder(nn.Module):
  """A stack of Transformer blocks that also returns per-layer taps.

  Attributes:
    num_layers: number of blocks L.
    hidden: model width C.
    heads: attention heads.
    mlp_dim: FFN inner width.
    block: "post_ln" (fairseq speech/text) or "pre_ln" (BEiT vision).
    layer_norm_eps: LayerNorm epsilon (1e-5 fairseq/HF text+audio, 1e-6
      BEiT, 1e-12 HF vision default).
    dropout_rate: dropout on the attention output and the FFN output.
    attention_dropout_rate: dropout on the attention probabilities.
    activation_dropout_rate: dropout after the FFN's GELU.
    layerdrop: post_ln only; probability of skipping a whole layer, drawn
      once per layer per step for the whole batch, train mode only.
    drop_path_rate: pre_ln only; stochastic-depth rate rising linearly from
      0 (first block) to this value (last block), drawn per sample.
    layer_scale_init: pre_ln only; init of the γ1/γ2 vectors, or None for
      no layer scale.
    key_bias: whether the key projection has a bias (False for BEiT).
    relative_position_grid: pre_ln only; `(h, w)` patch grid of a CLS +
      patches sequence. Adds one relative-position bias table shared by all
      blocks (zero init). None = no relative position bias.
    tap: which per-block tensor goes to `aux["layer_results"]` (the
      teacher features of the data2vec paper's Table 4): "ffn" = fc2
      output before dropout, residual and LayerNorm (data2vec speech/text
      target); "ffn_residual" = FFN output plus the residual stream, before
      the post-LN block's final LayerNorm (the block output in a pre-LN
      block); "end" = block output (data2vec_vision target); "attention" =
      the self-attention module's output, before dropout and residual.
    remat: recompute each block in the backward pass (`nn.remat`).
    dtype: compute dtype. Parameters are float32; LayerNorm and softmax are
      computed in float32.

  References:
    Baevski et al., "data2vec", 2022, section 3 (targets from the top K
    blocks); Vaswani et al., 2017 (post-LN); Bao et al., "BEiT", 2021
    (pre-LN blocks, shared relative position bias, layer scale); Fan et al.,
    "Reducing Transformer Depth on Demand", 2019 (LayerDrop); Huang et al.,
    "Deep Networks with Stochastic Depth", 2016.
  """

  num_layers: int
  hidden: int
  heads: int
  mlp_dim: int
  block: str = "post_ln"
  layer_norm_eps: float = 1e-5
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  activation_dropout_rate: float = 0.0
  layerdrop: float = 0.0
  drop_path_rate: float = 0.0
  layer_scale_init: float | None = None
  key_bias: bool = True
  relative_position_grid: tuple[int, int] | None = None
  tap: str = "ffn"
  remat: bool = False
  dtype: Any = jnp.float32

  def _position_bias(self, t: int) -> Array | None:
    if self.relative_position_grid is None:
      return None
    grid = tuple(self.relative_position_grid)
    index = relative_position_index(grid)
    if index.shape[0] != t:
      raise ValueError(
        f"relative_position_grid {grid} implies {index.shape[0]} tokens "
        f"(CLS + {grid[0]}x{grid[1]} patches) but the input has {t}"
      )
    table = self.param(
      "relative_position_bias_table",
      nn.initializers.zeros,
      (num_relative_positions(grid), self.heads),
      jnp.float32,
    )
    # [T, T, heads] gathered with a numpy constant, then heads first.
    return jnp.transpose(table[index], (2, 0, 1))

  @nn.compact
  def __call__(
    self,
    x: Array,
    *,
    padding_mask: Array | None = None,
    train: bool = False,
  ) -> tuple[Array, dict[str, Array]]:
    """Runs the blocks.

    Args:
      x: input `[B, T, C]`.
      padding_mask: `[B, T]` bool, True = padded (keys there are ignored;
        the padded positions themselves are still computed, never zeroed),
        or None.
      train: enables dropout, LayerDrop and stochastic depth (these need a
        `"dropout"` RNG).

    Returns:
      `(x, aux)`: `x` the last block's output `[B, T, C]`;
      `aux["layer_results"]` `[L, B, T, C]` the tapped tensor of every
      block; `aux["hidden_states"]` `[L+1, B, T, C]`, entry 0 the input and
      entry i the output of block i. Under LayerDrop a skipped layer passes
      its input through (its hidden state repeats the previous one) and its
      layer result is what the skipped layer would have produced; fairseq
      drops such entries instead, which cannot keep a static shape. The
      teacher runs in eval mode, so its taps are never affected.

    References:
      data2vec spec §2.1 (tap points), §4a.5, §4b.3, §4c.3.
    """
    if self.block not in BLOCK_STYLES:
      raise ValueError(f"block must be one of {BLOCK_STYLES}: {self.block!r}")
    if self.tap not in TAPS:
      raise ValueError(f"tap must be one of {TAPS}: {self.tap!r}")
    if self.relative_position_grid is not None and self.block != "pre_ln":
      raise ValueError("relative_position_grid needs block='pre_ln'")
    x = x.astype(self.dtype)
    position_bias = self._position_bias(x.shape[1])
    rates = np.linspace(0.0, self.drop_path_rate, self.num_layers)
    block_cls = EncoderBlock
    if self.remat:
      # `self` is argument 0, so `train` (a Python bool) is argument 4.
      block_cls = nn.remat(EncoderBlock, static_argnums=(4,))
    hidden_states, layer_results = [x], []
    for i in range(self.num_layers):
      x = gradient_barrier(x)
      y, tapped = block_cls(
        hidden=self.hidden,
        heads=self.heads,
        mlp_dim=self.mlp_dim,
        block=self.block,
        layer_norm_eps=self.layer_norm_eps,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        activation_dropout_rate=self.activation_dropout_rate,
        drop_path_rate=float(rates[i]) if self.block == "pre_ln" else 0.0,
        layer_scale_init=(
          self.layer_scale_init if self.block == "pre_ln" else None
        ),
        key_bias=self.key_bias,
        index=i + 1,
        tap=self.tap,
        dtype=self.dtype,
        name=f"layers_{i}",
      )(x, padding_mask, position_bias, train)
      if train and self.layerdrop > 0.0 and self.block == "post_ln":
        # One draw per layer per step for the whole batch (fairseq).
        keep = jax.random.bernoulli(
          self.make_rng("dropout"), 1 - self.layerdrop
        )
        y = jnp.where(keep, y, x)
      x = y
      hidden_states.append(x)
      # Under LayerDrop "end" follows the layer actually kept.
      layer_results.append(x if self.tap == "end" else tapped)
    aux = {
      "layer_results": jnp.stack(layer_results),
      "hidden_states": jnp.stack(hidden_states),
    }
    return x, aux


def encoder_for(model: nn.Module, **options: Any) -> TransformerEncoder:
  """The `encoder` submodule of a modality model, sized by its fields.

  `AudioEncoder`, `VisionEncoder` and `TextEncoder` name their Transformer
  fields as `TransformerEncoder` does; this reads `num_layers`, `hidden`,
  `heads`, `mlp_dim`, `layer_norm_eps`, `dropout_rate`,
  `attention_dropout_rate`, `remat` and `dtype` from `model`. Call it inside
  the model's compact `__call__`, so that the stack is its submodule.

  Args:
    model: the modality model whose Transformer this is.
    **options: the block style and every other `TransformerEncoder` field.

  Returns:
    A `TransformerEncoder` named `encoder`.
  """
  return TransformerEncoder(
    num_layers=model.num_layers,
    hidden=model.hidden,
    heads=model.heads,
    mlp_dim=model.mlp_dim,
    layer_norm_eps=model.layer_norm_eps,
    dropout_rate=model.dropout_rate,
    attention_dropout_rate=model.attention_dropout_rate,
    remat=model.remat,
    dtype=model.dtype,
    name="encoder",
    **options,
  )


def post_ln_encoder(model: nn.Module) -> TransformerEncoder:
  """`encoder_for` with fairseq's speech and text recipe.

  Post-LN blocks, LayerDrop, and the FFN output (fc2) as the teacher's tap;
  `activation_dropout_rate` and `layerdrop` are read from `model` too.

  Args:
    model: an `AudioEncoder` or `TextEncoder`.

  Returns:
    A `TransformerEncoder` named `encoder`.
  """
  return encoder_for(
    model,
    block="post_ln",
    activation_dropout_rate=model.activation_dropout_rate,
    layerdrop=model.layerdrop,
    tap="ffn",
  )
