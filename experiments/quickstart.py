r"""The README's main job: MTAG on SpokenReviews, data2vec on Fashion-MNIST.

  python -m experiments.quickstart [--output_dir=...] [--data_dir=...]

In a few minutes on a CPU it

1. builds a 600-sentence slice of SpokenReviews (real rated review
   sentences with synthetic speech and articulation, `spoken_reviews.py`)
   into the data directory, or finds it there;
2. trains MTAG on it (`experiments/configs/mtag_spoken.py`: the official
   loss, optimizer and plateau schedule at 3x the learning rate, best
   epoch by valid MAE) and, the same way, a text-only ablation, and
   reports both on the test split;
3. draws the training curves and the pruned attention graph of one test
   sentence;
4. pretrains a small data2vec ViT on Fashion-MNIST (1,500 steps), then
   fine-tunes it on 1 % of the labels (600 images) beside the same model
   from scratch, with the same recipe and number of updates.

Everything goes to one folder (default `outputs/quickstart-<time>` under the
current directory), named at the end with the results table, which is
also written there as `results.json`. A notebook calls `run(...)`.
`--tiny` shrinks every part to seconds (the tests use it with generated
inputs via `--vader_archive` and `--fashion_mnist_path`).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging

from experiments.configs import d2v_finetune, d2v_vision, mtag_spoken
from experiments.data import mtag_samples
from experiments.reports import plots
from experiments.runtime import cli, writers
from experiments.tasks import mtag as mtag_task
from mtagjax import datasets

FLAGS = flags.FLAGS

METRICS = ("acc2", "f1", "acc7", "mae", "corr")
# Fine-tuning updates of the data2vec comparison (batch 64, 600 labels).
FINETUNE_STEPS = 500
PER_MODALITY = ("feature_dims", "padded_lengths", "vocab_sizes")


def mtag_configs(
  *, tiny: bool, data_dir: str, archive: str, seed: int
) -> dict[str, ml_collections.ConfigDict]:
  """The full MTAG config and its text-only ablation."""
  full = mtag_spoken.get_config("tiny" if tiny else None)
  full.data.data_dir, full.data.archive = data_dir, archive
  full.data.seed = full.train.seed = seed
  text = full.copy_and_resolve_references()
  keep = [i for i, m in enumerate(full.model.modalities) if m == "text"]
  for field in ("modalities", *PER_MODALITY):
    if field in text.model:
      text.model[field] = tuple(text.model[field][i] for i in keep)
  return {"MTAG (vision+text+audio)": full, "text only": text}


def d2v_config(
  *, tiny: bool, path: str, data_dir: str, seed: int
) -> ml_collections.ConfigDict:
  """A small data2vec ViT on 28x28 Fashion-MNIST in 4x4 or 7x7 patches."""
  c = d2v_vision.get_config("tiny")
  c.data.source, c.data.path, c.data.data_dir = "fashion_mnist", path, data_dir
  c.train.seed = seed
  m = c.model
  m.image_size = 28
  if tiny:
    m.patch_size = 7  # 4x4 patches, as the tiny config's mask expects
    c.train.steps, c.train.checkpoint_every = 2, 2
  else:
    m.patch_size = 4  # a 7x7 grid of 49 patches
    m.hidden, m.num_layers, m.heads, m.mlp_dim = 64, 4, 4, 128
    m.top_k = 3
    c.mask.num_masking_patches = 29  # 60% of the patches, as BEiT's 120/196
    c.mask.min_num_patches, c.mask.max_num_patches = 4, 49
    c.ema.start, c.ema.end, c.ema.anneal_steps = 0.99, 0.999, 1_000
    c.optim.peak_lr, c.optim.warmup_steps = 2e-3, 30
    c.train.batch_size, c.train.steps = 64, 1_500
    c.train.log_every, c.train.checkpoint_every = 10, 500
  return c


def _test_metrics(workdir: pathlib.Path) -> dict[str, float]:
  records = writers.read_jsonl(workdir / "metrics.jsonl", dedupe=True)
  test = [r for r in records if "eval/test/mae" in r]
  if not test:
    raise RuntimeError(f"{workdir}: the run reported no test metrics")
  return {k: test[-1][f"eval/test/{k}"] for k in METRICS}


def _pick_sentence(tokens: Sequence[list[str]]) -> int:
  """A short test sentence (a readable figure) that still has some words."""
  lengths = np.asarray([len(t) for t in tokens])
  ok = np.flatnonzero(lengths >= min(6, lengths.max()))
  return int(ok[np.argmin(lengths[ok])])


def run_mtag(
  out: pathlib.Path, *, tiny: bool, data_dir: str, archive: str, seed: int
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
  """Trains MTAG and the text-only ablation; draws curves and a graph."""
  configs = mtag_configs(
    tiny=tiny, data_dir=data_dir, archive=archive, seed=seed
  )
  results, workdirs, states = {}, {}, {}
  for name, config in configs.items():
    workdir = out / ("mtag" if "+" in name else "mtag_text_only")
    print(f"\n== {name}: training on SpokenReviews -> {workdir}", flush=True)
    state = cli.run(config, str(workdir))
    states[name] = mtag_task.best_state(config, str(workdir), state)
    results[name] = _test_metrics(workdir)
    workdirs[name] = workdir
  files = {"curves": str(out / "mtag_curves.png")}
  plots.training_curves(workdirs, files["curves"])

  name, config = next(iter(configs.items()))
  raw = datasets.load_spoken_reviews(
    mtag_samples.spoken_reviews_path(config.data)
  )
  k = _pick_sentence(raw["test"]["tokens"])
  sample = mtag_samples.load_data(config)["test"][k]
  state = states[name]
  graph = plots.graph_attention(
    {"params": state.params, **state.constants}, config.model, sample
  )
  words = raw["test"]["tokens"][k]
  files["graph"] = str(out / "mtag_attention_graph.png")
  plots.attention_graph(
    graph,
    config.model.modalities,
    files["graph"],
    title=f'test sentence {k}: "{" ".join(words)}" (label {sample.label:+.2f})',
    labels={"text": words},
  )
  return results, files


def d2v_finetune_configs(
  pretrained: ml_collections.ConfigDict,
  encoder_dir: str,
  *,
  tiny: bool,
  path: str,
  data_dir: str,
  seed: int,
) -> dict[str, ml_collections.ConfigDict]:
  """Fine-tuning at 1 % of the labels from scratch and from `encoder_dir`.

  Both runs are ``d2v_finetune.py:image_fmnist_plain`` (600 class-balanced
  labelled images, 5,000 held out for validation, test scored on the best
  checkpoint; no augmentation, the recipe under which the model from
  scratch learns best) on the architecture `pretrained` pretrains, with the
  same seed, recipe and number of updates; only the starting weights
  differ.
  """
  c = d2v_finetune.get_config("image_fmnist_plain")
  arch = pretrained.model
  c.model.encoder.update({k: arch[k] for k in c.model.encoder if k in arch})
  c.data.path, c.data.data_dir = path, data_dir
  c.data.subset_seed = c.train.seed = seed
  if tiny:
    c.data.valid_size, c.data.labels = 8, 10
    c.train.update(
      batch_size=8, steps=4, eval_every=2, log_every=1, checkpoint_every=2
    )
    c.optim.warmup_steps = 1
  else:
    c.train.steps = FINETUNE_STEPS
    c.train.eval_every = c.train.checkpoint_every = FINETUNE_STEPS // 2
  d2v = c.copy_and_resolve_references()
  d2v.init = f"encoder:{encoder_dir}"
  return {"from scratch": c, "from data2vec": d2v}


def _accuracy(workdir: pathlib.Path) -> float:
  """Test accuracy of the checkpoint picked on the validation split."""
  records = writers.read_jsonl(workdir / "metrics.jsonl", dedupe=True)
  test = [r for r in records if "eval/test/accuracy" in r]
  if not test:
    raise RuntimeError(f"{workdir}: the run reported no test accuracy")
  return test[-1]["eval/test/accuracy"]


def run_d2v(
  out: pathlib.Path, *, tiny: bool, path: str, data_dir: str, seed: int
) -> dict[str, Any]:
  """Pretrains data2vec on Fashion-MNIST, then fine-tunes at 1 % labels.

  The pretrained run and the one from scratch share everything but their
  starting weights; returns their test accuracies and the sizes used.
  """
  config = d2v_config(tiny=tiny, path=path, data_dir=data_dir, seed=seed)
  workdir = out / "d2v"
  print(f"\n== data2vec: pretraining on Fashion-MNIST -> {workdir}")
  cli.run(config, str(workdir))
  configs = d2v_finetune_configs(
    config,
    str(workdir / "encoder"),
    tiny=tiny,
    path=path,
    data_dir=data_dir,
    seed=seed,
  )
  results = {}
  for name, c in configs.items():
    run_dir = out / f"d2v_finetune_{name.split()[-1]}"
    print(f"\n== data2vec: fine-tuning {name} at 1% labels -> {run_dir}")
    cli.run(c, str(run_dir))
    results[name] = _accuracy(run_dir)
  c = configs["from scratch"]
  results |= {
    "pretrain_steps": config.train.steps,
    "labels": c.data.labels,
    "finetune_steps": c.train.steps,
  }
  return results


def _listing(out: pathlib.Path) -> list[str]:
  """The files under `out`, with checkpoints and TensorBoard as folders."""
  lines = []
  for p in sorted(out.rglob("*")):
    rel = p.relative_to(out)
    inner = set(rel.parts[:-1])
    if inner & {"checkpoints", "best", "tensorboard"}:
      if p.is_dir() and p.parent.name in ("checkpoints", "best"):
        lines.append(f"{rel}/  (checkpoint)")
      continue
    if p.name == "tensorboard":
      lines.append(f"{rel}/  (TensorBoard)")
    elif p.is_file():
      lines.append(str(rel))
  return lines


def _cell(value: float | None) -> str:
  # A metric the writer could not store as a number (Corr of constant
  # predictions) comes back as None.
  return f"{'n/a':>8}" if value is None else f"{value:8.3f}"


def _table(mtag: dict, d2v: dict, out: pathlib.Path, files: dict) -> str:
  names = {"acc2": "Acc2", "f1": "F1", "acc7": "Acc7", "mae": "MAE"}
  head = "".join(f"{names.get(k, k.title()):>8}" for k in METRICS)
  rows = [
    "SpokenReviews test (best epoch by valid MAE)",
    f"  {'model':<28}{head}",
  ]
  for name, m in mtag.items():
    rows.append(f"  {name:<28}" + "".join(_cell(m[k]) for k in METRICS))
  rows += [
    "",
    f"Fashion-MNIST test, fine-tuned on {d2v['labels']} labelled images "
    f"for {d2v['finetune_steps']} updates",
    f"  {'from data2vec':<28}{d2v['from data2vec']:8.3f}"
    f"   ({d2v['pretrain_steps']} pretraining steps)",
    f"  {'from scratch':<28}{d2v['from scratch']:8.3f}",
    "",
    f"Output folder: {out}",
  ]
  rows += [f"  {line}" for line in _listing(out)]
  return "\n".join(rows)


def default_output_dir() -> pathlib.Path:
  """A fresh `outputs/quickstart-<time>` folder under the current directory."""
  return pathlib.Path("outputs") / time.strftime("quickstart-%Y%m%d-%H%M%S")


def run(
  output_dir: str | os.PathLike | None = None,
  *,
  data_dir: str | None = None,
  vader_archive: str | None = None,
  fashion_mnist_path: str | None = None,
  tiny: bool = False,
  seed: int = 0,
) -> dict[str, Any]:
  """Runs the whole job; returns the results (also in `results.json`).

  Args:
    output_dir: where everything goes (default `default_output_dir()`); a
      folder holding an earlier run of the same job resumes it.
    data_dir: the data directory (None = the user's cache).
    vader_archive: a vaderSentiment sdist to build SpokenReviews from.
    fashion_mnist_path: a folder of Fashion-MNIST IDX files.
    tiny: seconds-long sizes everywhere.
    seed: seeds the data slice, initialisations and data order.

  Returns:
    `{"spoken_reviews": {model: {metric: value}}, "fashion_mnist":
    {"pretrained": acc, "random": acc, ...}, "files": {...},
    "output_dir": str, "seconds": float}`.
  """
  start = time.perf_counter()
  out = pathlib.Path(output_dir or default_output_dir()).absolute()
  out.mkdir(parents=True, exist_ok=True)
  common = dict(tiny=tiny, data_dir=data_dir or "", seed=seed)
  mtag, files = run_mtag(out, archive=vader_archive or "", **common)
  d2v = run_d2v(out, path=fashion_mnist_path or "", **common)
  results = {
    "spoken_reviews": mtag,
    "fashion_mnist": d2v,
    "files": files,
    "output_dir": str(out),
    "seconds": round(time.perf_counter() - start, 1),
  }
  files["results"] = str(out / "results.json")
  (out / "results.json").write_text(json.dumps(results, indent=1))
  results["table"] = _table(mtag, d2v, out, files)
  print("\n" + results["table"])
  print(f"\ndone in {results['seconds']:.0f} s")
  return results


def define_flags() -> None:
  """The job's flags; defined when run as a program, not on import."""
  flags.DEFINE_string(
    "output_dir",
    None,
    "Folder for everything written (default: a fresh "
    "outputs/quickstart-<time> under the current directory).",
  )
  flags.DEFINE_string("data_dir", None, "Data directory (default: the cache).")
  flags.DEFINE_string(
    "vader_archive",
    None,
    "A vaderSentiment sdist to build from instead of the published one.",
  )
  flags.DEFINE_string(
    "fashion_mnist_path",
    None,
    "A folder of Fashion-MNIST IDX files instead of the Debian package.",
  )
  flags.DEFINE_bool("tiny", False, "Seconds-long sizes everywhere (for tests).")
  flags.DEFINE_integer("seed", 0, "Seed of the data slice, inits and order.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # The progress bars say how far along the job is; checkpoint chatter
  # at INFO would bury them.
  logging.set_verbosity(logging.WARNING)
  run(
    FLAGS.output_dir,
    data_dir=FLAGS.data_dir,
    vader_archive=FLAGS.vader_archive,
    fashion_mnist_path=FLAGS.fashion_mnist_path,
    tiny=FLAGS.tiny,
    seed=FLAGS.seed,
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
