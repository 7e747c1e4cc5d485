"""The demo's results: the figures it measured ([`summarize`]), the summary table it prints ([`DemoResult`]),
`report.md` ([`report_markdown`]) and its own plots ([`plot_demo`]: loss curves, speculation)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluation.dialogue_behaviour import DialogueBehaviourReport, setting_name
from ..evaluation.figures import save_figures
from ..evaluation.turn_taking_metrics import TurnTakingReport
from ..evaluation.user_prediction import UserPredictionReport
from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration
from ..serving.stream_result import StreamResult

TURN_HOLD_THRESHOLD = 0.5  # the demo's turn hold: no new word while P(turn end) < 0.5


@dataclass
class DemoResult:
    """What [`run_demo`] measured and wrote.

    Args:
        output_dir: where everything is (`encoded/`, `model/`, `stream/`, `plots/`, `report.md`).
        report: the held-out user-prediction report.
        stream: the speculative streaming run over the held-out dialogue.
        lossless: the speculative run's tokens equal plain streaming's.
        reload_identical: the `trust_remote_code` reload gives identical logits.
        summary: the printed table's rows (name -> value) as numbers, also in `summary.json`.
        plots: name -> PNG path.
        behaviour: the system's dialogue behaviour on the held-out dialogues, without and with the turn hold.
        turn_taking: the turn-taking signals at the held-out user pauses against silence timers.
    """

    output_dir: Path
    report: UserPredictionReport
    stream: StreamResult
    lossless: bool
    reload_identical: bool
    summary: dict[str, float | int | bool | str] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    behaviour: DialogueBehaviourReport | None = None
    turn_taking: TurnTakingReport | None = None

    def describe(self) -> str:
        """The summary table and where the report and the model are."""
        return (f"{summary_table(self.summary)}\n\nreport: {self.output_dir / 'report.md'}  "
                f"model: {self.output_dir / 'model'}")



def summarize(report: UserPredictionReport, stream: StreamResult, plain_ms: float, k: int, lossless: bool,
             reload_identical: bool, train_s: float, total_s: float, steps: int, head_steps: int,
             model: MoshiUserPredForConditionalGeneration, behaviour: DialogueBehaviourReport,
             turn_taking: TurnTakingReport) -> dict:
    m, last, uni = report.model, report.repeat_last, report.unigram
    head, timer = turn_taking.predictors["vap_head"], turn_taking.predictors["timer_500ms"]
    free, held = behaviour.settings["model"], behaviour.settings[setting_name(TURN_HOLD_THRESHOLD)]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_steps": steps,
        "head_training_steps": head_steps,
        "training_s": round(train_s, 1),
        "held_out_delay0_accuracy": m.delay0_accuracy,
        "repeat_last_delay0_accuracy": last.delay0_accuracy,
        "unigram_delay0_accuracy": uni.delay0_accuracy,
        "held_out_accuracy": m.accuracy,
        f"held_out_delay0_top{report.top_k}_accuracy": m.delay0_top_k_accuracy,
        "delay0_ece": report.delay0_ece,
        "stream_frames": len(stream.statuses),
        "speculate_top_k": k,
        "speculation_hit_rate": stream.hit_rate,
        "critical_ms_hit_mean": stream.critical_ms_hit_mean,
        "critical_ms_normal_mean": stream.critical_ms_normal_mean,
        "critical_ms_mean": stream.critical_ms_mean,
        "critical_ms_mean_without_speculation": plain_ms,
        "critical_path_saved_fraction": 1 - stream.critical_ms_mean / plain_ms,
        "tokens_identical_to_plain_streaming": lossless,
        "trust_remote_code_reload_identical": reload_identical,
        "turn_signal_balanced_accuracy": head.shift_hold.balanced_accuracy,
        "turn_signal_auc": head.shift_hold.auc,
        "turn_signal_frame_auc": turn_taking.frames["vap_head"].auc,
        "turn_signal_pauses": turn_taking.num_shifts + turn_taking.num_holds,
        "timer_500ms_balanced_accuracy": timer.shift_hold.balanced_accuracy,
        "turn_hold_threshold": TURN_HOLD_THRESHOLD,
        "pause_takeover_rate": free.pause_takeover_rate,
        "pause_takeover_rate_with_turn_hold": held.pause_takeover_rate,
        "response_rate": free.response_rate,
        "response_rate_with_turn_hold": held.response_rate,
        "total_s": round(total_s, 1),
    }


def summary_table(s: dict) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def ms(x: float | None) -> str:  # None: no such step (e.g. no speculation hit in a short run)
        return "-" if x is None else f"{x:.1f} ms"

    k = s["speculate_top_k"]
    rows = [
        ("model", f"{s['parameters'] / 1e6:.2f} M parameters, {s['training_steps']} steps in {s['training_s']:.0f} s"),
        ("held-out next user token (delay-0)", f"{pct(s['held_out_delay0_accuracy'])} (repeat-last "
         f"{pct(s['repeat_last_delay0_accuracy'])}, unigram {pct(s['unigram_delay0_accuracy'])})"),
        (f"speculation hit rate (k={k}, {s['stream_frames']} frames)", pct(s["speculation_hit_rate"])),
        ("critical path per frame", f"{ms(s['critical_ms_mean'])} with speculation vs "
         f"{ms(s['critical_ms_mean_without_speculation'])} without "
         f"({pct(s['critical_path_saved_fraction'])} saved; hits {ms(s['critical_ms_hit_mean'])})"),
        ("speculative tokens identical to plain streaming",
         "yes" if s["tokens_identical_to_plain_streaming"] else "NO"),
        ("trust_remote_code reload: identical logits", "yes" if s["trust_remote_code_reload_identical"] else "NO"),
        (f"turn end at {s['turn_signal_pauses']} user pauses: balanced accuracy / AUC",
         f"{pct(s['turn_signal_balanced_accuracy'])} / {s['turn_signal_auc']:.2f} voice-activity head, at once "
         f"(500 ms timer: {pct(s['timer_500ms_balanced_accuracy'])}, 560 ms later)"),
        (f"pause takeover / turn ends answered (hold {s['turn_hold_threshold']:g})",
         f"{pct(s['pause_takeover_rate'])} / {pct(s['response_rate'])} without the turn hold, "
         f"{pct(s['pause_takeover_rate_with_turn_hold'])} / {pct(s['response_rate_with_turn_hold'])} with it"),
        ("total time", f"{s['total_s']:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def report_markdown(result: DemoResult) -> str:
    s, plots = result.summary, result.plots
    table = "\n".join(f"| {line[:line.index('  ')].strip()} | {line[line.index('  '):].strip()} |"
                      for line in summary_table(s).splitlines())

    def image(name: str, caption: str) -> str:
        return f"![{caption}](plots/{Path(plots[name]).name})" if name in plots else ""

    return f"""# hf_moshi_userpred demo report

A tiny Moshi with the user-prediction Depformer, trained from scratch on the shipped espeak-ng dialogue sample
(23 dialogues; 5 held out), then streamed over a held-out dialogue with speculative streaming.

| | |
|---|---|
{table}

## Training

{image("loss_curves", "loss curves")}

## User prediction on the held-out dialogues

{result.report.to_markdown()}

{image("per_codebook_accuracy", "per-codebook accuracy")}
{image("reliability", "reliability")}

## Speculative streaming

At each frame the user Depformer proposes its {s['speculate_top_k']} most likely next user tokens and the next step is
precomputed for each while waiting for the frame; when the real frame matches one (a hit), only a commit is left on
the critical path. Tokens are identical to plain streaming: {"yes" if result.lossless else "NO"}.

{image("speculation", "speculation over time")}

## Turn taking

The turn-taking signal, P(the user's turn ends within the next {result.turn_taking.horizon * result.turn_taking.frame_ms:.0f} ms), at the held-out user pauses (shift: the
user's turn ended; hold: the user goes on), decided as soon as the last frame of user speech is in, next to silence
timers that decide later: `vap_head` is the model's voice-activity head (trained alone for {s["head_training_steps"]} steps after the
model), `model` the token table under the user branch's prediction. The sample's pauses inside a turn are all short,
so a timer of 500 ms or more never cuts the user off on it; and a handful of pauses is not a measurement (one moves
a rate by 20-25 points): the per-frame table scores every frame, and `hf-moshi-userpred synthesize` with
`demo --data` measures on a corpus of hours where silence cannot decide (docs/corpus.md).

{result.turn_taking.to_markdown()}

{image("turn_taking_timeline", "turn-taking timeline")}
{image("turn_taking_roc", "shift vs hold ROC")}

## Dialogue behaviour (Full-Duplex-Bench style)

The held-out dialogues' user channels streamed through the model (sampling seed {result.behaviour.seed}), without and
with the turn hold (the text held on padding while the voice-activity head's P(turn end) is below
{s['turn_hold_threshold']:g}), scored at the recording's user events; `recorded` is the recorded system measured the
same way. Five short dialogues give a handful of events: a first look, not a result.

{result.behaviour.to_markdown()}

{image("dialogue_behaviour_timeline", "dialogue behaviour timeline")}

Files: `model/` (loads with `AutoModel.from_pretrained(..., trust_remote_code=True)`; `model/README.md` is its model
card; `model/turn_taking_statistics.json` the turn-taking table), `stream/` (system.wav, dialogue.wav,
text.txt, frames.jsonl), `encoded/`, `summary.json`.
"""


# ------------------------------------------------------------------------------------------------------ plots
def plot_demo(log_history: list[dict], stream: StreamResult, plot_dir: str | os.PathLike) -> dict[str, str]:
    """Writes `loss_curves.png` (training loss parts and the held-out losses over steps, the user weight) and
    `speculation.png` (hits and misses per frame with the rolling hit rate, and the critical path per frame).

    Returns:
        `{"loss_curves": path, "speculation": path}`.

    Raises:
        ImportError: matplotlib is missing (`pip install 'hf_moshi_userpred[plots]'`).
    """
    return save_figures(plot_dir, {"loss_curves": (lambda figure: _plot_losses(log_history, figure), (9, 4.5)),
                                   "speculation": (lambda figure: _plot_speculation(stream, figure), (9, 5))})


def _plot_losses(log_history: list[dict], figure):
    axes = figure.subplots()
    for part, label, color in (("text", "text", "tab:blue"), ("audio", "system audio", "tab:orange"),
                               ("user", "user audio", "tab:green")):
        for key, suffix, style in ((f"loss/{part}", "", "-"), (f"eval_loss/{part}", " (held out)", "--")):
            points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
            if points:
                axes.plot(*zip(*points), style, color=color, label=label + suffix,
                          marker="o" if suffix else None, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats)")
    weights = [(entry["step"], entry["user_weight"]) for entry in log_history if "user_weight" in entry]
    if weights:
        twin = axes.twinx()
        twin.step(*zip(*weights), where="post", color="grey", alpha=0.5, label="user loss weight")
        twin.set_ylabel("user loss weight (curriculum)")
        twin.set_ylim(0, 1.1 * max(1e-6, max(w for _, w in weights)))
        twin.legend(loc="upper center", fontsize=8)
    axes.legend(fontsize=8, ncols=2)
    axes.set_title("training and held-out losses")
    return figure


def _plot_speculation(stream: StreamResult, figure):
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(1, 1.4))
    times = [i / stream.frame_rate for i in range(len(stream.statuses))]
    hits = [1.0 if status == "hit" else 0.0 for status in stream.statuses]
    tried = [status != "not_tried" for status in stream.statuses]
    colors = {"hit": "tab:green", "miss": "tab:red", "not_tried": "lightgrey"}
    top.vlines(times, 0, 1, colors=[colors[status] for status in stream.statuses], linewidth=1.5)
    window = 12  # about one second of frames
    rolling = []
    for i in range(len(hits)):
        lo = max(0, i - window + 1)
        n = sum(tried[lo : i + 1])
        rolling.append(sum(hits[lo : i + 1]) / n if n else float("nan"))
    top.plot(times, rolling, color="black", label="hit rate (1 s window)")
    top.set_ylim(0, 1.05)
    top.set_ylabel("hit (green) / miss (red)")
    top.legend(loc="lower right", fontsize=8)
    top.set_title(f"speculation over a held-out dialogue: {100 * stream.hit_rate:.0f}% hits")
    for status in ("hit", "miss", "not_tried"):
        points = [(t, ms) for t, ms, s in zip(times, stream.critical_ms, stream.statuses) if s == status]
        if points:
            bottom.scatter(*zip(*points), s=8, color=colors[status], label=status.replace("_", " "))
    bottom.set_ylabel("critical path (ms)")
    bottom.set_xlabel("time (s)")
    bottom.legend(fontsize=8)
    return figure


__all__ = ["TURN_HOLD_THRESHOLD", "DemoResult", "plot_demo", "report_markdown", "summarize", "summary_table"]
