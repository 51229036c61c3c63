"""Tests of saving and loading trained encoders (`d2vjax.encoder_io`)."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from d2vjax import audio, encoder_io, vision


def _vision():
  enc = vision.VisionEncoder(
    image_size=16, patch_size=4, hidden=16, num_layers=2, heads=2, mlp_dim=32
  )
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  return enc, enc.init(jax.random.key(0), x)["params"], x


def test_round_trip_gives_the_same_encoder(tmp_path):
  enc, params, x = _vision()
  encoder_io.save(tmp_path / "e", enc, params, metadata={"step": 7})
  info = encoder_io.read_info(tmp_path / "e")
  assert info["modality"] == "vision" and info["metadata"] == {"step": 7}
  assert info["num_params"] == sum(p.size for p in jax.tree.leaves(params))
  loaded, got = encoder_io.load(tmp_path / "e")
  assert loaded == enc
  want = enc.apply({"params": params}, x)[0]
  np.testing.assert_array_equal(loaded.apply({"params": got}, x)[0], want)
  assert (
    encoder_io.load(tmp_path / "e", drop_path_rate=0.3)[0].drop_path_rate == 0.3
  )


def test_audio_conv_layers_come_back_as_tuples(tmp_path):
  enc = audio.AudioEncoder(
    conv_layers=((8, 10, 5), (8, 3, 2)),
    pos_kernel_size=4,
    pos_groups=2,
    pos_depth=1,
    hidden=16,
    num_layers=1,
    heads=2,
    mlp_dim=32,
  )
  params = enc.init(jax.random.key(0), np.zeros((1, 400), np.float32))["params"]
  encoder_io.save(tmp_path, enc, params)
  loaded, _ = encoder_io.load(tmp_path)
  assert loaded.conv_layers == ((8, 10, 5), (8, 3, 2))
  hash(loaded)  # module fields must be hashable


def test_refuses_what_it_cannot_trust(tmp_path):
  enc, params, _ = _vision()
  with pytest.raises(TypeError, match="not a data2vec encoder"):
    encoder_io.save(tmp_path / "x", nn.Dense(3), params)
  bad = jax.tree.map(lambda p: p * np.nan, params)
  with pytest.raises(ValueError, match="NaN or inf: the run diverged"):
    encoder_io.save(tmp_path / "nan", enc, bad)
  with pytest.raises(FileNotFoundError, match="not a saved encoder"):
    encoder_io.load(tmp_path / "nowhere")
  folder = encoder_io.save(tmp_path / "e", enc, params)
  (folder / "params.msgpack").write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match="corrupt.*re-export"):
    encoder_io.load(folder)
  other = encoder_io.save(tmp_path / "o", enc, params)
  info = json.loads((other / "encoder.json").read_text())
  info["num_params"] += 1
  (other / "encoder.json").write_text(json.dumps(info))
  with pytest.raises(ValueError, match="do not belong together"):
    encoder_io.load(other)
  info["format"] = "something-else"
  (other / "encoder.json").write_text(json.dumps(info))
  with pytest.raises(ValueError, match="format 'something-else'"):
    encoder_io.load(other)
