"""The data2vec vision table, end to end on tiny models and images."""

import json
import pathlib

import pytest
from absl import flags
from absl.testing import flagsaver

from experiments.tables import d2v_vision, grid
from tests.d2vjax.test_datasets_images import write_fashion_mnist

# The cells' fine-tuning runs share their shapes: compile them once.
pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture(scope="module", autouse=True)
def _flags():
  if "results_dir" not in flags.FLAGS:
    d2v_vision.define_flags()
  flags.FLAGS.mark_as_parsed()


def test_cells_cover_the_table():
  cells = d2v_vision.cells(seeds=3, results_dir=pathlib.Path("r"))
  names = [c.name for c in cells]
  assert names[0] == "pretrain-s0" and len(set(names)) == len(names)
  # 7 rows x 3 seeds at 1% and 10%; at 100% the probes run once; then
  # four more pretraining runs (top-K, target feature) and 6 ablation rows
  # x 3 seeds; and the nearest-neighbour cell.
  assert len(cells) == 1 + 2 * 21 + (4 * 3 + 3) + 1 + 4 + 6 * 3
  knn = next(c for c in cells if c.name == "retrieval-s0")
  assert knn.spec["data"]["labels"] == 6_000 and knn.column == "10%"
  assert knn.spec["init"] == "encoder:pretrain-s0/encoder"
  d2v = next(c for c in cells if c.name == "1pct-finetune-d2v-s1")
  scratch = next(c for c in cells if c.name == "1pct-finetune-scratch-s1")
  assert d2v.spec["config"]["init"] == "encoder:pretrain-s0/encoder"
  assert scratch.spec["config"]["init"] == "scratch"
  # The same recipe and budget but for the initialisation.
  strip = lambda s: {k: v for k, v in s["config"].items() if k != "init"}
  assert strip(d2v.spec) == strip(scratch.spec)
  assert d2v.spec["config"]["data"]["labels"] == 600
  # The plain recipe: no augmentation, its own peak; the same pairing.
  plain = {
    c.name.split("-")[2]: c.spec["config"]
    for c in cells
    if c.name.startswith("1pct-plain-") and c.name.endswith("-s1")
  }
  assert plain["d2v"]["init"] == d2v.spec["config"]["init"]
  assert strip({"config": plain["d2v"]}) == strip({"config": plain["scratch"]})
  assert not plain["scratch"]["data"]["augment"]
  assert plain["scratch"]["mixup"]["prob"] == 0.0
  assert scratch.spec["config"]["data"]["augment"]


def test_tiny_table_runs_and_resumes(tmp_path, capsys):
  write_fashion_mnist(tmp_path / "fm", n_train=80, n_test=16)
  results, readme = tmp_path / "results", tmp_path / "README.md"
  args = dict(
    results_dir=str(results),
    readme=str(readme),
    workdir_root=str(tmp_path / "work"),
    seeds=1,
    only="^pretrain-s0$|^1pct|^retrieval",
    tiny=True,
    fashion_mnist_path=str(tmp_path / "fm"),
    compilation_cache="",
  )
  with flagsaver.flagsaver(**args):
    d2v_vision.main(["d2v_vision"])
  records = grid.saved_records(results)
  assert {r["name"] for r in records} == {
    "pretrain-s0",
    *(f"1pct-{k}-s0" for k in d2v_vision.ROWS),
    "retrieval-s0",
  }
  for r in records:
    if r["row"] not in ("pretraining", "k-NN"):
      assert 0 <= r["metrics"]["test/accuracy"] <= 1, r
  knn = next(r for r in records if r["name"] == "retrieval-s0")["metrics"]
  assert set(knn) == {f"test/knn_{k}" for k in ("pixels", "random", "d2v")}
  assert all(0 <= v <= 1 for v in knn.values())
  assert (results / "neighbours.png").exists()
  text = readme.read_text()
  assert (
    "<!-- begin:d2v_vision -->" in text and "fine-tuned from data2vec" in text
  )
  assert "10-NN vote (cosine)" in text and "data2vec encoder" in text
  assert (results / "accuracy_vs_labels.png").exists()
  assert (results / "pretraining.png").exists()
  assert (results / "encoders" / "pretrain-s0" / "encoder").is_dir()
  # Run again: everything is skipped.
  capsys.readouterr()
  with flagsaver.flagsaver(**args):
    d2v_vision.main(["d2v_vision"])
  out = capsys.readouterr().out
  assert out.count("done before, skipped") == 2 + len(d2v_vision.ROWS)
  assert ": running" not in out
  # A cell saved with another recipe is refused, not mixed in.
  path = results / "cells" / "1pct-finetune-scratch-s0.json"
  saved = json.loads(path.read_text())
  saved["spec"]["config"]["train"]["steps"] = 99
  path.write_text(json.dumps(saved))
  with flagsaver.flagsaver(**args), pytest.raises(ValueError, match="spec"):
    d2v_vision.main(["d2v_vision"])


def test_ablations_change_one_thing_each():
  plan = d2v_vision.ablations(
    results_dir=pathlib.Path("r"), tiny=False, data_path=""
  )
  assert [a.row for a in plan] == [
    "top-1 block",
    "top-3 blocks (default)",
    "top-6 blocks",
    "target: FFN output",
    "target: end of block (= FFN + residual) (default)",
    "target: self-attention output",
    "25 % of pretraining (750 steps)",
    "50 % of pretraining (1500 steps)",
    "100 % of pretraining (default)",
  ]
  default = d2v_vision.pretrain_config(tiny=False, data_path="").to_dict()
  changed = {"top1": {"top_k": 1}, "top6": {"top_k": 6}}
  changed |= {"tap-ffn": {"tap": "ffn"}, "tap-attention": {"tap": "attention"}}
  for a in plan:
    if a.pretrain is None:
      continue
    got = a.pretrain.to_dict()
    assert got["train"].pop("export_encoder_at") == ()
    want = {**default, "train": dict(default["train"])}
    want["train"].pop("export_encoder_at")
    want["model"] = {**default["model"], **changed.pop(a.key)}
    assert got == want, a.key
  assert not changed
  encoders = {a.key: a.encoder for a in plan if a.encoder is not None}
  assert encoders == {
    f"len{n}": pathlib.Path("r/encoders/pretrain-s0") / f"encoder-{n}"
    for n in (750, 1500)
  }


def test_ablation_table_fills_default_rows_from_the_main_cells():
  def record(name, row, acc, seed=0):
    metrics = {"test/accuracy": acc}
    return dict(name=name, row=row, column="1%", seed=seed, metrics=metrics)

  records = [
    record("1pct-finetune-d2v-s0", d2v_vision.ROWS["finetune-d2v"], 0.7),
    record("1pct-finetune-d2v-s1", d2v_vision.ROWS["finetune-d2v"], 0.8, 1),
    record(
      "ablation-1pct-tap-attention-s0", "target: self-attention output", 0.4
    ),
  ]
  plan = d2v_vision.ablations(
    results_dir=pathlib.Path("r"), tiny=False, data_path=""
  )
  lines = d2v_vision._ablation_table(records, plan).strip().splitlines()
  body = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
  assert list(body) == [a.row for a in plan]
  for a in plan:
    if a.key is None:
      assert "0.750 ± 0.071" in body[a.row], body[a.row]
  assert "0.400 (n=1)" in body["target: self-attention output"]
  assert d2v_vision._ablation_table(records[:2], plan) == ""
