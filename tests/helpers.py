"""Helpers shared by the test suites: tiny models, fixture paths, batches.

Like optax's `_src/test_utils.py`: what several test files build the same
way lives here, so each test states only what it varies. Model builders
take keyword overrides for any field of the model they build.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
from collections.abc import Iterator, Mapping
from typing import Any
from unittest import mock

import jax
import numpy as np

from d2vjax import audio, text, vision
from mtagjax import batching
from mtagjax import model as mtag_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
D2V_FIXTURES = FIXTURES / "d2v"
MTAG_FIXTURES = FIXTURES / "mtag"
# The official MTAG's weights and forward outputs on a few MOSI samples.
MTAG_FORWARD_FIXTURE = MTAG_FIXTURES / "forward_small.npz"

D2V_MODALITIES = ("audio", "text", "vision")

# A two-block speech CNN: 800 samples make 79 frames.
TINY_CONV_LAYERS = ((16, 10, 5), (16, 3, 2))

# ---------------------------------------------------------------------------
# data2vec.


# The transformer all tiny encoders share; each adds its front end below.
_TINY_TRANSFORMER = dict(hidden=16, heads=2, mlp_dim=32)
_TINY_FRONT_ENDS = {
  audio.AudioEncoder: dict(
    conv_layers=TINY_CONV_LAYERS,
    num_layers=1,
    pos_kernel_size=4,
    pos_groups=2,
    pos_depth=1,
  ),
  vision.VisionEncoder: dict(
    image_size=16, patch_size=4, num_layers=3, drop_path_rate=0.1
  ),
  text.TextEncoder: dict(vocab_size=50, num_layers=1, max_positions=40),
}


def _tiny(cls, overrides):
  return cls(**{**_TINY_TRANSFORMER, **_TINY_FRONT_ENDS[cls], **overrides})


def tiny_audio_encoder(**overrides: Any) -> audio.AudioEncoder:
  """A one-layer `AudioEncoder` of width 16 on `TINY_CONV_LAYERS`."""
  return _tiny(audio.AudioEncoder, overrides)


def tiny_vision_encoder(**overrides: Any) -> vision.VisionEncoder:
  """A three-block `VisionEncoder` of width 16 on 16x16 images, 4x4 patches."""
  return _tiny(vision.VisionEncoder, overrides)


def tiny_text_encoder(**overrides: Any) -> text.TextEncoder:
  """A one-layer `TextEncoder` of width 16, 50 ids, 40 positions."""
  return _tiny(text.TextEncoder, overrides)


def init_rngs(seed: int = 0) -> dict[str, jax.Array]:
  """`params` and `dropout` keys for `Module.init` / `apply`."""
  return {"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}


# ---------------------------------------------------------------------------
# MTAG.


def official_state_dict(arrays: Mapping[str, Any]) -> dict[str, Any]:
  """The official model's state dict stored in a fixture (`param/` keys)."""
  prefix = "param/"
  return {k[len(prefix) :]: arrays[k] for k in arrays if k.startswith(prefix)}


def mtag_single_batch(
  config: Any, num_frames: int, seed: int = 0
) -> batching.Batch:
  """A batch of one sample with `num_frames` random frames per modality."""
  rng = np.random.default_rng(seed)
  sample = batching.Sample(
    [
      rng.standard_normal((num_frames, d)).astype(np.float32)
      for d in config.feature_dims
    ]
  )
  return batching.GraphBatcher(config, batch_size=1)([sample])


def mtag_abstract_params(config: Any, num_frames: int = 2) -> Any:
  """The `MTAG` parameter tree of `config` as `jax.ShapeDtypeStruct`s."""
  model = mtag_model.create_model(config)
  batch = mtag_single_batch(config, num_frames)
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), batch, train=False)
  )["params"]


# ---------------------------------------------------------------------------
# Training runs in a workdir (`experiments.runtime.driver`).


def run_records(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of a run's ``metrics.jsonl``, in the order written."""
  from experiments.runtime import writers

  return writers.read_jsonl(pathlib.Path(workdir) / writers.METRICS_FILENAME)


def train_losses(workdir: str | pathlib.Path) -> dict[int, float]:
  """``{step: train/loss}``; a step logged twice (resumed) keeps its last."""
  return {
    r["step"]: r["train/loss"]
    for r in run_records(workdir)
    if "train/loss" in r
  }


@contextlib.contextmanager
def sigterm_at(step: int) -> Iterator[None]:
  """Sends this process SIGTERM when a run's progress bar reaches `step`.

  The run's own handler takes it (a checkpoint, then a clean return), as
  it would a scheduler's preemption notice.
  """
  from experiments.runtime import progress

  update = progress.Progress.update

  def update_then_signal(self, at, metrics=None):
    update(self, at, metrics)
    if at == step:
      os.kill(os.getpid(), signal.SIGTERM)

  with mock.patch.object(progress.Progress, "update", update_then_signal):
    yield


# ---------------------------------------------------------------------------
# Data in the formats the experiments read.


def write_vader_movie_set(
  folder: str | pathlib.Path,
  *,
  n: int = 40,
  max_len: int = 12,
  vocab_size: int = 40,
  seed: int = 0,
) -> dict[str, np.ndarray]:
  """A ``vader_movie.npz`` as `experiments.data.sentiment_sets` writes it.

  `n` sentences of random ordinary ids below ``vocab_size - 1`` (never
  ``<mask>``), wrapped in ``<s> ... </s>``; ratings in [-3, 3], the first
  four 0; splits train / valid / test in the ratio 3 : 1 : 1.

  Returns:
    The arrays written (``ids``, ``lengths``, ``labels``, ``split``).
  """
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, max_len + 3, n).clip(max=max_len)
  ids = np.full((n, max_len), 1, np.int32)  # <pad>
  for row, k in zip(ids, lengths, strict=True):
    row[0], row[k - 1] = 0, 2
    row[1 : k - 1] = rng.integers(4, vocab_size - 1, k - 2)
  labels = np.round(rng.uniform(-3, 3, n), 1).astype(np.float32)
  labels[:4] = 0.0
  split = np.array([0, 0, 0, 1, 2], np.uint8)[np.arange(n) % 5]
  arrays = {"ids": ids, "lengths": lengths, "labels": labels, "split": split}
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  np.savez(folder / "vader_movie.npz", **arrays)
  return arrays
