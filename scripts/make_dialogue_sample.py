"""Build the small spoken-dialogue sample shipped in ``hf_moshi_userpred/sample/``.

What it makes (all deterministic from ``--seed``):

* ``dialogues/NNN.flac``: synthetic two-voice English dialogues, stereo 16 kHz 16-bit lossless FLAC (a fifth
  of the WAV size: each channel is silent half the time, so five times more dialogue fits the budget), left channel the
  system (Moshi) voice, right channel the user voice, with turn-taking, pauses, overlapping turn changes and
  backchannels ("uh huh", "yeah", ...) spoken by the listener during the other speaker's turn. The text comes
  from a small template grammar with a limited vocabulary, so phrases (and, espeak-ng being deterministic,
  their audio) recur across dialogues: a tiny model can learn something from it in a few CPU minutes.
* ``dialogues/NNN.json``: word alignments in kyutai's moshi-finetune format,
  ``{"alignments": [[word, [start_s, end_s], speaker], ...]}``, speaker ``SPEAKER_MAIN`` (left) or
  ``SPEAKER_USER`` (right). The times come from the synthesiser itself: libespeak-ng (through ``ctypes``)
  reports where each word starts in its output; a word ends where the next one starts (or the utterance
  ends), and both ends are trimmed to the word's first and last non-silent sample.
* ``train.jsonl`` / ``eval.jsonl``: moshi-finetune manifests (``{"path": ..., "duration": ...}`` per line,
  paths relative to the manifest); the last ``--num-eval`` dialogues are held out.
* ``tokenizer.model``: a small sentencepiece model trained on the dialogues' words (unk 0, bos 1, eos 2,
  pad 3, as Moshi's text tokenizer).
* ``mimi/``: a small randomly initialised transformers ``MimiModel`` (24 kHz, 12.5 frames/s) whose
  codebooks are fitted by k-means, layer by layer, on the sample's own audio (a fresh Mimi has all-zero
  codebooks and would give code 0 everywhere), then whose decoder is trained to rebuild the training audio from its
  codes (``fit_decoder``; the encoder and codebooks frozen, so the codes do not change).
* ``README.md``: what is there and how it was made.

It needs espeak-ng (``libespeak-ng.so.1``) and is run at development time only; rerun it with

    python scripts/make_dialogue_sample.py [--seed 0] [--output hf_moshi_userpred/sample]

or refit only the Mimi decoder of the sample already there (no espeak-ng needed; a few CPU minutes) with

    python scripts/make_dialogue_sample.py --fit-decoder-only [--seed 0]

The output folder is built beside the target and swapped in only once it is complete and within the size
budget.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import math
import os
import random
import re
import shutil
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import soundfile as sf
import soxr
import torch
from transformers import MimiConfig, MimiModel
from transformers.audio_utils import mel_filter_bank

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RATE = 16_000
SIZE_BUDGET_BYTES = 4_800_000
SYSTEM = "SPEAKER_MAIN"
USER = "SPEAKER_USER"
CHANNEL = {SYSTEM: 0, USER: 1}
VOICES = {SYSTEM: "en-us+m3", USER: "en-gb-x-rp+f3"}

# A small Mimi: the real one's sample rate and frame rate (12.5 Hz), narrow layers, few small codebooks.
MIMI_CONFIG = dict(
    hidden_size=64,
    num_filters=4,
    num_residual_layers=1,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    intermediate_size=128,
    codebook_dim=32,
    vector_quantization_hidden_dimension=32,
    upsample_groups=64,
    num_quantizers=8,
    num_semantic_quantizers=1,
)

# Turn taking, in seconds.
LEAD_IN = (0.2, 0.5)
TAIL = (0.3, 0.6)
SHORT_PAUSE = (0.2, 0.8)
LONG_PAUSE = (1.0, 1.5)
OVERLAP = (0.1, 0.3)
TURN_CHANGE_PROBS = {"overlap": 0.25, "short": 0.6, "long": 0.15}
MIN_SELF_GAP = 0.15  # a speaker never overlaps their own previous utterance
BACKCHANNEL_PROB = 0.7
BACKCHANNEL_MIN_TURN = 1.2
BACKCHANNEL_DELAY = (0.05, 0.2)  # after the end of the word it reacts to
BACKCHANNEL_MARGIN = 0.35  # a backchannel ends this long before the turn does (more than any overlap)
MIN_USER_SPEECH_SHARE = 0.3
SENTENCE_GAP = (0.1, 0.25)  # between two sentences of one turn
# Mimi's frame. Sentences start on its grid, so a sentence that recurs (phrases recur by design) is encoded to the
# same codes wherever it is said: the regularity a tiny model can learn from a few minutes of audio.
FRAME_SECONDS = 0.08

# --------------------------------------------------------------------------------------------------------
# Text: a small template grammar.
# --------------------------------------------------------------------------------------------------------

GRAMMAR: dict[str, list[str]] = {
    "greeting": ["hello there.", "hi!", "good morning.", "hey, good to see you."],
    "how_are_you": ["how are you?", "how are you doing today?"],
    "fine": ["I'm fine, thanks.", "pretty good, thank you.", "not bad at all."],
    "counter": ["and you?", "what about you?"],
    "reaction": [
        "oh, that sounds nice.",
        "oh, really?",
        "great.",
        "me too.",
        "good to hear.",
        "nice, I like that.",
        "okay, sounds good.",
        "cool.",
    ],
    "hour": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"],
    "weather": ["sunny", "cold", "warm", "windy", "cloudy", "rainy"],
    "when": ["today", "tonight", "tomorrow", "this weekend"],
    "place": ["the park", "the beach", "the market", "the library", "the gym", "work"],
    "person": ["my sister", "my brother", "a friend", "my family"],
    "meal": ["lunch", "dinner", "breakfast"],
    "food": ["pasta", "soup", "rice", "pizza", "salad", "bread", "fish", "noodles"],
}

BACKCHANNELS = ["uh huh", "yeah", "right", "okay", "mm hmm"]


@dataclass(frozen=True)
class Topic:
    """Questions on one subject, the answers that fit them, and whether "and you?" may follow an answer."""

    questions: list[str]
    answers: list[str]
    personal: bool


GREETING = Topic(["{greeting} {how_are_you}"], ["{fine}"], personal=True)
TOPICS: dict[str, Topic] = {
    "time": Topic(
        ["what time is it?", "do you know the time?"],
        ["it is {hour} now.", "it is almost {hour}.", "I think it is {hour} thirty."],
        personal=False,
    ),
    "weather": Topic(
        ["how is the weather today?", "is it cold outside?", "what is the weather like?"],
        ["it is {weather} and {weather} today.", "it is a bit {weather} outside.", "pretty {weather}, I think."],
        personal=False,
    ),
    "plans": Topic(
        ["what are you doing {when}?", "any plans for {when}?"],
        ["I'm going to {place} with {person}.", "I want to go to {place}.", "nothing much, maybe {place}."],
        personal=True,
    ),
    "food": Topic(
        ["what do you want for {meal}?", "are you hungry?", "what should we eat for {meal}?"],
        ["maybe some {food}.", "I would like {food}, please.", "{food} and {food} sounds good."],
        personal=True,
    ),
    "day": Topic(
        ["how was your day?", "how is work going?"],
        ["pretty good, thank you.", "a little tired, but fine.", "busy, but it was nice."],
        personal=True,
    ),
}
GREETING_PROB = 0.5
COUNTER_PROB = 0.35
REACTION_PROB = 0.8
ASK_PROB = 0.4  # after an answer or a reaction; a turn with nothing else to say always asks


def expand(template: str, rng: random.Random) -> str:
    """Fill every ``{slot}`` of ``template`` with a random (recursively expanded) option of ``GRAMMAR``."""
    return re.sub(r"\{(\w+)\}", lambda m: expand(rng.choice(GRAMMAR[m.group(1)]), rng), template)


def turn_texts(rng: random.Random) -> Iterator[str]:
    """An endless conversation, one string per turn; consecutive turns belong to alternating speakers.

    A turn answers the question the previous turn asked (and may hand it back with "and you?"), or reacts to
    the previous answer, and may ask a new question on another topic.
    """
    topic: Topic | None = None
    if rng.random() < GREETING_PROB:
        topic = GREETING
        yield expand(rng.choice(GREETING.questions), rng)
    pending = topic  # the question this turn must answer
    may_counter = True  # "and you?" is not asked back twice in a row
    ended_with_answer = False
    while True:
        parts: list[str] = []
        if pending is not None:
            parts.append(expand(rng.choice(pending.answers), rng))
            if pending.personal and may_counter and rng.random() < COUNTER_PROB:
                parts.append(expand("{counter}", rng))
                may_counter = False
                yield " ".join(parts)
                continue
        elif ended_with_answer and rng.random() < REACTION_PROB:
            parts.append(expand("{reaction}", rng))
        may_counter = True
        if not parts or rng.random() < ASK_PROB:
            topic = TOPICS[rng.choice([name for name, t in TOPICS.items() if t is not topic])]
            parts.append(expand(rng.choice(topic.questions), rng))
            pending, ended_with_answer = topic, False
        else:
            ended_with_answer = pending is not None
            pending = None
        yield " ".join(parts)


# --------------------------------------------------------------------------------------------------------
# Speech: libespeak-ng through ctypes (speak_lib.h of espeak-ng 1.51).
# --------------------------------------------------------------------------------------------------------

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
EVENT_LIST_TERMINATED = 0
EVENT_WORD = 1
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


class Espeak:
    """Synchronous espeak-ng synthesis that keeps the word events (where each word starts in the audio)."""

    def __init__(self, library: str = "libespeak-ng.so.1") -> None:
        self._lib = ctypes.CDLL(library)
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
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

    def synthesize(self, text: str, voice: str) -> Utterance:
        """Speak ``text`` with ``voice``; the words are the letter sequences of ``text`` (apostrophes kept).

        Sentences are capitalised for espeak-ng, which only ends a sentence (pause, intonation) before a
        capital letter; the words keep the case of ``text``.
        """
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
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
        if starts.keys() != words.keys():
            missing = [words[p] for p in words if p not in starts]
            raise RuntimeError(f"espeak-ng reported no start for {missing} in {text!r}")
        bounds = [starts[p] for p in sorted(words)] + [len(audio)]
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


# --------------------------------------------------------------------------------------------------------
# Dialogues: turns and backchannels laid out on two channels.
# --------------------------------------------------------------------------------------------------------


@dataclass
class Dialogue:
    """Stereo float32 audio ``[samples, 2]`` at ``SAMPLE_RATE`` and moshi-finetune alignments."""

    audio: np.ndarray
    alignments: list[tuple[str, tuple[float, float], str]]
    lines: list[str]  # the words of each utterance, for the tokenizer
    speech_seconds: dict[str, float]  # per speaker, from the first to the last word of each utterance

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


class Timeline:
    """Utterances placed on the two channels; refuses to overlap a speaker with themselves."""

    def __init__(self) -> None:
        self.placed: list[tuple[str, int, Utterance]] = []
        self.free_at = {SYSTEM: 0.0, USER: 0.0}

    def place(self, speaker: str, start: float, utterance: Utterance) -> float:
        """Put ``utterance`` on ``speaker``'s channel at ``start`` (seconds, on the frame grid); returns where it
        ends."""
        if abs(start / FRAME_SECONDS - round(start / FRAME_SECONDS)) > 1e-6:
            raise ValueError(f"utterance start {start} is not on the {FRAME_SECONDS} s frame grid")
        first = round(start * SAMPLE_RATE)
        if first / SAMPLE_RATE < self.free_at[speaker]:
            raise ValueError(f"{speaker} would overlap their own speech at {start:.2f} s")
        self.placed.append((speaker, first, utterance))
        self.free_at[speaker] = (first + len(utterance.audio)) / SAMPLE_RATE
        return self.free_at[speaker]

    def speech_seconds(self, speaker: str) -> float:
        return sum(u.duration for s, _, u in self.placed if s == speaker)

    def render(self, duration: float) -> Dialogue:
        audio = np.zeros((round(duration * SAMPLE_RATE), 2), dtype=np.float32)
        alignments = []
        for speaker, first, utterance in self.placed:
            audio[first : first + len(utterance.audio), CHANNEL[speaker]] += utterance.audio
            offset = first / SAMPLE_RATE
            for word, begin, end in utterance.words:
                alignments.append((word, (round(offset + begin, 3), round(offset + end, 3)), speaker))
        alignments.sort(key=lambda a: (a[1][0], a[2]))
        lines = [" ".join(w for w, _, _ in u.words) for _, _, u in self.placed]
        return Dialogue(audio, alignments, lines, {s: self.speech_seconds(s) for s in CHANNEL})


def on_grid(seconds: float) -> float:
    """The first frame boundary at or after ``seconds``."""
    return math.ceil(seconds / FRAME_SECONDS - 1e-6) * FRAME_SECONDS


def turn_gap(rng: random.Random) -> float:
    """Seconds from the end of a turn to the start of the next one (negative: overlap)."""
    kind = rng.choices(list(TURN_CHANGE_PROBS), weights=list(TURN_CHANGE_PROBS.values()))[0]
    if kind == "overlap":
        return -rng.uniform(*OVERLAP)
    return rng.uniform(*(SHORT_PAUSE if kind == "short" else LONG_PAUSE))


def add_backchannel(
    rng: random.Random, espeak: Espeak, timeline: Timeline, listener: str, turn_start: float, turn: Utterance
) -> None:
    """Maybe let ``listener`` say "uh huh" (or similar) during ``turn``, after one of its words."""
    if turn.duration < BACKCHANNEL_MIN_TURN or rng.random() >= BACKCHANNEL_PROB:
        return
    backchannel = espeak.synthesize(rng.choice(BACKCHANNELS), VOICES[listener])
    delay = rng.uniform(*BACKCHANNEL_DELAY)
    latest = turn.duration - BACKCHANNEL_MARGIN - backchannel.duration - delay
    earliest = max(0.3, timeline.free_at[listener] + MIN_SELF_GAP - turn_start - delay)
    word_ends = [end for _, _, end in turn.words[:-1] if earliest <= end <= latest]
    if word_ends:
        start = on_grid(turn_start + rng.choice(word_ends) + delay)
        if start + backchannel.duration <= turn_start + turn.duration - BACKCHANNEL_MARGIN + FRAME_SECONDS:
            timeline.place(listener, start, backchannel)


def make_dialogue(rng: random.Random, espeak: Espeak, min_seconds: float, max_seconds: float) -> Dialogue:
    """A dialogue of ``min_seconds`` to ``max_seconds`` in which both speakers talk (the user substantially)."""
    while True:
        speakers = [SYSTEM, USER] if rng.random() < 0.5 else [USER, SYSTEM]
        timeline = Timeline()
        tail = rng.uniform(*TAIL)
        end = 0.0
        turns = {SYSTEM: 0, USER: 0}
        for index, text in enumerate(turn_texts(rng)):
            speaker, listener = speakers[index % 2], speakers[1 - index % 2]
            sentences = [espeak.synthesize(t, VOICES[speaker]) for t in re.split(r"(?<=[.?!])\s+", text)]
            gaps = [rng.uniform(*SENTENCE_GAP) for _ in sentences[1:]] + [0.0]
            start = rng.uniform(*LEAD_IN) if index == 0 else end + turn_gap(rng)
            start = on_grid(max(start, timeline.free_at[speaker] + (MIN_SELF_GAP if index else 0.0)))
            # Upper bound of the turn's length: each later sentence may wait up to a frame for the grid.
            length = sum(u.duration for u in sentences) + sum(gaps) + FRAME_SECONDS * (len(sentences) - 1)
            if start + length + tail > max_seconds:
                break
            for utterance, gap in zip(sentences, gaps):
                end = timeline.place(speaker, start, utterance)
                add_backchannel(rng, espeak, timeline, listener, start, utterance)
                start = on_grid(end + gap)
            turns[speaker] += 1
        duration = end + tail
        speech = timeline.speech_seconds(SYSTEM) + timeline.speech_seconds(USER)
        if (
            duration >= min_seconds
            and min(turns.values()) >= 1
            and timeline.speech_seconds(USER) >= MIN_USER_SPEECH_SHARE * speech
        ):
            return timeline.render(duration)


def check_alignments(dialogue: Dialogue) -> None:
    """Every word's span holds speech on its channel; the channel is silent between words apart by >= 0.1 s."""
    margin = round(0.02 * SAMPLE_RATE)
    for speaker, channel in CHANNEL.items():
        signal = dialogue.audio[:, channel]
        times = [span for _, span, s in dialogue.alignments if s == speaker]
        spans = [(round(b * SAMPLE_RATE), round(e * SAMPLE_RATE)) for b, e in times]
        for b, e in spans:
            if np.sqrt(np.mean(signal[b:e] ** 2)) < 0.01:
                raise AssertionError(f"{speaker}: no speech in the word at {b / SAMPLE_RATE:.3f} s")
        gaps = zip([0] + [e for _, e in spans], [b for b, _ in spans] + [len(signal)])
        for b, e in gaps:
            if e - b >= 0.1 * SAMPLE_RATE and np.abs(signal[b + margin : e - margin]).max() > SILENCE_LEVEL:
                raise AssertionError(f"{speaker}: sound between words, at {b / SAMPLE_RATE:.3f} s")


# --------------------------------------------------------------------------------------------------------
# Tokenizer and Mimi.
# --------------------------------------------------------------------------------------------------------


def train_tokenizer(lines: list[str], vocab_size: int, seed: int) -> bytes:
    """A BPE sentencepiece model with Moshi's special ids (unk 0, bos 1, eos 2, pad 3), serialized."""
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` centroids of ``points`` ``[N, D]``: k-means++ seeding from the data, then Lloyd iterations."""
    centroids = points[torch.randint(len(points), (1,), generator=generator)]
    nearest = torch.cdist(points, centroids)[:, 0] ** 2
    for _ in range(1, k):
        if nearest.sum() > 0:
            index = torch.multinomial(nearest / nearest.sum(), 1, generator=generator)
        else:  # fewer distinct points than centroids
            index = torch.randint(len(points), (1,), generator=generator)
        centroids = torch.cat([centroids, points[index]])
        nearest = torch.minimum(nearest, torch.cdist(points, points[index])[:, 0] ** 2)
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):  # re-seed empty clusters on the worst-represented points
            error = (points - centroids[assignment]).norm(dim=1)
            centroids[empty] = points[error.topk(len(empty)).indices]
    return centroids


@torch.no_grad()
def calibrate_codebooks(model: MimiModel, signals: list[torch.Tensor], iterations: int, seed: int) -> None:
    """Fit every codebook of ``model`` by k-means on the latents of ``signals`` (mono, 24 kHz).

    The semantic and the acoustic residual quantizers both quantize the encoder latents, each in its own
    projected space; within one, layer ``i`` is fitted on what layers ``< i`` leave unexplained.
    """
    generator = torch.Generator().manual_seed(seed)
    latents = torch.cat([model.encoder(signal[None, None]).latents for signal in signals], dim=-1)
    quantizer = model.quantizer
    for rvq in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
        projected = latents if rvq.input_proj is None else rvq.input_proj(latents)
        residual = projected[0].T
        for layer in rvq.layers:
            codebook = layer.codebook
            centroids = kmeans(residual, codebook.codebook_size, iterations, generator)
            codebook.cluster_usage.fill_(1.0)
            codebook.embed_sum.copy_(centroids)  # embed = embed_sum / cluster_usage
            codebook.initialized.fill_(1.0)
            codebook._embed = None  # drop the cached codebook (transformers computes it lazily)
            residual = residual - centroids[torch.cdist(residual, centroids).argmin(dim=1)]


@torch.no_grad()
def encode(model: MimiModel, signals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Codes ``[num_quantizers, frames]`` of each mono 24 kHz signal."""
    n_q = model.config.num_quantizers
    return [model.encode(s[None, None], num_quantizers=n_q).audio_codes[0] for s in signals]


def entropy(codes: torch.Tensor, codebook_size: int) -> float:
    """Entropy in bits of the empirical distribution of ``codes``."""
    probs = torch.bincount(codes, minlength=codebook_size).double() / len(codes)
    probs = probs[probs > 0]
    return round(-(probs * probs.log2()).sum().item(), 2)


def code_report(
    codes: list[torch.Tensor], signals: list[torch.Tensor], frame_size: int, codebook_size: int
) -> list[dict]:
    """Per codebook: entries used, entropy (bits) over all frames and over speech, silence stability.

    A frame is silent when it and the three frames before it (more than the encoder's receptive field) hold
    only zeros (the first three frames of a signal, which also see the encoder's start-up padding, are never
    silent), and speech when its RMS exceeds 0.01. Stability is the share of silent frames carrying the most
    common silent code.
    """
    silent, speech = [], []
    for code, signal in zip(codes, signals):
        padding = code.shape[-1] * frame_size - len(signal)
        frames = torch.nn.functional.pad(signal, (0, padding)).view(-1, frame_size)
        quiet = frames.abs().amax(dim=1) < SILENCE_LEVEL
        silent.append(torch.cat([torch.zeros(3, dtype=torch.bool), quiet]).unfold(0, 4, 1).all(dim=1))
        speech.append(frames.pow(2).mean(dim=1).sqrt() > 0.01)
    all_codes = torch.cat(codes, dim=-1)
    silent_mask, speech_mask = torch.cat(silent), torch.cat(speech)
    report = []
    for k, row in enumerate(all_codes):
        silent_codes = row[silent_mask]
        report.append(
            dict(
                codebook=k,
                used=int(row.unique().numel()),
                entropy_bits=entropy(row, codebook_size),
                speech_entropy_bits=entropy(row[speech_mask], codebook_size),
                silence_stability=round((silent_codes == silent_codes.mode().values).double().mean().item(), 3),
            )
        )
    return report


def initial_mimi(codebook_size: int, seed: int) -> MimiModel:
    """The small Mimi with its random initial weights (all-zero codebooks), the same for a given seed."""
    torch.manual_seed(seed)
    return MimiModel(MimiConfig(**MIMI_CONFIG, codebook_size=codebook_size)).eval()


def build_mimi(signals: list[torch.Tensor], codebook_size: int, iterations: int, seed: int) -> MimiModel:
    """A small random Mimi whose codebooks are calibrated on ``signals``."""
    model = initial_mimi(codebook_size, seed)
    calibrate_codebooks(model, signals, iterations, seed)
    return model


# --------------------------------------------------------------------------------------------------------
# Mimi's decoder: fitted to turn the codes of the training audio back into it.
# --------------------------------------------------------------------------------------------------------

# What decoding uses and encoding does not: the quantizer's output projections (codes -> latents), the upsampling, the
# decoder transformer and the SEANet decoder. Everything else (encoder, codebooks) stays as it was, so the codes of
# any audio are the same before and after the fit.
DECODER_PREFIXES = (
    "decoder.",
    "quantizer.semantic_residual_vector_quantizer.output_proj.",
    "quantizer.acoustic_residual_vector_quantizer.output_proj.",
)
MEL_FFT_SIZES = (512, 1024, 2048)  # STFT sizes of the multi-resolution mel loss (hop: a quarter; n_fft / 16 bands)
MEL_FLOOR = 1e-4  # added to the mel magnitudes (a sinusoid's amplitude) before the log: about 40 dB under speech
VOICED_RMS = 0.02  # a 40 ms frame louder than this whose normalised autocorrelation peaks over 0.5 is voiced
PITCH_RANGE_HZ = (60.0, 400.0)


@dataclass(frozen=True)
class DecoderFit:
    """How the decoder is fitted (the defaults made the shipped one): Adam on random segments of the training audio,
    linear warm-up then cosine decay, gradients clipped to norm 1. The target is the audio ``delay_frames`` later:
    the codes of this (untrained) encoder summarise the audio before them, and a causal decoder rebuilds it better
    late (a trial of 800 steps on time: held-out log-mel distance 0.57 against 0.45, with more noise in the silences
    around speech; 1 frame late: 0.50)."""

    steps: int = 1000
    batch_size: int = 8
    segment_frames: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    delay_frames: int = 2
    waveform_weight: float = 1.0  # L1 on the samples
    convergence_weight: float = 1.0  # spectral convergence of the mel magnitudes, beside the log-mel distance


class MelSpectrograms:
    """Magnitude mel spectrograms of ``[B, T]`` audio at the ``MEL_FFT_SIZES``: Hann window, a quarter hop, Slaney
    bands of peak 1, magnitudes divided by the window's sum (a full-scale sinusoid reads 0.5)."""

    def __init__(self, sampling_rate: int) -> None:
        self.resolutions = []
        for n_fft in MEL_FFT_SIZES:
            bank = mel_filter_bank(
                n_fft // 2 + 1, n_fft // 16, 0.0, sampling_rate / 2, sampling_rate, mel_scale="slaney"
            )
            self.resolutions.append((n_fft, torch.hann_window(n_fft), torch.from_numpy(bank).float()))

    def __call__(self, audio: torch.Tensor) -> list[torch.Tensor]:
        mels = []
        for n_fft, window, bank in self.resolutions:
            spectrum = torch.stft(audio, n_fft, n_fft // 4, window=window, return_complex=True)
            magnitude = (spectrum.real.square() + spectrum.imag.square() + 1e-12).sqrt() / window.sum()
            mels.append(torch.einsum("fm,bft->bmt", bank, magnitude))
        return mels


def log_mel_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Mean |ln(mel_a + floor) - ln(mel_b + floor)| over bands and frames, averaged over the resolutions."""
    return sum(((x + MEL_FLOOR).log() - (y + MEL_FLOOR).log()).abs().mean() for x, y in zip(a, b)) / len(a)


def spectral_convergence(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """||mel_a - mel_b|| / ||mel_b|| (Frobenius, over the batch), averaged over the resolutions: unlike the log
    distance, it weighs the loud parts, which keeps the decoder from playing speech too quietly."""
    return sum((x - y).norm() / (y.norm() + MEL_FLOOR * y.numel() ** 0.5) for x, y in zip(a, b)) / len(a)


def decoder_parameters(model: MimiModel) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.startswith(DECODER_PREFIXES)}


def codec_state(model: MimiModel) -> dict[str, torch.Tensor]:
    """Copies of every tensor that encoding uses (all but the decoder's)."""
    return {name: t.clone() for name, t in model.state_dict().items() if not name.startswith(DECODER_PREFIXES)}


def reset_decoder(model: MimiModel, seed: int) -> None:
    """Put the decoder of a Mimi built by this script back to its initial random weights (those ``build_mimi`` gave
    it), so that refitting it gives what the full build gives; refuses a Mimi whose encoder is not this seed's."""
    fresh = initial_mimi(model.config.codebook_size, seed)
    fresh_state, state = fresh.state_dict(), model.state_dict()
    encoder = [name for name in state if name.startswith(("encoder.",))]
    if state.keys() != fresh_state.keys() or not all(torch.equal(state[n], fresh_state[n]) for n in encoder):
        raise SystemExit(f"this Mimi was not built by this script with --seed {seed}: its encoder differs")
    with torch.no_grad():
        for name, parameter in decoder_parameters(model).items():
            parameter.copy_(fresh_state[name])


def pad_to_codes(signal: torch.Tensor, num_frames: int, frame_size: int, delay: int = 0) -> torch.Tensor:
    """``signal`` delayed by ``delay`` samples, cut or zero-padded to ``num_frames`` frames."""
    return torch.nn.functional.pad(signal, (delay, num_frames * frame_size - len(signal) - delay))


def fit_decoder(model: MimiModel, signals: list[torch.Tensor], fit: DecoderFit = DecoderFit(), seed: int = 0) -> float:
    """Train the decoder side of ``model`` (``DECODER_PREFIXES``) to rebuild ``signals`` (mono, 24 kHz) from their
    codes, ``fit.delay_frames`` late; the encoder and the codebooks are frozen (checked). Returns the seconds it took.

    Loss: L1 on the waveform + log-mel distance + spectral convergence (``MelSpectrograms``). The decoder's last
    convolution is first scaled so that its output has the loudness of ``signals``: an untrained decoder is hundreds of
    times louder, and bringing that down by gradient first teaches it silence, which it does not unlearn.
    """
    start = time.perf_counter()
    frozen = codec_state(model)
    parameters = decoder_parameters(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name in parameters)
    frame = model.config.frame_size
    codes = encode(model, signals)
    targets = [pad_to_codes(s, c.shape[-1], frame, fit.delay_frames * frame) for s, c in zip(signals, codes)]
    mels = MelSpectrograms(model.config.sampling_rate)

    with torch.no_grad():
        decoded = torch.cat([model.decode(c[None]).audio_values.flatten() for c in codes])
        gain = torch.cat(targets).square().mean().sqrt() / decoded.square().mean().sqrt()
        last = model.decoder.decoder_seanet.layers[-1].conv
        last.weight.mul_(gain)
        last.bias.mul_(gain)

    optimizer = torch.optim.Adam(parameters.values(), lr=fit.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / fit.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / fit.steps)),
    )
    generator = torch.Generator().manual_seed(seed)
    length = fit.segment_frames
    for step in range(fit.steps):
        batch_codes, batch_targets = [], []
        for index in torch.randint(len(signals), (fit.batch_size,), generator=generator).tolist():
            first = int(torch.randint(codes[index].shape[-1] - length + 1, (1,), generator=generator))
            batch_codes.append(codes[index][:, first : first + length])
            batch_targets.append(targets[index][first * frame : (first + length) * frame])
        audio, target = model.decode(torch.stack(batch_codes)).audio_values[:, 0], torch.stack(batch_targets)
        audio_mels, target_mels = mels(audio), mels(target)
        log_mel = log_mel_distance(audio_mels, target_mels)
        loss = (
            fit.waveform_weight * (audio - target).abs().mean()
            + log_mel
            + fit.convergence_weight * spectral_convergence(audio_mels, target_mels)
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters.values(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == fit.steps - 1:
            print(f"decoder step {step}: loss {loss.item():.3f}, log-mel {log_mel.item():.3f}", flush=True)

    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad[name])
    state = model.state_dict()
    if not all(torch.equal(state[name], tensor) for name, tensor in frozen.items()):
        raise AssertionError("fitting the decoder changed the encoder or the codebooks")
    return time.perf_counter() - start


def envelope_delay(decoded: torch.Tensor, original: torch.Tensor, hop: int, max_lag: int) -> int:
    """The lag (in ``hop`` samples, positive: ``decoded`` is late) that best correlates the two RMS envelopes."""
    n = min(len(decoded), len(original)) // hop
    a = decoded[: n * hop].view(n, hop).square().mean(dim=1).sqrt()
    b = original[: n * hop].view(n, hop).square().mean(dim=1).sqrt()
    a, b = a - a.mean(), b - b.mean()

    def correlation(lag: int) -> float:
        return float((a[max(lag, 0) : n + min(lag, 0)] * b[max(-lag, 0) : n - max(lag, 0)]).sum())

    return max(range(-max_lag, max_lag + 1), key=correlation)


def median_pitch(signals: list[torch.Tensor], sampling_rate: int) -> int | None:
    """Median F0 (Hz) of the voiced 40 ms frames of ``signals``, None without any. The period is the shortest lag
    within ``PITCH_RANGE_HZ`` where the normalised autocorrelation has a local maximum within 15% of its highest
    (not the highest itself, which is as often twice the period)."""
    size = round(0.04 * sampling_rate)
    shortest, longest = round(sampling_rate / PITCH_RANGE_HZ[1]), round(sampling_rate / PITCH_RANGE_HZ[0])
    periods = []
    for signal in signals:
        frames = signal[: len(signal) // size * size].view(-1, size).double()
        frames = frames[frames.square().mean(dim=1).sqrt() > VOICED_RMS]
        if not len(frames):
            continue
        frames = frames - frames.mean(dim=1, keepdim=True)
        correlation = torch.fft.irfft(torch.fft.rfft(frames, 2 * size).abs().square(), 2 * size)
        correlation = correlation[:, shortest - 1 : longest + 2] / correlation[:, :1]
        inner = correlation[:, 1:-1]
        peak = inner.max(dim=1, keepdim=True).values
        candidates = (inner >= 0.85 * peak) & (inner >= correlation[:, :-2]) & (inner >= correlation[:, 2:])
        voiced = peak[:, 0] > 0.5
        periods.append(candidates[voiced].double().argmax(dim=1) + shortest)  # argmax: the first True
    every = sampling_rate / torch.cat(periods or [torch.zeros(0)]).double()
    return round(every.median().item()) if len(every) else None


@torch.no_grad()
def decoder_quality(model: MimiModel, signals: list[torch.Tensor], delay_frames: int) -> dict:
    """How ``model`` rebuilds ``signals`` (mono 24 kHz, alternately left and right channels) from their codes, the
    decoded audio taken ``delay_frames`` early: log-mel distance (mean over signals), peak, RMS, measured delay (median
    over signals, envelope correlation at 10 ms), median pitch per channel; the same for the original audio."""
    frame, rate = model.config.frame_size, model.config.sampling_rate
    mels = MelSpectrograms(rate)
    delay = delay_frames * frame
    distances, delays, decoded, originals = [], [], [], []
    for signal, codes in zip(signals, encode(model, signals)):
        audio = model.decode(codes[None]).audio_values[0, 0]
        original = pad_to_codes(signal, codes.shape[-1], frame)
        delays.append(envelope_delay(audio, original, rate // 100, 50) * 10)
        audio = audio[delay:]
        original = original[: len(audio)]
        distances.append(log_mel_distance(mels(audio[None]), mels(original[None])).item())
        decoded.append(audio)
        originals.append(original)
    result = {}
    for name, audio in (("decoded", decoded), ("original", originals)):
        every = torch.cat(audio)
        result[name] = dict(
            peak=round(every.abs().max().item(), 2),
            rms=round(every.square().mean().sqrt().item(), 3),
            pitch_left_hz=median_pitch(audio[0::2], rate),
            pitch_right_hz=median_pitch(audio[1::2], rate),
        )
    result["decoded"]["log_mel_distance"] = round(sum(distances) / len(distances), 2)
    result["decoded"]["delay_ms"] = sorted(delays)[len(delays) // 2]
    return result


# --------------------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------------------


def folder_size(path: Path) -> int:
    """Apparent size of ``path`` and everything under it, as ``du -sb`` counts it."""
    return path.stat().st_size + sum(p.stat().st_size for p in path.rglob("*"))


def read_signals(folder: Path, names: list[str]) -> list[torch.Tensor]:
    """What Mimi sees of the written dialogues (the int16 FLAC, as the package reads it): left then right channel of
    each, mono float32 at 24 kHz."""
    signals = []
    for name in names:
        pcm, rate = sf.read(folder / name, dtype="float32")
        resampled = soxr.resample(pcm, rate, 24_000)
        signals += [torch.from_numpy(np.ascontiguousarray(resampled[:, c])) for c in range(2)]
    return signals


@dataclass
class DecoderReport:
    """A decoder fit and how the decoder rebuilds the held-out dialogues before and after it (``decoder_quality``)."""

    fit: DecoderFit
    seed: int
    seconds: float
    num_train: int  # dialogues
    num_eval: int
    before: dict
    after: dict


def fit_and_report(
    mimi: MimiModel, train: list[torch.Tensor], held_out: list[torch.Tensor], fit: DecoderFit, seed: int
) -> DecoderReport:
    """``fit_decoder`` on the ``train`` signals, measured on the ``held_out`` ones (two per dialogue)."""
    before = decoder_quality(mimi, held_out, fit.delay_frames)
    seconds = fit_decoder(mimi, train, fit, seed)
    after = decoder_quality(mimi, held_out, fit.delay_frames)
    print(json.dumps(dict(seconds=round(seconds), before=before, after=after)))
    return DecoderReport(fit, seed, seconds, len(train) // 2, len(held_out) // 2, before, after)


def save_mimi(mimi: MimiModel, folder: Path, signals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Save ``mimi`` into ``folder``, check that the saved one encodes and decodes ``signals`` as ``mimi`` does; returns
    the codes."""
    mimi.save_pretrained(folder)
    reloaded = MimiModel.from_pretrained(folder).eval()
    codes = encode(mimi, signals)
    if not all(torch.equal(a, b) for a, b in zip(codes, encode(reloaded, signals))):
        raise AssertionError("the saved Mimi does not encode like the calibrated one")
    with torch.no_grad():
        if not torch.equal(mimi.decode(codes[0][None]).audio_values, reloaded.decode(codes[0][None]).audio_values):
            raise AssertionError("the saved Mimi does not decode like the fitted one")
    return codes


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else "this CPU"


MIMI_HEADING = "## The Mimi codec\n"


def mimi_section(mimi: MimiModel, report: list[dict], decoder: DecoderReport) -> str:
    """The README's section on ``mimi/``, up to the next heading (``--fit-decoder-only`` rewrites it alone)."""
    config, fit, before, after = mimi.config, decoder.fit, decoder.before["decoded"], decoder.after["decoded"]
    original = decoder.after["original"]
    rows = "\n".join(
        f"| {r['codebook']} | {r['used']}/{config.codebook_size} | {r['entropy_bits']} "
        f"| {r['speech_entropy_bits']} | {r['silence_stability']} |"
        for r in report
    )
    delay_ms = round(fit.delay_frames * config.frame_size / config.sampling_rate * 1000)
    segment_s = fit.segment_frames * config.frame_size / config.sampling_rate
    ffts = "/".join(str(n) for n in MEL_FFT_SIZES)

    def pitch(value: int | None) -> str:
        return "none voiced" if value is None else f"{value} Hz"

    quality = "\n".join(
        f"| {name} | {q.get('log_mel_distance', 0)} | {q['peak']} | {q['rms']} "
        f"| {pitch(q['pitch_left_hz'])} | {pitch(q['pitch_right_hz'])} |"
        for name, q in (("untrained decoder", before), ("fitted decoder", after), ("original audio", original))
    )
    layers, parameters = config.num_hidden_layers, sum(p.numel() for p in mimi.parameters())
    codebooks = f"{config.num_quantizers} codebooks ({config.num_semantic_quantizers} semantic)"
    codebooks += f" of {config.codebook_size} entries"
    command = f"python scripts/make_dialogue_sample.py --fit-decoder-only --seed {decoder.seed}"
    if fit.steps != DecoderFit.steps:
        command += f" --decoder-steps {fit.steps}"
    left, right = after["pitch_left_hz"], after["pitch_right_hz"]
    if left and right and abs(left - right) < 0.15 * max(left, right):
        voices = (
            f"What comes back is where the speech is and how loud, silence where it is silent, but not the sample's "
            f"voices: both come out as one buzz of steady pitch ({left} and {right} Hz against "
            f"{original['pitch_left_hz']} and {original['pitch_right_hz']}). The codes of this untrained encoder carry "
            "little more than that to rebuild from."
        )
    elif left and right:
        voices = f"The two voices keep apart in pitch ({left} and {right} Hz)."
    else:
        voices = "The decoded audio has no voiced frames."
    return f"""{MIMI_HEADING}
`mimi/` holds a small transformers `MimiModel`, loaded by `MimiModel.from_pretrained`: {config.sampling_rate} Hz,
{config.frame_rate} frames/s, hidden size {config.hidden_size}, {config.num_filters} filters, {layers}
transformer layer, {codebooks}, {parameters} parameters in float32. Its encoder keeps its
random initial weights; its codebooks were fitted by k-means on this sample's audio (each channel of every dialogue),
so its codes follow the speech; its decoder was then trained to turn the codes back into the audio.

The Mimi codes of the sample (silence stability: the share of the frames that end at least 0.32 s of
silence which carry the most common code of such frames):

| codebook | entries used | entropy (bits) | entropy on speech (bits) | silence stability |
|---|---|---|---|---|
{rows}

The decoder side (the quantizer's output projections, the upsampling, the decoder transformer and the SEANet
decoder) was fitted to rebuild each channel of the {decoder.num_train} training dialogues (24 kHz) from its codes; the
encoder and the codebooks were frozen, so the codes are those the k-means codec gave. The fit: {fit.steps} Adam steps
of {fit.batch_size} random {segment_s:.2f} s segments, learning rate {fit.learning_rate} (linear warm-up over
{fit.warmup_steps} steps, then cosine decay); loss: L1 on the waveform + log-mel distance + spectral convergence of
mel spectrograms at STFT sizes {ffts}. The target is the audio {delay_ms} ms ({fit.delay_frames} frames) later: the
codes of this encoder summarise the audio before them, and the decoder rebuilds it better late (on time, a shorter
trial came out noisier around speech). The last decoder convolution was first scaled to the audio's loudness (an
untrained decoder is hundreds of times too loud, and learns silence first if left so). It took
{decoder.seconds:.0f} s on one thread of an {cpu_name()}, with

    {command}

How the codec rebuilds the {decoder.num_eval} held-out dialogues (`eval.jsonl`, both channels) from their codes:

| | log-mel distance | peak | RMS | pitch, left (system) | pitch, right (user) |
|---|---|---|---|---|---|
{quality}

Log-mel distance: mean |ln(mel + {MEL_FLOOR:g}) difference| over the {len(MEL_FFT_SIZES)} STFT sizes ({ffts}; n_fft/16
Slaney bands, magnitudes in units of a sinusoid's amplitude), the decoded audio taken {delay_ms} ms early. Peak and RMS:
over every sample. Pitch: median F0 of the voiced 40 ms frames. Delay of the decoded audio: {after['delay_ms']} ms
(envelope cross-correlation, median over the channels; the fit asks for {delay_ms} ms).
{textwrap.fill(voices, 116)}

"""


def replace_mimi_section(readme: str, section: str) -> str:
    """``readme`` with its ``MIMI_HEADING`` section (up to the next ``## `` heading) replaced by ``section``."""
    start = readme.find(MIMI_HEADING)
    if start < 0:
        raise SystemExit(f"the README has no {MIMI_HEADING.strip()!r} section to rewrite")
    end = readme.find("\n## ", start + len(MIMI_HEADING))
    return readme[:start] + section + readme[end + 1 :]


def write_readme(
    path: Path,
    args: argparse.Namespace,
    dialogues: list[Dialogue],
    vocabulary: set[str],
    mimi: MimiModel,
    report: list[dict],
    decoder: DecoderReport,
    espeak_version: str,
) -> None:
    """Describe the sample: contents, the Mimi codec, how it was made, licence."""
    n_train = len(dialogues) - args.num_eval
    seconds = [d.duration for d in dialogues]
    speech = {s: sum(d.speech_seconds[s] for d in dialogues) for s in CHANNEL}
    backchannels = ", ".join(f'"{b}"' for b in BACKCHANNELS)
    text = f"""# Sample spoken dialogues

A tiny synthetic dataset in kyutai's moshi-finetune format, with a matching small text tokenizer and a
small Mimi codec, for tests, the demo and quick experiments. It is far too small and too artificial to
train a useful model: it is there so that everything runs end to end in minutes on a CPU.

## Contents

- `dialogues/NNN.flac`: {len(dialogues)} two-voice English dialogues, {sum(seconds):.1f} s in all
  ({min(seconds):.1f} to {max(seconds):.1f} s each), stereo 16 kHz 16-bit lossless FLAC (moshi-finetune and
  this package read it like WAV).
  - Left channel: the system (Moshi) voice, espeak-ng `{VOICES[SYSTEM]}` (male, American English),
    {speech[SYSTEM]:.1f} s of speech.
  - Right channel: the user voice, espeak-ng `{VOICES[USER]}` (female, British English),
    {speech[USER]:.1f} s of speech.
  - Turns alternate after short pauses ({SHORT_PAUSE[0]} to {SHORT_PAUSE[1]} s), longer ones
    ({LONG_PAUSE[0]} to {LONG_PAUSE[1]} s) or overlapping ({OVERLAP[0]} to {OVERLAP[1]} s); the listener
    sometimes says {backchannels} during the other's turn.
  - Every sentence is synthesised on its own and starts on Mimi's {FRAME_SECONDS} s frame grid, so a sentence
    that recurs is encoded to mostly the same codes: real speech has no such alignment, but it gives a tiny
    model something learnable from three minutes of audio.
- `dialogues/NNN.json`: `{{"alignments": [[word, [start_s, end_s], speaker], ...]}}`, speaker
  `{SYSTEM}` (left channel) or `{USER}` (right channel). The word times are exact: they come from the
  synthesiser's word events, trimmed to the first and last non-silent sample of each word.
- `train.jsonl` ({n_train} dialogues, {sum(seconds[:n_train]):.1f} s) and `eval.jsonl`
  ({args.num_eval} dialogues, {sum(seconds[n_train:]):.1f} s), no dialogue in both:
  `{{"path": "dialogues/NNN.flac", "duration": seconds}}` per line.
- `tokenizer.model`: sentencepiece BPE model of {args.vocab_size} pieces trained on the dialogues' text
  ({len(vocabulary)} distinct words, from a small template grammar); ids unk 0, bos 1, eos 2, pad 3
  (Moshi uses 3 as the text padding id and 0 as the end of padding).
- `mimi/`: a small transformers `MimiModel` fitted to these dialogues (below).

{mimi_section(mimi, report, decoder)}## How it was made

    python scripts/make_dialogue_sample.py --seed {args.seed} --num-dialogues {args.num_dialogues} \\
        --num-eval {args.num_eval} --min-seconds {args.min_seconds} --max-seconds {args.max_seconds}

The script needs espeak-ng (libespeak-ng) and is deterministic for a given seed, espeak-ng version
(these files: espeak-ng {espeak_version}) and PyTorch build (it runs on one CPU thread). With `--fit-decoder-only` it
only refits the Mimi decoder on the dialogues already here, from the same initial weights as the full run (so with
the same result), and rewrites `mimi/` and the Mimi section above; that needs no espeak-ng.

## Licence

The speech is synthetic, produced by the espeak-ng synthesiser from text written by the script; it contains
no recorded voice and no third-party text. Distributed with the package under its Apache-2.0 licence.
"""
    path.write_text(text)


def write_sample(args: argparse.Namespace, folder: Path) -> int:
    """Write the whole sample into ``folder``; returns its size in bytes."""
    rng = random.Random(args.seed)
    espeak = Espeak()
    dialogues = [make_dialogue(rng, espeak, args.min_seconds, args.max_seconds) for _ in range(args.num_dialogues)]

    (folder / "dialogues").mkdir(parents=True)
    manifests: dict[str, list[str]] = {"train": [], "eval": []}
    for index, dialogue in enumerate(dialogues):
        check_alignments(dialogue)
        name = f"dialogues/{index:03d}"
        pcm = np.round(np.clip(dialogue.audio, -1.0, 1.0) * 32767).astype(np.int16)
        sf.write(folder / f"{name}.flac", pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        alignments = [[w, list(span), s] for w, span, s in dialogue.alignments]
        (folder / f"{name}.json").write_text(json.dumps({"alignments": alignments}) + "\n")
        split = "eval" if index >= len(dialogues) - args.num_eval else "train"
        manifests[split].append(json.dumps({"path": f"{name}.flac", "duration": len(pcm) / SAMPLE_RATE}))
    for split, lines in manifests.items():
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")

    lines = [line for d in dialogues for line in d.lines]
    (folder / "tokenizer.model").write_bytes(train_tokenizer(lines, args.vocab_size, args.seed))
    vocabulary = {word for line in lines for word in line.split()}

    # Mimi sees what the package will feed it: the written int16 audio, per channel, at 24 kHz
    signals = read_signals(folder, [f"dialogues/{index:03d}.flac" for index in range(len(dialogues))])
    mimi = build_mimi(signals, args.codebook_size, args.kmeans_iterations, args.seed)
    n_train = 2 * (len(dialogues) - args.num_eval)
    fit = DecoderFit(steps=args.decoder_steps)
    decoder = fit_and_report(mimi, signals[:n_train], signals[n_train:], fit, args.seed)
    codes = save_mimi(mimi, folder / "mimi", signals)
    report = code_report(codes, signals, mimi.config.frame_size, args.codebook_size)

    write_readme(folder / "README.md", args, dialogues, vocabulary, mimi, report, decoder, espeak.version)
    for r in report:
        print(json.dumps(r))
    print(
        f"{len(dialogues)} dialogues, {sum(d.duration for d in dialogues):.2f} s, "
        f"{len(vocabulary)} distinct words, train {len(manifests['train'])}, eval {len(manifests['eval'])}"
    )
    return folder_size(folder)


def refit_decoder(args: argparse.Namespace, folder: Path) -> int:
    """``--fit-decoder-only``: refit the decoder of the sample in ``folder`` (a copy of it) from its initial weights on
    its own dialogues, rewrite ``mimi/`` and the README's Mimi section; returns the folder's size in bytes."""
    names = {
        split: [json.loads(line)["path"] for line in (folder / f"{split}.jsonl").read_text().splitlines() if line]
        for split in ("train", "eval")
    }
    train, held_out = read_signals(folder, names["train"]), read_signals(folder, names["eval"])
    mimi = MimiModel.from_pretrained(folder / "mimi").eval()
    codec = codec_state(mimi)
    reset_decoder(mimi, args.seed)
    decoder = fit_and_report(mimi, train, held_out, DecoderFit(steps=args.decoder_steps), args.seed)
    signals = train + held_out  # the code report does not depend on their order
    codes = save_mimi(mimi, folder / "mimi", signals)
    saved = MimiModel.from_pretrained(folder / "mimi").state_dict()
    if not all(torch.equal(saved[name], tensor) for name, tensor in codec.items()):
        raise AssertionError("the refitted Mimi's encoder or codebooks differ from the sample's")
    report = code_report(codes, signals, mimi.config.frame_size, mimi.config.codebook_size)
    readme = folder / "README.md"
    readme.write_text(replace_mimi_section(readme.read_text(), mimi_section(mimi, report, decoder)))
    return folder_size(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "hf_moshi_userpred" / "sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-dialogues", type=int, default=28)
    parser.add_argument("--num-eval", type=int, default=5, help="held-out dialogues (the last ones)")
    parser.add_argument("--min-seconds", type=float, default=7.0)
    parser.add_argument("--max-seconds", type=float, default=8.0)
    parser.add_argument("--vocab-size", type=int, default=200, help="sentencepiece vocabulary size")
    parser.add_argument("--codebook-size", type=int, default=64, help="entries per Mimi codebook")
    parser.add_argument("--kmeans-iterations", type=int, default=30)
    parser.add_argument("--decoder-steps", type=int, default=DecoderFit.steps, help="Adam steps of the decoder fit")
    parser.add_argument(
        "--fit-decoder-only",
        action="store_true",
        help="only refit the Mimi decoder of the sample already in --output (built with --seed) on its dialogues and "
        "rewrite its mimi/ and README section; needs no espeak-ng",
    )
    args = parser.parse_args()
    if not 0 < args.num_eval < args.num_dialogues:
        parser.error("--num-eval must leave at least one training dialogue")

    torch.set_num_threads(1)  # same float reductions, hence same k-means and decoder fit, on every run
    output = args.output.resolve()
    if args.fit_decoder_only and not (output / "mimi").is_dir():
        parser.error(f"--fit-decoder-only: no sample with a mimi/ folder in {output}")
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        if args.fit_decoder_only:
            shutil.copytree(output, staging)
            size = refit_decoder(args, staging)
        else:
            size = write_sample(args, staging)
        if size > SIZE_BUDGET_BYTES:
            raise SystemExit(f"the sample takes {size} bytes, over {SIZE_BUDGET_BYTES}; {output} left as it was")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"wrote {output}: {size} bytes ({math.ceil(size / 1024)} KiB)")


if __name__ == "__main__":
    main()
