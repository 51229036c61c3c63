"""Tests of the MulT-style pickle reader (`mtagjax.datasets`)."""

import pickle

import numpy as np
import pytest

from experiments.configs import mtag_mosi
from experiments.data import mtag_samples
from mtagjax import datasets

# Small dims: vision, text, audio.
DIMS = (4, 6, 3)
LENGTHS = (8, 5, 7)
SIZES = {"train": 5, "valid": 3, "test": 3}


def _split(n, seed, iemocap=False):
  """One split in the MulT layout, left-padded with per-sample lengths."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, t, d in zip(
    ("vision", "text", "audio"), LENGTHS, DIMS, strict=True
  ):
    x = rng.normal(size=(n, t, d)).astype(np.float64)
    for i in range(n):
      x[i, : i % t] = 0.0  # sample i has i % t frames of left padding
    arrays[name] = x
  if iemocap:
    hot = rng.integers(0, 2, size=(n, 4))
    arrays["labels"] = np.stack([1 - hot, hot], axis=-1).astype(np.float32)
  else:
    arrays["labels"] = rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
  arrays["id"] = np.array([[b"vid", b"0", b"0"]] * n)
  return arrays


def _raw(iemocap=False):
  raw = {s: _split(n, i, iemocap) for i, (s, n) in enumerate(SIZES.items())}
  train = raw["train"]
  train["vision"][0, 3] = 0.0  # interior all-zero frame of sample 0
  train["audio"][1, 6, 1] = -np.inf  # a -inf entry in the last audio frame
  train["text"][2] = 0.0  # sample 2 has no text at all
  return raw


def _write(tmp_path, raw, name="data.pkl"):
  path = tmp_path / name
  with open(path, "wb") as f:
    pickle.dump(raw, f)
  return path


def test_mosi_samples(tmp_path):
  raw = _raw()
  splits = datasets.load_mult_pickle(_write(tmp_path, raw), dataset="mosi")
  assert {k: len(v) for k, v in splits.items()} == SIZES
  s0, s1, s2 = splits["train"][:3]
  # Sample 0: no padding, but vision frame 3 is all-zero and dropped.
  assert [len(f) for f in s0.features] == [7, 5, 7]
  np.testing.assert_array_equal(s0.positions[0], [0, 1, 2, 4, 5, 6, 7])
  np.testing.assert_array_equal(s0.positions[1], np.arange(5))
  # Sample 1: one frame of left padding per modality.
  assert [len(f) for f in s1.features] == [7, 4, 6]
  np.testing.assert_array_equal(s1.positions[2], np.arange(1, 7))
  # -inf -> 0, other entries of the frame untouched, float32.
  audio = s1.features[2]
  assert audio.dtype == np.float32
  assert audio[-1, 1] == 0.0
  np.testing.assert_allclose(
    audio[-1, 0], np.float32(raw["train"]["audio"][1, 6, 0])
  )
  assert np.isfinite(audio).all()
  # Sample 2: an empty text modality.
  assert s2.features[1].shape == (0, DIMS[1])
  assert len(s2.positions[1]) == 0
  # Features are the raw values (no normalisation).
  np.testing.assert_allclose(
    s1.features[0], raw["train"]["vision"][1, 1:].astype(np.float32)
  )
  # Labels: scalar float32.
  assert s0.label.shape == () and s0.label.dtype == np.float32
  np.testing.assert_allclose(s0.label, raw["train"]["labels"][0, 0, 0])
  assert datasets.feature_dims(splits) == DIMS
  assert datasets.padded_lengths(splits) == LENGTHS
  assert datasets.padded_lengths(tmp_path / "data.pkl") == LENGTHS


def test_iemocap_labels(tmp_path):
  raw = _raw(iemocap=True)
  path = _write(tmp_path, raw)
  splits = datasets.load_mult_pickle(path, dataset="iemocap")
  for split, samples in splits.items():
    for i, s in enumerate(samples):
      assert s.label.shape == (4,) and s.label.dtype == np.int32
      np.testing.assert_array_equal(s.label, raw[split]["labels"][i, :, 1])
  with pytest.raises(ValueError, match=r"'labels' has shape \(5, 4, 2\)"):
    datasets.load_mult_pickle(path, dataset="mosi")


def _expect(tmp_path, raw, match, **kwargs):
  with pytest.raises(ValueError, match=match):
    datasets.load_mult_pickle(_write(tmp_path, raw), **kwargs)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.pkl"):
    datasets.load_mult_pickle(tmp_path / "missing.pkl")

  good = _write(tmp_path, _raw(), "good.pkl")
  cut = tmp_path / "cut.pkl"
  cut.write_bytes(good.read_bytes()[:100])
  with pytest.raises(ValueError, match=r"cut\.pkl: cannot read the pickle"):
    datasets.load_mult_pickle(cut)

  raw = _raw()
  del raw["valid"]
  _expect(tmp_path, raw, r"data\.pkl: missing split 'valid'")

  raw = _raw()
  del raw["valid"]["audio"]
  _expect(tmp_path, raw, "split 'valid' lacks 'audio'")

  raw = _raw()
  raw["test"]["text"] = raw["test"]["text"][:2]
  _expect(tmp_path, raw, "split 'test' has different numbers of samples")

  raw = _raw()
  raw["train"]["labels"] = np.zeros((5, 2))
  _expect(tmp_path, raw, r"split 'train' 'labels' has shape \(5, 2\)")

  raw = _raw()
  raw["train"]["labels"] = np.zeros((5, 1, 1))
  _expect(tmp_path, raw, "expects one-hot", dataset="iemocap")

  raw = _raw()
  for k in ("vision", "text", "audio", "labels"):
    raw["valid"][k] = raw["valid"][k][:0]
  _expect(tmp_path, raw, "split 'valid' is empty")

  raw = _raw()
  raw["test"]["audio"][2, 4, 0] = np.nan
  _expect(tmp_path, raw, "split 'test' sample 2 modality 'audio' has NaN")

  with pytest.raises(ValueError, match="unknown dataset"):
    datasets.load_mult_pickle(good, dataset="cmu")


def _pickle_config(path):
  config = mtag_mosi.get_config("tiny")
  config.model.feature_dims = DIMS
  config.model.padded_lengths = LENGTHS
  config.data.source = "pickle"
  config.data.path = str(path)
  return config


def test_load_data_pickle(tmp_path):
  config = _pickle_config(_write(tmp_path, _raw()))
  splits = mtag_samples.load_data(config)
  assert {k: len(v) for k, v in splits.items()} == SIZES
  assert splits["train"][0].features[0].shape == (7, DIMS[0])


def test_load_data_dims_mismatch(tmp_path):
  config = _pickle_config(_write(tmp_path, _raw()))
  config.model.feature_dims = (4, 300, 3)
  with pytest.raises(ValueError, match=r"config\.model\.feature_dims=4,6,3"):
    mtag_samples.load_data(config)
  config.data.source = "csv"
  with pytest.raises(ValueError, match="'synthetic'.*'pickle'"):
    mtag_samples.load_data(config)
