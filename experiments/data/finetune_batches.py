"""Fine-tuning batches: synthetic or real, as pure functions of (seed, step).

`FinetuneBatches` is the data half of every fine-tuning family
(`experiments.tasks.finetune.FinetuneTask` derives from it); a family fills
in how one example is generated and how its real source is read, and gets
the batches of a run:

* ``config.data.source="synthetic"``: training row r of step s is
  generated from ``default_rng([seed, 0, s, r])``, validation example i
  from ``default_rng([seed, 2, i])`` (``config.data.num_valid`` of them);
* the family's real source (`FinetuneBatches.real_source`): training rows
  picked by `d2vjax.datasets.sampling` (a per-epoch permutation of the
  train split), validation rows from the valid split, capped by
  ``config.data.num_valid`` (0 = all);
* then the draws that span a training batch (speech masks, Mixup) from
  ``default_rng([seed, 1, s])``.

So a resumed run sees the batches an uninterrupted run would. Validation
sets are cut into training-sized batches, the last one filled with spare
rows (static shapes) that the metrics leave out.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np

from d2vjax.datasets import sampling

Batch = dict[str, Any]


def collate(examples: list[Batch]) -> Batch:
  """Stacks examples into a batch; transcripts (``text``) stay a list."""
  out = {}
  for key in examples[0]:
    values = [e[key] for e in examples]
    out[key] = values if key == "text" else np.stack(values)
  return out


class FinetuneBatches:
  """The batches of a fine-tuning config; families fill in the hooks.

  Attributes:
    name: the task's name, for messages.
    real_source: the ``config.data.source`` of the family's real examples.
    config: a fine-tuning config.
    encoder: the encoder the data must fit (image size, vocabulary, CNN).
  """

  name: str = ""
  real_source: str = ""
  config: ml_collections.ConfigDict
  encoder: nn.Module | None

  def check_source(self) -> None:
    """Raises ValueError if the data config cannot serve the task."""
    source = self.config.data.source
    usable = ("synthetic", self.real_source)
    if source not in usable:
      raise ValueError(
        f"config.data.source={source!r} does not serve the {self.name} "
        f"task; use one of {usable}"
      )
    if source == "synthetic":
      self.check_synthetic()
    else:
      self.check_real()

  # -- family hooks ----------------------------------------------------------

  def check_synthetic(self) -> None:
    """Raises ValueError if generated examples would not fit the config."""

  def check_real(self) -> None:
    """Raises ValueError if the real source does not fit the config."""

  def synthetic_example(self, rng: np.random.Generator) -> Batch:
    """One generated example (no batch axis), drawn from `rng`."""
    raise NotImplementedError

  def augment_batch(self, batch: Batch, rng: np.random.Generator) -> Batch:
    """A training batch with the draws that span its rows (masks, Mixup)."""
    del rng
    return batch

  def real_size(self, split: str) -> int:
    """Examples in `split` (``"train"``, ``"valid"`` or a final split such
    as ``"test"``) of the real source."""
    raise NotImplementedError

  def real_rows(self, split: str, idx: np.ndarray) -> Batch:
    """The examples `idx` of a real split, as a batch."""
    raise NotImplementedError

  def real_train_batch(self, step: int) -> Batch:
    """The real training rows of `step`, by `d2vjax.datasets.sampling`."""
    size = self.config.train.batch_size
    idx = sampling.example_indices(
      self.real_size("train"), size, step, (0, size), self.config.train.seed
    )
    return self.real_rows("train", idx)

  def real_valid_batches(self) -> list[Batch]:
    """The real validation examples in batches; spare rows repeat the first."""
    return self.real_split_batches("valid", self.num_valid())

  def real_split_batches(self, split: str, n: int) -> list[Batch]:
    """The first `n` examples of a real split in training-sized batches.

    The spare rows of the last batch repeat the first examples.
    """
    size = self.config.train.batch_size
    count = -(-n // size)
    idx = np.arange(count * size) % n
    return [
      self.real_rows(split, idx[i : i + size])
      for i in range(0, count * size, size)
    ]

  # -- batches ---------------------------------------------------------------

  def batch_at(self, step: int) -> Batch:
    """The training batch of global step `step`: a function of (seed, step).

    Returns:
      numpy arrays with a leading batch axis, as the family's
      `augment_batch` leaves them (transcripts dropped).
    """
    self.check_source()
    seed, size = self.config.train.seed, self.config.train.batch_size
    if self.config.data.source == "synthetic":
      batch = collate(
        [
          self.synthetic_example(np.random.default_rng([seed, 0, step, row]))
          for row in range(size)
        ]
      )
    else:
      batch = self.real_train_batch(step)
    batch.pop("text", None)
    return self.augment_batch(batch, np.random.default_rng([seed, 1, step]))

  def valid_batches(self) -> list[Batch]:
    """The validation set in training-sized batches, padded with spare rows.

    The rows past `num_valid` in the last batch are filled too (static
    shapes) and left out of the metrics.
    """
    self.check_source()
    if self.config.data.source != "synthetic":
      return self.real_valid_batches()
    seed, size = self.config.train.seed, self.config.train.batch_size
    count = -(-self.config.data.num_valid // size) * size
    examples = [
      self.synthetic_example(np.random.default_rng([seed, 2, i]))
      for i in range(count)
    ]
    return [collate(examples[i : i + size]) for i in range(0, count, size)]

  def num_valid(self) -> int:
    """Validation examples scored: ``config.data.num_valid``, or for a real
    source the validation split's size capped by it (0 = no cap)."""
    cap = self.config.data.num_valid
    if self.config.data.source == "synthetic":
      return cap
    n = self.real_size("valid")
    return min(n, cap) if cap > 0 else n

  def init_example(self) -> Batch:
    """A one-row batch with the shapes of the data, to initialise a model."""
    if self.config.data.source == "synthetic":
      example = collate([self.synthetic_example(np.random.default_rng(0))])
    else:
      example = {k: v[:1] for k, v in self.real_valid_batches()[0].items()}
    example.pop("text", None)
    return example
