"""What the data builders' command lines share.

Every runnable builder (`spoken_reviews`, `speech_corpus`, `text_corpus`,
`sentiment_sets`) has a ``define_flags()`` and a ``main(argv)`` and ends in

  if __name__ == "__main__":
    define_flags()
    app.run(main)

Its flags are defined when it runs as a program, never on import: several
builders own flags of the same name (``--data_dir``, ``--seed``,
``--limit``, ...), absl refuses a second definition in one process, and
builders import each other (`speech_corpus` uses `spoken_reviews`).
"""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags


def run(
  argv: Sequence[str], build: Callable[..., Any], *args: Any, **kwargs: Any
) -> tuple[pathlib.Path, float]:
  """The body of a builder's `main`: `build(*args, **kwargs)`, timed.

  Args:
    argv: what `app.run` passes; only the program name is accepted (all
      settings are flags).
    build: the builder, returning the built (or cached) folder.
    *args: its positional arguments.
    **kwargs: its keyword arguments.

  Returns:
    ``(folder, seconds)``; the seconds are about 0 when it was cached.

  Raises:
    app.UsageError: for arguments that are not flags.
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  path = pathlib.Path(build(*args, **kwargs))
  return path, time.perf_counter() - start


def define_spoken_flags(module_name: str, workers_help: str) -> None:
  """The flags of the sets spoken by espeak (`spoken_reviews`,
  `speech_corpus`): data directory, seed, size, split and workers.

  Args:
    module_name: the caller's ``__name__``, so that ``--help`` lists the
      flags as the program's own.
    workers_help: what ``--workers`` counts in that program.
  """
  # absl files the main module's flags under its path.
  if module_name == "__main__":
    module_name = sys.argv[0]
  own = dict(module_name=module_name)
  flags.DEFINE_string(
    "data_dir", None, "Data directory (default: cache).", **own
  )
  flags.DEFINE_integer("seed", 0, "Seed of order, speakers and splits.", **own)
  flags.DEFINE_integer("limit", None, "Build only this many sentences.", **own)
  flags.DEFINE_bool(
    "speaker_disjoint", False, "Hold out whole speakers.", **own
  )
  flags.DEFINE_integer("workers", 2, workers_help, **own)


def spoken_options(values: Any) -> dict[str, Any]:
  """The builder keywords of `define_spoken_flags`'s flags in `values`."""
  return {
    "seed": values.seed,
    "limit": values.limit,
    "speaker_disjoint": values.speaker_disjoint,
    "workers": values.workers,
  }


def folder_summary(path: pathlib.Path, seconds: float) -> str:
  """``"<path>: <size> MB, <seconds> s (0 s if it was cached)"``."""
  size = sum(p.stat().st_size for p in path.iterdir())
  return f"{path}: {size / 1e6:.1f} MB, {seconds:.1f} s (0 s if it was cached)"
