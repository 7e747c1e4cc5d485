"""Two speakers' utterances laid out on the two channels of a dialogue, rendered to stereo audio and moshi-finetune
word alignments (left channel: the system, `SPEAKER_MAIN`; right: the user, `SPEAKER_USER`).

    timeline = Timeline()
    timeline.place(USER, 0.4, utterance)
    dialogue = timeline.render(duration=12.0)
    check_alignments(dialogue)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .espeak import SAMPLE_RATE, SILENCE_LEVEL, Utterance

SYSTEM = "SPEAKER_MAIN"
USER = "SPEAKER_USER"
CHANNEL = {SYSTEM: 0, USER: 1}


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
        """Put ``utterance`` on ``speaker``'s channel at ``start`` (seconds); returns where it ends."""
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


def check_alignments(dialogue: Dialogue) -> None:
    """Every word's span holds speech on its channel; the channel is silent between words apart by >= 0.1 s (raises
    RuntimeError otherwise: the alignments would mislead whatever is trained on them)."""
    margin = round(0.02 * SAMPLE_RATE)
    for speaker, channel in CHANNEL.items():
        signal = dialogue.audio[:, channel]
        times = [span for _, span, s in dialogue.alignments if s == speaker]
        spans = [(round(b * SAMPLE_RATE), round(e * SAMPLE_RATE)) for b, e in times]
        for b, e in spans:
            if np.sqrt(np.mean(signal[b:e] ** 2)) < 0.01:
                raise RuntimeError(f"{speaker}: no speech in the word at {b / SAMPLE_RATE:.3f} s")
        gaps = zip([0] + [e for _, e in spans], [b for b, _ in spans] + [len(signal)])
        for b, e in gaps:
            if e - b >= 0.1 * SAMPLE_RATE and np.abs(signal[b + margin : e - margin]).max() > SILENCE_LEVEL:
                raise RuntimeError(f"{speaker}: sound between words, at {b / SAMPLE_RATE:.3f} s")


__all__ = ["CHANNEL", "SYSTEM", "USER", "Dialogue", "Timeline", "check_alignments"]
