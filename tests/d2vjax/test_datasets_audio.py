"""Tests of the audio readers, resampling, crops and the Tux Paint walker.

Audio files are written here with soundfile (Ogg Vorbis and WAV), in the
layout of the Tux Paint stamps package.
"""

import numpy as np
import pytest
import soundfile

from d2vjax.datasets import audio


def _sine(freq, rate, seconds, amp=0.5):
  t = np.arange(int(rate * seconds)) / rate
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave, rate):
  spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
  return np.argmax(spectrum) * rate / len(wave)


def write_stamps(root, layout=True):
  """A tiny stamps tree: two stamps, four recordings, one without text."""
  stamps = root / audio.STAMPS_SUBDIR if layout else root
  frog = stamps / "animals" / "amphibians"
  car = stamps / "vehicles"
  frog.mkdir(parents=True)
  car.mkdir(parents=True)
  (frog / "frog.txt").write_text(
    "A frog.\nfr.utf8=Une grenouille.\nru.utf8=Лягушка.\n", "utf-8"
  )
  (car / "car.txt").write_text("A red car.\nes.utf8=Un coche rojo.\n", "utf-8")
  clips = {
    frog / "frog_desc.ogg": 300.0,
    frog / "frog_desc_fr.ogg": 500.0,
    car / "car_desc_es.ogg": 700.0,
    car / "car_desc_da.ogg": 900.0,  # car.txt has no Danish line
  }
  for path, freq in clips.items():
    left = _sine(freq, 44100, 0.6)
    soundfile.write(path, np.stack([left, left], 1), 44100, format="OGG")
  (frog / "frog.png").write_bytes(b"not audio")
  return root


def test_resampling_keeps_a_sine_at_its_frequency():
  wave = _sine(440.0, 44100, 1.0)
  out = audio.resample(wave, 44100, 16000)
  assert out.dtype == np.float32 and len(out) == 16000
  assert _peak_hz(out, 16000) == pytest.approx(440.0, abs=1.5)
  # Energy above the new Nyquist is filtered out, not folded back.
  high = audio.resample(_sine(12000.0, 44100, 1.0), 44100, 16000)
  assert np.abs(high[200:-200]).max() < 0.02  # edges: filter transients
  with pytest.raises(ValueError, match="positive"):
    audio.resample(wave, 0, 16000)


def test_read_audio_mixes_to_mono_and_resamples(tmp_path):
  left = _sine(1000.0, 44100, 0.5)
  stereo = np.stack([left, np.zeros_like(left)], 1)
  soundfile.write(tmp_path / "a.wav", stereo, 44100)
  soundfile.write(tmp_path / "a.ogg", stereo, 44100, format="OGG")
  for name in ("a.wav", "a.ogg"):
    wave = audio.read_audio(tmp_path / name)
    assert wave.ndim == 1 and abs(len(wave) - 8000) <= 1
    assert _peak_hz(wave, 16000) == pytest.approx(1000.0, abs=3)
    # The mean of a sine and silence: half the amplitude.
    assert np.abs(wave[1000:-1000]).max() == pytest.approx(0.25, abs=0.02)


def test_read_audio_names_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.ogg"):
    audio.read_audio(tmp_path / "missing.ogg")
  (tmp_path / "junk.ogg").write_bytes(b"OggS but not really" * 10)
  with pytest.raises(ValueError, match="junk.ogg.*cannot decode"):
    audio.read_audio(tmp_path / "junk.ogg")
  soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1)), 16000)
  with pytest.raises(ValueError, match="empty.wav.*no samples"):
    audio.read_audio(tmp_path / "empty.wav")


def test_normalize_crop_pack():
  rng = np.random.default_rng(0)
  wave = 3.0 + 2.0 * rng.standard_normal(1000).astype(np.float32)
  norm = audio.normalize(wave)
  assert abs(norm.mean()) < 1e-5 and norm.std() == pytest.approx(1, 1e-4)
  crop = audio.random_crop(wave, 100, np.random.default_rng(1))
  again = audio.random_crop(wave, 100, np.random.default_rng(1))
  np.testing.assert_array_equal(crop, again)
  start = int(np.flatnonzero(wave == crop[0])[0])
  np.testing.assert_array_equal(wave[start : start + 100], crop)
  assert len(audio.random_crop(wave, 5000, rng)) == 1000  # shorter: whole
  waves = [audio.to_int16(_sine(f, 16000, 0.1)) for f in (200, 300)]
  flat, offsets = audio.pack(waves)
  assert flat.dtype == np.int16 and offsets.tolist() == [0, 1600, 3200]
  np.testing.assert_allclose(
    audio.clip(flat, offsets, 1), _sine(300, 16000, 0.1), atol=1e-4
  )


def test_stamp_text_parsing():
  parsed = audio.parse_stamp_text(
    "A frog.\r\n\r\nfr.utf8=Une grenouille.\nsr@latin.utf8=Žaba.\nxx.utf8=\n"
  )
  assert parsed == {
    "en": "A frog.",
    "fr": "Une grenouille.",
    "sr@latin": "Žaba.",
  }
  assert audio.parse_stamp_text("fr.utf8=Seulement.") == {"fr": "Seulement."}


@pytest.mark.parametrize("layout", [True, False])
def test_tuxpaint_stamps_pairs_recordings_with_text(tmp_path, layout):
  root = write_stamps(tmp_path, layout)
  items = audio.tuxpaint_stamps(root)
  got = [(i.path.name, i.lang, i.transcript, i.category) for i in items]
  assert got == [
    ("frog_desc.ogg", "en", "A frog.", "animals"),
    ("frog_desc_fr.ogg", "fr", "Une grenouille.", "animals"),
    ("car_desc_es.ogg", "es", "Un coche rojo.", "vehicles"),
  ]
  every = audio.tuxpaint_stamps(root, require_transcript=False)
  assert [(i.lang, i.transcript) for i in every if i.lang == "da"] == [
    ("da", "")
  ]


def test_tuxpaint_stamps_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="stamps folder not found"):
    audio.tuxpaint_stamps(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no <name>_desc"):
    audio.tuxpaint_stamps(tmp_path / "empty")
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "x_desc.ogg").write_bytes(b"")
  (bad / "x.txt").write_bytes(b"\xff\xfe bad")
  with pytest.raises(ValueError, match="x.txt: not UTF-8"):
    audio.tuxpaint_stamps(bad)


def test_crop_loader_rows_are_a_function_of_seed_and_step():
  waves = [np.full(n, i + 1, np.int16) for i, n in enumerate((50, 400, 900))]
  more = [np.arange(700, dtype=np.int16)]
  sets = [audio.pack(waves), audio.pack(more)]
  loader = audio.CropLoader(sets, batch_size=4, num_samples=300, seed=5)
  whole = loader.batch(3)
  assert whole["waveforms"].shape == (4, 300)
  # The 50-sample clip is too short to take part.
  assert {tuple(c) for c in whole["clips"]} <= {(0, 1), (0, 2), (1, 0)}
  part = loader.batch(3, (1, 3))
  np.testing.assert_array_equal(part["waveforms"], whole["waveforms"][1:3])
  np.testing.assert_array_equal(
    loader.batch(3)["waveforms"], whole["waveforms"]
  )
  assert not np.array_equal(loader.batch(4)["waveforms"], whole["waveforms"])
  raw = audio.CropLoader(sets, 4, 300, seed=5, normalize=False).batch(3)
  ramp = raw["waveforms"][np.all(raw["clips"] == (1, 0), axis=1)]
  for row in ramp:  # a contiguous window of the ramp
    np.testing.assert_allclose(np.diff(row * 32768), 1.0, atol=1e-3)
  with pytest.raises(ValueError, match="longest has 900.*num_samples"):
    audio.CropLoader(sets, 4, 1000)
