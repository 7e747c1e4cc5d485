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
import json
import logging
import math
import os
import random
import re
import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from transformers import MimiModel

from hf_moshi_userpred.corpus.codec import build_mimi, code_report, encode
from hf_moshi_userpred.corpus.decoder_fit import (
    MEL_FFT_SIZES,
    MEL_FLOOR,
    DecoderFit,
    codec_state,
    decoder_quality,
    fit_decoder,
    reset_decoder,
)
from hf_moshi_userpred.corpus.espeak import SAMPLE_RATE, Espeak, Utterance
from hf_moshi_userpred.corpus.timeline import CHANNEL, SYSTEM, USER, Dialogue, Timeline, check_alignments
from hf_moshi_userpred.corpus.tokenizer import train_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
SIZE_BUDGET_BYTES = 4_800_000
VOICES = {SYSTEM: "en-us+m3", USER: "en-gb-x-rp+f3"}

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
# Dialogues: turns and backchannels laid out on two channels.
# --------------------------------------------------------------------------------------------------------


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

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the decoder fit's progress
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
