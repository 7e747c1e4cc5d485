"""Turn taking from the user branch, evaluated: will the user be silent in the next frames, and is their turn over?

The signal (a token table under the user branch's predicted next token, or the model's voice-activity head) is
described with its table in `data/voice_activity.py` ([`fit_turn_taking_statistics`]); [`turn_taking_signal`]
computes it and is imported here from the remote-code file the streaming session uses.

**Evaluation** ([`evaluate_turn_taking`]) on held-out dialogues with word alignments: voice activity per 80 ms
frame from the alignments; events ([`find_events`], `turn_taking_events.py`): user pauses inside a turn (hold), user
turn ends (shift), user backchannels and user barge-ins over the system; shift-vs-hold prediction at each pause and
how far before the end of the user's turn the signal crosses its threshold (`turn_taking_metrics.py`, with the
report [`TurnTakingReport`]), next to
silence-duration timers (a VAD endpointer) and the same signal built from the unigram and repeat-last user
predictors; the plots are in `turn_taking_plots.py`.

    stats = fit_turn_taking_statistics(train, dialogue_alignments("encoded/train"), model.config)
    report = evaluate_turn_taking(model, held_out, dialogue_alignments("encoded/eval"), stats, plot_dir="plots")
    print(report.to_markdown())
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..data.voice_activity import KINDS, TurnTakingStatistics, dialogue_codes
from ..models.configuration_moshi_userpred import FRAME_RATE
from ..models.generation_moshi_text_constraints import turn_taking_signal  # the streaming session computes it too
from ..models.modeling_moshi_codes import ZERO_TOKEN_ID, check_codes
from ..models.modeling_moshi_voice_activity import voice_activity_targets
from .turn_taking_events import dialogue_events
from .turn_taking_metrics import (
    ShiftHoldMetrics,
    TurnTakingReport,
    anticipation_frames,
    balanced_accuracy,
    binary_metrics,
    frame_metrics,
    lower_median,
    timer_fires,
    timer_frames,
)
from .turn_taking_plots import plot_turn_taking
from .turn_taking_tradeoff import SWEEP, bootstrap_interval, hold_peak, takeover_latency_curve, timer_curve

if TYPE_CHECKING:
    from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration


# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def user_signals(
    model: MoshiUserPredForConditionalGeneration, codes: torch.Tensor, statistics: TurnTakingStatistics,
    kind: str = "token", window: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The signal of one dialogue, per predictor, indexed by frame boundary `b` (known after frame `b - 1`).

    Args:
        codes: `[1 + n_q, T]`.

    Returns:
        name -> (`silence` `[T, horizon]`, `turn_end` `[T]`) for `model` (the table under the teacher-forced user
        logits, windows of `window` frames), `vap_head` (the model's voice-activity head on the same forward, when
        it has one; its own horizon), `repeat_last` (the table under the last seen token) and `unigram` (training
        frequencies); NaN where a predictor has nothing (the model's first `lookahead - 1` boundaries, none at
        lookahead 1).
    """
    c = model.config
    k = statistics.codebook
    table = statistics.table(kind)
    codes = codes.long().cpu()  # `_forward_signals` validates them
    T = codes.shape[1]
    logits, head = _forward_signals(model, codes, k, window)  # boundary b predicts frame b + L - 1
    out = {}
    silence, turn_end = turn_taking_signal(logits, table)
    out["model"] = (silence, turn_end)
    if head is not None:
        out["vap_head"] = (head[:, :-1], head[:, -1])
    row = codes[1 + c.dep_q + k].cpu()
    unigram = statistics.unigram.float()
    previous = torch.cat([torch.tensor([ZERO_TOKEN_ID]), row[:-1]])
    distribution = torch.where((previous == ZERO_TOKEN_ID)[:, None], unigram[None],
                               torch.nn.functional.one_hot(previous.clamp_min(0), c.card).float())
    probs_table = table.float()
    repeat = distribution @ probs_table
    out["repeat_last"] = (repeat[:, :-1], repeat[:, -1])
    constant = (unigram @ probs_table).expand(T, -1)
    out["unigram"] = (constant[:, :-1], constant[:, -1])
    return out


@torch.no_grad()
def _forward_signals(model: MoshiUserPredForConditionalGeneration, codes: torch.Tensor, codebook: int,
                     window: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced user logits of `codebook` `[T, card]` of one dialogue `[1 + n_q, T]`, and the voice-activity
    head's probabilities `[T, horizon + 1]` (None without a head), in windows of `window` frames (default: the model's
    streaming window), on the CPU; both position-aligned (row `s` is what position `s` predicts)."""
    window = window or model.config.streaming_window
    codes = check_codes(codes[None].to(model.device), model.config)[0]
    logits, head = [], []
    L = model.config.user_prediction_lookahead
    for s in range(0, codes.shape[1], window):
        out = model(codes=codes[None, :, s : s + window])
        logits.append(out.user_logits[0, codebook].float().cpu())
        if out.voice_activity_logits is not None:
            head.append(torch.sigmoid(out.voice_activity_logits[0].float().cpu()))
    # user logits are target-aligned (row t scores frame t = position t - L + 1): back to positions
    return _shift(torch.cat(logits), L - 1), torch.cat(head) if head else None


def _shift(x: torch.Tensor, frames: int) -> torch.Tensor:
    """`x[b] <- x[b + frames]` (NaN past the end)."""
    if frames == 0:
        return x
    out = torch.full_like(x, float("nan"))
    out[: x.shape[0] - frames] = x[frames:]
    return out


def evaluate_turn_taking(
    model: MoshiUserPredForConditionalGeneration,
    dataset: Sequence[Mapping | torch.Tensor],
    alignments: Sequence[Sequence],
    statistics: TurnTakingStatistics,
    *,
    kind: str = "token",
    threshold: float = 0.5,
    signal_thresholds: Mapping[str, float] | None = None,
    timers_ms: Sequence[float] = (200, 500, 700, 1000),
    decision_delay: int = 0,
    onset_delay: int = 2,
    min_pause_frames: int = 2,
    max_backchannel_frames: int = 12,
    main_speaker: str = "SPEAKER_MAIN",
    window: int | None = None,
    timeline_dialogue: int = 0,
    plot_dir: str | os.PathLike | None = None,
) -> TurnTakingReport:
    """Shift-vs-hold prediction, anticipation of the user's turn end and backchannel-vs-barge-in on held-out
    dialogues, for the signal and its baselines.

    At each [`Pause`] (see [`find_events`]) the signal predictors decide at boundary `end_frame + 1 +
    decision_delay` (`decision_delay = 0`: as soon as the last frame with user speech has arrived) that the turn
    ended when `turn_end >= threshold`; a pause whose system onset comes before that boundary is left out (the
    teacher-forced system stream would give the answer away: the model sees the system's text of the frame it
    predicts). A silence timer of `ms` decides shift once both have been silent `timer_frames(ms)` frames, hold if
    the user speaks or the system answers before ([`timer_fires`]); it fires that many frames after the turn end. Backchannel vs barge-in is scored at
    boundary `onset + onset_delay` with `turn_end` (a backchannel is followed by silence). Per frame, each signal's
    `turn_end` is also scored against what followed at every boundary where it is known ([`FrameMetrics`]: many
    more decisions than the pauses, so a steadier comparison of the signals; no timer has an opinion there).

    Args:
        model: a model with a user branch (put in eval mode for the call).
        dataset: held-out dialogues, codes `[1 + n_q, T]` or dicts with `"codes"`.
        alignments: their word alignments (see [`dialogue_alignments`]).
        statistics: from [`fit_turn_taking_statistics`] on the training dialogues.
        kind: `"token"` or `"two_state"` table ([`TurnTakingStatistics.table`]).
        threshold: P(turn end) threshold of the signal predictors; `signal_thresholds` overrides it per signal
            name (`model`, `vap_head`, ...: each signal's own calibrated threshold).
        plot_dir: if given, write the plots there ([`plot_turn_taking`]).

    Raises:
        ValueError: no user branch, mismatched inputs, or no pause to score.
    """
    if not model.config.predict_user_audio:
        raise ValueError("evaluate_turn_taking: the model has no user branch (predict_user_audio=False)")
    if len(dataset) != len(alignments):
        raise ValueError(f"{len(dataset)} dialogues but {len(alignments)} alignment lists")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if statistics.token_table.shape[0] != model.config.card:
        raise ValueError(f"the statistics have {statistics.token_table.shape[0]} tokens, the model "
                         f"card={model.config.card}")
    frame_ms = 1000 / FRAME_RATE
    signal_thresholds = dict(signal_thresholds or {})
    timer_names = {f"timer_{ms:g}ms": timer_frames(ms) for ms in timers_ms}
    labels: list[bool] = []
    c = model.config
    signal_names = ("model", *(("vap_head",) if model.voice_activity_head is not None else ()), "repeat_last",
                    "unigram")
    thresholds = {name: signal_thresholds.get(name, threshold) for name in signal_names}
    signal_horizon = {name: (statistics.horizon, statistics.turn_end_frames) for name in signal_names}
    if model.voice_activity_head is not None:
        signal_horizon["vap_head"] = (c.voice_activity_horizon, c.voice_activity_turn_end_frames)
    frame_scores: dict[str, list[torch.Tensor]] = {name: [] for name in signal_names}
    frame_labels: dict[str, list[torch.Tensor]] = {name: [] for name in signal_names}
    scores: dict[str, list[float]] = {name: [] for name in (*signal_names, *timer_names)}
    anticipation: dict[str, list[float]] = {name: [] for name in scores}
    hold_peaks: dict[str, list[float]] = {name: [] for name in signal_names}
    sweep_latency: dict[str, dict[float, list[float]]] = {name: {t: [] for t in SWEEP} for name in signal_names}
    hold_silences_ms: list[float] = []
    onset_labels: list[bool] = []
    onset_scores: dict[str, list[float]] = {name: [] for name in signal_names}
    counts = {"shifts": 0, "holds": 0, "backchannels": 0, "barge_ins": 0}
    timeline: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        for i, (item, words) in enumerate(zip(dataset, alignments)):
            codes = dialogue_codes(item).long()
            T = codes.shape[1]
            events = dialogue_events(words, T, main_speaker, min_pause_frames=min_pause_frames,
                                     max_backchannel_frames=max_backchannel_frames)
            user, system = events.user_activity, events.system_activity
            signals = user_signals(model, codes, statistics, kind, window)
            frame_targets = {horizon: voice_activity_targets(user.long()[None], T, c.user_prediction_lookahead - 1,
                                                             *horizon)
                             for horizon in set(signal_horizon.values())}  # the table predictors share one
            for name in signal_names:
                targets, known = frame_targets[signal_horizon[name]]
                turn_end = signals[name][1]
                keep = known[0, :, -1] & ~turn_end.isnan()
                frame_scores[name].append(turn_end[keep])
                frame_labels[name].append(targets[0, keep, -1].bool())
            for pause in events.decidable_pauses(decision_delay):
                decide = pause.end_frame + 1 + decision_delay
                labels.append(pause.shift)
                counts["shifts" if pause.shift else "holds"] += 1
                if not pause.shift:
                    silence = pause.silence_frames
                    hold_silences_ms.append(math.inf if silence is None else silence * frame_ms)
                for name in signal_names:
                    turn_end = signals[name][1]
                    scores[name].append(float(turn_end[decide]))
                    if pause.shift:
                        ahead = anticipation_frames(turn_end, pause, thresholds[name])
                        anticipation[name].append(-math.inf if ahead is None else ahead * frame_ms)
                        for t, latencies in sweep_latency[name].items():
                            ahead = anticipation_frames(turn_end, pause, t)
                            latencies.append(math.inf if ahead is None else -ahead * frame_ms)
                    else:
                        hold_peaks[name].append(hold_peak(turn_end, pause))
                for name, frames in timer_names.items():
                    fires = timer_fires(pause, frames)
                    scores[name].append(1.0 if fires else 0.0)
                    if pause.shift:
                        anticipation[name].append(-frames * frame_ms if fires else -math.inf)
            for onset in events.onsets:
                at = onset.start_frame + onset_delay
                if at >= T:
                    continue
                onset_labels.append(onset.backchannel)
                counts["backchannels" if onset.backchannel else "barge_ins"] += 1
                for name in signal_names:
                    onset_scores[name].append(float(signals[name][1][at]))
            if i == timeline_dialogue:
                timeline = {"user": user, "system": system, "events": events,
                            "turn_end": {name: value[1] for name, value in signals.items()},
                            "silence": signals["model"][0], "name": _name(item, i)}
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("evaluate_turn_taking: no user pause to score (do the alignments mark a user?)")
    predictors = {}
    for name in scores:
        is_timer = name in timer_names
        predictors[name] = ShiftHoldMetrics.from_pauses(
            scores[name], labels, anticipation[name], 0.5 if is_timer else thresholds[name],
            (timer_names[name] if is_timer else decision_delay) * frame_ms)
    backchannel = {name: binary_metrics(onset_scores[name], onset_labels, thresholds[name])
                   for name in signal_names} if onset_labels else {}
    frames = {name: frame_metrics(torch.cat(frame_scores[name]), torch.cat(frame_labels[name]))
              for name in signal_names}
    report = TurnTakingReport(
        predictors=predictors, backchannel=backchannel, frames=frames, num_shifts=counts["shifts"], num_holds=counts["holds"],
        num_backchannels=counts["backchannels"], num_barge_ins=counts["barge_ins"], num_dialogues=len(dataset),
        threshold=threshold, signal_thresholds=thresholds, horizon=statistics.horizon, turn_end_frames=statistics.turn_end_frames, kind=kind,
        decision_delay=decision_delay, onset_delay=onset_delay, frame_ms=frame_ms, timeline=timeline,
    )
    for name in signal_names:
        report.false_takeovers[name] = (sum(p >= thresholds[name] for p in hold_peaks[name]) / len(hold_peaks[name])
                                        if hold_peaks[name] else None)
        report.tradeoff[name] = takeover_latency_curve(hold_peaks[name], sweep_latency[name])
    for name, frames in timer_names.items():
        report.false_takeovers[name] = (sum(s >= frames * frame_ms for s in hold_silences_ms) / len(hold_silences_ms)
                                        if hold_silences_ms else None)
    report.tradeoff["timer"] = timer_curve(hold_silences_ms, counts["shifts"])
    for name in scores:
        cut = 0.5 if name in timer_names else thresholds[name]
        report.intervals[name] = {
            "balanced_accuracy": bootstrap_interval(list(zip(scores[name], labels)),
                                                    lambda pairs, cut=cut: balanced_accuracy(pairs, cut)),
            "median_anticipation_ms": bootstrap_interval(anticipation[name], lower_median),
        }
        if name in backchannel:
            report.intervals[name]["backchannel_balanced_accuracy"] = bootstrap_interval(
                list(zip(onset_scores[name], onset_labels)),
                lambda pairs, cut=thresholds[name]: balanced_accuracy(pairs, cut))
    report.timeline["scores"] = {"labels": labels, **scores}  # per pause, for pooling over runs and the ROC plot
    report.timeline["anticipation_ms"] = anticipation  # per shift (-inf: never detected)
    if plot_dir is not None:
        report.plots = plot_turn_taking(report, plot_dir)
    return report


def _name(item: Mapping | torch.Tensor, index: int) -> str:
    return str(item.get("name", index)) if isinstance(item, Mapping) else str(index)


__all__ = ["evaluate_turn_taking", "turn_taking_signal", "user_signals"]
