"""Full-Duplex-Bench-style behaviour of the system stream while it streams held-out dialogues, with and without the
turn hold (the system may not start a word while the user branch's P(turn end) is below a threshold).

**Offline replay.** The user's channel of a held-out dialogue is fed to `model.generate` frame by frame; the user
does not react to what the model says, so the user's events are those of the recording ([`find_events`] on the
voice activity of both recorded speakers: hold pauses, turn ends, backchannels, barge-ins) and only the system's
side is the model's. Full-Duplex-Bench (Lin et al. 2025, v1: pause handling, smooth turn taking, user interruption;
v1.5: user backchannel, stop latency) plays scripted user stimuli to a live model and runs a VAD on its output
audio; this module asks the same questions of every matching event of the replayed dialogues.

**System speech per frame** ([`system_speech`]) comes from the text stream (the inner monologue: one text token
per frame from a word's start, padding otherwise; docs/design.md §5), where the model decides to speak, rather
than from the energy of the decoded audio (no Mimi decode needed). A frame holding a non-padding token and the
`hangover_frames` frames after it are speech (a word's tokens are written at its start, then padding while it is
spoken), and so is a silent gap shorter than `bridge_frames` frames between two tokens (one utterance). With the
defaults (480 ms, 240 ms) this activity agrees with the word alignments of the recorded system on 94.8 % of the
frames of the shipped sample (28 dialogues; precision 0.95, recall 0.90).

**Alignment** (docs/design.md §2). `generate` feeds user frame `o` of the recording at call `o`, where the model
treats it as the frame before the one it writes: the text it samples at call `o` (`text_tokens[:, o]`, moshi's
alignment) is for frame `o + 1`. So the system speaks in user frame `f` by `text_tokens[:, f - 1]` (`offset=1`);
frame 0 has no system text. (Checked on the demo model, which memorises its training dialogues: greedy `generate`
on 6 of them reproduces 60 of the recorded text row's 83 word tokens at offset 1, none at offset 0.) The recorded
system's own text row (`codes[0]`) is on the user's grid (`offset=0`): it is the `recorded` row of the report, a
check of the activity from text against the word alignments. The signal
`user_turn_end[:, o]` is computed at call `o`, once user frame `o` is in: it belongs to frame boundary `o + 1`.

**Metrics** ([`dialogue_behaviour`], on frame indices; `frame_ms` = 80 ms):

- *Pause takeover rate* (Full-Duplex-Bench's pause handling, lower is better): among the user's hold pauses (the
  user resumes before the recorded system speaks), the share with any system speech in the user's silent gap
  (frames `end_frame + 1 .. end_frame + silence_frames`).
- *Response latency* (smooth turn taking): at each user turn end (a shift: the recorded system answered), the
  first frame `f >= end_frame + 1` with system speech before the user speaks again (or the dialogue ends); latency
  `(f - end_frame - 1) * frame_ms`, from the end of the user's last speech frame (the frame holding the end of the
  user's last word) to the start of the system's first speech frame; 0 when the system already speaks at the turn
  end. None of them: a *no-response*. Reported: median and mean over the responses, the response rate.
- *Backchannel takeover rate* (v1.5's user backchannel, lower is better): among the user's backchannels (short
  user units over the recorded system's speech, after which it kept talking), the share where the system starts a
  new utterance (a silent frame, then speech) from the backchannel's second frame to `context_frames` frames after
  its end: it took the backchannel for a turn and answered it.
- *Stop latency* (v1.5's user interruption): at each user barge-in (a user unit over the recorded system that is
  no backchannel) where the system speaks at the user's first frame, the first silent frame from there to the
  frame after the user's unit; latency `(stop - start_frame) * frame_ms`. None: it talked over the whole barge-in
  (reported as the stop rate). Barge-ins while the system is silent are counted apart (nothing to stop).

Adaptations: events from the recording instead of scripted stimuli; a takeover is any speech (the text stream has
no backchannel/turn distinction, and Full-Duplex-Bench's word-count filter has no analogue for a small model's
text); 80 ms resolution.

    stats = TurnTakingStatistics.load("model_dir")
    report = evaluate_dialogue_behaviour(model, held_out, dialogue_alignments("encoded/eval"), stats,
                                         hold_thresholds=(None, 0.5), seed=0, plot_dir="plots")
    print(report.to_markdown())
"""

from __future__ import annotations

import os
import statistics as stats_lib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..data.audio import padding_ids
from ..data.voice_activity import KINDS, TurnTakingStatistics, activity_spans
from ..models.configuration_moshi_userpred import FRAME_RATE
from ..models.modeling_moshi_codes import ZERO_TOKEN_ID
from .figures import save_figures
from .report_format import milliseconds, percent
from .turn_taking_events import TurnTakingEvents, dialogue_events
from .turn_taking_metrics import timer_frames

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration

FRAME_MS = 1000 / FRAME_RATE
DEFAULT_BRIDGE_FRAMES = 6  # 480 ms: a longer silence between two words of the text stream ends an utterance
DEFAULT_HANGOVER_FRAMES = 3  # 240 ms: how long the last word of an utterance lasts after its first token
RECORDED = "recorded"  # the report's row of the recorded system


# --------------------------------------------------------------------------------------------- system speech
def system_speech(
    text_tokens: torch.Tensor,
    num_frames: int,
    padding: Sequence[int],
    *,
    offset: int = 1,
    bridge_frames: int = DEFAULT_BRIDGE_FRAMES,
    hangover_frames: int = DEFAULT_HANGOVER_FRAMES,
) -> torch.Tensor:
    """Bool `[num_frames]`: the system speaks in user frame `f`, from its text stream.

    Args:
        text_tokens: `[N]` text tokens; token `j` belongs to user frame `j + offset` (1 for `generate`'s
            `text_tokens`, 0 for a recorded dialogue's text row); tokens past `num_frames` are ignored, frames
            without a token are silent. Negative ids (ungenerated, zero token) are silent.
        padding: the padding ids ([`padding_ids`] of the config).
        bridge_frames: silent gaps shorter than this between two tokens are speech (one utterance).
        hangover_frames: frames of speech after each token (the word is still being spoken).

    Raises:
        ValueError: a negative `offset`, `bridge_frames` or `hangover_frames`, or `text_tokens` not 1-D.
    """
    for name, value in (("offset", offset), ("bridge_frames", bridge_frames), ("hangover_frames", hangover_frames)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if text_tokens.dim() != 1:
        raise ValueError(f"text_tokens must be 1-D [N], got shape {tuple(text_tokens.shape)}")
    tokens = text_tokens.long().cpu()
    word = tokens >= 0
    for pad in padding:
        word &= tokens != pad
    frames = (word.nonzero().flatten() + offset).tolist()
    speech = torch.zeros(num_frames, dtype=torch.bool)
    previous = None
    for f in frames:
        if f >= num_frames:
            break
        start = previous + 1 if previous is not None and f - previous - 1 < bridge_frames else f
        speech[start : f + 1 + hangover_frames] = True
        previous = f
    return speech


# ---------------------------------------------------------------------------------------------------- metrics
@dataclass
class BehaviourOutcomes:
    """What the system did at each user event of one or more dialogues (frame counts; see the module docstring).

    Args:
        pause_takeovers: per hold pause, the system spoke in the user's gap.
        response_frames: per user turn end, frames from the end of the user's last speech frame to the system's
            first speech frame (None: no response before the user spoke again or the dialogue ended).
        backchannel_takeovers: per user backchannel, the system started a new utterance in response.
        stop_frames: per user barge-in while the system spoke, frames until its first silent frame (None: it did
            not stop during the user's unit).
        barge_ins_over_silence: barge-ins while the system was silent (no stop to measure).
        speech_frames, num_frames: frames the system speaks, frames in all.
    """

    pause_takeovers: list[bool] = field(default_factory=list)
    response_frames: list[int | None] = field(default_factory=list)
    backchannel_takeovers: list[bool] = field(default_factory=list)
    stop_frames: list[int | None] = field(default_factory=list)
    barge_ins_over_silence: int = 0
    speech_frames: int = 0
    num_frames: int = 0

    def extend(self, other: BehaviourOutcomes) -> None:
        """Adds another dialogue's outcomes."""
        self.pause_takeovers += other.pause_takeovers
        self.response_frames += other.response_frames
        self.backchannel_takeovers += other.backchannel_takeovers
        self.stop_frames += other.stop_frames
        self.barge_ins_over_silence += other.barge_ins_over_silence
        self.speech_frames += other.speech_frames
        self.num_frames += other.num_frames

    def metrics(self, frame_ms: float = FRAME_MS) -> BehaviourMetrics:
        """Rates and latencies (ms) over the events."""
        responses = [f * frame_ms for f in self.response_frames if f is not None]
        stops = [f * frame_ms for f in self.stop_frames if f is not None]
        return BehaviourMetrics(
            pause_takeover_rate=_rate(self.pause_takeovers),
            num_pauses=len(self.pause_takeovers),
            response_rate=_rate([f is not None for f in self.response_frames]),
            median_response_ms=stats_lib.median(responses) if responses else None,
            mean_response_ms=stats_lib.fmean(responses) if responses else None,
            num_turn_ends=len(self.response_frames),
            no_responses=len(self.response_frames) - len(responses),
            backchannel_takeover_rate=_rate(self.backchannel_takeovers),
            num_backchannels=len(self.backchannel_takeovers),
            stop_rate=_rate([f is not None for f in self.stop_frames]),
            median_stop_ms=stats_lib.median(stops) if stops else None,
            num_barge_ins=len(self.stop_frames),
            barge_ins_over_silence=self.barge_ins_over_silence,
            speech_share=self.speech_frames / self.num_frames if self.num_frames else None,
        )


@dataclass
class BehaviourMetrics:
    """One system setting over the held-out dialogues (None where there is no event).

    Args:
        pause_takeover_rate: share of the user's hold pauses in which the system spoke (lower is better).
        response_rate, median_response_ms, mean_response_ms: share of the user's turn ends the system answered
            before the user spoke again, and the latency of those answers.
        backchannel_takeover_rate: share of the user's backchannels the system answered with a new utterance
            (lower is better).
        stop_rate, median_stop_ms: share of the user's barge-ins over the system's speech during which it stopped,
            and how long it took.
        num_pauses, num_turn_ends, no_responses, num_backchannels, num_barge_ins, barge_ins_over_silence: counts.
        speech_share: share of frames the system speaks.
    """

    pause_takeover_rate: float | None
    num_pauses: int
    response_rate: float | None
    median_response_ms: float | None
    mean_response_ms: float | None
    num_turn_ends: int
    no_responses: int
    backchannel_takeover_rate: float | None
    num_backchannels: int
    stop_rate: float | None
    median_stop_ms: float | None
    num_barge_ins: int
    barge_ins_over_silence: int
    speech_share: float | None


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def dialogue_behaviour(
    events: TurnTakingEvents, speech: torch.Tensor, *, context_frames: int = 3
) -> BehaviourOutcomes:
    """The system's behaviour at the user's events of one dialogue (definitions in the module docstring).

    Args:
        events: the user's events from the recording ([`find_events`]).
        speech: bool `[T]`, the system speaks in frame `f` (e.g. [`system_speech`]).
        context_frames: frames after a backchannel in which a new utterance still answers it.

    Raises:
        ValueError: `speech` is not 1-D bool, or an event lies outside it.
    """
    if speech.dim() != 1 or speech.dtype != torch.bool:
        raise ValueError(f"speech must be a bool tensor [T], got {speech.dtype} of shape {tuple(speech.shape)}")
    speech = speech.cpu()
    T = speech.shape[0]
    last_frames = [p.end_frame for p in events.pauses] + [o.end_frame for o in events.onsets]
    if last_frames and max(last_frames) >= T:
        raise ValueError(f"an event ends at frame {max(last_frames)} but speech has only {T} frames")
    out = BehaviourOutcomes(speech_frames=int(speech.sum()), num_frames=T)
    for pause in events.pauses:
        gap_end = T if pause.silence_frames is None else pause.end_frame + 1 + pause.silence_frames
        gap = speech[pause.end_frame + 1 : gap_end]
        if pause.shift:
            spoken = gap.nonzero().flatten()
            out.response_frames.append(int(spoken[0]) if spoken.numel() else None)
        else:
            out.pause_takeovers.append(bool(gap.any()))
    for onset in events.onsets:
        if onset.backchannel:
            window = speech[onset.start_frame : onset.end_frame + 1 + context_frames]
            out.backchannel_takeovers.append(bool((window[1:] & ~window[:-1]).any()))
        elif bool(speech[onset.start_frame]):
            silent = (~speech[onset.start_frame : onset.end_frame + 2]).nonzero().flatten()
            out.stop_frames.append(int(silent[0]) if silent.numel() else None)
        else:
            out.barge_ins_over_silence += 1
    return out


# -------------------------------------------------------------------------------------------------- the report
@dataclass
class DialogueBehaviourReport:
    """Result of [`evaluate_dialogue_behaviour`].

    Args:
        settings: row name -> [`BehaviourMetrics`]: `recorded` (the recorded system, from its own text row: what
            the definitions give on human-made timing), `model` (streaming without the turn hold), `hold {t}`
            (with `turn_hold_threshold=t`), `timer {ms} ms` (a silence-timer agent, [`timer_speech`]).
        num_dialogues, frames_per_dialogue: what was streamed (`frames_per_dialogue`: the `max_frames` cap or None).
        kind, bridge_frames, hangover_frames, context_frames, seed: the settings.
        signal: what the hold read: "voice-activity head" (the model has one) or "`kind` table".
        frame_ms: one frame in ms.
        timeline: one dialogue's arrays for the plot (`user`, `system` activity of the recording, `speech` per
            setting, `turn_end` per setting `[T]` indexed by frame boundary, `events`, `name`).
        plots: name -> PNG path.
    """

    settings: dict[str, BehaviourMetrics]
    num_dialogues: int
    frames_per_dialogue: int | None
    kind: str
    bridge_frames: int
    hangover_frames: int
    context_frames: int
    seed: int | None
    signal: str = "token table"
    frame_ms: float = FRAME_MS
    timeline: dict[str, Any] = field(default_factory=dict, repr=False)
    plots: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | int | str]:
        """Flat scalars for JSON (`"dialogue_behaviour/model/pause_takeover_rate"`, ...); None left out."""
        out: dict[str, Any] = {}
        for name, m in self.settings.items():
            out.update({f"dialogue_behaviour/{name}/{key}": value for key, value in vars(m).items()})
        out.update({f"dialogue_behaviour/{key}": getattr(self, key) for key in (
            "num_dialogues", "frames_per_dialogue", "kind", "bridge_frames", "hangover_frames", "context_frames",
            "seed")})
        return {key: value for key, value in out.items() if value is not None}

    def to_markdown(self) -> str:
        """One row per setting, then the event counts and how system speech was measured."""
        lines = ["| system | pause takeover ↓ | response rate | median response | mean response | "
                 "backchannel takeover ↓ | stops at barge-in | median stop | speaks |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in self.settings.items():
            lines.append(
                f"| {name} | {percent(m.pause_takeover_rate, 0)} | {percent(m.response_rate, 0)} | "
                f"{milliseconds(m.median_response_ms)} | {milliseconds(m.mean_response_ms)} | "
                f"{percent(m.backchannel_takeover_rate, 0)} | {percent(m.stop_rate, 0)} ({m.num_barge_ins}) | "
                f"{milliseconds(m.median_stop_ms)} | {percent(m.speech_share, 0)} |")
        first = next(iter(self.settings.values()))
        frames = "" if self.frames_per_dialogue is None else f" (first {self.frames_per_dialogue} frames each)"
        lines.append(
            f"\n{self.num_dialogues} dialogues{frames}; user events: hold pauses {first.num_pauses}, turn ends "
            f"{first.num_turn_ends}, backchannels {first.num_backchannels}; stops: of the barge-ins over the system's "
            f"speech (their number in brackets; the others came while it was silent). System speech from its text stream: non-padding tokens, "
            f"gaps under {self.bridge_frames * self.frame_ms:.0f} ms bridged, "
            f"{self.hangover_frames * self.frame_ms:.0f} ms after each token; {self.frame_ms:.0f} ms frames. Turn hold: {self.signal}, the "
            f"text held on padding while P(turn end) < threshold; sampling seed {self.seed}.")
        return "\n".join(lines)


def timer_speech(user: torch.Tensor, frames: int) -> torch.Tensor:
    """What a cascaded agent with a silence timer says (bool `[T]`), without user prediction: it speaks in frame `f`
    once the user has been silent over the `frames` frames before it (it has heard the user up to frame `f - 1`),
    and stops as soon as it hears them (an ideal voice-activity detector: one frame late)."""
    speech = torch.zeros_like(user, dtype=torch.bool)
    silent_run = 0
    for f in range(user.shape[0]):
        speech[f] = silent_run >= frames
        silent_run = 0 if bool(user[f]) else silent_run + 1
    return speech


def timer_setting_name(ms: float) -> str:
    """The report's row name of a silence-timer agent."""
    return f"timer {ms:g} ms"


def setting_name(threshold: float | None) -> str:
    """The report's row name of a turn-hold threshold (None: `model`, without the hold)."""
    return "model" if threshold is None else f"hold {threshold:g}"


# ------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_dialogue_behaviour(
    model: MoshiUserPredForConditionalGeneration,
    dialogues: Sequence[Mapping | torch.Tensor],
    alignments: Sequence[Sequence],
    statistics: TurnTakingStatistics,
    *,
    hold_thresholds: Sequence[float | None] = (None, 0.5),
    timers_ms: Sequence[float] = (),
    kind: str = "token",
    seed: int | None = 0,
    max_frames: int | None = None,
    bridge_frames: int = DEFAULT_BRIDGE_FRAMES,
    hangover_frames: int = DEFAULT_HANGOVER_FRAMES,
    min_pause_frames: int = 2,
    max_backchannel_frames: int = 12,
    context_frames: int = 3,
    main_speaker: str = "SPEAKER_MAIN",
    batch_size: int = 8,
    timeline_dialogue: int = 0,
    plot_dir: str | os.PathLike | None = None,
    **generation_kwargs,
) -> DialogueBehaviourReport:
    """Streams the user channel of each held-out dialogue through `model.generate` once per turn-hold threshold
    and scores the system's behaviour at the recording's user events (module docstring).

    Args:
        model: a model with a user branch (put in eval mode for the call).
        dialogues: held-out dialogues, codes `[1 + n_q, T]` or dicts with `"codes"` (and `"name"`).
        alignments: their word alignments ([`dialogue_alignments`]).
        statistics: the turn-taking statistics ([`fit_turn_taking_statistics`] on the training dialogues, or
            `TurnTakingStatistics.load(model_dir)`); `kind` picks the table.
        hold_thresholds: one streamed setting each: None streams without the turn hold, a float `t` with
            `turn_hold_threshold=t`.
        timers_ms: one silence-timer agent each (no model: [`timer_speech`] on the recorded user's activity), the
            policy of a voice agent without user prediction.
        seed: the sampling seed of every run (the settings differ only by the hold).
        max_frames: stream only the first `max_frames` frames of each dialogue (a quick look; later events are cut).
        bridge_frames, hangover_frames: [`system_speech`]; min_pause_frames, max_backchannel_frames,
            context_frames: [`find_events`] (and [`dialogue_behaviour`]'s backchannel window).
        batch_size: dialogues streamed at once (slots of one session; the shorter ones padded with the zero token
            at the end, their outputs there dropped).
        timeline_dialogue: the dialogue drawn in the timeline plot.
        plot_dir: if given, write `dialogue_behaviour_timeline.png` there ([`plot_dialogue_behaviour`]).
        **generation_kwargs: generation config fields of every run (e.g. `do_sample=False`).

    Raises:
        ValueError: no user branch, mismatched inputs, an unknown `kind`, or no threshold.
    """
    c = model.config
    if not c.predict_user_audio:
        raise ValueError("evaluate_dialogue_behaviour: the model has no user branch (predict_user_audio=False)")
    if len(dialogues) != len(alignments):
        raise ValueError(f"{len(dialogues)} dialogues but {len(alignments)} alignment lists")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if statistics.token_table.shape[0] != c.card:
        raise ValueError(f"the statistics have {statistics.token_table.shape[0]} tokens, the model card={c.card}")
    names = [setting_name(threshold) for threshold in hold_thresholds]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"hold_thresholds must be distinct and not empty, got {tuple(hold_thresholds)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_frames is not None and max_frames < 2:
        raise ValueError(f"max_frames must be at least 2, got {max_frames}")
    table, padding = statistics.table(kind), padding_ids(c)
    speech_settings = {"bridge_frames": bridge_frames, "hangover_frames": hangover_frames}
    timers = {timer_setting_name(ms): timer_frames(ms) for ms in timers_ms}
    outcomes = {name: BehaviourOutcomes() for name in (RECORDED, *names, *timers)}
    timeline: dict[str, Any] = {}
    codes = []
    for i, item in enumerate(dialogues):
        tensor = item["codes"] if isinstance(item, Mapping) else item
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[0] != 1 + c.n_q:
            raise ValueError(f"dialogue {i} must be codes [1 + n_q = {1 + c.n_q}, T] (or a dict holding them as "
                             f"'codes'), got {getattr(tensor, 'shape', type(tensor).__name__)}")
        codes.append(tensor[:, :max_frames].long().cpu())
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(codes), batch_size):
            batch = codes[first : first + batch_size]
            T_max = max(x.shape[1] for x in batch)
            # one batched run per setting; a shorter dialogue's tail is "no input" and its outputs there are cut
            user_codes = torch.full((len(batch), c.n_q - c.dep_q, T_max), ZERO_TOKEN_ID, dtype=torch.long)
            for b, x in enumerate(batch):
                user_codes[b, :, : x.shape[1]] = x[1 + c.dep_q :]
            runs = [model.generate(user_codes.to(model.device), seed=seed, progress=False, turn_taking_table=table,
                                   turn_hold_threshold=threshold, **generation_kwargs) for threshold in hold_thresholds]
            for b, x in enumerate(batch):
                i, T = first + b, x.shape[1]
                events = dialogue_events(alignments[i], T, main_speaker, min_pause_frames=min_pause_frames,
                                         max_backchannel_frames=max_backchannel_frames, context_frames=context_frames)
                user, system = events.user_activity, events.system_activity
                speech = {RECORDED: system_speech(x[0], T, padding, offset=0, **speech_settings)}
                turn_end = {}
                for name, frames in timers.items():
                    speech[name] = timer_speech(user, frames)
                for name, out in zip(names, runs):
                    speech[name] = system_speech(out.text_tokens[b], T, padding, offset=1, **speech_settings)
                    # computed at call o, once user frame o is in: it belongs to frame boundary o + 1
                    known = out.user_turn_end[b, : T - 1].float().cpu()
                    turn_end[name] = torch.cat([torch.full((1,), float("nan")), known])
                for name, spoken in speech.items():
                    outcomes[name].extend(dialogue_behaviour(events, spoken, context_frames=context_frames))
                if i == timeline_dialogue:
                    item = dialogues[i]
                    timeline = {"user": user, "system": system, "speech": speech, "turn_end": turn_end,
                                "thresholds": dict(zip(names, hold_thresholds)), "events": events,
                                "name": str(item.get("name", i) if isinstance(item, Mapping) else i)}
    finally:
        model.train(was_training)
    report = DialogueBehaviourReport(
        settings={name: o.metrics(FRAME_MS) for name, o in outcomes.items()}, num_dialogues=len(dialogues),
        frames_per_dialogue=max_frames, kind=kind, bridge_frames=bridge_frames, hangover_frames=hangover_frames,
        context_frames=context_frames, seed=seed, timeline=timeline,
        signal="voice-activity head" if model.voice_activity_head is not None else f"{kind} table",
    )
    if plot_dir is not None:
        report.plots = plot_dialogue_behaviour(report, plot_dir)
    return report


# ----------------------------------------------------------------------------------------------------- the plot
def plot_dialogue_behaviour(report: DialogueBehaviourReport, plot_dir: str | os.PathLike) -> dict[str, str]:
    """Writes `dialogue_behaviour_timeline.png`: one dialogue's recorded user and system activity (word
    alignments), the system's speech from the text stream in each setting (recorded text row, model, turn hold),
    and the user branch's P(turn end) with each hold threshold; user holds (green) and turn ends (red) marked.

    Raises:
        ImportError: matplotlib is missing (`pip install 'hf_moshi_userpred[plots]'`).
    """
    if not report.timeline:
        return {}
    return save_figures(plot_dir, {"dialogue_behaviour_timeline": (lambda f: _plot_timeline(report, f), (11, 5))})


def _plot_timeline(report: DialogueBehaviourReport, figure: Figure) -> Figure:
    t = report.timeline
    seconds = report.frame_ms / 1000
    activity, curves = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    rows = [("user (words)", t["user"], "C1"), ("system (words)", t["system"], "C0")]
    rows += [(f"system: {name}", spoken, "C2" if name == RECORDED else "C3")
             for name, spoken in t["speech"].items()]
    for y, (label, active, color) in enumerate(reversed(rows)):
        activity.broken_barh(activity_spans(active, seconds), (y - 0.35, 0.7), color=color)
    activity.set(yticks=range(len(rows)), yticklabels=[label for label, _, _ in reversed(rows)],
                 title=f"Dialogue {t['name']}: who speaks (system rows: from the text stream)")
    boundaries = [b * seconds for b in range(t["user"].shape[0])]
    for i, (name, values) in enumerate(t["turn_end"].items()):
        curves.plot(boundaries, values.numpy(), color=f"C{4 + i}", lw=1.5, label=f"P(turn end), run {name}")
        threshold = t["thresholds"][name]
        if threshold is not None:
            curves.axhline(threshold, color=f"C{4 + i}", ls="--", lw=0.8, label=f"hold threshold {threshold:g}")
    for pause in t["events"].pauses:
        curves.axvline((pause.end_frame + 1) * seconds, color="C3" if pause.shift else "C2", lw=1, alpha=0.6)
    curves.set(xlabel="time (s)", ylabel="P(turn end)", ylim=(-0.02, 1.02),
               title="user branch: P(user's turn ends within the horizon); red: turn end, green: hold")
    curves.legend(loc="upper left", fontsize=7)
    figure.tight_layout()
    return figure


__all__ = [
    "BehaviourMetrics",
    "BehaviourOutcomes",
    "DialogueBehaviourReport",
    "dialogue_behaviour",
    "evaluate_dialogue_behaviour",
    "plot_dialogue_behaviour",
    "setting_name",
    "timer_setting_name",
    "timer_speech",
    "system_speech",
]
