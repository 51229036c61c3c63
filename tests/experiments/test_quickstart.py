"""The README's main job runs end to end on generated inputs (tiny sizes).

SpokenReviews is built with the real speech synthesiser from the eight
generated sentences of `test_vader.MOVIE`, packed as the vaderSentiment
sdist; Fashion-MNIST is a few random images in the IDX layout.
"""

import json
import math

import matplotlib.image
import numpy as np
import pytest

from experiments import quickstart
from experiments.data import mtag_samples
from tests.d2vjax.test_datasets_images import write_fashion_mnist
from tests.experiments.data.test_vader import make_sdist


@pytest.fixture(scope="module")
def finished(tmp_path_factory, xla_cache):
  del xla_cache
  root = tmp_path_factory.mktemp("quickstart")
  sdist = make_sdist(root / "vaderSentiment-3.3.2.tar.gz")
  write_fashion_mnist(root / "fashion")
  out = root / "out"
  results = quickstart.run(
    out,
    data_dir=str(root / "data"),
    vader_archive=str(sdist),
    fashion_mnist_path=str(root / "fashion"),
    tiny=True,
  )
  return out, results


def test_reports_finite_metrics_for_both_models(finished, capsys):
  _, results = finished
  models = results["spoken_reviews"]
  assert list(models) == ["MTAG (vision+text+audio)", "text only"]
  for metrics in models.values():
    assert set(metrics) == set(quickstart.METRICS)
    # Corr is undefined (None) when predictions are constant; the rest
    # must be numbers.
    for name in ("acc2", "f1", "acc7", "mae"):
      assert math.isfinite(metrics[name]), (name, metrics)
  d2v = results["fashion_mnist"]
  for name in ("from data2vec", "from scratch"):
    assert 0.0 <= d2v[name] <= 1.0
  assert (d2v["labels"], d2v["finetune_steps"]) == (10, 4)


def test_everything_lands_in_the_output_folder(finished):
  out, results = finished
  assert results["output_dir"] == str(out.absolute())
  saved = json.loads((out / "results.json").read_text())
  assert saved["spoken_reviews"] == results["spoken_reviews"]
  for key in ("curves", "graph"):
    path = results["files"][key]
    assert path.startswith(str(out)) and path.endswith(".png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
  for run in ("mtag", "mtag_text_only"):
    assert (out / run / "metrics.jsonl").is_file()
    assert any((out / run / "best").iterdir())
  assert (out / "d2v" / "metrics.jsonl").is_file()
  assert any((out / "d2v" / "checkpoints").iterdir())
  assert (out / "d2v" / "encoder" / "encoder.json").is_file()
  for run in ("d2v_finetune_scratch", "d2v_finetune_data2vec"):
    assert any((out / run / "best").iterdir())


def test_fine_tuning_runs_differ_only_in_their_start(finished):
  out, _ = finished
  saved = {
    run: json.loads((out / run / "config.json").read_text())
    for run in ("d2v_finetune_scratch", "d2v_finetune_data2vec")
  }
  scratch, d2v = saved.values()
  assert scratch.pop("init") == "scratch"
  assert d2v.pop("init") == f"encoder:{out / 'd2v' / 'encoder'}"
  assert scratch == d2v
  # The scratch model is the architecture that was pretrained.
  pretrained = json.loads(
    (out / "d2v" / "encoder" / "encoder.json").read_text()
  )
  for field in ("hidden", "num_layers", "heads", "mlp_dim", "patch_size"):
    assert scratch["model"]["encoder"][field] == pretrained["fields"][field]


def test_prints_one_table_naming_the_folder(finished):
  out, results = finished
  table = results["table"]
  for text in ("Acc2", "F1", "Acc7", "MAE", "Corr", "text only"):
    assert text in table
  assert "from data2vec" in table and "from scratch" in table
  assert f"Output folder: {out.absolute()}" in table
  assert "mtag_attention_graph.png" in table and "results.json" in table


def test_pool_frames_averages_windows_and_keeps_a_short_tail():
  frames = np.arange(14, dtype=np.float16).reshape(7, 2)
  pooled = mtag_samples.pool_frames(frames, 3)
  assert pooled.dtype == np.float32
  np.testing.assert_allclose(pooled, [[2, 3], [8, 9], [12, 13]])
  np.testing.assert_array_equal(mtag_samples.pool_frames(frames, 1), frames)
  with pytest.raises(ValueError, match="pooling width 0"):
    mtag_samples.pool_frames(frames, 0)


def test_spoken_reviews_source_names_the_wrong_field(finished):
  out, _ = finished
  config = quickstart.mtag_configs(
    tiny=True,
    data_dir=str(out.parent / "data"),
    archive=str(out.parent / "vaderSentiment-3.3.2.tar.gz"),
    seed=0,
  )["MTAG (vision+text+audio)"]
  samples = mtag_samples.load_data(config)
  assert [len(samples[s]) for s in ("train", "valid", "test")] == [5, 1, 2]
  vision, text, audio = samples["test"][0].features
  assert vision.shape[1] == 6 and audio.shape[1] == 40
  assert text.shape[1] == 1 and np.all(text == np.round(text))
  # Standardised with the train statistics.
  train_audio = np.concatenate([s.features[2] for s in samples["train"]])
  np.testing.assert_allclose(train_audio.mean(0), 0.0, atol=1e-4)
  config.model.vocab_sizes = (0, 0, 0)
  with pytest.raises(ValueError, match=r"vocab_sizes\[1\]"):
    mtag_samples.load_data(config)
  config.model.vocab_sizes = (0, 64, 0)
  config.model.feature_dims = (6, 1, 41)
  with pytest.raises(ValueError, match=r"feature_dims\[2\]=41"):
    mtag_samples.load_data(config)
