"""Generated unaligned multimodal data with a learnable sentiment target.

For smoke runs, demos and tests where no corpus is at hand. Each sample has
random-length sequences per modality (modalities may be empty); the label in
[-3, 3] mixes per-modality evidence, so a model must read several modalities
to fit it. Nothing here is real data.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mtagjax.batching import Sample


def make_samples(
  num: int,
  config: ml_collections.ConfigDict,
  *,
  seed: int = 0,
  min_lengths: tuple[int, ...] | None = None,
  max_lengths: tuple[int, ...] | None = None,
  task: str = "regression",
) -> list[Sample]:
  """`num` samples whose label depends on the means of a few features.

  Args:
    num: number of samples.
    config: model config (feature sizes, padded lengths).
    seed: numpy seed; the same seed gives the same samples.
    min_lengths: per modality shortest sequence (default 1, 0 for audio:
      some samples lack a modality, as real data can).
    max_lengths: per modality longest sequence (default: a fifth of
      `config.padded_lengths`, at least 2).
    task: "regression" (a float in [-3, 3], MOSI-like) or "iemocap" (four
      binary labels: whether the score exceeds -1, 0, 1 and 2).

  Returns:
    A list of `Sample`s with float32 features and float32 labels.
  """
  if task not in ("regression", "iemocap"):
    raise ValueError(f"task {task!r}; expected 'regression' or 'iemocap'")
  rng = np.random.default_rng(seed)
  num_mod = len(config.feature_dims)
  if max_lengths is None:
    max_lengths = tuple(max(2, t // 5) for t in config.padded_lengths)
  if min_lengths is None:
    min_lengths = tuple(0 if m == num_mod - 1 else 1 for m in range(num_mod))
  # Fixed per-modality read-out directions: the target is a noisy mixture of
  # the sequence means projected on them.
  dirs = np.random.default_rng(12345)
  directions = [
    dirs.standard_normal(d) / np.sqrt(d) for d in config.feature_dims
  ]
  weights = np.linspace(1.5, 0.75, num_mod)
  samples = []
  for _ in range(num):
    mood = rng.normal()
    feats, evidence = [], 0.0
    for m, dim in enumerate(config.feature_dims):
      n = int(rng.integers(min_lengths[m], max_lengths[m] + 1))
      x = rng.standard_normal((n, dim))
      if n:
        # Each frame carries the sample's mood along this modality's
        # direction, drowned in per-frame noise.
        x += mood * directions[m] * np.sqrt(dim) * 0.5
        evidence += weights[m] * float(x.mean(0) @ directions[m])
      feats.append(x.astype(np.float32))
    score = np.clip(evidence + 0.1 * rng.normal(), -3.0, 3.0)
    label = (
      np.float32(score)
      if task == "regression"
      else (score > np.array([-1.0, 0.0, 1.0, 2.0])).astype(np.int32)
    )
    samples.append(Sample(features=feats, label=label))
  return samples
