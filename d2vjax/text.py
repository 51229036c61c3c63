"""The data2vec text encoder (fairseq RoBERTa-style `TransformerEncoder`).

Token embedding + learned position embedding (RoBERTa position ids) +
optional token-type embedding → embedding LayerNorm → dropout → post-LN
blocks; no final LayerNorm. The data2vec teacher taps each block's fc2
output (`tap="ffn"`). Token masking (`<mask>` ids) happens on the host, so
the ids the model sees are already corrupted.

Parameter layout: `word_embeddings/embedding`, `position_embeddings/
embedding`, `token_type_embeddings/embedding` (only with
`type_vocab_size > 0`), `embedding_layer_norm/{scale,bias}`, `encoder/...`
(see `d2vjax.encoder`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2vjax import encoder as encoder_lib

Array = jax.Array


def position_ids(input_ids: Array, pad_id: int) -> Array:
  """RoBERTa/fairseq position ids: `pad + cumsum(non-pad)`, `pad` at pads.

  Real tokens are numbered `pad+1, pad+2, …` (2, 3, … for pad 1) counting
  only non-pad tokens; pad positions get `pad` itself, whose embedding row
  is zero at init.

  Args:
    input_ids: `[B, T]` integer token ids.
    pad_id: the padding id.

  Returns:
    int32 `[B, T]`.

  References:
    fairseq `utils.make_positions`; data2vec spec §4c.3.
  """
  real = (input_ids != pad_id).astype(jnp.int32)
  return jnp.cumsum(real, axis=1) * real + pad_id


def _embedding_init(pad_id: int | None):
  """BERT init (normal 0.02) with the padding row zeroed (fairseq)."""

  def init(key, shape, dtype=jnp.float32):
    table = nn.initializers.normal(encoder_lib.BERT_INIT_STD)(key, shape, dtype)
    if pad_id is not None and pad_id < shape[0]:
      table = table.at[pad_id].set(0)
    return table

  return init


def check_ids(input_ids: Any, vocab_size: int) -> None:
  """Raises ValueError if concrete ids fall outside `[0, vocab_size)`.

  Traced ids (under `jit`) cannot be inspected and are skipped; an
  out-of-range id there gathers NaN embeddings instead.
  """
  if isinstance(input_ids, jax.core.Tracer):
    return
  ids = np.asarray(input_ids)
  bad = ids[(ids < 0) | (ids >= vocab_size)]
  if bad.size:
    raise ValueError(
      f"token id {int(bad.flat[0])} is outside the vocabulary "
      f"[0, {vocab_size}) (vocab_size={vocab_size}); "
      f"{bad.size} ids out of range"
    )


class TextEncoder(nn.Module):
  """RoBERTa-style encoder as used by data2vec text (defaults: Base).

  Attributes:
    vocab_size: rows of the token embedding (fairseq dictionary: 50265).
    hidden: model width.
    num_layers: number of post-LN blocks.
    heads: attention heads.
    mlp_dim: FFN inner width.
    max_positions: rows of the position embedding (512 + pad + 1 = 514).
    pad_id: padding id (fairseq/RoBERTa: 1).
    type_vocab_size: rows of a token-type embedding added to every token
      (HF keeps 1 all-zero row; fairseq has none: 0).
    layer_norm_eps: LayerNorm epsilon (1e-5).
    dropout_rate: dropout after the embedding LayerNorm and in the blocks.
    attention_dropout_rate: dropout on the attention probabilities.
    activation_dropout_rate: dropout after the FFN's GELU.
    layerdrop: probability of skipping a layer in train mode.
    zero_pad_embeddings: multiply the embeddings of pad tokens by 0 after
      the embedding LayerNorm (fairseq does, HF does not). Real-token outputs
      are the same either way because pads are masked as keys.
    remat: recompute blocks in the backward pass.
    dtype: compute dtype (parameters float32).

  References:
    Baevski et al., "data2vec", 2022, section 4.3; Liu et al., "RoBERTa",
    2019; data2vec spec §4c.3.
  """

  vocab_size: int = 50265
  hidden: int = 768
  num_layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  max_positions: int = 514
  pad_id: int = 1
  type_vocab_size: int = 0
  layer_norm_eps: float = 1e-5
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  activation_dropout_rate: float = 0.0
  layerdrop: float = 0.0
  zero_pad_embeddings: bool = True
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    mask: Array | None = None,
    train: bool = False,
    *,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """Encodes token ids.

    Args:
      input_ids: `[B, T]` integer ids (already `<mask>`-corrupted for the
        student).
      mask: accepted for a call signature shared with the other
        modalities and ignored: text masking replaces ids on the host, and
        the mask is only needed by the loss.
      train: enables dropout and LayerDrop (needs a `"dropout"` RNG).
      attention_mask: `[B, T]`, 1 = real token, 0 = padding (as in HF). If
        None, padding is `input_ids == pad_id`.
      token_type_ids: `[B, T]` ints or None (= all 0); needs
        `type_vocab_size > 0`.

    Returns:
      `(last_hidden_state [B, T, C], aux)` with `aux["layer_results"]`
      `[L, B, T, C]` (fc2 outputs), `aux["hidden_states"]`
      `[L+1, B, T, C]` (entry 0 the embedding output) and
      `aux["position_ids"]` `[B, T]`.

    Raises:
      ValueError: for concrete ids outside `[0, vocab_size)`, or a sequence
        longer than the position table allows.
    """
    del mask  # see Args
    check_ids(input_ids, self.vocab_size)
    _, t = input_ids.shape
    if t + self.pad_id + 1 > self.max_positions:
      raise ValueError(
        f"sequence length {t} needs position ids up to {t + self.pad_id} "
        f"but the position table has {self.max_positions} rows"
      )
    input_ids = jnp.asarray(input_ids)
    positions = position_ids(input_ids, self.pad_id)

    def embed(rows, name, pad):
      return nn.Embed(
        rows,
        self.hidden,
        dtype=self.dtype,
        embedding_init=_embedding_init(pad),
        name=name,
      )

    x = embed(self.vocab_size, "word_embeddings", self.pad_id)(input_ids)
    x = x + embed(self.max_positions, "position_embeddings", self.pad_id)(
      positions
    )
    if self.type_vocab_size > 0:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + embed(self.type_vocab_size, "token_type_embeddings", None)(
        token_type_ids
      )
    elif token_type_ids is not None:
      raise ValueError("token_type_ids given but type_vocab_size is 0")
    norm = encoder_lib.layer_norm(self.layer_norm_eps, "embedding_layer_norm")
    x = encoder_lib.layer_norm_rows(norm, x).astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    if attention_mask is None:
      padding_mask = input_ids == self.pad_id
    else:
      padding_mask = jnp.asarray(attention_mask) == 0
    if self.zero_pad_embeddings:
      x = x * (1 - padding_mask[..., None].astype(x.dtype))
    x, aux = encoder_lib.post_ln_encoder(self)(
      x, padding_mask=padding_mask, train=train
    )
    return x, {**aux, "position_ids": positions}
