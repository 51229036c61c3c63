r"""data2vec speech: CTC from 10 minutes and 1 hour of labels, vs scratch.

  python -m experiments.tables.d2v_speech [--only=REGEX] [--seeds=3]

The grid (`experiments.tables.grid`; a killed grid resumes):

* ``pretrain-s0``: data2vec pretraining of the small encoder of
  ``d2v_audio.py:small`` on 2 s crops of the Tux Paint recordings (real
  speech in 12 languages) and of the train split of 6,000 spoken sentences
  (`experiments.data.speech_corpus`, split by speaker: pretraining hears
  none of the voices that valid and test hold);
* per label budget -- 10 minutes and 1 hour of that train split's
  utterances, a random draw per seed -- and per seed:
  ``finetune-scratch`` / ``finetune-d2v``: ``d2v_finetune.py:
  speech_small`` (letter CTC) from a random encoder / from the pretrained
  one, the same recipe and updates.

Every number is on the model picked by validation WER (greedy decoding):
CER and WER on the test split's unheard speakers, and CER on the 65
English Tux Paint recordings, a check of transfer from espeak's voices to
real ones (expected to be poor: the labels are all synthetic). The table,
its plot and the pretraining curves go to ``results/d2v_speech/``, the
table into ``results/README.md``; cell workdirs under
``outputs/tables/d2v_speech/``.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import ml_collections
from absl import app, flags

from experiments.configs import common, d2v_audio, d2v_finetune
from experiments.runtime import cli, writers
from experiments.tables import grid, shared

FLAGS = flags.FLAGS

# (column, minutes of labelled speech, fine-tuning updates, updates
# between validations).
BUDGETS = (("10 min", 10.0, 600, 100), ("1 h", 60.0, 600, 100))
# The same columns on a few clips (0 = the whole train split), for the tests.
TINY_BUDGETS = (("10 min", 0.05, 2, 2), ("1 h", 0.0, 2, 2))
ROWS = {
  "finetune-scratch": "fine-tuned from scratch",
  "finetune-d2v": "fine-tuned from data2vec",
}
PRETRAIN = "pretrain-s0"
# (metric, column title) of each budget's columns.
COLUMNS = (("test/cer", "CER"), ("test/wer", "WER"))
TRANSFER = ("tuxpaint_en/cer", "Tux Paint English CER")


def _cell_prefix(column: str) -> str:
  return column.replace(" ", "")


def pretrain_config(
  *, tiny: bool, spoken: str, tuxpaint: str
) -> ml_collections.ConfigDict:
  """The pretraining recipe (``d2v_audio.py:small``, or a tiny one).

  Args:
    tiny: the tiny transformer of `experiments.configs.common` on a small
      CNN, for 4 steps of 1,600-sample crops.
    spoken: a built spoken-sentences folder; "" = the one the recipe
      names (6,000 sentences, split by speaker), found or built in the
      cache. Pretraining reads its train split.
    tuxpaint: a built Tux Paint folder; "" = the cache's.
  """
  c = d2v_audio.get_config("small")
  if tiny:
    c.model.update(common.encoder("audio", tiny=True))
    # 40 samples a frame: 800 frames for the 2 s of fine-tuning.
    c.model.conv_layers = ((16, 10, 5),) + ((16, 3, 2),) * 3
    c.model.top_k = 2
    c.mask.mask_length = 5
    c.data.num_samples = 1_600
    c.train.update(batch_size=8, steps=4, log_every=1, checkpoint_every=4)
    c.train.prefetch = 0
  if spoken or tuxpaint:
    if not (spoken and tuxpaint):
      raise ValueError("give both the spoken and the Tux Paint folders")
    c.data.path = f"{tuxpaint},{spoken}"
  return c


def finetune_config(
  *,
  init: str,
  minutes: float,
  steps: int,
  eval_every: int,
  seed: int,
  tiny: bool,
  spoken: str,
  tuxpaint: str,
) -> ml_collections.ConfigDict:
  """``d2v_finetune.py:speech_small`` for one budget and seed.

  The encoder architecture is the pretraining recipe's, also from scratch.
  """
  c = d2v_finetune.get_config("speech_small")
  c.init = init
  c.data.label_minutes, c.data.subset_seed = minutes, seed
  c.train.seed = seed
  c.train.steps = steps
  c.train.eval_every = c.train.checkpoint_every = eval_every
  c.data.tuxpaint_check = True
  arch = pretrain_config(tiny=tiny, spoken="", tuxpaint="").model
  c.model.encoder.update({k: arch[k] for k in c.model.encoder})
  if tiny:
    c.model.overrides.layerdrop = 0.0
    c.mask.mask_length, c.mask.mask_channel_length = 4, 4
    c.optim.freeze_finetune_updates = 1
    c.train.update(batch_size=8, log_every=1)
    c.data.num_samples, c.data.max_label_length = 36_000, 40
    c.data.num_valid = 8
  c.data.path, c.data.tuxpaint_path = spoken, tuxpaint
  return c


def _run_finetune(config, workdir: pathlib.Path) -> grid.Metrics:
  cli.run(config, str(workdir))
  records = writers.read_jsonl(workdir / "metrics.jsonl", dedupe=True)
  valid = [r for r in records if "eval/valid/wer" in r]
  best = min(valid, key=lambda r: r["eval/valid/wer"])
  # The final splits are scored once, on the checkpoint valid picked.
  final = [r for r in records if "eval/test/cer" in r][-1]
  out = {f"valid/{k}": best[f"eval/valid/{k}"] for k in ("cer", "wer")}
  for split in ("test", "tuxpaint_en"):
    for k in ("cer", "wer"):
      out[f"{split}/{k}"] = final[f"eval/{split}/{k}"]
  return out


def cells(
  *,
  seeds: int,
  results_dir: pathlib.Path,
  tiny: bool = False,
  spoken: str = "",
  tuxpaint: str = "",
) -> list[grid.Cell]:
  """The table's cells in running order: pretraining, then per budget.

  Args:
    seeds: seeds per row and budget.
    results_dir: the table's folder; the pretrained encoder is kept in
      ``<results_dir>/encoders/pretrain-s0/``, where fine-tuning reads it.
    tiny: tiny models and runs (the tests).
    spoken: a built spoken-sentences folder ("" = the recipe's, from the
      cache); pretraining reads its train split, fine-tuning all three.
    tuxpaint: a built Tux Paint folder ("" = the cache's).

  Returns:
    The cells; their specs do not depend on the folders.
  """
  pre = pretrain_config(tiny=tiny, spoken=spoken, tuxpaint=tuxpaint)
  cell, encoders_dir = shared.pretrain_cell(
    PRETRAIN, "pretraining", pre, results_dir
  )
  out = [cell]
  for column, minutes, steps, every in TINY_BUDGETS if tiny else BUDGETS:
    for seed in range(seeds):
      for kind, row in ROWS.items():
        init = (
          f"encoder:{encoders_dir / 'encoder'}"
          if kind.endswith("d2v")
          else "scratch"
        )
        c = finetune_config(
          init=init,
          minutes=minutes,
          steps=steps,
          eval_every=every,
          seed=seed,
          tiny=tiny,
          spoken=spoken,
          tuxpaint=tuxpaint,
        )
        c_spec = c.copy_and_resolve_references()
        c_spec.data.tuxpaint_path = ""
        name = f"{_cell_prefix(column)}-{kind}-s{seed}"
        run = functools.partial(_run_finetune, c)
        out.append(grid.Cell(name, row, column, seed, shared.spec(c_spec), run))
  return out


# -- the report -----------------------------------------------------------


def _table(records) -> str:
  """CER and WER per budget, then the transfer CER, mean ± std over seeds."""
  columns, shown = [], []
  metrics = [*COLUMNS, TRANSFER]
  for metric, title in metrics:
    for budget, *_ in BUDGETS:
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
    row_header="spoken sentences, unheard speakers (test)",
  )


def _plot(records, curves, out: pathlib.Path) -> list[str]:
  """CER against labelled minutes; pretraining curves. Returns the files."""
  shared.plot_vs_labels(
    records,
    rows=list(ROWS.values()),
    sizes={column: minutes for column, minutes, *_ in BUDGETS},
    metric="test/cer",
    xlabel="minutes of labelled speech",
    ylabel="test CER (greedy)",
    path=out / "cer_vs_labels.png",
  )
  files = ["cer_vs_labels.png"]
  if curves:
    shared.plot_pretraining(curves, out / "pretraining.png")
    files.append("pretraining.png")
  return files


def report(records, results_dir: pathlib.Path, root: pathlib.Path) -> str:
  """Renders the table (markdown), its plot and the pretraining curves."""
  text = _table(records)
  ratios = []
  for c, *_ in BUDGETS:
    d2v = grid.mean_of(records, ROWS["finetune-d2v"], c, "test/cer")
    scratch = grid.mean_of(records, ROWS["finetune-scratch"], c, "test/cer")
    if d2v[2] and scratch[2] and scratch[0] > 0:
      ratios.append(f"{c}: {d2v[0] / scratch[0]:.2f}")
  if ratios:
    text += "\nTest CER, data2vec over scratch: " + ", ".join(ratios) + ".\n"
  curves = shared.curves(root / PRETRAIN)
  if curves:
    grid.write_json(results_dir / "pretrain_curves.json", curves)
  text += shared.pretraining_summary(records, "d2v_speech", PRETRAIN)
  text += f"\nAll cells: {grid.total_hours(records):.2f} h of runs.\n"
  results_dir.mkdir(parents=True, exist_ok=True)
  for name in _plot(records, curves, results_dir):
    text += f"\n![{name}](d2v_speech/{name})\n"
  (results_dir / "table.md").write_text(text)
  return text


# -- the command ----------------------------------------------------------


def define_flags() -> None:
  """The table command's flags, those not yet defined (`shared`)."""
  shared.define_table_flags(
    "d2v_speech",
    (
      "string",
      "spoken_path",
      "",
      "A built spoken-sentences folder ('' = the recipe's, from the cache).",
    ),
    (
      "string",
      "tuxpaint_path",
      "",
      "A built Tux Paint folder ('' = find or build the cache's).",
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
  if not FLAGS.report_only:
    if FLAGS.tiny and not (FLAGS.spoken_path and FLAGS.tuxpaint_path):
      raise app.UsageError("--tiny needs --spoken_path and --tuxpaint_path")
    table = cells(
      seeds=FLAGS.seeds,
      results_dir=results,
      tiny=FLAGS.tiny,
      spoken=FLAGS.spoken_path,
      tuxpaint=FLAGS.tuxpaint_path,
    )
    grid.run_grid(table, results, root, only=FLAGS.only, rerun=FLAGS.rerun)
  text = report(grid.saved_records(results), results, root)
  grid.update_readme(FLAGS.readme, "d2v_speech", text)
  print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
