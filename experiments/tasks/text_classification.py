"""Sentence classification and regression: a data2vec text encoder.

The task behind ``config.task="text_classification"``
(`experiments/configs/d2v_finetune.py` ``:text*``), RoBERTa's GLUE recipe
as data2vec uses it (spec §6.3):

* a tanh head on ``<s>`` (`d2vjax.finetune.SentenceClassifier`);
  ``model.num_labels == 1`` makes it a regression (STS-B: MSE);
* fairseq Adam with decay of every weight, linear warm-up then linear
  decay to 0;
* accuracy, or for regression (`regression_scores`) MSE, MAE, Pearson
  correlation and Acc2, the sign agreement on the non-zero targets; the
  best step by accuracy or Pearson.

Data (``config.data.source``): a ``"synthetic"`` text is random ordinary
tokens and its label the most frequent token group (``id % num_labels``)
or, for regression, five times the share of even ids (STS-B's 0-5);
``"sentiment"`` is a set of `experiments.data.sentiment_sets`
(``data.sentiment_task``): ``vader_movie`` with ``num_labels=1`` regresses
the rating in [-3, 3], with ``num_labels=2`` classifies its sign (zero
ratings left out); ``rt_polarity`` is fresh vs rotten. Training sees
``data.labels`` of the train split's sentences (0 = all; a random draw by
``data.subset_seed``, `experiments.data.sentiment_sets.labelled_subset`);
the valid split validates and picks the best checkpoint, on which the test
split is scored once at the end (`labelled_splits`).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from d2vjax import finetune as ft
from d2vjax import optim
from d2vjax.datasets import text as text_lib
from experiments.data import sentiment_sets
from experiments.tasks import finetune
from mtagjax import metrics as mtag_metrics

Array = jax.Array
Batch = finetune.Batch

SENTIMENT_TASKS = ("vader_movie", "rt_polarity")


@functools.lru_cache(maxsize=2)
def _sentiment_set(
  path: str, corpus: str, data_dir: str, task: str, seq_len: int, k: int
) -> dict:
  """A sentiment set fitted to `seq_len` tokens, labels for `k` outputs."""
  if not path:
    path = sentiment_sets.build(corpus, data_dir or None)
  file = pathlib.Path(path) / f"{task}.npz"
  if not file.is_file():
    raise FileNotFoundError(
      f"{file} not found: point config.data.path at a folder built by "
      "`python -m experiments.data.sentiment_sets`"
    )
  with np.load(file) as z:
    ids, lengths = z["ids"], z["lengths"]
    labels, split = z["labels"], z["split"]
  if task == "vader_movie" and k == 2:  # the sign; zero ratings left out
    keep = labels != 0
    ids, lengths, split = ids[keep], lengths[keep], split[keep]
    labels = (labels[keep] > 0).astype(np.int32)
  fitted = np.full((len(ids), seq_len), text_lib.PAD_ID, np.int32)
  width = min(seq_len, ids.shape[1])
  fitted[:, :width] = ids[:, :width]
  cut = lengths > seq_len  # truncated here: end on </s> again
  fitted[cut, seq_len - 1] = text_lib.EOS_ID
  labels = labels.astype(np.float32 if k == 1 else np.int32)
  return {"ids": fitted, "labels": labels, "split": split}


def labelled_splits(
  config: ml_collections.ConfigDict,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The sentences of a ``source="sentiment"`` config, by split.

  Args:
    config: a fine-tuning config; ``config.data`` names the set
      (``path`` / ``corpus``, ``sentiment_task``), the padded length
      (``seq_len``) and the labelled subset (``labels``, ``subset_seed``);
      ``config.model.num_labels`` whether ratings are regressed (1) or
      their signs classified (2).

  Returns:
    ``(ids, labels)`` for ``train`` (the labelled subset; for the sign of
    the rating, drawn among the sentences rated other than 0), ``valid``
    and ``test``: ids int32 ``[n, seq_len]`` as ``<s> ... </s>`` padded
    with ``<pad>``, labels float32 ratings or int32 classes.

  Raises:
    FileNotFoundError: when the set is not where ``data.path`` says.
    ValueError: for a ``data.labels`` larger than the train split.
  """
  d, k = config.data, config.model.num_labels
  data = _sentiment_set(
    d.path, d.corpus, d.data_dir, d.sentiment_task, d.seq_len, k
  )
  out = {}
  for code, split in enumerate(sentiment_sets.SPLITS):
    at = np.flatnonzero(data["split"] == code)
    if split == "train":
      at = at[sentiment_sets.labelled_subset(len(at), d.labels, d.subset_seed)]
    out[split] = (data["ids"][at], data["labels"][at])
  return out


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  if x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def regression_scores(
  preds: np.ndarray, targets: np.ndarray
) -> dict[str, float]:
  """The regression metrics of predicted ratings.

  Args:
    preds: ``[n]`` predictions.
    targets: ``[n]`` true ratings (or scores).

  Returns:
    ``mse``, ``mae``, ``pearson`` (NaN when either side is constant) and
    ``acc2``: the share of the targets other than 0 whose sign the
    prediction has (`mtagjax.metrics.mosi_metrics`'s ``acc2_nonzero``,
    CMU-MOSI's Acc2 as MulT reports it; NaN when every target is 0). A
    prediction that is not finite makes MAE and Acc2 NaN.
  """
  preds = np.asarray(preds, np.float64)
  targets = np.asarray(targets, np.float64)
  out = {
    "mse": float(np.mean((preds - targets) ** 2)),
    "mae": float("nan"),
    "pearson": _pearson(preds, targets),
    "acc2": float("nan"),
  }
  if np.isfinite(preds).all():
    mosi = mtag_metrics.mosi_metrics(preds, targets)
    out.update(mae=mosi["mae"], acc2=mosi["acc2_nonzero"])
  return out


class Task(finetune.FinetuneTask):
  """Sentence classes or scores (``config.task="text_classification"``)."""

  name = "text_classification"
  modality = "text"
  legacy_name = "text"
  real_source = "sentiment"
  # Workdirs from before labelled subsets trained on every sentence.
  legacy_fields = finetune.FinetuneTask.legacy_fields | {
    "data.labels": 0,
    "data.subset_seed": 0,
  }

  @property
  def default_best_metric(self) -> str:
    if self.config.model.num_labels == 1:
      return "eval/valid/pearson"
    return "eval/valid/accuracy"

  # -- model -----------------------------------------------------------------

  def create_model(self, encoder: nn.Module) -> nn.Module:
    m = self.config.model
    return ft.SentenceClassifier(
      encoder, num_labels=m.num_labels, pooler_dropout=m.pooler_dropout
    )

  def model_inputs(self, batch, freeze_encoder=None):
    return (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}

  def losses(self, logits: Array, padding: None, batch: Batch) -> Array:
    k = self.config.model.num_labels
    one = lambda x, y: ft.classification_loss(x[None], y[None], k)
    return jax.vmap(one)(logits, batch["labels"])

  def scores(self, outputs):
    logits, labels = outputs.logits, outputs.labels()
    if self.config.model.num_labels == 1:
      return regression_scores(logits[:, 0], labels)
    return {"accuracy": float(np.mean(logits.argmax(axis=-1) == labels))}

  # -- optimizer -------------------------------------------------------------

  def create_schedule(self) -> optax.Schedule:
    o = self.config.optim
    return optim.polynomial_warmup_schedule(
      o.peak_lr, self.config.train.steps, o.warmup_steps
    )

  def create_update_rule(
    self, params: Any
  ) -> list[optax.GradientTransformation]:
    """fairseq Adam and decay of every weight (RoBERTa's GLUE yamls)."""
    o = self.config.optim
    parts = [optim.scale_by_fairseq_adam(o.b1, o.b2, o.eps)]
    if o.weight_decay:
      parts.append(optax.add_decayed_weights(o.weight_decay, optim.decay_all))
    return parts

  # -- data ------------------------------------------------------------------

  def check_real(self) -> None:
    d, k = self.config.data, self.config.model.num_labels
    task = d.sentiment_task
    if task not in SENTIMENT_TASKS:
      raise ValueError(
        f"config.data.sentiment_task={task!r}; use one of {SENTIMENT_TASKS}"
      )
    if (task, k) not in (("vader_movie", 1), ("vader_movie", 2)) and k != 2:
      raise ValueError(
        f"config.model.num_labels={k}: {task} needs 2 (classes)"
        + (" or 1 (rating regression)" if task == "vader_movie" else "")
      )
    if not (d.path or d.corpus):
      raise ValueError(
        "config.data.path (a built experiments.data.sentiment_sets folder) or "
        "config.data.corpus (the text_corpus whose tokenizer the encoder "
        "uses) must be set for source='sentiment'"
      )

  def synthetic_example(self, rng: np.random.Generator) -> Batch:
    d, k = self.config.data, self.config.model.num_labels
    pad_id = self.encoder.pad_id
    length = int(rng.integers(d.min_len, d.seq_len + 1))
    ids = np.full(d.seq_len, pad_id, np.int32)
    ids[0], ids[length - 1] = d.bos_id, d.eos_id
    content = rng.integers(d.num_special, self.encoder.vocab_size, length - 2)
    ids[1 : length - 1] = content
    counts = np.bincount(content % max(k, 2), minlength=max(k, 2))
    if k == 1:
      label = np.float32(5.0 * counts[0] / content.size)
    else:
      label = np.int32(np.argmax(counts))
    return {
      "input_ids": ids,
      "attention_mask": (ids != pad_id).astype(np.int32),
      "labels": label,
    }

  def _splits(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # Drawn once per task and data config: every training batch asks.
    d, k = self.config.data, self.config.model.num_labels
    key = (d.path, d.corpus, d.data_dir, d.sentiment_task, d.seq_len, k)
    key += (d.labels, d.subset_seed)
    cache = self.__dict__.setdefault("_split_cache", {})
    if key not in cache:
      cache.clear()
      cache[key] = labelled_splits(self.config)
    return cache[key]

  @property
  def final_splits(self) -> tuple[str, ...]:
    # The test sentences, once, on the checkpoint the valid split picked.
    return ("test",) if self.config.data.source == self.real_source else ()

  def real_size(self, split: str) -> int:
    return len(self._splits()[split][1])

  def real_rows(self, split: str, idx: np.ndarray) -> Batch:
    ids, labels = self._splits()[split]
    ids = ids[idx]
    encoder = self.encoder
    if ids.max() >= encoder.vocab_size or encoder.pad_id != text_lib.PAD_ID:
      raise ValueError(
        f"the sentiment set's tokenizer (pad {text_lib.PAD_ID}, ids up to "
        f"{int(ids.max())}) does not fit the encoder (pad {encoder.pad_id}, "
        f"vocab_size {encoder.vocab_size}); use the pretraining corpus"
      )
    return {
      "input_ids": ids,
      "attention_mask": (ids != text_lib.PAD_ID).astype(np.int32),
      "labels": labels[idx],
    }

  def final_batches(self, split: str) -> tuple[list[Batch], int]:
    n = self.real_size(split)
    return self.real_split_batches(split, n), n
