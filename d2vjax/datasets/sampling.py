"""Which examples a batch holds: a pure function of (seed, step, row).

Every loader of `d2vjax.datasets` reads through the same index rule, which
makes a run resumable from its step alone and independent of how many
processes share a batch:

* the global batch of step ``s`` holds rows ``0..B-1``; row ``r`` is the
  example at position ``p = s * B + r`` of an endless stream;
* the stream walks the dataset epoch by epoch, each epoch in its own
  permutation, drawn from ``np.random.default_rng([seed, epoch])``;
* a process builds only its rows ``lo..hi-1`` (`process_rows`), which are
  exactly those rows of the whole batch.

Within an epoch no example repeats, so the rows of different processes in
one step are different examples; a batch that straddles the end of an
epoch may meet an example of the next epoch again, as any epoch-based
loader would.
"""

from __future__ import annotations

import functools

import numpy as np

# Salts keep the loaders' random streams apart from each other and from the
# masks, which the pretraining pipeline draws from rng([seed, step, row]).
PERMUTATION_STREAM = 0x5EED
AUGMENT_STREAM = 0xA06


def process_rows(
  batch_size: int, process_index: int, process_count: int
) -> tuple[int, int]:
  """The rows ``(lo, hi)`` of a global batch that one process builds.

  Args:
    batch_size: rows of the global batch.
    process_index: this process, in ``[0, process_count)``.
    process_count: processes sharing the batch; must divide `batch_size`.

  Returns:
    ``(lo, hi)``: the process builds rows ``lo..hi-1``.

  Raises:
    ValueError: if the batch does not divide over the processes or the
      index is out of range.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index={process_index} is not in [0, {process_count})"
    )
  if batch_size % process_count:
    raise ValueError(
      f"batch_size={batch_size} is not divisible by the {process_count} "
      "processes that share it"
    )
  share = batch_size // process_count
  return process_index * share, (process_index + 1) * share


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  rng = np.random.default_rng([seed, PERMUTATION_STREAM, epoch])
  perm = rng.permutation(n)
  perm.flags.writeable = False
  return perm


def example_indices(
  num_examples: int,
  batch_size: int,
  step: int,
  rows: tuple[int, int],
  seed: int,
) -> np.ndarray:
  """Dataset indices of rows ``lo..hi-1`` of the batch of `step`.

  Args:
    num_examples: size of the dataset.
    batch_size: rows of the global batch.
    step: the global step.
    rows: ``(lo, hi)``, a slice of ``[0, batch_size)``.
    seed: the run's seed; picks the per-epoch permutations.

  Returns:
    int64 ``[hi - lo]`` indices into the dataset.

  Raises:
    ValueError: for an empty dataset or rows that are not a slice of the
      batch.
  """
  if num_examples < 1:
    raise ValueError("the dataset is empty: there is nothing to sample")
  lo, hi = int(rows[0]), int(rows[1])
  if not 0 <= lo < hi <= batch_size:
    raise ValueError(f"rows {rows} are not a slice of a batch of {batch_size}")
  positions = np.arange(lo, hi, dtype=np.int64) + int(step) * batch_size
  epochs, offsets = np.divmod(positions, num_examples)
  out = np.empty(hi - lo, np.int64)
  for epoch in np.unique(epochs):
    at = epochs == epoch
    out[at] = _permutation(int(seed), int(epoch), num_examples)[offsets[at]]
  return out


def row_rng(seed: int, stream: int, step: int, row: int):
  """The numpy generator of one row of one step in a named stream."""
  return np.random.default_rng([int(seed), stream, int(step), int(row)])
