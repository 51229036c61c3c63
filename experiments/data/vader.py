"""The VADER human-rated sentences (Hutto & Gilbert, ICWSM 2014).

About 23.7k English snippets from four domains, each rated by 10-29 people
on a -4..4 sentiment scale. The files ship only in the *source*
distribution of `vaderSentiment==3.3.2` on PyPI (MIT licence), as the nested
archive `vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz`
whose `hutto_ICWSM_2014/<domain>_GroundTruth.txt` files hold one snippet per
line: id, mean rating and text, tab-separated, UTF-8 with CRLF endings.

  records = vader.load_ratings("movie")   # fetched once, then cached
  records[0].text, records[0].rating, records[0].label

`label` is the mean rating times 0.75, i.e. on the [-3, 3] scale of
CMU-MOSI, so the MOSI metrics (Acc7, Acc2, MAE, Corr) apply unchanged.

References:
  C. J. Hutto and E. Gilbert. VADER: A Parsimonious Rule-based Model for
  Sentiment Analysis of Social Media Text. ICWSM 2014.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import tarfile
import zlib
from typing import NamedTuple

from experiments.data import fetch

REQUIREMENT = "vaderSentiment==3.3.2"
# The ratings archive inside the source distribution.
INNER_ARCHIVE = (
  "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
)
INNER_FOLDER = "hutto_ICWSM_2014"
# Domain name -> file stem inside the ratings archive.
DOMAINS = {
  "movie": "movieReviewSnippets",
  "tweets": "tweets",
  "nyt": "nytEditorialSnippets",
  "amazon": "amazonReviewSnippets",
}
# Sentences per domain in vaderSentiment 3.3.2 (measured).
SIZES = {"movie": 10605, "tweets": 4200, "nyt": 5190, "amazon": 3708}
RATING_RANGE = (-4.0, 4.0)
# Maps the -4..4 ratings onto the [-3, 3] scale of CMU-MOSI.
LABEL_SCALE = 0.75


class Record(NamedTuple):
  """One rated snippet.

  Attributes:
    id: the snippet id as written in the file ("17" or "12_3").
    text: the snippet, surrounding whitespace stripped.
    rating: the mean human rating in [-4, 4].
    label: `rating * 0.75`, in [-3, 3].
  """

  id: str
  text: str
  rating: float
  label: float


def ground_truth_name(domain: str) -> str:
  """The member name of `domain`'s ratings file in the ratings archive."""
  if domain not in DOMAINS:
    raise ValueError(
      f"unknown VADER domain {domain!r}; use one of {sorted(DOMAINS)}"
    )
  return f"{INNER_FOLDER}/{DOMAINS[domain]}_GroundTruth.txt"


def parse_ground_truth(data: bytes, name: str) -> list[Record]:
  """Parses the bytes of one `*_GroundTruth.txt` file.

  Args:
    data: the file's content.
    name: the file's name, used in error messages.

  Returns:
    The records in file order.

  Raises:
    ValueError: the file is not UTF-8, is empty, or a line lacks the three
      tab-separated fields, has a rating that is not a number in [-4, 4],
      an empty id or text, or repeats an id; the message names the file
      and the line.
  """
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{name}: not UTF-8 text ({e})") from e
  records = []
  seen: dict[str, int] = {}
  lo, hi = RATING_RANGE
  # splitlines() would also split on the rare form feeds and other breaks
  # some snippets might hold; the format's separator is CRLF (LF accepted).
  for num, line in enumerate(text.split("\n"), start=1):
    line = line.rstrip("\r")
    if not line.strip():
      continue
    where = f"{name} line {num}"
    fields = line.split("\t")
    if len(fields) != 3:
      raise ValueError(
        f"{where}: expected 3 tab-separated fields (id, mean rating, "
        f"text), found {len(fields)}: {line[:80]!r}"
      )
    sid, value, snippet = fields[0].strip(), fields[1].strip(), fields[2]
    try:
      rating = float(value)
    except ValueError:
      raise ValueError(
        f"{where}: the rating {value!r} is not a number"
      ) from None
    if not math.isfinite(rating) or not lo <= rating <= hi:
      raise ValueError(
        f"{where}: the rating {rating} is outside [{lo:g}, {hi:g}]"
      )
    snippet = snippet.strip()
    if not sid or not snippet:
      raise ValueError(f"{where}: empty id or text: {line[:80]!r}")
    if sid in seen:
      raise ValueError(f"{where}: id {sid!r} already used on line {seen[sid]}")
    seen[sid] = num
    records.append(Record(sid, snippet, rating, rating * LABEL_SCALE))
  if not records:
    raise ValueError(f"{name}: no rated sentences in the file")
  return records


def _member_bytes(tar: tarfile.TarFile, member: str, where: str) -> bytes:
  try:
    f = tar.extractfile(member)
  except KeyError:
    raise ValueError(
      f"{where}: no member {member!r}; is this the vaderSentiment 3.3.2 "
      "source distribution?"
    ) from None
  if f is None:
    raise ValueError(f"{where}: {member!r} is not a regular file")
  with f:
    return f.read()


def read_ratings(
  archive: str | os.PathLike, domain: str = "movie"
) -> list[Record]:
  """Reads one domain's rated sentences from an archive file.

  Args:
    archive: the `vaderSentiment-3.3.2.tar.gz` source distribution, or
      the `hutto_ICWSM_2014.tar.gz` ratings archive taken out of it.
    domain: "movie", "tweets", "nyt" or "amazon".

  Returns:
    The records of `domain`'s `*_GroundTruth.txt`, in file order.

  Raises:
    FileNotFoundError: `archive` does not exist.
    ValueError: the archive is truncated or not a tar.gz, lacks a member
      of the layout above, or a line is malformed (see
      `parse_ground_truth`).
  """
  member = ground_truth_name(domain)
  path = pathlib.Path(archive)
  if not path.is_file():
    raise FileNotFoundError(
      f"VADER archive not found: {os.fspath(path)!r}; fetch it with "
      f"`fetch.pip_archive({REQUIREMENT!r}, source=True)`"
    )
  where = os.fspath(path)
  try:
    with tarfile.open(path, "r:gz") as outer:
      names = set(outer.getnames())
      if INNER_ARCHIVE in names:
        inner = _member_bytes(outer, INNER_ARCHIVE, where)
        where = f"{where}:{INNER_ARCHIVE}"
        with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as tar:
          data = _member_bytes(tar, member, where)
      else:
        data = _member_bytes(outer, member, where)
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    # A truncated gzip stream ends in EOFError; a damaged one in zlib or
    # tar errors. Either way the download should be repeated.
    raise ValueError(
      f"{where}: cannot read the archive (truncated or not a tar.gz?): "
      f"{type(e).__name__}: {e}; delete it and fetch again"
    ) from e
  return parse_ground_truth(data, f"{where}:{member}")


def load_ratings(
  domain: str = "movie", root: str | os.PathLike | None = None
) -> list[Record]:
  """Fetches the vaderSentiment sdist (once) and reads `domain`'s ratings.

  Args:
    domain: "movie" (10,605 movie-review snippets), "tweets" (4,200),
      "nyt" (5,190 editorial snippets) or "amazon" (3,708 review snippets).
    root: the data directory (see `fetch.data_dir`).

  Returns:
    The records in file order, `label = rating * 0.75`.

  Raises:
    ValueError: as `read_ratings`, or the file holds a number of sentences
      other than the published one (a different or damaged archive).
  """
  ground_truth_name(domain)  # validates the name before any download
  archive = fetch.pip_archive(REQUIREMENT, root, source=True)
  records = read_ratings(archive, domain)
  if len(records) != SIZES[domain]:
    raise ValueError(
      f"{archive}: {domain!r} holds {len(records)} sentences, expected "
      f"{SIZES[domain]}; delete the archive and fetch again"
    )
  return records
