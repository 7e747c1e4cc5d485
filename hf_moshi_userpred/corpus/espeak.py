"""Speech from espeak-ng with exact word times: libespeak-ng through `ctypes` (speak_lib.h of espeak-ng 1.51), whose
word events say where each word starts in the audio.

    espeak = Espeak()
    utterance = espeak.synthesize("I went to the market, and", "en-us+m3", rate=170, pitch=40)
    utterance.audio, utterance.words   # float32 mono at SAMPLE_RATE; (word, start_s, end_s)
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass

import numpy as np
import soxr

SAMPLE_RATE = 16_000  # the corpus' audio rate (moshi-finetune folders are resampled to Mimi's rate when encoded)
AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
EVENT_LIST_TERMINATED = 0
EVENT_WORD = 1
PARAMETER = {"rate": 1, "pitch": 3}  # espeak_PARAMETER: words per minute; base pitch 0-100
DEFAULT_RATE, DEFAULT_PITCH = 175, 50  # espeak-ng's own defaults, set on every call (the settings persist)
FADE_SECONDS = 0.02  # an utterance cut short (a speaker who yields) fades out over this long instead of clicking
SILENCE_LEVEL = 1e-3  # espeak-ng writes exact zeros between words; this only ignores rounding dust
WORD_PATTERN = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


class _EspeakEventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _EspeakEvent(ctypes.Structure):
    """``espeak_EVENT``; ``text_position`` is 1-based (characters), ``audio_position`` in ms from the start."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EspeakEventId),
    ]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)


@dataclass
class Utterance:
    """Synthesised speech (float32 mono at ``SAMPLE_RATE``, no leading or trailing silence) and its words.

    ``words`` holds ``(word, start_s, end_s)`` relative to the start of ``audio``.
    """

    audio: np.ndarray
    words: list[tuple[str, float, float]]

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def cut(self, seconds: float, min_word_seconds: float = 0.15) -> Utterance:
        """The first ``seconds`` of this utterance, fading out over its last ``FADE_SECONDS``; a word cut with less
        than ``min_word_seconds`` of it said is dropped from the words (and its sound), the last word kept ends at
        the cut."""
        words = [(w, b, min(e, seconds)) for w, b, e in self.words if b + min_word_seconds <= seconds]
        if not words:
            raise ValueError(f"cutting at {seconds:.3f} s leaves no word of {self.words[0][0]!r}...")
        stop = round(words[-1][2] * SAMPLE_RATE)
        audio = self.audio[:stop].copy()
        fade = min(round(FADE_SECONDS * SAMPLE_RATE), stop)
        audio[stop - fade :] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        return Utterance(audio, words)


class Espeak:
    """Synchronous espeak-ng synthesis that keeps the word events (where each word starts in the audio)."""

    def __init__(self, library: str = "libespeak-ng.so.1") -> None:
        try:
            self._lib = ctypes.CDLL(library)
        except OSError as error:
            raise OSError(f"espeak-ng is not installed ({library}: {error}); on Debian or Ubuntu: apt-get install "
                          "espeak-ng") from None
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self._lib.espeak_Info.argtypes = [ctypes.c_void_p]
        self._lib.espeak_Info.restype = ctypes.c_char_p
        self.sample_rate = self._lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, 0)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak_Initialize failed")
        self.version: str = self._lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        self._word_events: list[tuple[int, int]] = []
        self._callback = _SYNTH_CALLBACK(self._on_synth)  # referenced for as long as espeak may call it
        self._lib.espeak_SetSynthCallback(self._callback)

    def _on_synth(self, wav: ctypes.Array, num_samples: int, events: ctypes.Array) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        i = 0
        while events[i].type != EVENT_LIST_TERMINATED:
            if events[i].type == EVENT_WORD:
                self._word_events.append((events[i].text_position, events[i].audio_position))
            i += 1
        return 0  # continue synthesis

    def synthesize(self, text: str, voice: str, rate: int = DEFAULT_RATE, pitch: int = DEFAULT_PITCH) -> Utterance:
        """Speak ``text`` with ``voice`` at ``rate`` words per minute and base ``pitch`` (0-100); the words are the
        letter sequences of ``text`` (apostrophes kept).

        Sentences are capitalised for espeak-ng, which only ends a sentence (pause, intonation) before a
        capital letter; the words keep the case of ``text``.
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        for name, value in (("rate", rate), ("pitch", pitch)):
            if self._lib.espeak_SetParameter(PARAMETER[name], value, 0) != 0:
                raise ValueError(f"espeak-ng refused {name}={value}")
        self._chunks, self._word_events = [], []
        data = re.sub(r"(^|[.?!] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text).encode("ascii")
        error = self._lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
        if error != 0:
            raise RuntimeError(f"espeak_Synth failed ({error}) on {text!r}")
        audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0

        # One word event per word. An event points at the word's first character (1-based), or just before
        # it after a sentence end; espeak-ng also reports stray events (position 0, or one per punctuation).
        words = {m.start() + 1: m.group() for m in WORD_PATTERN.finditer(text)}
        starts: dict[int, int] = {}
        for position, ms in self._word_events:
            following = [p for p in words if p >= position]
            if position > 0 and following and min(following) not in starts:
                starts[min(following)] = round(ms * self.sample_rate / 1000)
        positions = sorted(words)
        if positions[0] not in starts:
            raise RuntimeError(f"espeak-ng reported no start for {words[positions[0]]!r} in {text!r}")
        # espeak-ng speaks some word pairs as one ("on the"): the second one gets no event, and a share of the pair's
        # time in proportion to its position in the text
        for index, position in enumerate(positions):
            if position not in starts:
                before = positions[index - 1]
                after = next((p for p in positions[index:] if p in starts), len(text) + 1)
                stop = starts.get(after, round(len(audio)))
                starts[position] = starts[before] + round((stop - starts[before]) * (position - before) / (after - before))
        bounds = [starts[p] for p in positions] + [len(audio)]
        spans = []
        for (position, word), begin, stop in zip(sorted(words.items()), bounds[:-1], bounds[1:]):
            voiced = np.flatnonzero(np.abs(audio[begin:stop]) > SILENCE_LEVEL)
            if len(voiced) == 0:
                raise RuntimeError(f"no audio for {word!r} in {text!r}")
            spans.append((word, begin + int(voiced[0]), begin + int(voiced[-1]) + 1))

        first, last = spans[0][1], spans[-1][2]
        audio = soxr.resample(audio[first:last], self.sample_rate, SAMPLE_RATE)
        return Utterance(
            audio.astype(np.float32),
            [(w, (b - first) / self.sample_rate, (e - first) / self.sample_rate) for w, b, e in spans],
        )


__all__ = ["SAMPLE_RATE", "Espeak", "Utterance"]
