"""What a synthetic corpus holds, as generated and as the turn-taking evaluation will see it, and a plot of it.

- **Generated** (seconds, from the [`ConversationLog`]s): the user's and the system's holds, gaps and overlaps,
  hold cues and turn endings, backchannels and barge-ins.
- **As evaluated** (80 ms frames, from the written word alignments through the evaluation's own event finder): the
  user's holds and shifts that a predictor can be scored at, backchannels and barge-ins over the system, and the
  balanced accuracy silence timers reach at the user's pauses ([`timer_fires`]: a timer takes the turn when the
  silence lasts its length before anyone speaks).
- **The lexical cue** ([`lexical_cue`]): how well the user's last word alone tells a shift from a hold.

    statistics = corpus_statistics(splits, logs)      # {"generated": ..., "evaluated": {"train": ..., "eval": ...}}
    plot_corpus_statistics(statistics, "DIR/statistics.png")
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from ..evaluation.turn_taking_events import dialogue_events
from ..evaluation.turn_taking_metrics import binary_metrics, timer_fires, timer_frames
from ..models.configuration_moshi_userpred import FRAME_RATE
from .conversation import ConversationLog
from .timeline import SYSTEM, USER

TIMERS_MS = (200, 500, 700, 1000)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def distribution(seconds: Sequence[float]) -> dict:
    """Count, mean, quantiles and the share over 700 ms of durations in seconds (None when empty)."""
    values = np.asarray(seconds, dtype=float)
    if not len(values):
        return {"count": 0}
    return {"count": int(len(values)), "mean_s": round(float(values.mean()), 3),
            **{f"q{round(q * 100)}_s": round(float(np.quantile(values, q)), 3) for q in QUANTILES},
            "share_over_700ms": round(float((values > 0.7).mean()), 3)}


def generated_statistics(logs: Sequence[ConversationLog]) -> dict:
    """Per speaker: hold and gap distributions (gaps: >= 0; overlaps: the overlapped seconds), the share of turn
    changes that overlap, hold cues, turn endings; backchannels and barge-ins by who said them."""
    out = {}
    for side, name in ((USER, "user"), (SYSTEM, "system")):
        holds = [h for log in logs for h in log.holds[side]]
        gaps = [g for log in logs for g in log.gaps[side]]
        cues: dict[str, int] = {}
        endings: dict[str, int] = {}
        for log in logs:
            for cue in log.hold_cues[side]:
                cues[cue] = cues.get(cue, 0) + 1
            for ending in log.turn_endings[side]:
                endings[ending] = endings.get(ending, 0) + 1
        out[name] = {
            "holds": distribution(holds),
            "gaps": distribution([g for g in gaps if g >= 0]),
            "overlaps": distribution([-g for g in gaps if g < 0]),
            "overlap_share": round(sum(g < 0 for g in gaps) / len(gaps), 3) if gaps else None,
            "hold_cues": dict(sorted(cues.items())),
            "turn_endings": dict(sorted(endings.items())),
            "backchannels": sum(log.backchannels[side] for log in logs),
            "barge_ins": sum(log.barge_ins[side] for log in logs),
        }
    out["user"]["barge_ins_held_on_by_system"] = sum(log.held_on for log in logs)
    return out


def evaluated_statistics(alignments: Sequence[Sequence], num_frames: Sequence[int],
                         timers_ms: Sequence[float] = TIMERS_MS) -> dict:
    """The user's turn-taking events on the 80 ms frame grid, as `evaluate --turn-taking` finds them in these
    dialogues' word alignments, and the silence timers' shift/hold balanced accuracy at the decidable pauses."""
    holds = shifts = backchannels = barge_ins = 0
    hold_silences, shift_silences = [], []
    labels: list[bool] = []
    decisions: dict[str, list[float]] = {f"timer_{ms:g}ms": [] for ms in timers_ms}
    frames = {f"timer_{ms:g}ms": timer_frames(ms) for ms in timers_ms}
    for words, T in zip(alignments, num_frames):
        events = dialogue_events(words, T)
        for pause in events.decidable_pauses():
            labels.append(pause.shift)
            if pause.shift:
                shifts += 1
                shift_silences.append((pause.system_onset - pause.end_frame - 1) / FRAME_RATE)
            else:
                holds += 1
                hold_silences.append(pause.silence_frames / FRAME_RATE)
            for name, timer in frames.items():
                decisions[name].append(1.0 if timer_fires(pause, timer) else 0.0)
        backchannels += sum(onset.backchannel for onset in events.onsets)
        barge_ins += sum(not onset.backchannel for onset in events.onsets)
    timers = {name: binary_metrics(scores, labels).balanced_accuracy for name, scores in decisions.items()}
    return {
        "dialogues": len(num_frames), "hours": round(sum(num_frames) / FRAME_RATE / 3600, 3),
        "holds": holds, "shifts": shifts, "backchannels": backchannels, "barge_ins": barge_ins,
        "hold_silence": distribution(hold_silences), "shift_silence": distribution(shift_silences),
        "timer_balanced_accuracy": {name: None if v is None else round(v, 3) for name, v in timers.items()},
    }


def last_words(alignments: Sequence, num_frames: int) -> tuple[list[str], list[bool]]:
    """The user's last word before each decidable pause of one dialogue, and the labels (True: shift)."""
    user_words = sorted((start, word.lower()) for word, (start, _), speaker in alignments if speaker == USER)
    words, labels = [], []
    for pause in dialogue_events(alignments, num_frames).decidable_pauses():
        end = (pause.end_frame + 1) / FRAME_RATE
        spoken = [word for start, word in user_words if start < end]
        if spoken:
            words.append(spoken[-1])
            labels.append(pause.shift)
    return words, labels


def lexical_cue(train: tuple[Sequence[Sequence], Sequence[int]], held_out: tuple[Sequence[Sequence], Sequence[int]]
                ) -> dict:
    """How much the last word alone decides shift / hold: P(shift | the user's last word before the pause), counted
    on the training dialogues (add-one smoothed, unseen words at the prior) and scored on the held-out ones at the
    training shift rate (balanced accuracy, AUC). A ceiling for the lexical cue that a model must hear in the audio;
    the melody over the word adds to it."""
    counts: dict[str, list[int]] = {}
    for words, T in zip(*train):
        for word, shift in zip(*last_words(words, T)):
            counts.setdefault(word, [0, 0])[shift] += 1
    total = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
    if not all(total):
        return {"balanced_accuracy": None, "auc": None}
    prior = total[1] / sum(total)
    scores, labels = [], []
    for words, T in zip(*held_out):
        for word, shift in zip(*last_words(words, T)):
            holds, shifts = counts.get(word, (0, 0))
            scores.append((shifts + prior) / (holds + shifts + 1))
            labels.append(shift)
    metrics = binary_metrics(scores, labels, prior)
    return {"balanced_accuracy": None if metrics.balanced_accuracy is None else round(metrics.balanced_accuracy, 3),
            "auc": None if metrics.auc is None else round(metrics.auc, 3), "words": len(counts)}


def corpus_statistics(splits: Mapping[str, tuple[Sequence[Sequence], Sequence[int]]],
                      logs: Sequence[ConversationLog], sentence_overlap: float | None = None) -> dict:
    """`{"generated": generated_statistics(logs), "evaluated": {split: evaluated_statistics(...)}, "last_word":
    lexical_cue(...)}` for `splits` (name -> (alignments, frame counts); `last_word` when they are "train" and
    "eval"), with the share of held-out sentences also in training."""
    statistics = {"generated": generated_statistics(logs),
                  "evaluated": {name: evaluated_statistics(*split) for name, split in splits.items()}}
    if "train" in splits and "eval" in splits:
        statistics["last_word"] = lexical_cue(splits["train"], splits["eval"])
    if sentence_overlap is not None:
        statistics["held_out_sentences_in_training"] = round(sentence_overlap, 3)
    return statistics


def plot_corpus_statistics(statistics: Mapping, logs: Sequence[ConversationLog], path: str | os.PathLike) -> str:
    """Two panels: the user's holds against the gaps before the system's replies (overlaps negative), and the
    silence timers' balanced accuracy per split against chance. Returns the PNG's path."""
    from ..evaluation.figures import save_figures

    holds = [h for log in logs for h in log.holds[USER]]
    gaps = [g for log in logs for g in log.gaps[USER]]

    def draw(figure) -> None:
        left, right = figure.subplots(1, 2)
        bins = np.linspace(-0.6, 2.0, 53)
        left.hist(gaps, bins=bins, alpha=0.6, label=f"gaps before a reply ({len(gaps)})")
        left.hist(holds, bins=bins, alpha=0.6, label=f"holds inside a turn ({len(holds)})")
        left.set_xlabel("user silence (s); negative: the reply overlaps")
        left.set_ylabel("count")
        left.set_title("The user's pauses, as generated")
        left.legend(fontsize=8)
        for split, evaluated in statistics["evaluated"].items():
            timers = evaluated["timer_balanced_accuracy"]
            right.plot([int(name[6:-2]) for name in timers], [math.nan if v is None else v for v in timers.values()],
                       marker="o", label=f"{split} ({evaluated['holds']} holds, {evaluated['shifts']} shifts)")
        right.axhline(0.5, color="grey", linestyle=":", label="chance")
        right.axhline(0.65, color="red", linestyle="--", label="0.65")
        right.set_ylim(0, 1)
        right.set_xlabel("silence timer (ms)")
        right.set_ylabel("shift/hold balanced accuracy")
        right.set_title("Silence timers at the user's pauses")
        right.legend(fontsize=8)
        figure.tight_layout()

    directory, name = os.path.split(os.fspath(path))
    return save_figures(directory or ".", {os.path.splitext(name)[0]: (draw, (11, 4))})[os.path.splitext(name)[0]]


__all__ = ["TIMERS_MS", "corpus_statistics", "evaluated_statistics", "generated_statistics", "plot_corpus_statistics"]
