"""In-process espeak-ng speech synthesis with word and phoneme timing.

The synthesiser is the `libespeak-ng` shared library and voice data that
the `espeakng-loader` wheel bundles (PyPI, no system install), driven
through ctypes in synchronous mode: one call returns the 16-bit waveform
and the events espeak reports while speaking, each with its position in the
audio in milliseconds -- one per word (with the word's character span in
the text) and one per phoneme (with its mnemonic, e.g. "E", "aI", "_:").

  wave, sr, events = espeak.synthesize("Too tepid.", "en-gb+f2", 170, 50)

The library keeps global state between utterances, so every call starts
from a freshly loaded copy (see `_fresh_engine`): the output depends only
on the arguments. Synthesis is not thread-safe; run parallel builds in
separate processes. espeak-ng is GPL-3; this module only loads it.

References:
  espeak-ng `speak_lib.h` (the C API and the `espeak_EVENT` layout),
  version 1.52 as bundled by espeakng-loader 0.2.4.
"""

from __future__ import annotations

import _ctypes
import ctypes
import pathlib
from typing import NamedTuple

import espeakng_loader
import numpy as np

# espeak_AUDIO_OUTPUT: synthesise inside espeak_Synth, calling back with
# the audio and events, no sound device.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_BUFFER_MS = 500
# espeak_Initialize option: report phoneme events as well as words.
_INITIALIZE_PHONEME_EVENTS = 0x0001
_CHARS_UTF8 = 1  # espeak_Synth flags
_POS_CHARACTER = 1  # espeak_POSITION_TYPE
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_EVENT_LIST_TERMINATED, _EVENT_WORD, _EVENT_PHONEME = 0, 1, 7
_EE_OK = 0

# Voice names whose espeak voice file is named differently.
_FILE_OF = {"en-gb": "en"}

RATE_RANGE = (80, 450)  # words per minute accepted by espeak
PITCH_RANGE = (0, 100)


class _EventId(ctypes.Union):
  _fields_ = [
    ("number", ctypes.c_int),
    ("name", ctypes.c_char_p),
    ("string", ctypes.c_char * 8),
  ]


class _Event(ctypes.Structure):
  _fields_ = [
    ("type", ctypes.c_int),
    ("unique_identifier", ctypes.c_uint),
    ("text_position", ctypes.c_int),
    ("length", ctypes.c_int),
    ("audio_position", ctypes.c_int),
    ("sample", ctypes.c_int),
    ("user_data", ctypes.c_void_p),
    ("id", _EventId),
  ]


_CALLBACK = ctypes.CFUNCTYPE(
  ctypes.c_int,
  ctypes.POINTER(ctypes.c_short),
  ctypes.c_int,
  ctypes.POINTER(_Event),
)


class Event(NamedTuple):
  """One timing event of an utterance.

  Attributes:
    kind: "word" or "phoneme".
    ms: the event's position in the audio, in milliseconds.
    text_position: for words, the 1-based character index of the word in
      the text; -1 for phonemes.
    length: for words, the word's length in characters; 0 for phonemes.
    phoneme: for phonemes, espeak's mnemonic ("_" prefixes pauses); "" for
      words.
  """

  kind: str
  ms: int
  text_position: int
  length: int
  phoneme: str


class _Engine:
  """One freshly loaded copy of the library and the callback's buffers."""

  def __init__(self, callback):
    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.argtypes = [
      ctypes.c_int,
      ctypes.c_int,
      ctypes.c_char_p,
      ctypes.c_int,
    ]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Terminate.argtypes = []
    lib.espeak_Terminate.restype = ctypes.c_int
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_ng_SetRandSeed.restype = None
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int] * 3
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
      ctypes.c_void_p,  # text
      ctypes.c_size_t,  # size in bytes, including the terminating NUL
      ctypes.c_uint,  # position
      ctypes.c_int,  # position type
      ctypes.c_uint,  # end position (0 = none)
      ctypes.c_uint,  # flags
      ctypes.POINTER(ctypes.c_uint),  # unique identifier (out)
      ctypes.c_void_p,  # user data
    ]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_Synchronize.restype = ctypes.c_int
    self.data = espeakng_loader.get_data_path()
    rate = lib.espeak_Initialize(
      _AUDIO_OUTPUT_SYNCHRONOUS,
      _BUFFER_MS,
      self.data.encode(),
      _INITIALIZE_PHONEME_EVENTS,
    )
    if rate <= 0:
      raise RuntimeError(
        f"espeak_Initialize failed (returned {rate}) with the data folder "
        f"{self.data!r}; reinstall espeakng-loader"
      )
    lib.espeak_ng_SetRandSeed(0)
    lib.espeak_SetSynthCallback(callback)
    self.lib = lib
    self.sample_rate = int(rate)

  def unload(self) -> None:
    self.lib.espeak_Terminate()
    # With the last handle closed the next dlopen maps a pristine copy of
    # the library's static data (see `_fresh_engine`).
    _ctypes.dlclose(self.lib._handle)


class _Buffers:
  """Collects what the synthesis callback receives."""

  def __init__(self):
    self.chunks: list[np.ndarray] = []
    self.events: list[Event] = []

  def clear(self) -> None:
    self.chunks.clear()
    self.events.clear()

  def on_audio(self, wav, num, events) -> int:
    if num > 0:
      self.chunks.append(np.ctypeslib.as_array(wav, (num,)).copy())
    i = 0
    while events[i].type != _EVENT_LIST_TERMINATED:
      e = events[i]
      if e.type == _EVENT_WORD:
        self.events.append(
          Event("word", e.audio_position, e.text_position, e.length, "")
        )
      elif e.type == _EVENT_PHONEME:
        name = e.id.string.decode("latin-1")
        self.events.append(Event("phoneme", e.audio_position, -1, 0, name))
      i += 1
    return 0  # 0 = continue synthesis


_BUFFERS = _Buffers()
# ctypes does not keep a function pointer alive on its own: the library
# would call freed memory once the wrapper was collected.
_CALLBACK_REF = _CALLBACK(_BUFFERS.on_audio)
_ENGINE: _Engine | None = None


def _fresh_engine() -> _Engine:
  """The library, reloaded so that no state of earlier utterances remains.

  espeak-ng keeps wave-generator state from one utterance to the next
  that neither `espeak_Initialize` nor `espeak_Terminate` resets (static
  variables of its C source, such as the pitch-flutter index): measured,
  the same call gave different samples, and lengths a few samples apart,
  depending on what the process had spoken before. Unloading
  and loading the library again (about 0.3 ms) makes every utterance a
  function of its own arguments, whatever the order or the process.
  """
  global _ENGINE
  if _ENGINE is not None:
    # Also after a fork: the inherited handle must go too, or the next
    # dlopen would return the child's copy of the parent's used library.
    _ENGINE.unload()
  _ENGINE = _Engine(_CALLBACK_REF)
  return _ENGINE


def _voice_file(voice: str, data: str) -> str:
  """Maps `voice` to the name `espeak_SetVoiceByName` looks up."""
  base, _, variant = voice.partition("+")
  # The lookup matches voice *files*; British English's file is "en" (its
  # language code en-gb names no file).
  base = _FILE_OF.get(base.lower(), base)
  # espeak silently ignores an unknown variant; refuse it instead.
  if variant and not (pathlib.Path(data) / "voices" / "!v" / variant).is_file():
    raise ValueError(
      f"espeak-ng has no voice variant {variant!r} (in {voice!r}); use one "
      "such as 'm1'..'m8', 'f1'..'f5' or 'klatt'"
    )
  return f"{base}+{variant}" if variant else base


def sample_rate() -> int:
  """The synthesiser's output sample rate in Hz (22,050 for espeak-ng)."""
  return (_ENGINE or _fresh_engine()).sample_rate


def synthesize(
  text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50
) -> tuple[np.ndarray, int, list[Event]]:
  """Speaks `text` with espeak-ng.

  Args:
    text: plain text (not SSML).
    voice: an espeak voice name, optionally with a variant, e.g. "en-us",
      "en-gb-scotland+m3", "en-029+f2".
    rate: speaking rate in words per minute, 80-450.
    pitch: base pitch, 0-100 (espeak's default is 50).

  Returns:
    `(waveform, sample_rate, events)`: int16 mono samples, the rate in Hz,
    and the word and phoneme `Event`s in the order espeak reported them
    (nondecreasing `ms`).

  Raises:
    ValueError: bad rate or pitch, an unknown voice, or an utterance that
      gave no audio (the message quotes the text).
    RuntimeError: espeak reported an error while synthesising.
  """
  if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
    raise ValueError(f"rate {rate} wpm is outside {RATE_RANGE}")
  if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
    raise ValueError(f"pitch {pitch} is outside {PITCH_RANGE}")
  eng = _fresh_engine()
  lib = eng.lib
  buffers = _BUFFERS
  name = _voice_file(voice, eng.data)
  if lib.espeak_SetVoiceByName(name.encode()) != _EE_OK:
    raise ValueError(
      f"espeak-ng has no voice {voice!r}; use a language such as 'en-us' "
      "or 'en-gb-scotland', optionally with a variant like '+m3'"
    )
  # Set after the voice: selecting a voice resets rate and pitch.
  lib.espeak_SetParameter(_RATE, int(rate), 0)
  lib.espeak_SetParameter(_PITCH, int(pitch), 0)
  buffers.clear()
  data = text.encode("utf-8") + b"\0"
  err = lib.espeak_Synth(
    data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
  )
  if err == _EE_OK:
    err = lib.espeak_Synchronize()
  if err != _EE_OK:
    raise RuntimeError(f"espeak_Synth failed with code {err} on {text!r}")
  chunks = buffers.chunks
  wave = (np.concatenate(chunks) if chunks else np.zeros(0, np.int16)).astype(
    np.int16, copy=False
  )
  events = list(buffers.events)
  buffers.clear()
  # Unspeakable text ("...", "") still gives a few ms of silence and
  # pause phonemes only.
  spoken = any(
    e.kind == "phoneme" and not e.phoneme.startswith("_") for e in events
  )
  if not spoken or not np.any(wave):
    raise ValueError(
      f"espeak-ng produced no audio for {text!r} (voice {voice!r}); the "
      "text holds nothing speakable"
    )
  return wave, eng.sample_rate, events
