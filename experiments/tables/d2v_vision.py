r"""data2vec vision on Fashion-MNIST: pretrained vs scratch with few labels.

  python -m experiments.tables.d2v_vision [--only=REGEX] [--seeds=3]

The grid (`experiments.tables.grid`; a killed grid resumes):

* ``pretrain-s0``: data2vec pretraining of the small ViT of
  ``d2v_vision.py:fmnist`` on the 60,000 unlabelled training images;
* per label budget -- 600 (1 %), 6,000 (10 %) and all 55,000 training
  images left after holding 5,000 out for validation -- and per seed:

  - ``pixels``: softmax regression on the raw pixels;
  - ``probe-random`` / ``probe-d2v``: softmax regression on the mean patch
    feature of the encoder at initialisation / after pretraining;
  - ``finetune-scratch`` / ``finetune-d2v``: ``d2v_finetune.py:
    image_fmnist`` (BEiT's augmented recipe) from a random encoder / from
    the pretrained one, the same recipe and updates;
  - ``plain-scratch`` / ``plain-d2v``: the same pair with
    ``image_fmnist_plain`` (no augmentation), the recipe tuned on the
    validation split for the model from scratch.

A seed draws the labelled subset (class-balanced) and the run's own
randomness; the probes on all the labels do not depend on it and run
once. Every number is test accuracy of the model picked on the validation
split. The table, its plot and the pretraining curves go to
``results/d2v_vision/``, the table into ``results/README.md``; cell
workdirs (checkpoints, the pretrained encoder) under
``outputs/tables/d2v_vision/``.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import app, flags

from d2vjax.datasets import images as images_lib
from experiments.configs import d2v_finetune, d2v_vision
from experiments.data import fashion_mnist
from experiments.reports import probe, retrieval
from experiments.runtime import cli, writers
from experiments.runtime import mesh as mesh_lib
from experiments.tables import grid, shared
from experiments.tasks import encoders

FLAGS = flags.FLAGS

# (column, labelled images (0 = all), fine-tuning updates)
BUDGETS = (("1%", 600, 1_000), ("10%", 6_000, 2_000), ("100%", 0, 6_000))
# The same columns on a few dozen images, for the tests.
TINY_BUDGETS = (("1%", 10, 2), ("10%", 20, 2), ("100%", 0, 2))
ROWS = {
  "pixels": "softmax regression, pixels",
  "probe-random": "linear probe, random encoder",
  "probe-d2v": "linear probe, data2vec",
  "finetune-scratch": "fine-tuned from scratch, augmented",
  "finetune-d2v": "fine-tuned from data2vec, augmented",
  "plain-scratch": "fine-tuned from scratch, plain",
  "plain-d2v": "fine-tuned from data2vec, plain",
}
# The fine-tuning recipe of each pair of rows (d2v_finetune.py variants).
RECIPES = {"finetune": "image_fmnist", "plain": "image_fmnist_plain"}
PRETRAIN = "pretrain-s0"
# Nearest neighbours (cosine) on the 10 % labels: the cell, k of the k-NN
# vote, and neighbours shown per query in ``neighbours.png``.
RETRIEVAL = "retrieval-s0"
KNN_K = 10
SHOWN_NEIGHBOURS = 8
RETRIEVAL_NAMES = {
  "pixels": "pixels",
  "random": "random encoder",
  "d2v": "data2vec encoder",
}


def pretrain_config(*, tiny: bool, data_path: str) -> ml_collections.ConfigDict:
  """The pretraining recipe (``d2v_vision.py:fmnist``, or a tiny one)."""
  c = d2v_vision.get_config("fmnist")
  if tiny:
    c.model.update(hidden=16, num_layers=2, heads=2, mlp_dim=32, top_k=2)
    c.train.update(batch_size=8, steps=4, log_every=1, checkpoint_every=4)
    c.optim.warmup_steps = 1
  c.data.path = data_path
  return c


def finetune_config(
  *,
  init: str,
  labels: int,
  steps: int,
  seed: int,
  tiny: bool,
  data_path: str,
  recipe: str = "image_fmnist",
) -> ml_collections.ConfigDict:
  """``d2v_finetune.py:<recipe>`` for one budget and seed."""
  c = d2v_finetune.get_config(recipe)
  c.init = init
  c.data.labels, c.data.subset_seed, c.train.seed = labels, seed, seed
  c.train.steps = steps
  if tiny:
    c.model.encoder.update(hidden=16, num_layers=2, heads=2, mlp_dim=32)
    c.data.valid_size = 20
    c.train.update(batch_size=8, eval_every=2, log_every=1, checkpoint_every=2)
    c.optim.warmup_steps = 1
  c.data.path = data_path
  return c


def _probe_spec(kind: str, config: ml_collections.ConfigDict) -> dict:
  """A probe cell's spec: the data, the encoder and the probe's grid."""
  d = config.data
  spec = {
    "probe": kind,
    "l2_grid": list(probe.L2_GRID),
    "data": {k: d[k] for k in ("valid_size", "labels", "subset_seed")},
  }
  if kind == "probe-random":
    spec |= {
      "encoder": config.model.encoder.to_dict(),
      "seed": config.train.seed,
    }
  elif kind == "probe-d2v":
    spec["init"] = shared.spec(config)["config"]["init"]
  return spec


def _run_finetune(config, workdir: pathlib.Path) -> grid.Metrics:
  cli.run(config, str(workdir))
  records = writers.read_jsonl(workdir / "metrics.jsonl", dedupe=True)
  valid = [
    r["eval/valid/accuracy"] for r in records if "eval/valid/accuracy" in r
  ]
  test = [r for r in records if "eval/test/accuracy" in r][-1]
  return {
    "test/accuracy": test["eval/test/accuracy"],
    "valid/accuracy": max(valid),
  }


def _labelled(config: ml_collections.ConfigDict) -> dict:
  d = config.data
  return fashion_mnist.labelled_splits(
    d.path,
    d.data_dir,
    valid_size=d.valid_size,
    labels=d.labels,
    subset_seed=d.subset_seed,
  )


def _features(kind: str, config: ml_collections.ConfigDict, splits) -> dict:
  """``{split: (features, labels)}``: pixels, or an encoder's mean patch."""
  if kind == "pixels":
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32) / 255
    data = {s: (flat(x), y) for s, (x, y) in splits.items()}
  else:
    encoder, params = encoders.load(
      config, mesh_lib.make_mesh(config, jax.device_count())
    )
    size = encoder.image_size
    if params is None:  # the random encoder: as fine-tuning initialises it
      dummy = np.zeros((1, size, size, 3), np.float32)
      params = encoder.init(jax.random.key(config.train.seed), dummy)["params"]
    data = {
      s: (
        probe.encoder_features(encoder, params, probe.probe_images(x, size)),
        y,
      )
      for s, (x, y) in splits.items()
    }
  return {s: (x, np.asarray(y, np.int32)) for s, (x, y) in data.items()}


def _run_probe(
  kind: str, config: ml_collections.ConfigDict, _: pathlib.Path
) -> grid.Metrics:
  """Softmax regression on pixels or on an encoder's features."""
  data = _features(kind, config, _labelled(config))
  return probe.probe(data["train"], data["valid"], data["test"], num_classes=10)


def _run_retrieval(
  configs: dict[str, ml_collections.ConfigDict],
  results_dir: pathlib.Path,
  _: pathlib.Path,
) -> grid.Metrics:
  """k-NN accuracy per representation; the neighbours of a few queries.

  The gallery is the labelled training images, the queries the test ones.
  """
  splits = _labelled(next(iter(configs.values())))
  (gallery, g_labels), (queries, q_labels) = splits["train"], splits["test"]
  out, shown = {}, {}
  # The first test image of each of six classes, as queries.
  picks = [int(np.flatnonzero(q_labels == c)[0]) for c in np.unique(q_labels)]
  picks = sorted(picks)[:6]
  for kind, config in configs.items():
    wanted = {"train": splits["train"], "test": (queries, q_labels)}
    data = _features(kind, config, wanted)
    near = retrieval.cosine_neighbours(data["train"][0], data["test"][0], KNN_K)
    out[f"test/knn_{kind}"] = retrieval.knn_accuracy(near, g_labels, q_labels)
    shown[RETRIEVAL_NAMES[kind]] = near[picks, :SHOWN_NEIGHBOURS]
  results_dir.mkdir(parents=True, exist_ok=True)
  retrieval.plot_neighbours(
    queries[picks],
    gallery,
    shown,
    results_dir / "neighbours.png",
    class_names=images_lib.CLASS_NAMES,
    query_labels=q_labels[picks],
    gallery_labels=g_labels,
  )
  return out


def _finetune_cell(name, row, column, seed, config) -> grid.Cell:
  run = functools.partial(_run_finetune, config)
  return grid.Cell(name, row, column, seed, shared.spec(config), run)


def cells(
  *,
  seeds: int,
  results_dir: pathlib.Path,
  tiny: bool = False,
  data_path: str = "",
) -> list[grid.Cell]:
  """The table's cells in running order: pretraining, then per budget,
  then the ablations (`ablation_cells`).

  The pretrained encoders are kept in ``<results_dir>/encoders/<cell>/``
  (`d2vjax.encoder_io`), where the later cells read them.
  """
  pre = pretrain_config(tiny=tiny, data_path=data_path)
  cell, encoders_dir = shared.pretrain_cell(
    PRETRAIN, "pretraining", pre, results_dir
  )
  out = [cell]
  kw = {"tiny": tiny, "data_path": data_path}
  for column, labels, steps in TINY_BUDGETS if tiny else BUDGETS:
    for seed in range(seeds):
      for kind, row in ROWS.items():
        recipe = RECIPES.get(kind.split("-")[0])
        tuned = recipe is not None
        if not labels and seed and not tuned:
          continue  # a probe on all the labels has nothing left to draw
        pretrained = kind.endswith("d2v")
        init = (
          f"encoder:{encoders_dir / 'encoder'}" if pretrained else "scratch"
        )
        c = finetune_config(
          init=init,
          labels=labels,
          steps=steps,
          seed=seed,
          recipe=recipe or "image_fmnist",
          **kw,
        )
        name = f"{column.rstrip('%')}pct-{kind}-s{seed}"
        if tuned:
          out.append(_finetune_cell(name, row, column, seed, c))
        else:
          run = functools.partial(_run_probe, kind, c)
          spec = _probe_spec(kind, c)
          out.append(grid.Cell(name, row, column, seed, spec, run))
  out.append(_retrieval_cell(encoders_dir, results_dir, **kw))
  return out + ablation_cells(seeds=seeds, results_dir=results_dir, **kw)


def _retrieval_cell(
  encoders_dir: pathlib.Path, results_dir: pathlib.Path, **kw
) -> grid.Cell:
  """k-NN on the 10 % labels (seed 0): pixels, random and data2vec encoders."""
  column, labels, _ = (TINY_BUDGETS if kw["tiny"] else BUDGETS)[1]
  kw |= {"labels": labels, "steps": 1, "seed": 0}
  configs = {
    "pixels": finetune_config(init="scratch", **kw),
    "random": finetune_config(init="scratch", **kw),
    "d2v": finetune_config(init=f"encoder:{encoders_dir / 'encoder'}", **kw),
  }
  d = configs["d2v"].data
  spec = {
    "retrieval": "knn-cosine",
    "k": KNN_K,
    "data": {k: d[k] for k in ("valid_size", "labels", "subset_seed")},
    "encoder": configs["random"].model.encoder.to_dict(),
    "seed": configs["random"].train.seed,
    "init": shared.spec(configs["d2v"])["config"]["init"],
  }
  run = functools.partial(_run_retrieval, configs, results_dir)
  return grid.Cell(RETRIEVAL, "k-NN", column, 0, spec, run)


# The teacher features of the paper's Table 4, as this ViT's pre-LN blocks
# have them: no LayerNorm follows the residual sum, so "FFN + residual" is
# the end of the block.
TARGET_ROWS = {
  "ffn": "target: FFN output",
  "end": "target: end of block (= FFN + residual)",
  "attention": "target: self-attention output",
}


class Ablation(NamedTuple):
  """A row of the ablation table.

  Attributes:
    key: names its cells (``ablation-pretrain-<key>-s0``,
      ``ablation-1pct-<key>-s<seed>``); None for the default recipe, whose
      row the main table's 1 % fine-tuning cells fill.
    row: the row's label.
    pretrain: the pretraining run it needs, or None.
    encoder: the encoder it fine-tunes when it needs no run of its own.
  """

  key: str | None
  row: str
  pretrain: ml_collections.ConfigDict | None = None
  encoder: pathlib.Path | None = None


def ablations(
  *, results_dir: pathlib.Path, tiny: bool, data_path: str
) -> list[Ablation]:
  """The paper's ablations at 1 % labels, in the table's order.

  * top-K: pretraining regresses the average of the top 1 or of all the
    blocks instead of 3 (the paper's Figure 3: averaging beats K = 1);
  * target feature: the teacher's FFN output or its self-attention output
    instead of the block output (the paper's Table 4: FFN best, attention
    fails);
  * pretraining length: fine-tuning from the encoders saved after 25 % and
    50 % of the default run.
  """
  default = pretrain_config(tiny=tiny, data_path=data_path)
  m = default.model

  def variant(**model) -> ml_collections.ConfigDict:
    c = default.copy_and_resolve_references()
    c.model.update(model)
    c.train.export_encoder_at = ()
    return c

  out = []
  for k in sorted({1, m.top_k, m.num_layers}):
    row = f"top-{k} block{'s' * (k > 1)}"
    if k == m.top_k:
      out.append(Ablation(None, f"{row} (default)"))
    else:
      out.append(Ablation(f"top{k}", row, variant(top_k=k)))
  for tap, row in TARGET_ROWS.items():
    if tap == m.tap:
      out.append(Ablation(None, f"{row} (default)"))
    else:
      out.append(Ablation(f"tap-{tap}", row, variant(tap=tap)))
  total = default.train.steps
  for fraction in default.train.export_encoder_at:
    step = round(fraction * total)
    folder = results_dir / "encoders" / PRETRAIN / f"encoder-{step}"
    row = f"{100 * fraction:.0f} % of pretraining ({step} steps)"
    out.append(Ablation(f"len{step}", row, encoder=folder))
  out.append(Ablation(None, "100 % of pretraining (default)"))
  return out


def ablation_cells(
  *, seeds: int, results_dir: pathlib.Path, tiny: bool, data_path: str
) -> list[grid.Cell]:
  """The ablations' pretraining runs, then their fine-tuning cells."""
  column, labels, steps = (TINY_BUDGETS if tiny else BUDGETS)[0]
  kw = {"labels": labels, "steps": steps, "tiny": tiny, "data_path": data_path}
  plan = ablations(results_dir=results_dir, tiny=tiny, data_path=data_path)
  out, encoders = [], []
  for a in plan:
    if a.key is None:
      continue
    folder = a.encoder
    if a.pretrain is not None:
      name = f"ablation-pretrain-{a.key}-s0"
      cell, where = shared.pretrain_cell(
        name, "pretraining", a.pretrain, results_dir
      )
      out.append(cell)
      folder = where / "encoder"
    encoders.append((a.key, a.row, folder))
  for seed in range(seeds):
    for key, row, folder in encoders:
      c = finetune_config(init=f"encoder:{folder}", seed=seed, **kw)
      cell_name = f"ablation-{column.rstrip('%')}pct-{key}-s{seed}"
      out.append(_finetune_cell(cell_name, row, column, seed, c))
  return out


# -- the report -----------------------------------------------------------


def _plot(records, curves, out: pathlib.Path) -> list[str]:
  """Accuracy against labels; pretraining curves. Returns the files."""
  shared.plot_vs_labels(
    records,
    rows=list(ROWS.values()),
    sizes={"1%": 600, "10%": 6_000, "100%": 55_000},
    metric="test/accuracy",
    xlabel="labelled training images",
    ylabel="test accuracy",
    path=out / "accuracy_vs_labels.png",
  )
  files = ["accuracy_vs_labels.png"]
  if curves:
    shared.plot_pretraining(curves, out / "pretraining.png")
    files.append("pretraining.png")
  return files


def _ablation_table(records, plan: Sequence[Ablation]) -> str:
  """The ablations beside the default recipe (its 1 % fine-tuning cells)."""
  if not any(r["name"].startswith("ablation-1pct-") for r in records):
    return ""
  defaults = [a.row for a in plan if a.key is None]
  records = list(records) + [
    dict(r, row=label)
    for r in records
    if r["name"].startswith("1pct-finetune-d2v-")
    for label in defaults
  ]
  return "\n" + grid.render(
    records,
    metric="test/accuracy",
    rows=[a.row for a in plan],
    columns=["1%"],
    row_header="ablation: fine-tuned at 1 % labels",
  )


def _retrieval_table(records) -> str:
  """The k-NN accuracies and the neighbours picture, once the cell ran."""
  found = [r for r in records if r["name"] == RETRIEVAL]
  if not found:
    return ""
  m = found[0]["metrics"]
  head = " | ".join(RETRIEVAL_NAMES.values())
  values = " | ".join(f"{m[f'test/knn_{k}']:.3f}" for k in RETRIEVAL_NAMES)
  return (
    f"\nNearest neighbours: a {KNN_K}-NN vote (cosine) among the "
    f"{found[0]['column']} labelled training images, test accuracy; for "
    "the encoders, their mean patch feature.\n\n"
    f"| k-NN | {head} |\n|---|---|---|---|\n| test accuracy | {values} |\n"
    "\n![neighbours.png](d2v_vision/neighbours.png)\n"
  )


def report(
  records,
  results_dir: pathlib.Path,
  root: pathlib.Path,
  *,
  tiny: bool = False,
) -> str:
  """Renders the table (markdown), its plots and the pretraining curves."""
  columns = [c for c, *_ in BUDGETS]
  text = grid.render(
    records,
    metric="test/accuracy",
    rows=list(ROWS.values()),
    columns=columns,
    row_header="Fashion-MNIST test accuracy",
  )
  for recipe in RECIPES:
    gains = []
    for c in columns:
      d2v, scratch = (
        grid.mean_of(records, ROWS[f"{recipe}-{start}"], c, "test/accuracy")
        for start in ("d2v", "scratch")
      )
      if d2v[2] and scratch[2]:
        gains.append(f"{c}: {100 * (d2v[0] - scratch[0]):+.1f} points")
    if gains:
      label = ROWS[f"{recipe}-d2v"].split(", ")[-1]
      text += (
        f"\nFine-tuned ({label}), data2vec minus scratch: "
        + ", ".join(gains)
        + "."
      )
  text += "\n"
  curves = shared.curves(root / PRETRAIN)
  if curves:
    grid.write_json(results_dir / "pretrain_curves.json", curves)
  text += shared.pretraining_summary(records, "d2v_vision", PRETRAIN)
  text += _retrieval_table(records)
  plan = ablations(results_dir=results_dir, tiny=tiny, data_path="")
  text += _ablation_table(records, plan)
  text += f"\nAll cells: {grid.total_hours(records):.2f} h of runs.\n"
  for name in _plot(records, curves, results_dir):
    text += f"\n![{name}](d2v_vision/{name})\n"
  (results_dir / "table.md").write_text(text)
  return text


# -- the command ----------------------------------------------------------


def define_flags() -> None:
  """The table command's flags, those not yet defined."""
  shared.define_table_flags(
    "d2v_vision",
    (
      "string",
      "fashion_mnist_path",
      "",
      "Folder of Fashion-MNIST IDX files ('' = fetch).",
    ),
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  grid.enable_compilation_cache(FLAGS.compilation_cache)
  results, root = (
    pathlib.Path(FLAGS.results_dir),
    pathlib.Path(FLAGS.workdir_root),
  )
  table = cells(
    seeds=FLAGS.seeds,
    results_dir=results,
    tiny=FLAGS.tiny,
    data_path=FLAGS.fashion_mnist_path,
  )
  if not FLAGS.report_only:
    grid.run_grid(table, results, root, only=FLAGS.only, rerun=FLAGS.rerun)
  records = grid.relabel(grid.saved_records(results), table)
  text = report(records, results, root, tiny=FLAGS.tiny)
  grid.update_readme(FLAGS.readme, "d2v_vision", text)
  print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
