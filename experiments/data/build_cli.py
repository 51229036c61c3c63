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
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app


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


def folder_summary(path: pathlib.Path, seconds: float) -> str:
  """``"<path>: <size> MB, <seconds> s (0 s if it was cached)"``."""
  size = sum(p.stat().st_size for p in path.iterdir())
  return f"{path}: {size / 1e6:.1f} MB, {seconds:.1f} s (0 s if it was cached)"
