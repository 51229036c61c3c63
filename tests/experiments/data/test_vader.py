"""Tests of the VADER ratings reader on small archives in the real layout."""

import io
import tarfile

import pytest

from experiments.data import vader

# (id, mean rating, text): a handful of made-up snippets, one non-ASCII.
MOVIE = [
  ("1", "2.26666666667", "A warm, funny and wholly surprising film."),
  ("2", "-3.1", "Two hours of my life I will never get back."),
  ("3", "0.0", "The film is ninety minutes long."),
  ("4", "1.5", "The café scenes alone are worth the ticket!"),
  ("5", "-1.25", "It isn't bad, but it doesn't sing either..."),
  ("6", "3.8", "A masterpiece: tender, sharp and beautifully acted."),
  ("7", "-0.5", "Mildly diverting, quickly forgotten."),
  ("8", "0.9", "Its heart is in the right place."),
]
OTHERS = {
  "tweets": [("1", "2.5", "What a great day!")],
  "nyt": [("1_1", "-0.2", "The council met on Tuesday.")],
  "amazon": [("1_1", "1.0", "works as described")],
}


def ground_truth(rows) -> bytes:
  """A `*_GroundTruth.txt` body: tab-separated, CRLF, no final newline."""
  return "\r\n".join("\t".join(r) for r in rows).encode("utf-8")


def _tar_gz(members: dict[str, bytes]) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def make_ratings_archive(movie=MOVIE, raw: dict | None = None) -> bytes:
  """The bytes of `hutto_ICWSM_2014.tar.gz` with the four domains."""
  files = {"movie": ground_truth(movie)}
  files.update({d: ground_truth(rows) for d, rows in OTHERS.items()})
  files.update(raw or {})
  return _tar_gz({vader.ground_truth_name(d): b for d, b in files.items()})


def make_sdist(path, movie=MOVIE, raw: dict | None = None):
  """Writes a vaderSentiment-3.3.2 sdist in the published layout."""
  path.write_bytes(
    _tar_gz(
      {
        "vaderSentiment-3.3.2/LICENSE.txt": b"MIT",
        vader.INNER_ARCHIVE: make_ratings_archive(movie, raw),
      }
    )
  )
  return path


def test_reads_every_domain_from_the_sdist(tmp_path):
  sdist = make_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz")
  movie = vader.read_ratings(sdist, "movie")
  assert [r.id for r in movie] == [m[0] for m in MOVIE]
  assert movie[3].text == "The café scenes alone are worth the ticket!"
  assert "\r" not in "".join(r.text for r in movie)
  for rec, (_, rating, _) in zip(movie, MOVIE, strict=True):
    assert rec.rating == float(rating)
    assert rec.label == pytest.approx(0.75 * float(rating))
    assert -3.0 <= rec.label <= 3.0
  for domain, rows in OTHERS.items():
    got = vader.read_ratings(sdist, domain)
    assert [(r.id, r.text) for r in got] == [(i, t) for i, _, t in rows]


def test_reads_the_inner_archive_directly(tmp_path):
  inner = tmp_path / "hutto_ICWSM_2014.tar.gz"
  inner.write_bytes(make_ratings_archive())
  assert vader.read_ratings(inner)[1].rating == -3.1


def test_unknown_domain_and_missing_archive(tmp_path):
  with pytest.raises(ValueError, match="unknown VADER domain 'imdb'"):
    vader.read_ratings(tmp_path / "x.tar.gz", "imdb")
  with pytest.raises(FileNotFoundError, match="pip_archive"):
    vader.read_ratings(tmp_path / "absent.tar.gz")


def test_truncated_archive_is_refused(tmp_path):
  data = make_sdist(tmp_path / "full.tar.gz").read_bytes()
  cut = tmp_path / "cut.tar.gz"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"cut\.tar\.gz.*truncated"):
    vader.read_ratings(cut)


def test_archive_without_the_ratings_is_refused(tmp_path):
  other = tmp_path / "other.tar.gz"
  other.write_bytes(_tar_gz({"pkg/README": b"hi"}))
  with pytest.raises(ValueError, match="movieReviewSnippets_GroundTruth"):
    vader.read_ratings(other)


@pytest.mark.parametrize(
  ("line", "message"),
  [
    (b"9\t1.0", "3 tab-separated fields"),
    (b"9\tgood\tText.", "'good' is not a number"),
    (b"9\t4.5\tText.", "outside"),
    (b"9\tnan\tText.", "outside"),
    (b"9\t1.0\t   ", "empty id or text"),
    (b"2\t1.0\tAgain.", "id '2' already used on line 2"),
  ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
  body = ground_truth(MOVIE[:3]) + b"\r\n" + line + b"\r\n"
  sdist = make_sdist(tmp_path / "s.tar.gz", raw={"movie": body})
  with pytest.raises(ValueError, match=message) as err:
    vader.read_ratings(sdist)
  assert "movieReviewSnippets_GroundTruth.txt line 4" in str(err.value)


def test_non_utf8_and_empty_files(tmp_path):
  bad = make_sdist(tmp_path / "a.tar.gz", raw={"movie": b"1\t1.0\tcaf\xe9"})
  with pytest.raises(ValueError, match="not UTF-8"):
    vader.read_ratings(bad)
  empty = make_sdist(tmp_path / "b.tar.gz", raw={"movie": b"\r\n"})
  with pytest.raises(ValueError, match="no rated sentences"):
    vader.read_ratings(empty)


def test_load_ratings_checks_the_published_size(tmp_path, monkeypatch):
  sdist = make_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz")
  fetched = []

  def fake_pip_archive(req, root, *, source):
    fetched.append((req, root, source))
    return sdist

  monkeypatch.setattr(vader.fetch, "pip_archive", fake_pip_archive)
  with pytest.raises(ValueError, match="holds 8 sentences, expected 10605"):
    vader.load_ratings("movie", tmp_path)
  assert fetched == [("vaderSentiment==3.3.2", tmp_path, True)]
  monkeypatch.setitem(vader.SIZES, "movie", len(MOVIE))
  assert len(vader.load_ratings("movie", tmp_path)) == len(MOVIE)
