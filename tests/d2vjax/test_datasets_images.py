"""Fashion-MNIST reader, augmentations and loader on tiny IDX files."""

import gzip
import struct

import numpy as np
import pytest

from d2vjax.datasets import images, sampling


def idx_bytes(array: np.ndarray) -> bytes:
  """An IDX file of a uint8 array, written as the format describes."""
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_fashion_mnist(folder, n_train=24, n_test=8, size=28, gz=True):
  """A folder in the Fashion-MNIST layout with random pixels and labels."""
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  data = {}
  for split, prefix, n in (
    ("train", "train", n_train),
    ("test", "t10k", n_test),
  ):
    x = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
      name = f"{prefix}-{kind}-ubyte"
      raw = idx_bytes(arr)
      if gz:
        (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
      else:
        (folder / name).write_bytes(raw)
    data[split] = (x, y)
  return data


@pytest.mark.parametrize("gz", [True, False])
def test_load_round_trips_gzip_and_raw(tmp_path, gz):
  want = write_fashion_mnist(tmp_path, gz=gz)
  got = images.load_fashion_mnist(tmp_path)
  for split in ("train", "test"):
    np.testing.assert_array_equal(got[split][0], want[split][0])
    np.testing.assert_array_equal(got[split][1], want[split][1])
    assert got[split][0].dtype == np.uint8


def test_load_finds_the_debian_layout(tmp_path):
  want = write_fashion_mnist(tmp_path / images.DEBIAN_SUBDIR)
  got = images.load_fashion_mnist(tmp_path)
  np.testing.assert_array_equal(got["test"][0], want["test"][0])


def test_read_idx_other_types(tmp_path):
  a = (np.arange(6) - 3).astype(">i4").reshape(2, 3)
  raw = struct.pack(">BBBB", 0, 0, 0x0C, 2) + struct.pack(">2I", 2, 3)
  (tmp_path / "x").write_bytes(raw + a.tobytes())
  got = images.read_idx(tmp_path / "x")
  np.testing.assert_array_equal(got, a)
  assert got.dtype.isnative


def test_truncated_file_names_file_and_sizes(tmp_path):
  raw = idx_bytes(np.zeros((3, 4, 4), np.uint8))
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(raw[:-5])
  with pytest.raises(ValueError, match=r"train-images.*43 bytes.*need 48"):
    images.read_idx(path)


def test_truncated_gzip_and_bad_magic(tmp_path):
  raw = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
  (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
  with pytest.raises(ValueError, match="cut.gz.*gzip stream"):
    images.read_idx(tmp_path / "cut.gz")
  (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
  with pytest.raises(ValueError, match="png.*not an IDX file"):
    images.read_idx(tmp_path / "png")
  (tmp_path / "code").write_bytes(b"\0\0\x07\x01" + b"\0\0\0\1x")
  with pytest.raises(ValueError, match="type code 0x07"):
    images.read_idx(tmp_path / "code")


def test_missing_or_mismatched_files(tmp_path):
  write_fashion_mnist(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    images.load_fashion_mnist(tmp_path)
  labels = gzip.compress(idx_bytes(np.zeros(7, np.uint8)))
  (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(labels)
  with pytest.raises(ValueError, match=r"labels \[8\]"):
    images.load_fashion_mnist(tmp_path)


def test_crop_boxes_follow_the_scale_and_ratio_ranges():
  rng = np.random.default_rng(0)
  boxes = np.array(
    [images.random_resized_crop_box(rng, 28, 28) for _ in range(500)]
  )
  top, left, h, w = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 28).all() and (left + w <= 28).all()
  area = h * w / 28**2
  # Rounding to whole pixels blurs the bounds a little.
  assert area.min() >= 0.05 and area.max() <= 1.0
  assert area.min() < 0.2 and area.max() > 0.8  # the range is used
  # Impossible ranges fall back to a centre crop of the clamped ratio.
  box = images.random_resized_crop_box(rng, 10, 40, (1.0, 1.0), (1.0, 1.0))
  assert box == (0, 15, 10, 10)


def test_resize_of_the_whole_image_keeps_constants_and_identity():
  rng = np.random.default_rng(1)
  x = rng.random((2, 6, 6)).astype(np.float32)
  full = np.array([[0, 0, 6, 6]] * 2)
  np.testing.assert_allclose(images.resize_boxes(x, full, 6), x, atol=1e-6)
  const = np.full((1, 9, 9, 3), 7.0)
  out = images.resize_boxes(const, np.array([[2, 1, 5, 7]]), (4, 3))
  assert out.shape == (1, 4, 3, 3)
  np.testing.assert_allclose(out, 7.0)
  # Halving a ramp averages neighbouring pixels.
  ramp = np.tile(np.arange(4.0), (1, 4, 1))
  half = images.resize_boxes(ramp, np.array([[0, 0, 4, 4]]), 2)
  np.testing.assert_allclose(half[0, 0], [0.5, 2.5])


def _loader(data, **kw):
  return images.ImageLoader(*data["train"], batch_size=8, image_size=16, **kw)


def test_loader_shapes_ranges_and_determinism(tmp_path):
  data = write_fashion_mnist(tmp_path)
  loader = _loader(data, seed=3)
  a, b = loader.batch(5), loader.batch(5)
  assert a["images"].shape == (8, 16, 16, 3)
  assert a["images"].dtype == np.float32
  np.testing.assert_array_equal(a["images"], b["images"])
  lo = (0 - images.MEAN) / images.STD
  hi = (1 - images.MEAN) / images.STD
  assert a["images"].min() >= lo - 1e-5 and a["images"].max() <= hi + 1e-5
  np.testing.assert_array_equal(a["images"][..., 0], a["images"][..., 2])
  assert not np.array_equal(a["images"], loader.batch(6)["images"])
  other = _loader(data, seed=4).batch(5)
  assert not np.array_equal(a["indices"], other["indices"])
  np.testing.assert_array_equal(
    a["labels"], data["train"][1][a["indices"]].astype(np.int32)
  )


def test_rows_of_a_process_equal_those_of_the_whole_batch(tmp_path):
  data = write_fashion_mnist(tmp_path)
  loader = _loader(data)
  whole = loader.batch(2)
  parts = [
    loader.batch(2, sampling.process_rows(8, p, 4))["images"] for p in range(4)
  ]
  np.testing.assert_array_equal(np.concatenate(parts), whole["images"])


def test_epochs_visit_every_image_once(tmp_path):
  data = write_fashion_mnist(tmp_path)  # 24 images, 8 per batch
  loader = _loader(data, augment=False)
  seen = np.concatenate([loader.batch(s)["indices"] for s in range(3)])
  assert sorted(seen) == list(range(24))
  nxt = np.concatenate([loader.batch(s)["indices"] for s in range(3, 6)])
  assert sorted(nxt) == list(range(24)) and not np.array_equal(seen, nxt)


def test_no_augment_is_the_plain_resize(tmp_path):
  data = write_fashion_mnist(tmp_path)
  loader = _loader(data, augment=False, mean=0.0, std=1.0, channels=1)
  batch = loader.batch(0)
  x = data["train"][0][batch["indices"]]
  want = images.resize_boxes(x, np.array([[0, 0, 28, 28]] * 8), 16) / 255
  np.testing.assert_allclose(batch["images"][..., 0], want, atol=1e-6)


def test_flip_mirrors_the_crop(tmp_path):
  data = write_fashion_mnist(tmp_path)
  kw = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0.0)
  flipped = _loader(data, **kw).batch(0)["images"]
  plain = _loader(data, flip=False, **kw).batch(0)["images"]
  pairs = list(zip(flipped, plain, strict=True))
  same = [np.array_equal(f, p) for f, p in pairs]
  mirrored = [np.array_equal(f, p[:, ::-1]) for f, p in pairs]
  assert all(s or m for s, m in zip(same, mirrored, strict=True))
  assert any(mirrored) and any(same)


def test_bad_loader_settings(tmp_path):
  data = write_fashion_mnist(tmp_path)
  with pytest.raises(ValueError, match="scale"):
    _loader(data, scale=(0.5, 0.2))
  with pytest.raises(ValueError, match="rows"):
    _loader(data).batch(0, (4, 12))
  with pytest.raises(ValueError, match="not divisible"):
    sampling.process_rows(8, 0, 3)
