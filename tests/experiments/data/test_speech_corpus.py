"""Tests of the speech set builders and the `speech` pretraining source.

Spoken sentences come from a generated VADER sdist of short sentences
(real espeak-ng); Tux Paint clips from a generated stamps tree.
"""

import json

import numpy as np
import pytest

from d2vjax.datasets import audio
from experiments import tasks
from experiments.configs import d2v_audio
from experiments.data import espeak, pretrain_batches
from experiments.data import speech_corpus as sc
from tests.d2vjax.test_datasets_audio import write_stamps
from tests.experiments.data.test_vader import make_sdist

SHORT = [
  ("1", "1.0", "Too tepid."),
  ("2", "-2.0", "A fine film!"),
  ("3", "0.5", "Bad."),
  ("4", "2.5", "It's the 2nd best, & warm."),
  ("5", "-1.0", "Dull, dull, dull."),
  ("6", "0.0", "So-so acting; café scenes."),
  ("7", "1.5", "Great fun."),
  ("8", "-0.5", "--- ..."),  # no words: dropped
]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
  return make_sdist(tmp_path_factory.mktemp("src") / "v.tar.gz", movie=SHORT)


@pytest.fixture(scope="module")
def spoken(sdist, tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  return sc.build_spoken_sentences(
    root, domains=("movie",), seed=1, workers=1, archive=sdist, progress=False
  )


@pytest.fixture(scope="module")
def tux(tmp_path_factory):
  tree = write_stamps(tmp_path_factory.mktemp("tree"))
  root = tmp_path_factory.mktemp("data")
  return sc.build_tuxpaint(root, stamps=tree, workers=1, progress=False)


@pytest.mark.parametrize(
  "text, spoken, transcript",
  [
    ("Too tepid.", "too tepid.", "TOO TEPID"),
    ("It's the 2nd best!", "it's the second best!", "IT'S THE SECOND BEST"),
    (
      "'Quoted' café, 1,200 & 4.5%",
      None,
      "QUOTED CAFE ONE THOUSAND TWO HUNDRED AND FOUR POINT FIVE PERCENT",
    ),
    ("The 90s / well-made", None, "THE NINETIES WELL MADE"),
    ("21st 13th 40th", None, "TWENTY FIRST THIRTEENTH FORTIETH"),
  ],
)
def test_normalise_sentence(text, spoken, transcript):
  got = sc.normalise_sentence(text)
  assert got[1] == transcript
  assert set(got[1]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
  if spoken is not None:
    assert got[0] == spoken
  assert sc.normalise_sentence("--- ... 🙂") is None


def test_spell_number():
  assert sc.spell_number(0) == "zero"
  assert sc.spell_number(105) == "one hundred five"
  assert sc.spell_number(2_000_013) == "two million thirteen"


def test_spoken_sentences_build(spoken, sdist):
  meta = json.loads((spoken / "meta.json").read_text())
  assert meta["dropped_sentences"] == 1 and sum(meta["sizes"].values()) == 7
  seen = {}
  for split in sc.SPLITS:
    d = sc.load(spoken, split)
    assert (
      d["audio"].dtype == np.int16 and len(d["offsets"]) == len(d["ids"]) + 1
    )
    for i, (sid, text) in enumerate(zip(d["ids"], d["spoken"], strict=True)):
      seen[str(sid)] = str(d["transcripts"][i])
      wave = d["audio"][d["offsets"][i] : d["offsets"][i + 1]]
      raw, rate, _ = espeak.synthesize(
        str(text),
        sc.spoken_reviews.speakers(1)[d["speakers"][i]]["voice"],
        int(d["rates"][i]),
        int(d["pitches"][i]),
      )
      # 22,050 Hz -> 16 kHz, and the clip is the utterance's own.
      assert abs(len(wave) - len(raw) * 16000 / rate) <= 1
      np.testing.assert_array_equal(
        wave, audio.to_int16(audio.resample(raw / 32768.0, rate, 16000))
      )
  assert seen["movie/4"] == "IT'S THE SECOND BEST AND WARM"
  again = sc.build_spoken_sentences(
    spoken.parent.parent,
    domains=("movie",),
    seed=1,
    workers=1,
    archive=sdist,
    progress=False,
  )
  assert again == spoken  # found in the cache


def test_failed_build_leaves_no_cache(sdist, tmp_path, monkeypatch):
  def boom(item):
    raise ValueError(f"cannot speak {item['id']}")

  monkeypatch.setattr(sc, "_synthesize", boom)
  with pytest.raises(ValueError, match="cannot speak movie/"):
    sc.build_spoken_sentences(
      tmp_path, domains=("movie",), workers=1, archive=sdist, progress=False
    )
  assert list((tmp_path / "speech").iterdir()) == []
  with pytest.raises(ValueError, match="domains"):
    sc.build_spoken_sentences(tmp_path, domains=("poems",))
  with pytest.raises(FileNotFoundError, match="no split 'dev'"):
    sc.load(tmp_path, "dev")


def test_tuxpaint_build(tux):
  d = sc.load(tux, "all")
  assert d["paths"].tolist() == [
    "animals/amphibians/frog_desc.ogg",
    "animals/amphibians/frog_desc_fr.ogg",
    "vehicles/car_desc_da.ogg",
    "vehicles/car_desc_es.ogg",
  ]
  assert d["langs"].tolist() == ["en", "fr", "da", "es"]
  assert d["transcripts"][2] == "" and d["transcripts"][1] == "Une grenouille."
  assert np.diff(d["offsets"]).tolist() == [9600] * 4  # 0.6 s at 16 kHz
  wave = audio.clip(d["audio"], d["offsets"], 3)
  peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave)
  assert peak == pytest.approx(700, abs=5)
  meta = json.loads((tux / "meta.json").read_text())
  assert meta["clips"] == 4 and meta["with_transcript"] == 3


def test_tuxpaint_bad_clip_is_named_and_not_cached(tmp_path):
  tree = write_stamps(tmp_path / "tree")
  bad = next(tree.rglob("car_desc_es.ogg"))
  bad.write_bytes(b"truncated")
  with pytest.raises(ValueError, match="car_desc_es.ogg: cannot decode"):
    sc.build_tuxpaint(tmp_path / "data", stamps=tree, workers=1, progress=False)
  assert list((tmp_path / "data" / "speech").iterdir()) == []


def test_speech_pretraining_source(tux, spoken):
  c = d2v_audio.get_config("tiny")
  c.data.source = "speech"
  c.data.path = f"{tux},{spoken}"
  whole = pretrain_batches.batch_at(c, 2)
  assert whole["inputs"].shape == (8, 800) and whole["mask"].shape == (8, 79)
  np.testing.assert_allclose(whole["inputs"].mean(1), 0, atol=0.2)
  part = pretrain_batches.batch_at(c, 2, rows=(4, 8))
  np.testing.assert_array_equal(part["inputs"], whole["inputs"][4:])
  np.testing.assert_array_equal(
    pretrain_batches.batch_at(c, 2)["inputs"], whole["inputs"]
  )
  c.data.num_samples = 16_000 * 30
  with pytest.raises(ValueError, match="lower config.data.num_samples"):
    pretrain_batches.batch_at(c, 0)
  c.data.path, c.data.speech_sets = "", "poems"
  with pytest.raises(ValueError, match="speech_sets='poems'"):
    pretrain_batches.batch_at(c, 0)


def test_speech_pretraining_reads_the_split_the_config_names(
  spoken, monkeypatch
):
  asked = []

  def fake(root, *, limit, speaker_disjoint):
    asked.append((root, limit, speaker_disjoint))
    return spoken

  monkeypatch.setattr(sc, "build_spoken_sentences", fake)
  c = d2v_audio.get_config("tiny")
  c.data.source = "speech"
  c.data.data_dir, c.data.speech_limit = "/data", 7
  for disjoint in (False, True):
    c.data.speaker_disjoint = disjoint
    pretrain_batches.batch_at(c, 0)
  assert asked == [("/data", 7, False), ("/data", 7, True)]
  # The table's recipe pretrains on the speaker-disjoint train split.
  small = d2v_audio.get_config("small").data
  assert small.speaker_disjoint and small.speech_limit == 6_000
  assert small.speech_sets == "tuxpaint,spoken_sentences"


def test_speech_workdirs_from_before_the_split_switch_resume():
  task = tasks.create(d2v_audio.get_config("tiny"))
  saved = task.upgrade_saved_config({"modality": "audio", "data": {}})
  assert saved["data"] == {"speaker_disjoint": False}
  vision = task.upgrade_saved_config({"modality": "vision", "data": {}})
  assert vision["data"] == {}
