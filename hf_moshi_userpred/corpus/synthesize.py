"""`synthesize_corpus`: a synthetic conversational corpus in kyutai's moshi-finetune format, where silence cannot
decide the turn (`conversation.py`), with its text tokenizer, a small fitted Mimi and its statistics.

    summary = synthesize_corpus("corpus", CorpusOptions(hours=1.0), seed=0)

writes, into a new folder (built beside it and renamed into place once complete):

- `dialogues/NNNNN.flac`: stereo 16 kHz 16-bit FLAC, left the system, right the user;
  `dialogues/NNNNN.json`: `{"alignments": [[word, [start_s, end_s], speaker], ...]}`;
- `train.jsonl`, `eval.jsonl`: `{"path": ..., "duration": ...}` per line (the last dialogues held out);
- `tokenizer.model`: sentencepiece BPE trained on the training dialogues' words;
- `mimi/`: a small transformers Mimi, its encoder trained to keep the spectra (`encoder_fit.py`), its codebooks fitted
  by k-means and its decoder trained, all on training audio;
- `statistics.json`, `statistics.png`: the corpus as generated and as the evaluation sees it (`statistics.py`), the
  share of held-out sentences heard in training, the codec's clause-ending probe (`cue_probe.py`), the settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from transformers import MimiModel

from ..data.audio import load_mimi
from ..models.configuration_moshi_userpred import FRAME_RATE
from .codec import build_mimi
from .conversation import ConversationLog, ConversationSettings, make_conversation
from .corpus_options import CorpusOptions
from .cue_probe import clause_ending_probe
from .decoder_fit import DecoderFit, decoder_quality, fit_decoder
from .encoder_fit import EncoderFit
from .espeak import SAMPLE_RATE, Espeak
from .grammar import sentence_overlap
from .statistics import corpus_statistics, plot_corpus_statistics
from .timeline import Dialogue, check_alignments
from .tokenizer import train_tokenizer

logger = logging.getLogger(__name__)
MIMI_RATE = 24_000


@dataclass
class CorpusSummary:
    """What [`synthesize_corpus`] wrote: dialogue counts and hours per split, seconds it took, the statistics."""

    path: str
    train_dialogues: int
    eval_dialogues: int
    hours: float
    seconds: float
    statistics: dict

    def __str__(self) -> str:
        evaluated = self.statistics["evaluated"]["eval"]
        timers = ", ".join(f"{name[6:]} {value}" for name, value in evaluated["timer_balanced_accuracy"].items())
        return (f"{self.path}: {self.train_dialogues} training and {self.eval_dialogues} held-out dialogues, "
                f"{self.hours:.2f} h, in {self.seconds:.0f} s ({self.hours * 3600 / self.seconds:.0f}x real time); "
                f"held out: {evaluated['holds']} holds, {evaluated['shifts']} shifts, {evaluated['backchannels']} "
                f"backchannels, {evaluated['barge_ins']} barge-ins; silence timers' balanced accuracy: {timers}; "
                f"the last word alone: {self.statistics['last_word']['balanced_accuracy']}")


def _dialogues(rng: random.Random, espeak: Espeak, settings: ConversationSettings, options: CorpusOptions,
               hours: float) -> tuple[list[Dialogue], list[ConversationLog]]:
    dialogues, logs = [], []
    while sum(d.duration for d in dialogues) < hours * 3600:
        dialogue, log = make_conversation(rng, espeak, settings, rng.uniform(*options.dialogue_seconds))
        check_alignments(dialogue)
        dialogues.append(dialogue)
        logs.append(log)
    return dialogues, logs


def _write_dialogue(folder: Path, name: str, dialogue: Dialogue) -> float:
    """`name.flac` and `name.json` in `folder`; returns the duration of the written audio."""
    pcm = np.round(np.clip(dialogue.audio, -1.0, 1.0) * 32767).astype(np.int16)
    sf.write(folder / f"{name}.flac", pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    alignments = [[word, list(span), speaker] for word, span, speaker in dialogue.alignments]
    (folder / f"{name}.json").write_text(json.dumps({"alignments": alignments}) + "\n")
    return len(pcm) / SAMPLE_RATE


def _mimi_signals(dialogues: list[Dialogue], minutes: float | None = None) -> list[torch.Tensor]:
    """What Mimi sees of `dialogues` (the int16 audio as written, per channel, at 24 kHz), up to `minutes` of it."""
    signals, seconds = [], 0.0
    for dialogue in dialogues:
        pcm = np.round(np.clip(dialogue.audio, -1.0, 1.0) * 32767).astype(np.int16).astype(np.float32) / 32768
        resampled = soxr.resample(pcm, SAMPLE_RATE, MIMI_RATE)
        signals += [torch.from_numpy(np.ascontiguousarray(resampled[:, channel])) for channel in range(2)]
        seconds += 2 * dialogue.duration
        if minutes is not None and seconds >= minutes * 60:
            break
    return signals


def _codec(options: CorpusOptions, train: list[Dialogue], seed: int) -> tuple[MimiModel, dict[str, float]]:
    """The corpus' Mimi: `options.mimi` reused, or fitted on `options.codec_minutes` of the training audio (encoder,
    codebooks, then decoder); and the seconds each fit took."""
    if options.mimi is not None:
        return load_mimi(options.mimi), {}
    signals = _mimi_signals(train, options.codec_minutes)
    started = time.perf_counter()
    encoder_fit = EncoderFit(steps=options.encoder_steps) if options.encoder_steps else None
    mimi = build_mimi(signals, options.codebook_size, options.kmeans_iterations, seed, encoder_fit)
    encoder_seconds = time.perf_counter() - started
    decoder_seconds = fit_decoder(mimi, signals, DecoderFit(steps=options.decoder_steps), seed)
    return mimi, {"encoder_and_codebooks": round(encoder_seconds, 1), "decoder": round(decoder_seconds, 1)}


def synthesize_corpus(out: str | os.PathLike, options: CorpusOptions = CorpusOptions(),
                      settings: ConversationSettings = ConversationSettings(), seed: int = 0) -> CorpusSummary:
    """Write a synthetic corpus into the new folder `out` (see the module's docstring); deterministic for a seed,
    espeak-ng version and PyTorch build in a fresh process (espeak-ng's wave generator keeps state between calls, so
    after other speech in the same process the audio can differ by a few samples).

    Raises:
        ValueError: `out` exists and is not an empty folder.
        OSError: espeak-ng is not installed.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose a new one")
    started = time.perf_counter()
    rng = random.Random(seed)
    espeak = Espeak()
    train, train_logs = _dialogues(rng, espeak, settings, options, options.hours - options.held_out_hours)
    held_out, eval_logs = _dialogues(rng, espeak, settings, options, options.held_out_hours)
    logger.info("synthesised %d dialogues (%.2f h) in %.0f s", len(train) + len(held_out),
                sum(d.duration for d in train + held_out) / 3600, time.perf_counter() - started)

    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "dialogues").mkdir(parents=True)
        splits: dict[str, tuple[list, list[int]]] = {}
        for split, dialogues, first in (("train", train, 0), ("eval", held_out, len(train))):
            lines, alignments, frames = [], [], []
            for index, dialogue in enumerate(dialogues, first):
                name = f"dialogues/{index:05d}"
                duration = _write_dialogue(staging, name, dialogue)
                lines.append(json.dumps({"path": f"{name}.flac", "duration": duration}))
                alignments.append([[w, list(span), s] for w, span, s in dialogue.alignments])
                frames.append(math.ceil(duration * FRAME_RATE))
            (staging / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
            splits[split] = (alignments, frames)

        train_lines = [line for d in train for line in d.lines]
        (staging / "tokenizer.model").write_bytes(train_tokenizer(train_lines, options.vocab_size, seed))

        mimi, codec_seconds = _codec(options, train, seed)
        mimi.save_pretrained(staging / "mimi")
        signals = {"train": _mimi_signals(train), "eval": _mimi_signals(held_out)}
        probe = clause_ending_probe(mimi, {name: s[1::2] for name, s in signals.items()},
                                    {name: split[0] for name, split in splits.items()})
        # the first 30 s of 5 held-out dialogues, both channels: decoding is slow, and more changes the figures little
        quality = decoder_quality(mimi, [s[: 30 * MIMI_RATE] for s in signals["eval"][:10]], DecoderFit.delay_frames)

        statistics = corpus_statistics(splits, train_logs + eval_logs,
                                       sentence_overlap(train_lines, [line for d in held_out for line in d.lines]))
        statistics["codec"] = {"clause_ending_probe": probe, "decoder": quality,
                               "fit_seconds": codec_seconds, "reused": options.mimi}
        statistics["settings"] = {"seed": seed, **asdict(options), **asdict(settings), "espeak_ng": espeak.version}
        (staging / "statistics.json").write_text(json.dumps(statistics, indent=1) + "\n")
        plot_corpus_statistics(statistics, train_logs + eval_logs, staging / "statistics.png")
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    hours = sum(d.duration for d in train + held_out) / 3600
    return CorpusSummary(str(out), len(train), len(held_out), hours, time.perf_counter() - started, statistics)


__all__ = ["CorpusSummary", "synthesize_corpus"]
