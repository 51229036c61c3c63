"""What the result tables share: specs of configs, pretraining cells.

A table's pretraining cell runs `experiments.pretrain_d2v`'s recipe in its
workdir and copies the encoders the run exports (`d2vjax.encoder_io`) to
``<results>/encoders/<cell>/``, where the table's fine-tuning cells and
users read them; its curves come back from the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import functools
import pathlib
import shutil

import matplotlib
import ml_collections

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

from experiments.runtime import cli, writers
from experiments.tables import grid


def spec(config: ml_collections.ConfigDict) -> dict:
  """A run's spec: its config without where data and workdirs live."""
  c = config.copy_and_resolve_references()
  c.data.path = c.data.data_dir = ""
  if c.get("init", "").startswith("encoder:"):
    # encoders/<pretraining cell>/<encoder folder>, wherever results live.
    c.init = "encoder:" + "/".join(pathlib.Path(c.init).parts[-2:])
  return grid.spec_of(c)


def run_pretrain(
  config, artifact: pathlib.Path, workdir: pathlib.Path
) -> grid.Metrics:
  """Pretrains (or finishes pretraining); keeps its encoder as `artifact`."""
  cli.run(config, str(workdir))
  records = writers.read_jsonl(workdir / "metrics.jsonl", dedupe=True)
  train = [r for r in records if "train/loss" in r]
  # The final encoder and those of export_encoder_at.
  if artifact.exists():
    shutil.rmtree(artifact)
  for folder in sorted(workdir.glob("encoder*")):
    shutil.copytree(folder, artifact / folder.name)
  final = artifact / "encoder"
  keys = ("train/loss", "train/target_var", "train/pred_var")
  return {
    "steps": train[-1]["step"],
    # From the first logged step to the last: the run's own time, however
    # many processes it took.
    "train_hours": (train[-1]["time"] - train[0]["time"]) / 3600,
    "encoder_mb": sum(f.stat().st_size for f in final.iterdir()) / 2**20,
    **{k: train[-1][k] for k in keys},
  }


def pretrain_cell(
  name: str, row: str, config: ml_collections.ConfigDict, results_dir
) -> tuple[grid.Cell, pathlib.Path]:
  """A pretraining cell, and where it keeps its encoders."""
  encoders_dir = results_dir / "encoders" / name
  run = functools.partial(run_pretrain, config, encoders_dir)
  return grid.Cell(name, row, "", 0, spec(config), run), encoders_dir


def curves(workdir: pathlib.Path) -> dict[str, list[float]]:
  """Pretraining loss and variances by step, from the run's metrics."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return {}
  records = writers.read_jsonl(path, dedupe=True)
  keys = ("train/loss", "train/target_var", "train/pred_var")
  rows = [r for r in records if all(k in r for k in keys)]
  return {"step": [r["step"] for r in rows]} | {
    k: [r[k] for r in rows] for k in keys
  }


def plot_pretraining(
  curves: dict[str, list[float]], path: pathlib.Path
) -> None:
  """Regression loss, and target / prediction variance, against step."""
  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
  a.plot(curves["step"], curves["train/loss"])
  a.set(xlabel="step", ylabel="regression loss", yscale="log")
  b.plot(curves["step"], curves["train/target_var"], label="targets")
  b.plot(curves["step"], curves["train/pred_var"], label="predictions")
  b.set(xlabel="step", ylabel="variance across the batch")
  b.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
