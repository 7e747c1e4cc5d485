"""Scores of a turn-taking predictor: a binary decision against labels ([`binary_metrics`], [`auc`]), how early a
signal detects the end of the user's turn ([`anticipation_frames`]), when a silence timer fires ([`timer_frames`],
[`timer_fires`]),
the per-pause and per-frame summaries of [`evaluate_turn_taking`] ([`ShiftHoldMetrics`], [`FrameMetrics`]), and its
result, [`TurnTakingReport`], with its JSON and Markdown forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..models.configuration_moshi_userpred import FRAME_RATE
from .report_format import milliseconds, number, percent
from .turn_taking_events import Pause

if TYPE_CHECKING:
    from .turn_taking_tradeoff import TradeoffPoint


@dataclass
class BinaryMetrics:
    """A binary prediction against labels (positive: shift, or backchannel). `auc` is threshold-free (the
    probability that a positive scores above a negative, ties half); for a yes/no predictor it equals the balanced
    accuracy. None where a class is empty."""

    balanced_accuracy: float | None
    f1: float | None
    auc: float | None
    recall: float | None  # true-positive rate
    specificity: float | None  # true-negative rate
    count: int


def binary_metrics(scores: Sequence[float], labels: Sequence[bool], threshold: float = 0.5) -> BinaryMetrics:
    """Balanced accuracy and F1 of `score >= threshold` as the positive class, and the scores' AUC."""
    scores_t = torch.tensor(list(scores), dtype=torch.float64)
    labels_t = torch.tensor(list(labels), dtype=torch.bool)
    predicted = scores_t >= threshold
    pos, neg = int(labels_t.sum()), int((~labels_t).sum())
    tp = int((predicted & labels_t).sum())
    tn = int((~predicted & ~labels_t).sum())
    fp = neg - tn
    recall = tp / pos if pos else None
    specificity = tn / neg if neg else None
    balanced = (recall + specificity) / 2 if pos and neg else None
    f1 = 2 * tp / (2 * tp + fp + (pos - tp)) if tp + fp + pos else None
    return BinaryMetrics(balanced, f1, auc(scores_t, labels_t), recall, specificity, len(labels_t))


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties count one half); None without both classes."""
    positive, negative = scores[labels], scores[~labels]
    if positive.numel() == 0 or negative.numel() == 0:
        return None
    greater = (positive[:, None] > negative[None]).double().sum()
    ties = (positive[:, None] == negative[None]).double().sum()
    return float((greater + 0.5 * ties) / (positive.numel() * negative.numel()))


def anticipation_frames(signal: torch.Tensor, pause: Pause, threshold: float) -> int | None:
    """How many frames before the end of the user's turn the signal crosses `threshold` and stays above it.

    `signal[b]` is what is known at frame boundary `b` (after frame `b - 1` has arrived); the turn ends at boundary
    `pause.end_frame + 1` (the end of the last frame with user speech). The crossing is the first boundary from
    which the signal stays >= threshold up to that end, searched back to the start of the turn's last IPU; when
    the signal is below the threshold at the end, the first later boundary where it is above it, before the system
    starts (a negative anticipation: the signal is late). None: it never crosses in that window.
    """
    end = pause.end_frame + 1
    T = signal.shape[0]
    if end < T and bool(signal[end] >= threshold):
        b = end
        while b - 1 >= pause.start_frame + 1 and bool(signal[b - 1] >= threshold):
            b -= 1
        return end - b
    stop = min(pause.system_onset if pause.system_onset is not None else T, T - 1)
    for b in range(end + 1, stop + 1):
        if bool(signal[b] >= threshold):
            return end - b
    return None


def timer_frames(ms: float, frame_rate: float = FRAME_RATE) -> int:
    """Whole silent frames a silence timer of `ms` waits for (it fires once that much silence has arrived)."""
    return max(math.ceil(ms * frame_rate / 1000 - 1e-9), 1)


def timer_fires(pause: Pause, frames: int) -> bool:
    """Whether a silence timer that waits `frames` whole silent frames takes the turn at `pause` in time: the mutual
    silence after the user's last speech frame (up to the user's next unit at a hold, up to the system's onset at a
    shift; to the end of the dialogue if neither comes) lasts at least `frames`.

    At a hold a firing timer cuts the user off. At a shift it answers no sooner than the recorded reply came: a
    timer that has not fired when the reply was due says "hold" there, since a later answer is not the turn taking
    the dialogue shows (how much later a patient timer would answer is the decision latency, `frames` itself).
    """
    if pause.shift:
        silence = pause.system_onset - pause.end_frame - 1
    else:
        silence = pause.silence_frames
    return silence is None or silence >= frames


@dataclass
class ShiftHoldMetrics:
    """One predictor at the user's pauses: shift-vs-hold [`BinaryMetrics`] (positive: shift), and the
    anticipation before the end of the user's turn, in ms (positive: before), median over the shifts (a shift the
    predictor never detects counts as the latest, so the median is None when most are missed), and the share of
    shifts detected. `decision_ms`: when the predictor decides, after the end of the user's last speech frame."""

    shift_hold: BinaryMetrics
    median_anticipation_ms: float | None
    detected: float | None
    decision_ms: float

    @classmethod
    def from_pauses(cls, scores: Sequence[float], labels: Sequence[bool], anticipation_ms: Sequence[float],
                    threshold: float, decision_ms: float) -> ShiftHoldMetrics:
        """From every pause's score and label (shift) and every shift's anticipation (-inf: never detected), of one
        run or pooled over several."""
        detected = [a for a in anticipation_ms if a != -math.inf]
        return cls(shift_hold=binary_metrics(scores, labels, threshold),
                   median_anticipation_ms=lower_median(anticipation_ms),
                   detected=len(detected) / len(anticipation_ms) if anticipation_ms else None,
                   decision_ms=decision_ms)


@dataclass
class FrameMetrics:
    """A signal's P(turn end) at every frame boundary where the outcome is known, against it: AUC and log-loss
    (mean binary cross-entropy, nats; a constant at the base rate scores its entropy); None without both outcomes."""

    auc: float | None
    log_loss: float | None
    count: int


def frame_metrics(scores: torch.Tensor, labels: torch.Tensor) -> FrameMetrics:
    """[`FrameMetrics`] of probabilities `scores` `[N]` against bool `labels` `[N]`."""
    if labels.numel() == 0:
        return FrameMetrics(None, None, 0)
    p = scores.double().clamp(1e-6, 1 - 1e-6)
    log_loss = float(torch.nn.functional.binary_cross_entropy(p, labels.double()))
    return FrameMetrics(auc(p, labels), log_loss, labels.numel())


@dataclass
class TurnTakingReport:
    """Result of [`evaluate_turn_taking`].

    Args:
        predictors: name -> [`ShiftHoldMetrics`]: `model` (the token table under the user branch's prediction),
            `vap_head` (the model's voice-activity head, when it has one), `repeat_last` and `unigram` (the table
            under those predictors' next-token distributions), `timer_{ms}ms` (a VAD endpointer: "turn over" once
            the user has been silent that long).
        backchannel: name -> [`BinaryMetrics`] of backchannel (positive) vs barge-in at user onsets during system
            speech, scored `onset_delay` frames after the onset (signal predictors only).
        frames: name -> [`FrameMetrics`] of each signal's `turn_end` at every boundary where the outcome is known.
        num_shifts, num_holds, num_backchannels, num_barge_ins: event counts; `num_dialogues`.
        threshold, horizon, turn_end_frames, kind, decision_delay, onset_delay: the settings.
        signal_thresholds: the threshold each signal predictor was decided at (`threshold` unless overridden).
        false_takeovers: per predictor, the share of holds it takes over: a signal reaching its threshold anywhere in
            the user's silence, a timer whose wait the silence outlasts.
        intervals: per predictor, bootstrap 95 % intervals (over the events) of `balanced_accuracy` (shift/hold),
            `median_anticipation_ms` and `backchannel_balanced_accuracy`: `(low, high)`, None where undefined.
        tradeoff: per signal, and `"timer"` for a patient silence timer, the false-takeover rate against the median
            decision latency over a sweep of its threshold (of its wait) ([`takeover_latency_curve`]).
        frame_ms: one frame in ms.
        timeline: one dialogue's arrays for the timeline plot (`user`, `system` activity, `turn_end` per predictor,
            `silence` `[T, horizon]` of the model, `events`), and every pause's `scores` (`labels`: shift; per
            predictor) and every shift's `anticipation_ms` per predictor (to pool several runs).
        plots: name -> PNG path.
    """

    predictors: dict[str, ShiftHoldMetrics]
    backchannel: dict[str, BinaryMetrics]
    frames: dict[str, FrameMetrics]
    num_shifts: int
    num_holds: int
    num_backchannels: int
    num_barge_ins: int
    num_dialogues: int
    threshold: float
    horizon: int
    turn_end_frames: int
    kind: str
    decision_delay: int
    onset_delay: int
    frame_ms: float
    signal_thresholds: dict[str, float] = field(default_factory=dict)
    false_takeovers: dict[str, float | None] = field(default_factory=dict)
    intervals: dict[str, dict[str, tuple[float, float] | None]] = field(default_factory=dict)
    tradeoff: dict[str, list[TradeoffPoint]] = field(default_factory=dict, repr=False)
    timeline: dict[str, Any] = field(default_factory=dict, repr=False)
    plots: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | int | str]:
        """Flat scalars for JSON: `"turn_taking/model/balanced_accuracy"`, `"turn_taking/timer_500ms/f1"`,
        `"turn_taking/model/median_anticipation_ms"`, `"turn_taking/model/backchannel_auc"`, counts, settings.
        Undefined metrics (None) are left out."""
        out: dict[str, Any] = {}
        for name, m in self.predictors.items():
            prefix = f"turn_taking/{name}/"
            out.update({prefix + key: value for key, value in vars(m.shift_hold).items()})
            out.update({prefix + "median_anticipation_ms": m.median_anticipation_ms,
                        prefix + "detected": m.detected, prefix + "decision_ms": m.decision_ms})
        out.update({f"turn_taking/{name}/threshold": value for name, value in self.signal_thresholds.items()})
        out.update({f"turn_taking/{name}/false_takeover": value for name, value in self.false_takeovers.items()})
        for name, intervals in self.intervals.items():
            for key, interval in intervals.items():
                if interval is not None:
                    out.update({f"turn_taking/{name}/{key}_ci_low": interval[0],
                                f"turn_taking/{name}/{key}_ci_high": interval[1]})
        for name, m in self.backchannel.items():
            out.update({f"turn_taking/{name}/backchannel_{key}": value for key, value in vars(m).items()})
        for name, m in self.frames.items():
            out.update({f"turn_taking/{name}/frame_{key}": value for key, value in vars(m).items()})
        out.update({f"turn_taking/{key}": getattr(self, key) for key in (
            "num_shifts", "num_holds", "num_backchannels", "num_barge_ins", "num_dialogues", "threshold", "horizon",
            "turn_end_frames", "kind", "decision_delay", "onset_delay")})
        return {key: value for key, value in out.items() if value is not None}

    def to_markdown(self) -> str:
        """Shift-vs-hold table (predictors as rows), then backchannel-vs-barge-in, then the counts and settings."""
        header = ("| predictor | decides at | balanced accuracy (95 % CI) | F1 | AUC | shift recall | hold recall | "
                  "median anticipation (95 % CI) | shifts detected | false takeovers |")
        lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in self.predictors.items():
            s, intervals = m.shift_hold, self.intervals.get(name, {})
            accuracy = percent(s.balanced_accuracy) + _interval(intervals.get("balanced_accuracy"), percent)
            anticipation = milliseconds(m.median_anticipation_ms, signed=True) + _interval(
                intervals.get("median_anticipation_ms"), lambda v: milliseconds(v, signed=True))
            lines.append(f"| {name} | +{m.decision_ms:.0f} ms | {accuracy} | {number(s.f1)} | {number(s.auc)} | "
                         f"{percent(s.recall)} | {percent(s.specificity)} | {anticipation} | {percent(m.detected)} | "
                         f"{percent(self.false_takeovers.get(name))} |")
        if self.backchannel:
            lines += ["", "| predictor | backchannel vs barge-in: balanced accuracy (95 % CI) | F1 | AUC |",
                      "|---|---:|---:|---:|"]
            lines += [f"| {name} | {percent(m.balanced_accuracy)}"
                      f"{_interval(self.intervals.get(name, {}).get('backchannel_balanced_accuracy'), percent)} | "
                      f"{number(m.f1)} | {number(m.auc)} |" for name, m in self.backchannel.items()]
        lines += ["", "| predictor | P(turn end) per frame: AUC | log-loss | frames |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {number(m.auc)} | {number(m.log_loss)} | {m.count} |"
                  for name, m in self.frames.items()]
        horizon_ms = self.horizon * self.frame_ms
        lines.append(
            f"\n{self.num_shifts} shifts, {self.num_holds} holds, {self.num_backchannels} backchannels, "
            f"{self.num_barge_ins} barge-ins over {self.num_dialogues} dialogues. Signal ({self.kind} table): "
            f"P(user silent over the last {self.turn_end_frames * self.frame_ms:.0f} ms of the next "
            f"{horizon_ms:.0f} ms), threshold {self._thresholds()}; decisions at the end of the user's last speech "
            f"frame + {self.decision_delay} frame(s); anticipation before the end of that frame (positive: early).")
        return "\n".join(lines)


    def _thresholds(self) -> str:
        differing = {name: t for name, t in self.signal_thresholds.items() if t != self.threshold}
        return f"{self.threshold:g}" + "".join(f", {name} {t:g}" for name, t in differing.items())


def _interval(interval: tuple[float, float] | None, form: Callable[[float], str]) -> str:
    return "" if interval is None else f" ({form(interval[0])} to {form(interval[1])})"


def lower_median(values: Sequence[float]) -> float | None:
    """The lower median; None when it is infinite (most events never detected) or there is nothing."""
    if not values:
        return None
    value = sorted(values)[(len(values) - 1) // 2]
    return None if math.isinf(value) else value


def balanced_accuracy(pairs: Sequence[tuple[float, bool]], threshold: float) -> float | None:
    """Balanced accuracy of `score >= threshold` on `(score, label)` pairs (what [`binary_metrics`] gives, without
    its AUC: cheap enough to bootstrap); None without both classes."""
    positives = [score >= threshold for score, label in pairs if label]
    negatives = [score < threshold for score, label in pairs if not label]
    if not positives or not negatives:
        return None
    return (sum(positives) / len(positives) + sum(negatives) / len(negatives)) / 2


__all__ = [
    "BinaryMetrics",
    "FrameMetrics",
    "ShiftHoldMetrics",
    "TurnTakingReport",
    "anticipation_frames",
    "auc",
    "balanced_accuracy",
    "binary_metrics",
    "frame_metrics",
    "lower_median",
    "timer_fires",
    "timer_frames",
]
