r"""data2vec text on the English corpus: pretrained vs scratch on ratings.

  python -m experiments.tables.d2v_text [--only=REGEX] [--seeds=3]

The grid (`experiments.tables.grid`; a killed grid resumes):

* ``pretrain-s0``: data2vec pretraining of the small RoBERTa-style encoder
  of ``d2v_text.py:small`` on the English corpus (12.1M BPE tokens,
  `experiments.data.text_corpus`);
* per label budget -- 848 (10 %) and all 8,483 training sentences of the
  VADER movie ratings (``vader_movie`` of
  `experiments.data.sentiment_sets`) -- and per seed:

  - ``tfidf-ridge``: ridge regression on TF-IDF token unigrams and
    bigrams (`experiments.reports.tfidf`), for scale;
  - ``probe-random`` / ``probe-d2v``: ridge regression on the frozen
    features (mean of the real tokens and ``<s>`` of the final layer) of
    the encoder at initialisation / after pretraining
    (`experiments.reports.probe.ridge_probe`);
  - ``finetune-scratch`` / ``finetune-d2v``: ``d2v_finetune.py:
    text_vader`` regressing the rating from a random encoder / from the
    pretrained one, the same recipe and updates.

A seed draws the labelled subset and the run's own randomness; TF-IDF and
the probes on all the labels have nothing left to draw and run once. Every
number is on the 1,060 test sentences, of the model picked on the 1,060
valid ones: Corr (Pearson correlation with the rating) and Acc2 (sign
agreement on the ratings other than 0). The table, its plot and the
pretraining curves go to ``results/d2v_text/``, the table into
``results/README.md``; cell workdirs (checkpoints, the pretrained encoder)
under ``outputs/tables/d2v_text/``.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags

from d2vjax.datasets import text as text_lib
from experiments.configs import common, d2v_finetune, d2v_text
from experiments.data import text_corpus
from experiments.reports import probe, tfidf
from experiments.runtime import cli, writers
from experiments.runtime import mesh as mesh_lib
from experiments.tables import grid, shared
from experiments.tasks import encoders, text_classification

FLAGS = flags.FLAGS

# The training sentences of vader_movie (its valid and test splits hold
# 1,060 each).
TRAIN_SENTENCES = 8_483
# (column, labelled sentences (0 = all), fine-tuning updates, updates
# between validations): about 23 and 7.5 epochs at batch 32.
BUDGETS = (("10%", 848, 600, 100), ("100%", 0, 2_000, 250))
# The same columns on a few dozen sentences, for the tests.
TINY_BUDGETS = (("10%", 12, 2, 2), ("100%", 0, 2, 2))
ROWS = {
  "tfidf-ridge": "TF-IDF + ridge",
  "probe-random": "ridge on frozen features, random encoder",
  "probe-d2v": "ridge on frozen features, data2vec",
  "finetune-scratch": "fine-tuned from scratch",
  "finetune-d2v": "fine-tuned from data2vec",
}
PRETRAIN = "pretrain-s0"
# RoBERTa's GLUE recipe warms up over 6 % of the updates.
WARMUP_FRACTION = 0.06


def pretrain_config(*, tiny: bool, corpus: str) -> ml_collections.ConfigDict:
  """The pretraining recipe (``d2v_text.py:small``, or a tiny one).

  Args:
    tiny: the tiny encoder of `experiments.configs.common` for 4 steps,
      with the vocabulary of `corpus`'s tokenizer.
    corpus: a `experiments.data.text_corpus` folder; "" = the one the
      config finds or builds in the cache (not with `tiny`).

  Returns:
    The config.
  """
  c = d2v_text.get_config("small")
  if tiny:
    meta = json.loads((pathlib.Path(corpus) / "meta.json").read_text())
    c.model.update(common.encoder("text", tiny=True))
    c.model.vocab_size, c.mask.mask_id = meta["vocab_size"], meta["ids"]["mask"]
    c.model.top_k = 2
    c.data.seq_len = 16
    c.train.update(batch_size=8, steps=4, log_every=1, checkpoint_every=4)
    c.optim.warmup_steps = 1
  c.data.path = corpus
  return c


def finetune_config(
  *,
  init: str,
  labels: int,
  steps: int,
  eval_every: int,
  seed: int,
  tiny: bool,
  corpus: str,
  sentiment_path: str,
) -> ml_collections.ConfigDict:
  """``d2v_finetune.py:text_vader`` for one budget and seed.

  From scratch, the encoder is the pretraining recipe's architecture.
  """
  c = d2v_finetune.get_config("text_vader")
  c.init = init
  c.data.labels, c.data.subset_seed, c.train.seed = labels, seed, seed
  c.train.steps = steps
  c.optim.warmup_steps = max(1, round(WARMUP_FRACTION * steps))
  c.train.eval_every = c.train.checkpoint_every = eval_every
  if tiny:
    arch = pretrain_config(tiny=True, corpus=corpus).model
    c.model.encoder.update({k: arch[k] for k in c.model.encoder})
    c.data.seq_len = 16
    c.train.update(batch_size=8, log_every=1)
  c.data.path, c.data.corpus = sentiment_path, corpus
  return c


def _spec(config: ml_collections.ConfigDict) -> dict:
  """A run's spec: its config without where data and workdirs live."""
  c = config.copy_and_resolve_references()
  if "corpus" in c.data:
    c.data.corpus = ""
  return shared.spec(c)


def _tfidf_spec(config: ml_collections.ConfigDict) -> dict:
  """A TF-IDF cell's spec: the sentences it sees and the ridge's grid."""
  d = config.data
  keys = ("sentiment_task", "seq_len", "labels", "subset_seed")
  return {
    "baseline": "tfidf-ridge",
    "orders": list(tfidf.ORDERS),
    "alphas": list(tfidf.ALPHAS),
    "num_labels": config.model.num_labels,
    "data": {k: d[k] for k in keys},
  }


def _finite(value) -> float:
  # metrics.jsonl keeps a NaN (a constant prediction's Pearson) as null.
  return math.nan if value is None else float(value)


def _run_finetune(config, workdir: pathlib.Path) -> grid.Metrics:
  cli.run(config, str(workdir))
  records = writers.read_jsonl(workdir / "metrics.jsonl", dedupe=True)
  valid = [
    _finite(r["eval/valid/pearson"])
    for r in records
    if "eval/valid/pearson" in r
  ]
  # The test split is scored once, on the checkpoint the valid split picked.
  test = [r for r in records if "eval/test/pearson" in r][-1]
  return {
    "test/pearson": _finite(test["eval/test/pearson"]),
    "test/acc2": _finite(test["eval/test/acc2"]),
    "valid/pearson": max((v for v in valid if v == v), default=math.nan),
  }


def _run_tfidf(
  config: ml_collections.ConfigDict, _: pathlib.Path
) -> grid.Metrics:
  """TF-IDF + ridge on the labelled sentences; the penalty picked on valid."""
  splits = text_classification.labelled_splits(config)
  alpha, preds = tfidf.tfidf_ridge(splits)
  out = {"alpha": alpha}
  for split in ("valid", "test"):
    scores = text_classification.regression_scores(
      preds[split], splits[split][1]
    )
    out |= {f"{split}/{k}": scores[k] for k in ("pearson", "acc2")}
  return out


def _probe_spec(kind: str, config: ml_collections.ConfigDict) -> dict:
  """A probe cell's spec: the sentences, the encoder and the ridge's grid."""
  d = config.data
  keys = ("sentiment_task", "seq_len", "labels", "subset_seed")
  spec = {
    "probe": kind,
    "features": "mean of the real tokens, <s>",
    "alphas": list(probe.RIDGE_GRID),
    "data": {k: d[k] for k in keys},
  }
  if kind == "probe-random":
    spec |= {
      "encoder": config.model.encoder.to_dict(),
      "seed": config.train.seed,
    }
  else:
    spec["init"] = shared.spec(config)["config"]["init"]
  return spec


def _run_probe(
  config: ml_collections.ConfigDict, _: pathlib.Path
) -> grid.Metrics:
  """Ridge on a frozen encoder's features; the penalty picked on valid."""
  splits = text_classification.labelled_splits(config)
  encoder, params = encoders.load(
    config, mesh_lib.make_mesh(config, jax.device_count())
  )
  if params is None:  # the random encoder: as fine-tuning initialises it
    ids = splits["train"][0][:1]
    params = encoder.init(
      jax.random.key(config.train.seed),
      ids,
      attention_mask=(ids != text_lib.PAD_ID).astype(np.int32),
    )["params"]
  features = {
    s: (
      probe.text_features(encoder, params, ids, pad_id=text_lib.PAD_ID),
      y,
    )
    for s, (ids, y) in splits.items()
  }
  alpha, preds = probe.ridge_probe(features)
  out = {"alpha": alpha}
  for split in ("valid", "test"):
    scores = text_classification.regression_scores(
      preds[split], splits[split][1]
    )
    out |= {f"{split}/{k}": scores[k] for k in ("pearson", "acc2")}
  return out


def cells(
  *,
  seeds: int,
  results_dir: pathlib.Path,
  tiny: bool = False,
  corpus: str = "",
  sentiment_path: str = "",
) -> list[grid.Cell]:
  """The table's cells in running order: pretraining, then per budget.

  Args:
    seeds: seeds per row and budget.
    results_dir: the table's folder; the pretrained encoder is kept in
      ``<results_dir>/encoders/pretrain-s0/`` (`d2vjax.encoder_io`), where
      the fine-tuning cells read it.
    tiny: tiny models and runs (the tests).
    corpus: the `experiments.data.text_corpus` folder; "" = the cache's.
      Fine-tuning needs one to find or build the sentiment set.
    sentiment_path: a built `experiments.data.sentiment_sets` folder; "" =
      the one of `corpus`.

  Returns:
    The cells; their specs do not depend on `corpus`, `sentiment_path` or
    `results_dir`.
  """
  pre = pretrain_config(tiny=tiny, corpus=corpus)
  cell, encoders_dir = shared.pretrain_cell(
    PRETRAIN, "pretraining", pre, results_dir
  )
  out = [cell]
  kw = {"tiny": tiny, "corpus": corpus, "sentiment_path": sentiment_path}
  for column, labels, steps, every in TINY_BUDGETS if tiny else BUDGETS:
    for seed in range(seeds):
      for kind, row in ROWS.items():
        tuned = kind.startswith("finetune")
        if not labels and seed and not tuned:
          continue  # TF-IDF and probes on all the labels: nothing to draw
        init = (
          f"encoder:{encoders_dir / 'encoder'}"
          if kind.endswith("d2v")
          else "scratch"
        )
        c = finetune_config(
          init=init,
          labels=labels,
          steps=steps,
          eval_every=every,
          seed=seed,
          **kw,
        )
        name = f"{column.rstrip('%')}pct-{kind}-s{seed}"
        if tuned:
          run, spec = functools.partial(_run_finetune, c), _spec(c)
        elif kind.startswith("probe"):
          run, spec = functools.partial(_run_probe, c), _probe_spec(kind, c)
        else:
          run, spec = functools.partial(_run_tfidf, c), _tfidf_spec(c)
        out.append(grid.Cell(name, row, column, seed, spec, run))
  return out


# -- the report -----------------------------------------------------------

# (metric, column title) of each budget's columns.
COLUMNS = (("test/pearson", "Corr"), ("test/acc2", "Acc2"))


def _table(records) -> str:
  """Corr and Acc2 beside each other per budget, mean ± std over seeds."""
  columns, shown = [], []
  for budget, *_ in BUDGETS:
    for metric, title in COLUMNS:
      column = f"{title} {budget}"
      columns.append(column)
      shown += [
        dict(r, column=column, metrics={"value": r["metrics"][metric]})
        for r in records
        if r["column"] == budget and metric in r["metrics"]
      ]
  return grid.render(
    shown,
    metric="value",
    rows=list(ROWS.values()),
    columns=columns,
    row_header="VADER movie ratings (test)",
  )


def _plot(records, curves, out: pathlib.Path) -> list[str]:
  """Corr against labels; pretraining curves. Returns the files."""
  shared.plot_vs_labels(
    records,
    rows=list(ROWS.values()),
    sizes={"10%": BUDGETS[0][1], "100%": TRAIN_SENTENCES},
    metric="test/pearson",
    xlabel="labelled training sentences",
    ylabel="test Corr (Pearson)",
    path=out / "corr_vs_labels.png",
  )
  files = ["corr_vs_labels.png"]
  if curves:
    shared.plot_pretraining(curves, out / "pretraining.png")
    files.append("pretraining.png")
  return files


def report(records, results_dir: pathlib.Path, root: pathlib.Path) -> str:
  """Renders the table (markdown), its plot and the pretraining curves."""
  text = _table(records)
  gains = []
  for c, *_ in BUDGETS:
    d2v = grid.mean_of(records, ROWS["finetune-d2v"], c, "test/pearson")
    scratch = grid.mean_of(records, ROWS["finetune-scratch"], c, "test/pearson")
    if d2v[2] and scratch[2]:
      gains.append(f"{c}: {d2v[0] - scratch[0]:+.3f}")
  if gains:
    text += (
      "\nFine-tuned, data2vec minus scratch (test Corr): "
      + ", ".join(gains)
      + ".\n"
    )
  curves = shared.curves(root / PRETRAIN)
  if curves:
    grid.write_json(results_dir / "pretrain_curves.json", curves)
  text += shared.pretraining_summary(records, "d2v_text", PRETRAIN)
  text += f"\nAll cells: {grid.total_hours(records):.2f} h of runs.\n"
  results_dir.mkdir(parents=True, exist_ok=True)
  for name in _plot(records, curves, results_dir):
    text += f"\n![{name}](d2v_text/{name})\n"
  (results_dir / "table.md").write_text(text)
  return text


# -- the command ----------------------------------------------------------


def define_flags() -> None:
  """The table command's flags, those not yet defined (`shared`)."""
  shared.define_table_flags(
    "d2v_text",
    (
      "string",
      "corpus_path",
      "",
      "A text_corpus folder ('' = find or build the cache's).",
    ),
    (
      "string",
      "sentiment_path",
      "",
      "A built sentiment_sets folder ('' = build it from the corpus).",
    ),
  )


def default_corpus(*, tiny: bool) -> str:
  """The English corpus of the pretraining recipe, found or built."""
  if tiny:
    raise ValueError("--tiny needs --corpus_path (a small built corpus)")
  vocab = pretrain_config(tiny=False, corpus="").model.vocab_size
  return str(text_corpus.build_corpus(vocab_size=vocab))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  grid.enable_compilation_cache(FLAGS.compilation_cache)
  results, root = (
    pathlib.Path(FLAGS.results_dir),
    pathlib.Path(FLAGS.workdir_root),
  )
  if not FLAGS.report_only:
    corpus = FLAGS.corpus_path or default_corpus(tiny=FLAGS.tiny)
    table = cells(
      seeds=FLAGS.seeds,
      results_dir=results,
      tiny=FLAGS.tiny,
      corpus=corpus,
      sentiment_path=FLAGS.sentiment_path,
    )
    grid.run_grid(table, results, root, only=FLAGS.only, rerun=FLAGS.rerun)
  text = report(grid.saved_records(results), results, root)
  grid.update_readme(FLAGS.readme, "d2v_text", text)
  print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
