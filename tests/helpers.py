"""Helpers shared by the test suites: tiny models, fixture paths, batches.

Like optax's `_src/test_utils.py`: what several test files build the same
way lives here, so each test states only what it varies. Model builders
take keyword overrides for any field of the model they build.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

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


def tiny_audio_encoder(**overrides: Any) -> audio.AudioEncoder:
  """A one-layer `AudioEncoder` of width 16 on `TINY_CONV_LAYERS`."""
  fields = dict(
    conv_layers=TINY_CONV_LAYERS,
    hidden=16,
    num_layers=1,
    heads=2,
    mlp_dim=32,
    pos_kernel_size=4,
    pos_groups=2,
    pos_depth=1,
  )
  return audio.AudioEncoder(**{**fields, **overrides})


def tiny_vision_encoder(**overrides: Any) -> vision.VisionEncoder:
  """A three-block `VisionEncoder` of width 16 on 16x16 images, 4x4 patches."""
  fields = dict(
    image_size=16,
    patch_size=4,
    hidden=16,
    num_layers=3,
    heads=2,
    mlp_dim=32,
    drop_path_rate=0.1,
  )
  return vision.VisionEncoder(**{**fields, **overrides})


def tiny_text_encoder(**overrides: Any) -> text.TextEncoder:
  """A one-layer `TextEncoder` of width 16, 50 ids, 40 positions."""
  fields = dict(
    vocab_size=50,
    hidden=16,
    num_layers=1,
    heads=2,
    mlp_dim=32,
    max_positions=40,
  )
  return text.TextEncoder(**{**fields, **overrides})


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
