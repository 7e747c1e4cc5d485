"""The turn-taking report's plots: one dialogue's timeline, the shift-vs-hold ROC and the false-takeover against
latency trade-off ([`plot_turn_taking`])."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..data.voice_activity import activity_spans
from .figures import save_figures
from .report_format import number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .turn_taking_metrics import TurnTakingReport


def plot_turn_taking(report: TurnTakingReport, plot_dir: str | os.PathLike) -> dict[str, str]:
    """Write `turn_taking_timeline.png` (one dialogue: both speakers' activity, the model's P(user silent) over the
    horizon as a heat map, P(turn end) of each predictor with the threshold, shifts and holds marked) and
    `turn_taking_roc.png` (shift-vs-hold ROC of the signal predictors, the timers as points) and
    `turn_taking_tradeoff.png` (false takeovers at holds against the median latency at shifts, over a threshold
    sweep of each signal and the wait of a silence timer).

    Raises:
        ImportError: matplotlib is missing (`pip install 'hf_moshi_userpred[plots]'`).
    """
    drawings = {"turn_taking_roc": (lambda figure: _plot_roc(report, figure), (5, 5))}
    if report.tradeoff:
        drawings["turn_taking_tradeoff"] = (lambda figure: _plot_tradeoff(report, figure), (6, 5))
    if report.timeline.get("user") is not None:
        drawings["turn_taking_timeline"] = (lambda figure: _plot_timeline(report, figure), (11, 6))
    return save_figures(plot_dir, drawings)


def _plot_timeline(report: TurnTakingReport, figure: Figure) -> Figure:
    t = report.timeline
    ms = report.frame_ms / 1000
    activity, heat, curves = figure.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2, 2]})
    for y, name, color in ((1, "user", "C1"), (0, "system", "C0")):
        activity.broken_barh(activity_spans(t[name], ms), (y - 0.4, 0.8), color=color)
    activity.set(yticks=[0, 1], yticklabels=["system", "user"], title=f"Turn taking, dialogue {t['name']}")
    silence = t["silence"].T.numpy()
    image = heat.imshow(silence, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1,
                        extent=(0, silence.shape[1] * ms, 0.5, silence.shape[0] + 0.5))
    heat.set(ylabel="frames ahead", title="model: P(user silent n frames ahead)")
    figure.colorbar(image, ax=heat, fraction=0.02, pad=0.01)
    times = [b * ms for b in range(t["user"].shape[0])]
    for name, values in t["turn_end"].items():
        curves.plot(times, values.numpy(), label=name, lw=2 if name == "model" else 1)
    curves.axhline(report.threshold, color="k", ls="--", lw=0.8, label="threshold")
    for pause in t["events"].pauses:
        curves.axvline((pause.end_frame + 1) * ms, color="C3" if pause.shift else "C2", lw=1, alpha=0.7)
    curves.set(xlabel="time (s): value at a frame boundary, known once the frame before it arrived",
               ylabel="P(turn end)", ylim=(-0.02, 1.02),
               title="P(user's turn ends within the horizon); red: shift, green: hold (end of user speech)")
    curves.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    return figure


def _roc(scores: Sequence[float], labels: Sequence[bool]) -> tuple[list[float], list[float]]:
    pos = sum(labels)
    neg = len(labels) - pos
    fpr, tpr = [0.0], [0.0]
    for threshold in sorted(set(scores), reverse=True):
        fpr.append(sum(s >= threshold and not y for s, y in zip(scores, labels)) / max(neg, 1))
        tpr.append(sum(s >= threshold and y for s, y in zip(scores, labels)) / max(pos, 1))
    fpr.append(1.0)
    tpr.append(1.0)
    return fpr, tpr


def _plot_roc(report: TurnTakingReport, figure: Figure) -> Figure:
    ax = figure.subplots()
    scores = report.timeline.get("scores", {})
    labels = scores.get("labels", [])
    for name in scores:
        if name != "labels" and not name.startswith("timer_"):
            metrics = report.predictors[name].shift_hold
            ax.plot(*_roc(scores[name], labels), label=f"{name} (AUC {number(metrics.auc)})")
    for name, m in report.predictors.items():
        if name.startswith("timer_") and m.shift_hold.specificity is not None and m.shift_hold.recall is not None:
            ax.plot(1 - m.shift_hold.specificity, m.shift_hold.recall, "o",
                    label=f"{name} (decides +{m.decision_ms:.0f} ms)")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false shift rate (holds called shifts)", ylabel="shift recall", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02), title=f"Shift vs hold ({report.num_shifts} shifts, {report.num_holds} holds)")
    ax.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    return figure


def _plot_tradeoff(report: TurnTakingReport, figure: Figure) -> Figure:
    ax = figure.subplots()
    for name, points in report.tradeoff.items():
        shown = [p for p in points if p.false_takeover is not None and p.median_latency_ms is not None]
        if not shown:
            continue
        latency, takeover = [p.median_latency_ms for p in shown], [p.false_takeover for p in shown]
        if name == "timer":
            ax.plot(latency, takeover, "s--", color="gray", ms=4, label="silence timer (its wait)")
            for p in shown:
                ax.annotate(f"{p.setting:g}", (p.median_latency_ms, p.false_takeover), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
            continue
        line, = ax.plot(latency, takeover, ".-", label=f"{name} (threshold sweep)")
        chosen = report.signal_thresholds.get(name)
        for p in shown:
            if chosen is not None and abs(p.setting - chosen) < 1e-9:
                ax.plot(p.median_latency_ms, p.false_takeover, "o", color=line.get_color(), ms=9, mfc="none",
                        label=f"{name} at its threshold {chosen:g}")
    ax.axvline(0, color="k", lw=0.6, ls=":")
    ax.set(xlabel="median latency at shifts (ms after the end of the user's turn; < 0: before it)",
           ylabel="false takeovers (share of holds taken over)", ylim=(-0.02, 1.02),
           title=f"Answering sooner vs cutting in ({report.num_shifts} shifts, {report.num_holds} holds)")
    if ax.get_legend_handles_labels()[0]:  # nothing to draw without holds
        ax.legend(loc="upper right", fontsize=7)
    figure.tight_layout()
    return figure


__all__ = ["plot_turn_taking"]
