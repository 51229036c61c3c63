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
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import ml_collections
import numpy as np
from absl import flags

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


def plot_vs_labels(
  records,
  *,
  rows: Sequence[str],
  sizes: Mapping[str, float],
  metric: str,
  xlabel: str,
  ylabel: str,
  path: pathlib.Path,
) -> None:
  """A metric against the labelled budget (log x), one line per row.

  Args:
    records: cell records.
    rows: the rows drawn, in legend order; rows with no record are left out.
    sizes: the budget of each column, in plotting units.
    metric: the key in each record's ``metrics``.
    xlabel: the budget's axis title.
    ylabel: the metric's axis title.
    path: the PNG to write.
  """
  fig, ax = plt.subplots(figsize=(6, 4))
  for row in rows:
    points = [
      (x, *grid.mean_of(records, row, column, metric))
      for column, x in sizes.items()
    ]
    points = [p for p in points if p[3]]
    if points:
      x, mean, std, _ = map(np.asarray, zip(*points, strict=True))
      ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=row)
  ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def pretraining_summary(records, table: str, name: str) -> str:
  """The paragraph on a table's pretraining cell; "" before it has run."""
  found = [r for r in records if r["name"] == name]
  if not found:
    return ""
  m, where = found[0]["metrics"], found[0]["machine"]
  return (
    f"\nPretraining: {int(m['steps'])} steps in {m['train_hours']:.2f} h "
    f"on {where['cpu']} ({where['cores']} cores); final loss "
    f"{m['train/loss']:.4f}, target variance {m['train/target_var']:.3f}, "
    f"prediction variance {m['train/pred_var']:.3f}. The encoder "
    f"(`{table}/encoders/{name}/encoder/`, {m['encoder_mb']:.1f} "
    f"MiB) fine-tunes with `--config.init=encoder:results/{table}/"
    f"encoders/{name}/encoder`.\n"
  )


def define_table_flags(table: str, *extra: tuple[str, str, Any, str]) -> None:
  """A table command's flags, those not yet defined.

  The table commands share flag names; a process that holds several (the
  tests) keeps the first definition of each.

  Args:
    table: the table's key: ``results/<table>``, ``outputs/tables/<table>``.
    *extra: the table's own flags as ``(kind, name, default, help)``, kind
      one of absl's ``DEFINE_<kind>``.
  """
  wanted = (
    ("string", "results_dir", f"results/{table}", "Cell records, plots."),
    ("string", "readme", "results/README.md", "Where the table goes."),
    ("string", "workdir_root", f"outputs/tables/{table}", "Cell workdirs."),
    ("integer", "seeds", 3, "Seeds per row and label budget."),
    ("string", "only", "", "Run just the cells whose name matches."),
    ("bool", "rerun", False, "Run cells again though saved."),
    ("bool", "report_only", False, "Render the saved cells; run none."),
    ("string", "compilation_cache", "outputs/jax_cache", "XLA's cache."),
    ("bool", "tiny", False, "Tiny models and runs (the tests)."),
    *extra,
  )
  for kind, name, default, help_text in wanted:
    if name not in flags.FLAGS:
      getattr(flags, f"DEFINE_{kind}")(name, default, help_text)
