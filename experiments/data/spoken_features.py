"""SpokenReviews' two synthetic streams: log-mel audio and articulation.

* audio: 40-d log-mel energies at 100 Hz of the synthesised speech;
* vision: a 30 fps articulatory track (jaw opening, lip rounding,
  closure, spreading, lip-teeth and tongue-tip contact) rendered from
  espeak's phoneme timing with Gaussian coarticulation, a speaker's gain
  and offset, and noise.

`experiments.data.spoken_reviews` calls these per utterance; `meta()`
describes both for the set's ``meta.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.fft
from scipy import ndimage

from experiments.data import espeak

# Audio features: a 25 ms Hann window every 10 ms (the hop is 220.5 samples
# at 22,050 Hz: frame i starts at round(i * sr / 100)), zero-padded to a
# 1024-point FFT; power spectrum; 40 triangular HTK-mel filters from 20 Hz
# to sr / 2; natural log of the energies plus 1e-6 (silence -> -13.8).
N_MELS = 40
FRAME_RATE = 100  # audio frames per second
WIN_S = 0.025
N_FFT = 1024
F_MIN = 20.0
LOG_FLOOR = 1e-6
# Vision: 30 frames per second, one value per channel in about [0, 1].
FPS = 30
CHANNELS = (
  "jaw_open",
  "lip_round",
  "lip_closure",
  "lip_spread",
  "lip_teeth",
  "tongue_tip",
)
COARTICULATION_MS = 30.0  # std of the Gaussian smoothing the targets
GRID_MS = 4  # time step of the targets before smoothing
SPEAKER_OFFSET_STD, SPEAKER_GAIN, NOISE_STD = 0.05, (0.85, 1.15), 0.02

# Articulatory targets per phoneme class, in CHANNELS order.
_TARGETS = {
  "pause": (0.05, 0.1, 0.6, 0.0, 0.0, 0.0),
  "bilabial": (0.1, 0.1, 1.0, 0.1, 0.0, 0.0),
  "labiodental": (0.15, 0.0, 0.3, 0.1, 1.0, 0.0),
  "dental": (0.2, 0.0, 0.0, 0.2, 0.0, 1.0),
  "postalveolar": (0.2, 0.6, 0.0, 0.0, 0.0, 0.3),
  "w": (0.15, 0.9, 0.2, 0.0, 0.0, 0.0),
  "r": (0.25, 0.4, 0.0, 0.0, 0.0, 0.3),
  "l": (0.3, 0.0, 0.0, 0.2, 0.0, 0.6),
  "alveolar": (0.2, 0.0, 0.0, 0.3, 0.0, 0.4),
  "dorsal": (0.35, 0.0, 0.0, 0.1, 0.0, 0.0),
  "open": (0.9, 0.0, 0.0, 0.2, 0.0, 0.0),
  "mid": (0.55, 0.0, 0.0, 0.2, 0.0, 0.0),
  "close_front": (0.25, 0.0, 0.0, 0.8, 0.0, 0.0),
  "back_round": (0.6, 0.7, 0.0, 0.0, 0.0, 0.0),
  "close_round": (0.3, 0.9, 0.0, 0.0, 0.0, 0.0),
}
_CLASS_INDEX = {name: i for i, name in enumerate(_TARGETS)}
_TARGET_TABLE = np.asarray(list(_TARGETS.values()), np.float32)
# espeak's English phoneme mnemonics, by their leading characters.
_CONSONANTS = (
  (("tS", "dZ", "S", "Z"), "postalveolar"),
  (("p", "b", "m"), "bilabial"),
  (("f", "v"), "labiodental"),
  (("T", "D"), "dental"),
  (("w",), "w"),
  (("r",), "r"),
  (("l",), "l"),
  (("t", "d", "n", "s", "z"), "alveolar"),
  (("k", "g", "N", "h", "j", "x"), "dorsal"),
)
_VOWELS = {
  **dict.fromkeys("aA", "open"),
  **dict.fromkeys("Ee3@V", "mid"),
  **dict.fromkeys("Ii", "close_front"),
  **dict.fromkeys("Oo0", "back_round"),
  **dict.fromkeys("Uu", "close_round"),
}
_STRESS = "',%="  # espeak's stress and syllable marks before a phoneme


def _phoneme_class(name: str) -> str:
  name = name.lstrip(_STRESS)
  if not name or name[0] in "_;":
    return "pause"
  for prefixes, cls in _CONSONANTS:
    if name.startswith(prefixes):
      return cls
  return _VOWELS.get(name[0], "mid")


def _phoneme_segments(name: str) -> list[str]:
  """One class, or two for a diphthong (its first and last vowel)."""
  cls = _phoneme_class(name)
  vowels = [_VOWELS[c] for c in name.lstrip(_STRESS) if c in _VOWELS]
  if cls in _VOWELS.values() and len(vowels) > 1 and vowels[-1] != cls:
    return [cls, vowels[-1]]
  return [cls]


_MEL_CACHE: dict[int, np.ndarray] = {}


def _mel_filters(sr: int) -> np.ndarray:
  """`[N_MELS, N_FFT // 2 + 1]` triangular filters on the HTK mel scale."""
  if sr not in _MEL_CACHE:
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    edges = hz(np.linspace(mel(F_MIN), mel(sr / 2), N_MELS + 2))
    freqs = np.linspace(0, sr / 2, N_FFT // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs - lo) / (mid - lo)
    down = (hi - freqs) / (hi - mid)
    _MEL_CACHE[sr] = np.maximum(0.0, np.minimum(up, down)).astype(np.float32)
  return _MEL_CACHE[sr]


def log_mel(wave: np.ndarray, sr: int) -> np.ndarray:
  """`[T, 40]` float32 log-mel energies, T = floor(100 x seconds) (>= 1)."""
  x = wave.astype(np.float32) / 32768.0
  win = round(WIN_S * sr)
  num = max(1, len(x) * FRAME_RATE // sr)
  starts = np.round(np.arange(num) * (sr / FRAME_RATE)).astype(np.int64)
  x = np.concatenate([x, np.zeros(win, np.float32)])
  frames = x[starts[:, None] + np.arange(win)]
  # The periodic Hann window, as scipy.signal.get_window("hann", win).
  frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)).astype(
    np.float32
  )
  spec = scipy.fft.rfft(frames, N_FFT)  # complex64 for float32 frames
  power = spec.real**2 + spec.imag**2
  return np.log(power @ _mel_filters(sr).T + LOG_FLOOR)


def articulation(
  events: Sequence[espeak.Event],
  duration_ms: float,
  speaker: dict[str, Any],
  rng: np.random.Generator,
) -> np.ndarray:
  """`[T, 6]` float32 articulatory track at 30 fps, T = floor(30 x s).

  Each phoneme holds its class's targets from its event to the next one
  (a diphthong moves half-way through); a Gaussian of 30 ms std blends
  neighbours (coarticulation); the speaker's gain and offset and per-frame
  noise follow.
  """
  steps = max(1, math.ceil(duration_ms / GRID_MS))
  classes = np.full(steps, _CLASS_INDEX["pause"], np.int64)
  phones = [e for e in events if e.kind == "phoneme"]
  for i, e in enumerate(phones):
    end = phones[i + 1].ms if i + 1 < len(phones) else duration_ms
    a = min(round(e.ms / GRID_MS), steps)
    b = min(max(round(end / GRID_MS), a), steps)
    parts = _phoneme_segments(e.phoneme)
    mid = (a + b) // 2 if len(parts) == 2 else b
    classes[a:mid] = _CLASS_INDEX[parts[0]]
    classes[mid:b] = _CLASS_INDEX[parts[-1]]
  grid = ndimage.gaussian_filter1d(
    _TARGET_TABLE[classes], COARTICULATION_MS / GRID_MS, axis=0
  )
  num = max(1, int(duration_ms * FPS // 1000))
  centres = ((np.arange(num) + 0.5) * 1000.0 / FPS / GRID_MS).astype(int)
  track = grid[np.minimum(centres, steps - 1)]
  gain = np.asarray(speaker["gain"], np.float32)
  offset = np.asarray(speaker["offset"], np.float32)
  noise = rng.normal(0.0, NOISE_STD, track.shape).astype(np.float32)
  return track * gain + offset + noise


def speaker_look(seed: int, index: int) -> dict[str, Any]:
  """A speaker's articulatory gain and offset, one value per channel."""
  rng = np.random.default_rng([seed, 3, index])
  return {
    "gain": rng.uniform(*SPEAKER_GAIN, len(CHANNELS)).tolist(),
    "offset": rng.normal(0.0, SPEAKER_OFFSET_STD, len(CHANNELS)).tolist(),
  }


def meta() -> dict[str, dict[str, Any]]:
  """The ``audio`` and ``vision`` entries of a built set's ``meta.json``."""
  return {
    "audio": {
      "features": "log-mel",
      "n_mels": N_MELS,
      "frame_rate": FRAME_RATE,
      "window_s": WIN_S,
      "window": "hann",
      "n_fft": N_FFT,
      "f_min": F_MIN,
      "f_max": "sample_rate / 2",
      "mel": "htk",
      "log_floor": LOG_FLOOR,
    },
    "vision": {
      "fps": FPS,
      "channels": list(CHANNELS),
      "grid_ms": GRID_MS,
      "coarticulation_ms": COARTICULATION_MS,
      "speaker_offset_std": SPEAKER_OFFSET_STD,
      "speaker_gain": list(SPEAKER_GAIN),
      "noise_std": NOISE_STD,
    },
  }
