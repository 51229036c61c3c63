"""Fine-tuning on the real sources: spoken sentences, Fashion-MNIST, VADER.

Inputs are tiny generated files in the real formats: a VADER sdist of short
sentences spoken by espeak-ng, a Tux Paint stamps tree, Fashion-MNIST IDX
files, and a sentiment set ``vader_movie.npz`` as
`experiments.data.sentiment_sets` writes it.
"""

import os

import numpy as np
import pytest
import soundfile

from d2vjax.datasets import audio
from d2vjax.datasets import text as text_lib
from experiments import finetune_d2v, tasks
from experiments.configs import d2v_finetune
from experiments.data import sentiment_sets
from experiments.data import speech_corpus as sc
from experiments.runtime import writers
from experiments.tasks import ctc, text_classification
from tests.d2vjax.test_datasets_audio import write_stamps
from tests.d2vjax.test_datasets_images import write_fashion_mnist
from tests.experiments.data.test_speech_corpus import SHORT
from tests.experiments.data.test_vader import make_sdist
from tests.experiments.test_finetune_d2v import task_with_encoder
from tests.helpers import write_vader_movie_set

pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
  sdist = make_sdist(tmp_path_factory.mktemp("s") / "v.tar.gz", movie=SHORT)
  return sc.build_spoken_sentences(
    tmp_path_factory.mktemp("data"),
    domains=("movie",),
    seed=1,
    workers=1,
    archive=sdist,
    progress=False,
  )


# English stamps beside `write_stamps`'s (whose only English one is "A
# frog."): name -> (text file or None, seconds of audio).
_ENGLISH_STAMPS = {
  "bus": ("Two buses & 3 cars!\nfr.utf8=Deux bus.\n", 0.6),  # kept
  "boat": ("fr.utf8=Un bateau.\n", 0.6),  # no English text
  "dash": ("---\n", 0.6),  # no words
  "snake": ("A snake.\n", 3.5),  # longer than num_samples
  "eel": ("An eel far too long to spell in forty letters.\n", 0.6),
  "owl": (None, 0.6),  # no text file at all
}


@pytest.fixture(scope="module")
def tux(tmp_path_factory):
  tree = write_stamps(tmp_path_factory.mktemp("tree"))
  folder = tree / audio.STAMPS_SUBDIR / "vehicles"
  for name, (text, seconds) in _ENGLISH_STAMPS.items():
    if text is not None:
      (folder / f"{name}.txt").write_text(text, "utf-8")
    t = np.arange(int(16_000 * seconds)) / 16_000
    wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    soundfile.write(folder / f"{name}_desc.ogg", wave, 16_000, format="OGG")
  soundfile.write(folder / "bus_desc_fr.ogg", wave, 16_000, format="OGG")
  return sc.build_tuxpaint(
    tmp_path_factory.mktemp("data"), stamps=tree, workers=1, progress=False
  )


def _speech_config(path):
  c = d2v_finetune.get_config("speech_tiny")
  c.mesh.data = 1
  c.data.source, c.data.path = "spoken_sentences", str(path)
  c.data.num_samples, c.data.max_label_length = 48_000, 40
  # A stride of 80 samples: 600 frames for 3 s, cheap on a CPU.
  c.model.encoder.conv_layers = ((16, 10, 5),) + ((16, 3, 2),) * 3
  return c


def test_speech_batches_hold_the_transcripts(spoken):
  c = _speech_config(spoken)
  task = task_with_encoder(c)
  train = sc.load(spoken, "train")
  batch = task.batch_at(3)
  assert batch["waveform"].shape == (8, 48_000)
  lengths = set(np.diff(train["offsets"]).tolist())
  assert set(batch["attention_mask"].sum(1).tolist()) <= lengths
  texts = {str(t) for t in train["transcripts"]}
  for ids in batch["labels"]:
    assert ctc.VOCAB.decode(ids) in texts
  real = batch["attention_mask"] == 1
  assert np.all(batch["waveform"][~real] == 0)
  assert batch["time_mask"].any() and "channel_mask" in batch
  again = task.batch_at(3)
  for k, v in batch.items():
    np.testing.assert_array_equal(v, again[k], err_msg=k)
  valid = task.valid_batches()
  n = task.num_valid()
  assert n == len(sc.load(spoken, "valid")["ids"])
  assert valid[0]["text"][:n] == [
    str(t) for t in sc.load(spoken, "valid")["transcripts"]
  ]
  c.data.num_samples = 4_000
  with pytest.raises(ValueError, match="fits config.data.num_samples=4000"):
    task.batch_at(0)


def test_fashion_mnist_task(tmp_path):
  data = write_fashion_mnist(tmp_path / "fm", n_train=24, n_test=8)
  c = d2v_finetune.get_config("image_tiny")
  c.mesh.data = 1
  c.data.source, c.data.path = "fashion_mnist", str(tmp_path / "fm")
  with pytest.raises(ValueError, match="num_classes=10"):
    tasks.create(c).check_source()
  c.model.num_classes = 10
  with pytest.raises(ValueError, match="config.data.valid_size=5000"):
    task_with_encoder(c).num_valid()
  c.data.valid_size, c.data.labels = 6, 10
  task = task_with_encoder(c)
  batch = task.batch_at(2)
  assert batch["images"].shape == (16, 16, 16, 3)
  assert batch["targets"].shape == (16, 10)
  np.testing.assert_allclose(batch["targets"].sum(-1), 1, rtol=1e-6)
  # 6 training images held out, 10 of the other 18 labelled.
  assert task.num_valid() == 6 and task.real_size("train") == 10
  assert task.final_splits == ("test",)
  (valid,) = task.valid_batches()
  (test,), n = task.final_batches("test")
  # The first n rows: every test image once, unaugmented.
  assert n == 8
  assert sorted(test["labels"][:8].tolist()) == sorted(data["test"][1].tolist())
  # valid_size=0 validates on the test images and has no final split.
  c.data.valid_size = 0
  task = task_with_encoder(c)
  assert task.num_valid() == 8 and task.final_splits == ()
  c.data.source = "spoken_sentences"
  with pytest.raises(
    ValueError, match="does not serve the image_classification task"
  ):
    tasks.create(c).check_source()


def _sentiment_folder(folder, max_len=12):
  rng = np.random.default_rng(0)
  n = 30
  lengths = rng.integers(3, max_len + 3, n).clip(max=max_len)
  ids = np.full((n, max_len), text_lib.PAD_ID, np.int32)
  for row, k in zip(ids, lengths, strict=True):
    row[0], row[1 : k - 1], row[k - 1] = 0, rng.integers(4, 40, k - 2), 2
  labels = np.round(rng.uniform(-3, 3, n), 1).astype(np.float32)
  labels[:4] = 0.0
  split = (np.arange(n) % 5 == 0).astype(np.uint8)  # 6 valid
  folder.mkdir()
  np.savez(
    folder / "vader_movie.npz",
    ids=ids,
    lengths=lengths,
    labels=labels,
    split=split,
  )
  return labels, split


def test_sentiment_task_regression_and_sign(tmp_path):
  labels, split = _sentiment_folder(tmp_path / "sent")
  c = d2v_finetune.get_config("text_tiny")
  c.mesh.data = 1
  c.data.source = "sentiment"
  with pytest.raises(ValueError, match="config.data.path"):
    tasks.create(c).check_source()
  c.data.path = str(tmp_path / "sent")
  c.model.num_labels = 1
  task = task_with_encoder(c)
  batch = task.batch_at(0)
  assert batch["input_ids"].shape == (8, 16)
  assert batch["labels"].dtype == np.float32
  assert set(batch["labels"].tolist()) <= set(labels[split == 0].tolist())
  np.testing.assert_array_equal(
    batch["attention_mask"], batch["input_ids"] != text_lib.PAD_ID
  )
  assert task.num_valid() == 6
  c.model.num_labels = 2  # the sign; zero ratings left out
  text_classification._sentiment_set.cache_clear()
  task = task_with_encoder(c)
  (valid,) = task.valid_batches()
  want = (labels[(split == 1) & (labels != 0)] > 0).astype(np.int32)
  assert task.num_valid() == len(want)
  np.testing.assert_array_equal(valid["labels"][: len(want)], want)
  c.model.encoder.vocab_size = 30  # the set's ids reach 39
  with pytest.raises(ValueError, match="does not fit the encoder"):
    task_with_encoder(c).batch_at(0)
  c.data.sentiment_task, c.model.num_labels = "rt_polarity", 1
  with pytest.raises(ValueError, match="rt_polarity needs 2"):
    tasks.create(c).check_source()


def _vader_config(path):
  c = d2v_finetune.get_config("text_tiny")
  c.mesh.data = 1
  c.data.source, c.data.path = "sentiment", str(path)
  c.model.num_labels = 1
  return c


def test_sentiment_label_subsets_and_test_split(tmp_path):
  data = write_vader_movie_set(tmp_path / "sent", n=40)
  labels, split = data["labels"], data["split"]
  c = _vader_config(tmp_path / "sent")
  task = task_with_encoder(c)
  assert task.real_size("train") == 24 and task.num_valid() == 8
  assert task.final_splits == ("test",)
  # The test sentences, each once, in order.
  (batch,), n = task.final_batches("test")
  assert n == 8
  np.testing.assert_array_equal(batch["labels"][:n], labels[split == 2])
  # 10 of the 24 training sentences, drawn by the subset seed.
  c.data.labels, c.data.subset_seed = 10, 3
  task = task_with_encoder(c)
  kept = sentiment_sets.labelled_subset(24, 10, 3)
  want = labels[split == 0][kept]
  np.testing.assert_array_equal(task._splits()["train"][1], want)
  assert set(task.batch_at(5)["labels"].tolist()) <= set(want.tolist())
  np.testing.assert_array_equal(task._splits()["valid"][1], labels[split == 1])
  c.data.labels = 25
  with pytest.raises(ValueError, match="config.data.labels=25"):
    task_with_encoder(c).batch_at(0)
  # Workdirs from before the subsets trained on every sentence.
  saved = task.upgrade_saved_config({"task": "text", "data": {}})
  assert saved["data"] == {"labels": 0, "subset_seed": 0}
  c.data.source = "synthetic"
  assert tasks.create(c).final_splits == ()


def test_regression_scores_acc2_leaves_zero_ratings_out():
  preds = np.array([1.0, -0.5, 0.2, -2.0, 0.0])
  targets = np.array([2.0, 1.0, 0.0, -1.0, 0.0])
  s = text_classification.regression_scores(preds, targets)
  # Signs agree on 2 of the 3 non-zero ratings; the zeros do not count.
  assert s["acc2"] == pytest.approx(2 / 3)
  assert s["mse"] == pytest.approx(np.mean((preds - targets) ** 2))
  assert s["mae"] == pytest.approx(np.mean(np.abs(preds - targets)))
  assert s["pearson"] == pytest.approx(np.corrcoef(preds, targets)[0, 1])
  assert np.isnan(
    text_classification.regression_scores(preds, 0 * preds)["acc2"]
  )
  diverged = text_classification.regression_scores(preds * np.nan, targets)
  assert np.isnan(diverged["acc2"]) and np.isnan(diverged["mae"])


def test_sentiment_regression_scores_test_on_the_best_checkpoint(tmp_path):
  write_vader_movie_set(tmp_path / "sent", n=40)
  c = _vader_config(tmp_path / "sent")
  c.data.seq_len = 12
  c.train.update(steps=4, eval_every=2, checkpoint_every=2)
  c.data.labels = 12
  finetune_d2v.run(c, str(tmp_path / "run"))
  records = writers.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  valid = [r for r in records if "eval/valid/pearson" in r]
  (test,) = [r for r in records if "eval/test/pearson" in r]
  assert [r["step"] for r in valid] == [2, 4] and test["step"] == 4
  assert 0 <= test["eval/test/acc2"] <= 1 and "eval/test/mae" in test
  # Run again: nothing left to train, the test split is scored again.
  finetune_d2v.run(c, str(tmp_path / "run"))
  records = writers.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  again = [r for r in records if "eval/test/pearson" in r]
  assert len(again) == 2 and again[1]["eval/test/mse"] == test["eval/test/mse"]


def test_speech_finetuning_runs_on_spoken_sentences(spoken, tmp_path):
  c = _speech_config(spoken)
  # One compiled step variant and small batches: the run stays short.
  c.train.steps, c.train.eval_every, c.train.batch_size = 3, 3, 4
  c.optim.freeze_finetune_updates = 0
  c.data.num_samples = 36_000  # the test utterance's 2.1 s fit
  finetune_d2v.run(c, str(tmp_path))
  records = writers.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  evals = [r for r in records if "eval/valid/wer" in r]
  assert evals and np.isfinite(evals[-1]["eval/valid/loss"])
  assert 0 <= evals[-1]["eval/valid/cer"]
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == 3 and np.all(np.isfinite(losses))


def test_labelled_subset_is_a_seeded_prefix_within_the_budget():
  samples = np.random.default_rng(0).integers(8_000, 64_000, 60)
  minutes = lambda at: samples[at].sum() / 16_000 / 60
  total = minutes(np.arange(60))
  order = np.random.default_rng([3, ctc.SUBSET_STREAM]).permutation(60)
  smaller = np.array([], int)
  for budget in (0.1, 0.3, 1.0, total):
    at = ctc.labelled_subset(samples, budget, seed=3)
    assert np.all(np.diff(at) > 0) and minutes(at) <= budget
    # The longest prefix of the seeded order that fits.
    assert set(at) == set(order[: len(at)])
    assert len(at) == 60 or minutes(order[: len(at) + 1]) > budget
    assert set(smaller) < set(at)  # a larger budget keeps a smaller one's
    smaller = at
  assert len(smaller) == 60
  other = ctc.labelled_subset(samples, 0.3, seed=4)
  assert set(other) != set(ctc.labelled_subset(samples, 0.3, seed=3))
  np.testing.assert_array_equal(
    ctc.labelled_subset(samples, 0.0, 3), np.arange(60)
  )
  with pytest.raises(ValueError, match="label_minutes=9.0: the train split's"):
    ctc.labelled_subset(samples, 9.0, 3)
  with pytest.raises(ValueError, match="label_minutes=-1"):
    ctc.labelled_subset(samples, -1, 3)
  with pytest.raises(ValueError, match="label_minutes=0.001 selects no"):
    ctc.labelled_subset(samples, 0.001, 3)


def test_speech_label_minutes_subset_only_the_train_split(spoken):
  c = _speech_config(spoken)
  everything = task_with_encoder(c)._split("train")
  lengths = np.diff(everything["clips"]["offsets"])
  assert len(everything["keep"]) == 5  # 4.6 s of speech
  c.data.label_minutes, c.data.subset_seed = 0.03, 2
  task = task_with_encoder(c)
  train = task._split("train")
  at = ctc.labelled_subset(lengths[everything["keep"]], 0.03, 2)
  np.testing.assert_array_equal(train["keep"], everything["keep"][at])
  assert train["texts"] == [everything["texts"][i] for i in at]
  assert 0 < lengths[train["keep"]].sum() / 16_000 / 60 <= 0.03
  assert task.real_size("train") == len(at) < 5
  # The batches draw only from the labelled utterances.
  for step in range(3):
    for ids in task.batch_at(step)["labels"]:
      assert ctc.VOCAB.decode(ids) in train["texts"]
  # Valid and test keep every utterance; test is scored at the end.
  for split in ("valid", "test"):
    want = [str(t) for t in sc.load(spoken, split)["transcripts"]]
    assert task._split(split)["texts"] == want
  assert task.final_splits == ("test",)
  c.data.label_minutes = 0.06
  larger = task_with_encoder(c)._split("train")["texts"]
  assert set(train["texts"]) < set(larger)
  drawn = set()
  for seed in range(6):
    c.data.subset_seed = seed
    drawn.add(tuple(task_with_encoder(c)._split("train")["texts"]))
  assert len(drawn) > 1
  c.data.label_minutes = 0.5
  with pytest.raises(
    ValueError, match="label_minutes=0.5: the train split's 5"
  ):
    task_with_encoder(c).batch_at(0)
  c.data.label_minutes = 0.001
  with pytest.raises(ValueError, match="label_minutes=0.001 selects no"):
    task_with_encoder(c).batch_at(0)
  # Workdirs from before the budgets trained on every utterance.
  saved = task.upgrade_saved_config({"task": "speech", "data": {}})
  assert saved["data"] == {
    "label_minutes": 0.0,
    "subset_seed": 0,
    "tuxpaint_check": False,
    "tuxpaint_path": "",
  }
  c.data.source = "synthetic"
  assert tasks.create(c).final_splits == ()


def test_tuxpaint_en_holds_the_english_recordings_with_text(spoken, tux):
  c = _speech_config(spoken)
  assert tasks.create(c).final_splits == ("test",)
  c.data.tuxpaint_check, c.data.tuxpaint_path = True, str(tux)
  task = task_with_encoder(c)
  assert task.final_splits == ("test", "tuxpaint_en")
  data = sc.load(tux, "all")
  split = task._split("tuxpaint_en")
  assert data["paths"][split["keep"]].tolist() == [
    "animals/amphibians/frog_desc.ogg",
    "vehicles/bus_desc.ogg",
  ]
  # Transcripts as the spoken sentences hold theirs.
  assert split["texts"] == ["A FROG", "TWO BUSES AND THREE CARS"]
  (batch,), n = task.final_batches("tuxpaint_en")
  assert n == 2 and batch["text"][:n] == split["texts"]
  for row, i in enumerate(split["keep"]):
    wave = audio.normalize(audio.clip(data["audio"], data["offsets"], i))
    np.testing.assert_array_equal(batch["waveform"][row, : wave.size], wave)
    assert batch["attention_mask"][row].sum() == wave.size
    assert ctc.VOCAB.decode(batch["labels"][row]) == split["texts"][row]
  # A shorter label length drops the bus; no English clip fits 1,000 samples.
  c.data.max_label_length = 10
  assert task_with_encoder(c)._split("tuxpaint_en")["texts"] == ["A FROG"]
  c.data.num_samples = 1_000
  with pytest.raises(ValueError, match="no English Tux Paint clip of the 4"):
    task_with_encoder(c).final_batches("tuxpaint_en")


def test_speech_finetuning_scores_test_and_tuxpaint_on_the_best_checkpoint(
  spoken, tux, tmp_path
):
  c = _speech_config(spoken)
  c.train.steps, c.train.eval_every, c.train.batch_size = 2, 2, 4
  c.optim.freeze_finetune_updates = 0
  c.data.num_samples = 36_000  # the test utterance's 2.1 s fit
  c.data.label_minutes = 0.03
  c.data.tuxpaint_check, c.data.tuxpaint_path = True, str(tux)
  finetune_d2v.run(c, str(tmp_path))
  path = os.path.join(tmp_path, "metrics.jsonl")
  records = writers.read_jsonl(path)
  assert [r["step"] for r in records if "eval/valid/wer" in r] == [2]
  assert len([r for r in records if "eval/test/cer" in r]) == 1
  # Each final split is its own record of the last step.
  final = writers.read_jsonl(path, dedupe=True)[-1]
  assert final["step"] == 2
  for split in ("test", "tuxpaint_en"):
    assert 0 <= final[f"eval/{split}/cer"]
    assert 0 <= final[f"eval/{split}/wer"]
    assert np.isfinite(final[f"eval/{split}/loss"])
