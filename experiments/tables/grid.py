"""Result tables as code: a resumable grid of runs, one JSON per cell.

A table module (`experiments.tables.d2v_vision`, ...) lists its `Cell`s --
one run of one configuration with one seed -- and hands them to
`run_grid`, which

* skips a cell whose JSON is already in ``<results>/cells/`` with the same
  spec (a killed grid resumes where it stopped; a cell killed mid-run
  resumes from its own checkpoints in its workdir, through the run driver);
* refuses a cell whose saved spec differs from today's (the table would
  mix two recipes): delete its JSON, or pass ``rerun``;
* runs the others in order, printing progress, and writes each cell's
  metrics, spec, seconds and machine as soon as it finishes.

`render` turns the records into a markdown table of mean ± standard
deviation over seeds; `update_readme` puts it between a table's markers in
``results/README.md``. `enable_compilation_cache` keeps compiled programs
on disk, so that cells of the same shapes (seeds, label fractions) compile
once per grid rather than once per cell.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

Metrics = dict[str, float]


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of a table.

  Attributes:
    name: unique within the table; the JSON file and workdir are named by
      it (letters, digits, ``-``, ``_``, ``.``).
    row: the table row it belongs to.
    column: the table column group (e.g. a label fraction); "" for none.
    seed: the seed; a row's cells differ only in it.
    spec: JSON-able description of everything that makes the run (its
      config); a saved cell with another spec is not reused.
    run: ``workdir -> metrics``; the workdir is the cell's own, kept
      between attempts so that a run driver there resumes.
  """

  name: str
  row: str
  column: str
  seed: int
  spec: Mapping[str, Any]
  run: Callable[[pathlib.Path], Metrics]

  def __post_init__(self) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
      raise ValueError(
        f"cell name {self.name!r}: use letters, digits, '-', '_' and '.'"
      )


def _canonical(spec: Mapping[str, Any]) -> Any:
  """The spec as JSON reads it back (tuples become lists, keys strings)."""
  return json.loads(json.dumps(spec, sort_keys=True, default=str))


def machine() -> dict[str, Any]:
  """Where a cell ran: CPU model, cores and JAX devices."""
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "devices": [d.device_kind for d in jax.devices()],
    "jax": jax.__version__,
  }


def write_json(path: pathlib.Path, record: Mapping[str, Any]) -> None:
  """Writes atomically: a killed grid never leaves half a cell."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, path)


def load_cell(path: pathlib.Path) -> dict[str, Any]:
  """A saved cell record; a clear error for a file that is not one."""
  try:
    record = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(
      f"{path}: not a readable cell record ({e}); delete it to rerun the cell"
    ) from e
  missing = {"name", "row", "column", "seed", "metrics", "spec"} - set(record)
  if missing:
    raise ValueError(
      f"{path}: cell record lacks {sorted(missing)}; delete it to rerun "
      "the cell"
    )
  return record


def run_grid(
  cells: Sequence[Cell],
  results_dir: str | os.PathLike,
  workdir_root: str | os.PathLike,
  *,
  only: str = "",
  rerun: bool = False,
  log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
  """Runs the cells not yet done; returns every selected cell's record.

  Args:
    cells: the table's cells, in the order to run them (a cell that needs
      another's output comes after it).
    results_dir: the table's folder; records go to ``cells/<name>.json``.
    workdir_root: the cells' workdirs, ``<root>/<name>``.
    only: run and return just the cells whose name this regular
      expression finds something in ("" = all).
    rerun: run cells again even when their record is saved.
    log: where progress lines go.

  Returns:
    The records (saved or new) of the selected cells, in order.

  Raises:
    ValueError: for duplicate cell names, or a saved record whose spec is
      not the cell's.
  """
  names = [c.name for c in cells]
  if len(set(names)) != len(names):
    dup = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(f"duplicate cell names {dup}")
  chosen = [c for c in cells if re.search(only, c.name)]
  cell_dir = pathlib.Path(results_dir) / "cells"
  records = []
  for i, cell in enumerate(chosen, 1):
    path = cell_dir / f"{cell.name}.json"
    spec = _canonical(cell.spec)
    if path.exists() and not rerun:
      record = load_cell(path)
      if record["spec"] != spec:
        raise ValueError(
          f"{path} was run with another spec than cell {cell.name!r} has "
          "now; delete it (or pass --rerun) to run the cell again"
        )
      log(f"[{i}/{len(chosen)}] {cell.name}: done before, skipped")
      records.append(record)
      continue
    log(f"[{i}/{len(chosen)}] {cell.name}: running")
    start = time.time()
    metrics = cell.run(pathlib.Path(workdir_root) / cell.name)
    seconds = time.time() - start
    record = {
      "name": cell.name,
      "row": cell.row,
      "column": cell.column,
      "seed": cell.seed,
      "metrics": {k: float(v) for k, v in metrics.items()},
      "spec": spec,
      "seconds": round(seconds, 1),
      "finished": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"
      ),
      "machine": machine(),
    }
    write_json(path, record)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items())
    log(f"[{i}/{len(chosen)}] {cell.name}: {shown} ({seconds:.0f} s)")
    records.append(record)
  return records


def saved_records(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """Every cell record saved in a table's folder, by name."""
  cell_dir = pathlib.Path(results_dir) / "cells"
  return [load_cell(p) for p in sorted(cell_dir.glob("*.json"))]


def summarise(values: Iterable[float]) -> tuple[float, float, int]:
  """``(mean, sample standard deviation, n)``; the deviation is 0 for one."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return math.nan, math.nan, 0
  std = float(v.std(ddof=1)) if v.size > 1 else 0.0
  return float(v.mean()), std, int(v.size)


def _format(mean: float, std: float, n: int, digits: int) -> str:
  if n == 0:
    return "–"
  text = f"{mean:.{digits}f}"
  if n > 1:
    text += f" ± {std:.{digits}f}"
  return text


def relabel(
  records: Sequence[Mapping[str, Any]], cells: Sequence[Cell]
) -> list[dict[str, Any]]:
  """Records with the row and column labels that their cells have today.

  A cell's name and spec say what ran; its labels only present it, so a
  renamed row shows the records saved under its old label. Records of
  cells no longer defined keep theirs.
  """
  labels = {c.name: (c.row, c.column) for c in cells}
  out = []
  for r in records:
    row, column = labels.get(r["name"], (r["row"], r["column"]))
    out.append(dict(r, row=row, column=column))
  return out


def render(
  records: Sequence[Mapping[str, Any]],
  *,
  metric: str,
  rows: Sequence[str],
  columns: Sequence[str],
  digits: int = 3,
  row_header: str = "",
) -> str:
  """A markdown table of one metric: rows x columns, mean ± std over seeds.

  A cell shows how many seeds it averages when that is not the most common
  count, and "–" where nothing has run.

  Args:
    records: cell records (`run_grid`, `saved_records`).
    metric: the key in each record's ``metrics``.
    rows: row labels, in order.
    columns: column labels, in order ("" for a table with one column).
    digits: decimals shown.
    row_header: the first column's title.

  Returns:
    The table, ending in a newline.
  """
  groups: dict[tuple[str, str], list[float]] = {}
  for r in records:
    if metric in r["metrics"]:
      groups.setdefault((r["row"], r["column"]), []).append(
        r["metrics"][metric]
      )
  counts = [len(v) for v in groups.values()]
  usual = max(set(counts), key=lambda n: (counts.count(n), n), default=0)
  titles = [c or metric for c in columns]
  lines = [
    "| " + " | ".join([row_header, *titles]) + " |",
    "|" + "---|" * (len(columns) + 1),
  ]
  for row in rows:
    shown = []
    for column in columns:
      mean, std, n = summarise(groups.get((row, column), []))
      text = _format(mean, std, n, digits)
      if n and n != usual:
        text += f" (n={n})"
      shown.append(text)
    lines.append("| " + " | ".join([row, *shown]) + " |")
  return "\n".join(lines) + "\n"


def total_hours(records: Sequence[Mapping[str, Any]]) -> float:
  """Hours the records' runs took, added up.

  A cell that reports its run's own ``train_hours`` (one that resumed a
  run begun elsewhere) counts those, if longer than its own seconds.
  """
  return (
    sum(
      max(r.get("seconds", 0.0), 3600 * r["metrics"].get("train_hours", 0.0))
      for r in records
    )
    / 3600
  )


def update_readme(path: str | os.PathLike, key: str, text: str) -> None:
  """Replaces what lies between a table's markers in a README.

  The markers are ``<!-- begin:KEY -->`` and ``<!-- end:KEY -->`` on lines
  of their own; missing ones are appended (with `text`) at the end.
  """
  path = pathlib.Path(path)
  begin, end = f"<!-- begin:{key} -->", f"<!-- end:{key} -->"
  old = path.read_text() if path.exists() else ""
  block = f"{begin}\n{text.rstrip()}\n{end}"
  if begin in old and end in old:
    head, rest = old.split(begin, 1)
    new = head + block + rest.split(end, 1)[1]
  else:
    new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(new)


def enable_compilation_cache(path: str | os.PathLike) -> None:
  """Keeps XLA's compiled programs under `path`, shared by later cells."""
  if not path:
    return
  pathlib.Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  # Cache every program that took a while to compile, whatever its size.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def spec_of(config: Any, **extra: Any) -> dict[str, Any]:
  """A cell spec from an ml_collections config and extra fields."""
  base = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return _canonical({"config": base, **extra})


def mean_of(
  records: Sequence[Mapping[str, Any]], row: str, column: str, metric: str
) -> tuple[float, float, int]:
  """`summarise` of one metric of one (row, column) group."""
  return summarise(
    r["metrics"].get(metric)
    for r in records
    if r["row"] == row and r["column"] == column
  )
