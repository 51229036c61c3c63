"""A run's config in its workdir: written once, compared on every start.

``workdir/config.json`` holds the config a run was started with. A later
run in the same workdir must have the same config, apart from fields that
may change between a run and its resumption (when to stop, log and save;
the device layout), so that two experiments never mix their checkpoints.
A task whose configs gained or renamed fields passes an ``upgrade``
function that rewrites an older saved config as today's configs spell it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

CONFIG_FILENAME = "config.json"

_ABSENT = object()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Flattens nested JSON dicts to ``{"model.hidden": 64, ...}``."""
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return flat


def _ignored(path: str, ignore_fields: Sequence[str]) -> bool:
  # Ignoring a sub-config ignores everything below it.
  return any(path == f or path.startswith(f + ".") for f in ignore_fields)


def _first_difference(
  saved: Any, current: Any, ignore_fields: Sequence[str]
) -> tuple[str, Any, Any] | None:
  """Returns ``(path, saved_value, current_value)`` of the first mismatch."""
  saved, current = _flatten(saved), _flatten(current)
  for path in sorted(saved.keys() | current.keys()):
    if _ignored(path, ignore_fields):
      continue
    old, new = saved.get(path, _ABSENT), current.get(path, _ABSENT)
    if old != new:
      return path, old, new
  return None


def _show(value: Any) -> str:
  return "<absent>" if value is _ABSENT else json.dumps(value)


def check_or_write(
  workdir: epath.Path,
  config: ml_collections.ConfigDict,
  ignore_fields: Sequence[str] = (),
  upgrade: Callable[[dict], dict] | None = None,
) -> None:
  """Writes `config` to a new workdir, or checks it against the saved one.

  Args:
    workdir: the run's directory (created if missing, by process 0).
    config: the run's config.
    ignore_fields: dotted paths that may differ; a path covers its
      sub-fields.
    upgrade: maps the saved config (parsed JSON) to today's spelling
      before the comparison.

  Raises:
    ValueError: naming the first field (outside `ignore_fields`) whose
      saved value differs from `config`'s.
  """
  text = config.to_json_best_effort(sort_keys=True)
  path = epath.Path(workdir) / CONFIG_FILENAME
  if path.exists():
    saved = json.loads(path.read_text())
    if upgrade is not None:
      saved = upgrade(saved)
    # Compare parsed JSON on both sides, so tuples and lists, or key order,
    # do not count as differences.
    diff = _first_difference(saved, json.loads(text), ignore_fields)
    if diff is not None:
      field, old, new = diff
      raise ValueError(
        f"workdir {workdir} holds a run with config.{field}="
        f"{_show(old)}; this run has {_show(new)}: use a new workdir"
      )
  elif jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so other processes (and a crash) never see a
    # half-written file.
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)
