"""Tests of espeak synthesis, the SpokenReviews builder and its reader.

Builds use the real espeak-ng wheel on the eight generated sentences of
`test_vader.MOVIE`, packed in the layout of the vaderSentiment sdist.
"""

import json
import shutil

import numpy as np
import pytest

from experiments.data import espeak, vader
from experiments.data import spoken_features as sf
from experiments.data import spoken_reviews as sr
from mtagjax import datasets
from tests.experiments.data.test_vader import MOVIE, make_sdist

KEYS = ("text_ids", "tokens", "audio", "vision", "words")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
  return make_sdist(tmp_path_factory.mktemp("src") / "vader.tar.gz")


@pytest.fixture(scope="module")
def built(sdist, tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return sr.build(root, seed=3, workers=1, archive=sdist, progress=False)


def _arrays(path):
  out = {}
  for split in sr.SPLITS:
    with np.load(path / f"{split}.npz") as z:
      out.update({f"{split}/{k}": z[k] for k in z.files})
  return out


def test_synthesize_returns_audio_and_timed_events():
  wave, rate, events = espeak.synthesize("Too tepid.", "en-gb+f2", 170, 50)
  assert wave.dtype == np.int16 and rate == 22050
  assert 0.3 < len(wave) / rate < 3.0 and np.any(wave)
  words = [e for e in events if e.kind == "word"]
  assert [(w.text_position, w.length) for w in words] == [(1, 3), (5, 5)]
  ms = [e.ms for e in events]
  assert ms == sorted(ms) and ms[-1] <= 1000 * len(wave) / rate
  assert any(e.kind == "phoneme" and "E" in e.phoneme for e in events)


def test_synthesis_does_not_depend_on_earlier_utterances():
  first = espeak.synthesize("A quiet film.", "en-029+m3", 150, 40)[0]
  espeak.synthesize("Something else entirely!", "en-us+f4", 200, 70)
  again = espeak.synthesize("A quiet film.", "en-029+m3", 150, 40)[0]
  np.testing.assert_array_equal(first, again)
  slower = espeak.synthesize("A quiet film.", "en-029+m3", 120, 40)[0]
  assert len(slower) > len(first)


def test_synthesize_refuses_bad_input():
  with pytest.raises(ValueError, match="no audio for '...'"):
    espeak.synthesize("...")
  with pytest.raises(ValueError, match="no voice 'xx-yy'"):
    espeak.synthesize("hello", "xx-yy")
  with pytest.raises(ValueError, match="variant 'q9'"):
    espeak.synthesize("hello", "en-us+q9")
  with pytest.raises(ValueError, match="rate 20"):
    espeak.synthesize("hello", rate=20)


def test_features_run_at_their_frame_rates():
  rng = np.random.default_rng(0)
  wave = rng.integers(-3000, 3000, 33075).astype(np.int16)  # 1.5 s
  audio = sf.log_mel(wave, 22050)
  assert audio.shape == (150, sf.N_MELS) and np.all(np.isfinite(audio))
  look = {"gain": [1.0] * 6, "offset": [0.0] * 6}
  events = [
    espeak.Event("phoneme", ms, -1, 0, name)
    for ms, name in ((0, "m"), (500, "'a"), (1000, "_"))
  ]
  track = sf.articulation(events, 1500.0, look, rng)
  assert track.shape == (45, len(sf.CHANNELS))
  jaw, closure = (sf.CHANNELS.index(c) for c in ("jaw_open", "lip_closure"))
  # Lips shut for /m/, jaw open for /a/ (frames in the middle of each).
  assert track[7, closure] > 0.8 and track[7, jaw] < 0.3
  assert track[22, jaw] > 0.7 and track[22, closure] < 0.2


def test_built_set_matches_its_sources(built):
  data = datasets.load_spoken_reviews(built)
  by_id = {i: (float(r), t) for i, r, t in MOVIE}
  seen = []
  for split in sr.SPLITS:
    d = data[split]
    n = len(d["ids"])
    assert all(len(d[k]) == n for k in KEYS)
    for i, sid in enumerate(d["ids"]):
      rating, text = by_id[sid]
      assert d["labels"][i] == np.float32(rating * 0.75)
      assert d["tokens"][i] == sr.tokenize(text)
      audio, vision = d["audio"][i], d["vision"][i]
      assert audio.dtype == vision.dtype == np.float32
      assert audio.shape[1] == 40 and vision.shape[1] == len(sf.CHANNELS)
      # Same utterance, two clocks: 100 Hz and 30 fps.
      assert abs(audio.shape[0] / 100 - vision.shape[0] / 30) < 0.04
      assert d["words"][i][-1, 0] < 10 * audio.shape[0]
      lo, hi = sr.RATE_RANGE
      assert lo <= d["rates"][i] <= hi
    seen += d["ids"]
  assert sorted(seen) == sorted(by_id)
  assert [len(data[s]["ids"]) for s in sr.SPLITS] == [5, 1, 2]
  assert data["vocab"][:2] == ["<pad>", "<unk>"]
  train_words = {t for toks in data["train"]["tokens"] for t in toks}
  assert set(data["vocab"][2:]) == train_words
  for split in sr.SPLITS:
    d = data[split]
    for ids, toks in zip(d["text_ids"], d["tokens"], strict=True):
      expect = [data["vocab"].index(t) if t in train_words else 1 for t in toks]
      assert ids.tolist() == expect


def test_build_is_deterministic_for_any_worker_count(built, sdist, tmp_path):
  again = sr.build(tmp_path, seed=3, workers=2, archive=sdist, progress=False)
  assert again.name == built.name
  a, b = _arrays(built), _arrays(again)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  other = sr.build(tmp_path, seed=4, workers=1, archive=sdist, progress=False)
  assert other.name != built.name
  c = _arrays(other)
  assert not np.array_equal(a["train/audio"], c["train/audio"])


def test_prosody_and_speaker_ignore_the_label():
  recs = [vader.Record(str(i), "Fine.", 1.0, 0.75) for i in range(50)]
  flipped = [r._replace(rating=-4.0, label=-3.0) for r in recs]
  assert sr.plan(recs, 0) == sr.plan(flipped, 0)
  assert len({p["speaker"] for p in sr.plan(recs, 0)}) > 20


def test_random_split_sizes():
  plans = sr.plan([vader.Record(str(i), "x", 0, 0) for i in range(1000)], 1)
  idx = sr.split_indices(plans, 1, speaker_disjoint=False)
  assert [len(idx[s]) for s in sr.SPLITS] == [700, 100, 200]
  assert sorted(np.concatenate(list(idx.values()))) == list(range(1000))


def test_speaker_disjoint_split(sdist, tmp_path):
  plans = sr.plan([vader.Record(str(i), "x", 0, 0) for i in range(2000)], 1)
  idx = sr.split_indices(plans, 1, speaker_disjoint=True)
  spk = {s: {plans[i]["speaker"] for i in idx[s]} for s in sr.SPLITS}
  assert not spk["train"] & (spk["valid"] | spk["test"])
  assert not spk["valid"] & spk["test"]
  assert 0.18 < len(idx["test"]) / 2000 < 0.25
  path = sr.build(
    tmp_path, seed=3, speaker_disjoint=True, workers=1, archive=sdist,
    progress=False,
  )  # fmt: skip
  data = datasets.load_spoken_reviews(path)
  train = set(data["train"]["speakers"].tolist())
  held = set(data["test"]["speakers"]) | set(data["valid"]["speakers"])
  assert train and held and not train & held
  assert json.loads((path / "meta.json").read_text())["split"] == "speaker"


def test_failed_build_leaves_no_cache(tmp_path):
  bad = make_sdist(
    tmp_path / "bad.tar.gz", movie=[*MOVIE, ("9", "0.5", "... ...")]
  )
  with pytest.raises(ValueError, match=r"no audio for '\.\.\. \.\.\.'"):
    sr.build(tmp_path / "d", seed=3, workers=1, archive=bad, progress=False)
  assert list((tmp_path / "d" / "spoken_reviews").iterdir()) == []


def test_cached_build_is_reused(built, sdist, monkeypatch):
  def boom(*args):
    raise AssertionError("rebuilt a cached set")

  monkeypatch.setattr(sr, "featurize", boom)
  root = built.parent.parent
  path = sr.build(root, seed=3, workers=1, archive=sdist, progress=False)
  assert path == built


def test_build_refuses_bad_sources_and_options(tmp_path, sdist):
  with pytest.raises(FileNotFoundError, match="absent.tar.gz"):
    sr.build(tmp_path, archive=tmp_path / "absent.tar.gz", progress=False)
  cut = tmp_path / "cut.tar.gz"
  cut.write_bytes(sdist.read_bytes()[:300])
  with pytest.raises(ValueError, match="truncated"):
    sr.build(tmp_path, archive=cut, progress=False)
  with pytest.raises(ValueError, match="limit=2"):
    sr.build(tmp_path, limit=2, archive=sdist, progress=False)
  with pytest.raises(ValueError, match="limit=9 exceeds the 8 sentences"):
    sr.build(tmp_path, limit=9, archive=sdist, progress=False)


def test_limit_takes_a_seeded_slice(tmp_path, sdist):
  path = sr.build(tmp_path, seed=3, limit=4, workers=1, archive=sdist)
  assert "-n4-" in path.name
  data = datasets.load_spoken_reviews(path)
  ids = [i for s in sr.SPLITS for i in data[s]["ids"]]
  assert len(ids) == 4 and len(set(ids)) == 4


def _rewrite(path, split, **changes):
  file = path / f"{split}.npz"
  with np.load(file) as z:
    arrays = {k: z[k] for k in z.files}
  arrays.update(changes)
  for key in [k for k, v in changes.items() if v is None]:
    del arrays[key]
  np.savez(file, **arrays)


def test_reader_names_file_and_problem(built, tmp_path):
  def copy(name):
    dst = tmp_path / name
    shutil.copytree(built, dst)
    return dst

  with pytest.raises(FileNotFoundError, match="folder not found"):
    datasets.load_spoken_reviews(tmp_path / "nothing")
  p = copy("no_valid")
  (p / "valid.npz").unlink()
  with pytest.raises(FileNotFoundError, match="valid.npz"):
    datasets.load_spoken_reviews(p)
  p = copy("width")
  with np.load(p / "train.npz") as z:
    audio = z["audio"]
  _rewrite(p, "train", audio=audio[:, :39])
  with pytest.raises(ValueError, match=r"train\.npz: 'audio' should be"):
    datasets.load_spoken_reviews(p)
  p = copy("offsets")
  _rewrite(p, "test", vision_offsets=np.array([0, 5, 3], np.int64))
  with pytest.raises(ValueError, match=r"test\.npz: 'vision_offsets'"):
    datasets.load_spoken_reviews(p)
  p = copy("missing")
  _rewrite(p, "valid", labels=None)
  with pytest.raises(
    ValueError, match=r"valid\.npz: missing arrays \['labels'"
  ):
    datasets.load_spoken_reviews(p)
  p = copy("ids")
  with np.load(p / "valid.npz") as z:
    text_ids = z["text_ids"].copy()
  text_ids[-1] = 10**6
  _rewrite(p, "valid", text_ids=text_ids)
  with pytest.raises(ValueError, match="'text_ids' should lie in"):
    datasets.load_spoken_reviews(p)
  p = copy("vocab")
  (p / "vocab.json").write_text('{"a": 1}')
  with pytest.raises(ValueError, match="vocab.json: expected a list"):
    datasets.load_spoken_reviews(p)
  p = copy("cut")
  data = (p / "train.npz").read_bytes()
  (p / "train.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"train\.npz: cannot read the npz"):
    datasets.load_spoken_reviews(p)
