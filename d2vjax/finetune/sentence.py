"""GLUE-style sentence classification and regression on the text encoder.

data2vec text checkpoints are fine-tuned with fairseq's RoBERTa recipe: the
features of the first token (`<s>`) go through a small head (dropout, dense,
tanh, dropout, output projection); classification tasks use cross-entropy
and STS-B (one output) mean squared error, both averaged over sentences.

Recipe (spec §6.3): Adam (0.9, 0.98) ε 1e-6, weight decay 0.1, 6% linear
warm-up then linear decay to 0, 10 epochs, dropout 0.1 in the encoder.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from d2vjax import initializers, text

Array = jax.Array


class SentenceClassifier(nn.Module):
  """RoBERTa-style classification head on the `<s>` token.

  Parameters: `encoder/...` (the `TextEncoder` layout), `dense`,
  `out_proj`. The head uses PyTorch's default Linear init: fairseq
  registers classification heads after BERT init has run on the model.

  Attributes:
    encoder: the (pretrained) `TextEncoder`, with its fine-tuning dropouts.
    num_labels: classes, or 1 for regression (STS-B).
    pooler_dropout: dropout before each head projection (0 in the recipe).
    inner_dim: width of the dense layer (None = the encoder width).

  References:
    Liu et al., "RoBERTa", 2019; fairseq `models/roberta/model.py`
    (`RobertaClassificationHead`); data2vec spec §6.3.
  """

  encoder: text.TextEncoder
  num_labels: int
  pooler_dropout: float = 0.0
  inner_dim: int | None = None

  @nn.compact
  def __call__(
    self,
    input_ids: Array,
    *,
    attention_mask: Array | None = None,
    token_type_ids: Array | None = None,
    train: bool,
  ) -> Array:
    """Sentence logits (or regression outputs).

    Args:
      input_ids: `[B, T]` ids starting with `<s>`.
      attention_mask: `[B, T]`, 1 = real token; None = `ids != pad`.
      token_type_ids: passed to the encoder (needs `type_vocab_size > 0`).
      train: enables dropout (needs a `"dropout"` RNG).

    Returns:
      float32 `[B, num_labels]`.
    """
    x, _ = self.encoder(
      input_ids,
      None,
      train,
      attention_mask=attention_mask,
      token_type_ids=token_type_ids,
    )
    x = x[:, 0].astype(jnp.float32)
    hidden = self.inner_dim or x.shape[-1]
    x = nn.Dropout(self.pooler_dropout)(x, deterministic=not train)
    x = nn.Dense(
      hidden, name="dense", **initializers.torch_linear_init(x.shape[-1])
    )(x)
    x = jnp.tanh(x)
    x = nn.Dropout(self.pooler_dropout)(x, deterministic=not train)
    return nn.Dense(
      self.num_labels, name="out_proj", **initializers.torch_linear_init(hidden)
    )(x)


def classification_loss(logits: Array, labels: Array, num_labels: int) -> Array:
  """Sentence-averaged loss of fairseq's `sentence_prediction` criterion.

  Args:
    logits: `[B, num_labels]`.
    labels: `[B]` integer classes, or `[B]` float targets when
      `num_labels == 1`.
    num_labels: 1 selects regression (mean squared error), otherwise
      softmax cross-entropy.

  Returns:
    Scalar float32, the mean over sentences.

  Raises:
    ValueError: if the logits' last axis is not `num_labels`.

  References:
    fairseq `criterions/sentence_prediction.py` (sum reduction over
    sentences, divided by their number).
  """
  logits = jnp.asarray(logits, jnp.float32)
  if logits.shape[-1] != num_labels:
    raise ValueError(
      f"logits have {logits.shape[-1]} outputs, num_labels is {num_labels}"
    )
  if num_labels == 1:
    target = jnp.asarray(labels, jnp.float32).reshape(-1)
    return jnp.mean(jnp.square(logits.reshape(-1) - target))
  labels = jnp.asarray(labels).astype(jnp.int32)
  return jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  )
