"""Pretraining batches from real data: Fashion-MNIST files, a text corpus."""

import os

import numpy as np
import pytest

from d2vjax.datasets import text
from experiments import pretrain_d2v
from experiments.configs import d2v_text, d2v_vision
from experiments.data import pretrain_batches, text_corpus
from experiments.runtime import writers
from tests.d2vjax.test_datasets_images import write_fashion_mnist
from tests.d2vjax.test_datasets_text import make_debian_trees

pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("fashion")
  write_fashion_mnist(folder, n_train=32, n_test=8)
  return str(folder)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  trees = make_debian_trees(root / "debian", copies=4)
  path = text_corpus.build_corpus(
    root, vocab_size=300, block_size=24, trees=trees
  )
  return str(path)


def _vision(fashion_dir):
  c = d2v_vision.get_config("tiny")
  c.data.source, c.data.path = "fashion_mnist", fashion_dir
  c.mesh.data = 1
  return c


def _text(corpus_dir):
  c = d2v_text.get_config("tiny")
  meta = text.load_corpus(corpus_dir)["meta"]
  c.data.source, c.data.path = "corpus", corpus_dir
  c.model.vocab_size, c.mask.mask_id = meta["vocab_size"], meta["ids"]["mask"]
  c.mesh.data = 1
  return c


def test_fashion_mnist_batches(fashion_dir):
  c = _vision(fashion_dir)
  batch = pretrain_batches.batch_at(c, 2)
  assert batch["inputs"].shape == (8, 16, 16, 3)
  assert batch["inputs"].dtype == np.float32
  assert batch["mask"].shape == (8, 16)
  again = pretrain_batches.batch_at(c, 2)
  np.testing.assert_array_equal(batch["inputs"], again["inputs"])
  part = pretrain_batches.batch_at(c, 2, rows=(4, 8))
  np.testing.assert_array_equal(part["inputs"], batch["inputs"][4:])
  np.testing.assert_array_equal(part["mask"], batch["mask"][4:])
  # The synthetic source draws different inputs with the same masks.
  c.data.source = "synthetic"
  synthetic = pretrain_batches.batch_at(c, 2)
  np.testing.assert_array_equal(synthetic["mask"].sum(1), batch["mask"].sum(1))


def test_corpus_batches(corpus_dir):
  c = _text(corpus_dir)
  blocks = text.load_corpus(corpus_dir)["blocks"]
  batch = pretrain_batches.batch_at(c, 1)
  assert batch["inputs"].shape == (8, 24)
  assert batch["attention_mask"].all()  # packed blocks hold no padding
  rows = {tuple(r) for r in np.asarray(blocks)}
  assert all(tuple(r) in rows for r in batch["targets_ids"])
  masked = batch["inputs"][batch["mask"]]
  assert (masked == c.mask.mask_id).all()
  np.testing.assert_array_equal(
    batch["inputs"][~batch["mask"]], batch["targets_ids"][~batch["mask"]]
  )
  part = pretrain_batches.batch_at(c, 1, rows=(2, 6))
  np.testing.assert_array_equal(part["inputs"], batch["inputs"][2:6])
  # Another length repacks the stored token stream.
  c.data.seq_len = 12
  short = pretrain_batches.batch_at(c, 0)
  assert short["inputs"].shape == (8, 12)
  assert (short["targets_ids"][:, 0] == text.BOS_ID).all()


def test_mismatched_vocabulary_fails_naming_the_field(corpus_dir):
  c = _text(corpus_dir)
  c.model.vocab_size, c.mask.mask_id = 50, 49
  with pytest.raises(ValueError, match="config.model.vocab_size=50"):
    pretrain_batches.batch_at(c, 0)
  c = _text(corpus_dir)
  c.mask.mask_id = 4
  with pytest.raises(ValueError, match="config.mask.mask_id=4"):
    pretrain_batches.batch_at(c, 0)


def test_source_must_serve_the_modality(fashion_dir):
  c = d2v_text.get_config("tiny")
  c.data.source = "fashion_mnist"
  with pytest.raises(ValueError, match=r"does not serve text.*'corpus'"):
    pretrain_batches.batch_at(c, 0)
  c = _vision(fashion_dir)
  c.data.split = "valid"
  with pytest.raises(ValueError, match="config.data.split='valid'"):
    pretrain_batches.batch_at(c, 0)


def test_pretraining_runs_on_fashion_mnist_files(fashion_dir, tmp_path):
  c = _vision(fashion_dir)
  c.train.steps, c.train.checkpoint_every = 1, 1
  state = pretrain_d2v.run(c, str(tmp_path))
  assert int(state.step) == 1
  records = writers.read_jsonl(
    os.path.join(str(tmp_path), "metrics.jsonl"), dedupe=True
  )
  assert [r["step"] for r in records] == [1]
  assert all(np.isfinite(r["train/loss"]) for r in records)
