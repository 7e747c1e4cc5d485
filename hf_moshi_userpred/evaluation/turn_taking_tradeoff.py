"""What an agent pays for answering sooner: the false-takeover rate at holds against the decision latency at shifts,
over a threshold sweep of each turn-taking signal and over the waiting time of a silence timer
([`takeover_latency_curve`], [`timer_curve`]); and bootstrap 95 % intervals of the per-event figures
([`bootstrap_interval`]).

A signal takes over at a hold when its P(turn end) reaches the threshold anywhere in the user's silence
([`hold_peak`]); it answers a shift when it crosses, before the end of the user's turn (negative latency:
anticipation) or after it, before the recorded reply ([`anticipation_frames`]; never: an infinite latency). A patient
silence timer of `t` takes over at every hold whose silence lasts `t`, and answers every shift `t` late.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .turn_taking_events import Pause
from .turn_taking_metrics import lower_median

SWEEP = tuple(round(0.05 * i, 2) for i in range(1, 20))  # P(turn end) thresholds of the trade-off curves
TIMER_SWEEP_MS = (80, 160, 240, 320, 400, 500, 600, 700, 800, 1000, 1200, 1500, 2000)


@dataclass
class TradeoffPoint:
    """One setting (`setting`: a threshold, or a timer's ms): the share of holds taken over and the median latency
    (ms after the end of the user's turn; negative: before it; None when most shifts are never answered)."""

    setting: float
    false_takeover: float | None
    median_latency_ms: float | None


def hold_peak(turn_end: torch.Tensor, pause: Pause) -> float:
    """The highest P(turn end) `turn_end` `[T]` reaches in the silence of the hold `pause`: at the boundaries from
    the end of the user's last speech frame up to the one before their next frame (to the end without one)."""
    end = pause.end_frame + 1
    stop = turn_end.shape[0] if pause.silence_frames is None else min(end + pause.silence_frames, turn_end.shape[0])
    return float(turn_end[end:stop].max()) if stop > end else float(turn_end[min(end, turn_end.shape[0] - 1)])


def takeover_latency_curve(hold_peaks: Sequence[float], shift_latencies: Mapping[float, Sequence[float]]
                           ) -> list[TradeoffPoint]:
    """A signal's trade-off over its thresholds: `hold_peaks` one per hold ([`hold_peak`]), `shift_latencies` per
    threshold one latency per shift in ms (inf: never answered)."""
    return [TradeoffPoint(threshold, sum(p >= threshold for p in hold_peaks) / len(hold_peaks) if hold_peaks else None,
                          lower_median(latencies))
            for threshold, latencies in sorted(shift_latencies.items())]


def timer_curve(hold_silences_ms: Sequence[float], num_shifts: int, timers_ms: Sequence[float] = TIMER_SWEEP_MS
                ) -> list[TradeoffPoint]:
    """A patient silence timer's trade-off: at `t` it takes over every hold whose silence lasts `t` (`inf`: to the
    end of the dialogue) and answers each of the `num_shifts` shifts `t` late."""
    return [TradeoffPoint(t, sum(s >= t for s in hold_silences_ms) / len(hold_silences_ms) if hold_silences_ms else None,
                          float(t) if num_shifts else None) for t in timers_ms]


def bootstrap_interval(samples: Sequence, statistic: Callable[[list], float | None], resamples: int = 1000,
                       seed: int = 0) -> tuple[float, float] | None:
    """The 95 % percentile interval of `statistic` over `resamples` resamplings with replacement of `samples`
    (events: pauses, shifts or onsets); resamples where the statistic is undefined are left out. None when fewer
    than half are defined."""
    if not samples:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        value = statistic([samples[rng.randrange(len(samples))] for _ in samples])
        if value is not None and not math.isinf(value):
            values.append(value)
    if len(values) < resamples / 2:
        return None
    values.sort()
    return values[int(0.025 * (len(values) - 1))], values[int(math.ceil(0.975 * (len(values) - 1)))]


__all__ = ["SWEEP", "TIMER_SWEEP_MS", "TradeoffPoint", "bootstrap_interval", "hold_peak", "takeover_latency_curve", "timer_curve"]
