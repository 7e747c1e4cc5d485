"""Turn taking from the user branch: will the user be silent in the next frames, and is their turn over?

**The signal.** At each frame the user Depformer gives a distribution over the user's next semantic (delay-0)
token. A table fitted on training dialogues (their codes and word alignments) says, for every token value `c`, how
often the user was silent `n - 1` frames after a frame holding `c` (`n = 1 .. horizon`), and how often the user was
silent over the last `turn_end_frames` frames of the horizon. The signal is that table averaged under the predicted
distribution (a first-order rollout in token space: the future is assumed to depend on the context only through
the next token):

    silence[..., n - 1] = sum_c p(c) * P(user silent at frame t + n - 1 | token at t = c)     n = 1 .. horizon
    turn_end[...]       = sum_c p(c) * P(user silent over frames t + horizon - turn_end_frames .. t + horizon - 1
                                         | token at t = c)

`turn_end` is the probability that the user's turn ends within the horizon: a user who is silent over the end of
the horizon has stopped (the sample's in-turn pauses are shorter than `turn_end_frames`). [`turn_taking_signal`]
is that computation, a pure function of tensors (torch only) that lives in the streaming session's remote-code file
(`generation_moshi_streaming.py`, which emits it each step as `user_turn`) and is imported here. `kind="two_state"` replaces the per-token rows by two rows (silence token or not: the mass the
branch puts on the silence tokens, rolled out with the training data's silence/speech persistence), the variant
that needs only [`TurnTakingStatistics.silence_tokens`]. A model with a voice-activity-projection head
(`config.voice_activity_horizon`, `modeling_moshi_voice_activity.py`) has the same outputs learned directly from
voice-activity targets: the Trainer trains it (an extra loss, off by default) on dialogues that carry the user's
voice activity ([`DialoguesWithVoiceActivity`]), and the streaming session then takes its signal from the head.

**Evaluation** ([`evaluate_turn_taking`]) on held-out dialogues with word alignments: voice activity per 80 ms
frame from the alignments; events: user pauses inside a turn (hold), user turn ends (shift), user backchannels and
user barge-ins over the system; shift-vs-hold prediction at each pause and how far before the end of the user's turn
the signal crosses its threshold, next to silence-duration timers (a VAD endpointer) and the same signal built
from the unigram and repeat-last user predictors.

    stats = fit_turn_taking_statistics(train, dialogue_alignments("encoded/train"), model.config)
    report = evaluate_turn_taking(model, held_out, dialogue_alignments("encoded/eval"), stats, plot_dir="plots")
    print(report.to_markdown())
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..models.configuration_moshi_userpred import MoshiUserPredConfig
from ..models.generation_moshi_text_constraints import turn_taking_signal  # the streaming session computes it each step too
from ..utils.files import read_json_object
from ..models.modeling_moshi_codes import ZERO_TOKEN_ID, check_codes
from ..models.modeling_moshi_voice_activity import voice_activity_targets
from ..data.text_alignment import validate_alignments

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration

FRAME_RATE = 12.5  # Mimi frames per second
DEFAULT_HORIZON = 10  # frames (800 ms)
DEFAULT_TURN_END_FRAMES = 5  # the last 400 ms of the horizon
STATISTICS_NAME = "turn_taking_statistics.json"  # where a model directory keeps them
KINDS = ("token", "two_state")
SIGNAL_PREDICTORS = ("model", "repeat_last", "unigram")


# ---------------------------------------------------------------------------------------------------- the signal
@dataclass
class TurnTakingStatistics:
    """What the signal learned from training dialogues, for one user semantic codebook.

    Args:
        horizon, turn_end_frames: the signal's horizon in frames and the frames at its end that must be silent.
        token_table: `[card, horizon + 1]` per token value (smoothed towards `prior`; see [`turn_taking_signal`]).
        two_state_table: `[2, horizon + 1]` the same per state: row 0 after a speech frame, row 1 after a silent one.
        silence_prob: `[card]` P(the frame holding the token is silent) (= `token_table[:, 0]`).
        token_counts: `[card]` training frames per token (also the unigram baseline's distribution).
        codebook: index `k` of the user codebook (`user_logits[:, k]`, codes row `1 + dep_q + k`).
        num_frames: training frames counted.
    """

    horizon: int
    turn_end_frames: int
    token_table: torch.Tensor
    two_state_table: torch.Tensor
    silence_prob: torch.Tensor
    token_counts: torch.Tensor
    codebook: int
    num_frames: int

    def silence_tokens(self, threshold: float = 0.5, min_count: int = 1) -> list[int]:
        """Token ids seen at least `min_count` times whose frames were silent with probability >= `threshold`
        (what a config field `user_silence_tokens` would hold)."""
        keep = (self.silence_prob >= threshold) & (self.token_counts >= min_count)
        return keep.nonzero().flatten().tolist()

    def table(self, kind: str = "token") -> torch.Tensor:
        """`[card, horizon + 1]` for [`turn_taking_signal`]: `"token"` the per-token rows, `"two_state"` the state
        row of each token (silence token or not)."""
        if kind == "token":
            return self.token_table
        if kind == "two_state":
            silent = torch.zeros(self.token_table.shape[0], dtype=torch.long)
            silent[self.silence_tokens()] = 1
            return self.two_state_table[silent]
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    @property
    def unigram(self) -> torch.Tensor:
        """`[card]` the training frequency of each token (the unigram predictor's distribution)."""
        return self.token_counts.double() / self.token_counts.sum().clamp_min(1)

    def to_dict(self) -> dict[str, Any]:
        return {"horizon": self.horizon, "turn_end_frames": self.turn_end_frames, "codebook": self.codebook,
                "num_frames": self.num_frames, "token_table": self.token_table.tolist(),
                "two_state_table": self.two_state_table.tolist(), "silence_prob": self.silence_prob.tolist(),
                "token_counts": self.token_counts.tolist(), "silence_tokens": self.silence_tokens()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TurnTakingStatistics:
        return cls(horizon=int(data["horizon"]), turn_end_frames=int(data["turn_end_frames"]),
                   token_table=torch.tensor(data["token_table"], dtype=torch.float32),
                   two_state_table=torch.tensor(data["two_state_table"], dtype=torch.float32),
                   silence_prob=torch.tensor(data["silence_prob"], dtype=torch.float32),
                   token_counts=torch.tensor(data["token_counts"], dtype=torch.long),
                   codebook=int(data["codebook"]), num_frames=int(data["num_frames"]))

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the statistics as JSON (into a model directory: `STATISTICS_NAME`); returns the path."""
        path = Path(path)
        if path.is_dir():
            path = path / STATISTICS_NAME
        path.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TurnTakingStatistics:
        path = Path(path)
        if path.is_dir():
            path = path / STATISTICS_NAME
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def delay0_user_codebook(config: MoshiUserPredConfig) -> int:
    """The first user codebook the user branch predicts with delay 0 (the real forecast; docs/design.md §2)."""
    start = 1 + config.dep_q
    for k in range(config.user_dep_q):
        if config.delays[start + k] == 0:
            return k
    raise ValueError("the user branch predicts no delay-0 codebook: no forecast to build a turn-taking signal on")


def fit_turn_taking_statistics(
    dataset: Sequence[Mapping | torch.Tensor],
    alignments: Sequence[Sequence],
    config: MoshiUserPredConfig,
    *,
    horizon: int = DEFAULT_HORIZON,
    turn_end_frames: int = DEFAULT_TURN_END_FRAMES,
    main_speaker: str = "SPEAKER_MAIN",
    frame_rate: float = FRAME_RATE,
    prior_weight: float = 1.0,
) -> TurnTakingStatistics:
    """Fits the signal's tables on training dialogues: which user semantic tokens occur while the user is silent
    (by the word alignments), and what follows them.

    Args:
        dataset: dialogues, codes `[1 + n_q, T]` or dicts holding them as `"codes"` (e.g. `EncodedDialogues`).
        alignments: one moshi-finetune alignment list per dialogue (`[[word, [start_s, end_s], speaker], ...]`);
            every speaker but `main_speaker` is the user.
        config: the model's config (which row is the user's delay-0 codebook, `card`).
        horizon, turn_end_frames: frames the signal looks ahead, and the frames at the end of the horizon that must
            be silent for "the turn has ended" (`1 <= turn_end_frames <= horizon`).
        prior_weight: pseudo-frames with which each token's row is pulled to the all-token average (rare tokens).

    Raises:
        ValueError: mismatched lengths, bad horizon, or no frame.
    """
    if not 1 <= turn_end_frames <= horizon:
        raise ValueError(f"need 1 <= turn_end_frames <= horizon, got {turn_end_frames} and {horizon}")
    if len(dataset) != len(alignments):
        raise ValueError(f"{len(dataset)} dialogues but {len(alignments)} alignment lists")
    k = delay0_user_codebook(config)
    row = 1 + config.dep_q + k
    card, columns = config.card, horizon + 1
    silent_sum = torch.zeros(card, columns, dtype=torch.float64)
    seen = torch.zeros(card, columns, dtype=torch.float64)
    state_silent = torch.zeros(2, columns, dtype=torch.float64)
    state_seen = torch.zeros(2, columns, dtype=torch.float64)
    token_counts = torch.zeros(card, dtype=torch.long)
    for item, words in zip(dataset, alignments):
        tokens = _codes(item)[row].long()
        T = tokens.shape[0]
        silent = ~voice_activity(words, T, main_speaker, user=True, frame_rate=frame_rate)
        targets, valid = future_silence_targets(silent, horizon, turn_end_frames)  # [T, columns]
        known = tokens != ZERO_TOKEN_ID
        tok = tokens.clamp_min(0)
        token_counts += torch.bincount(tok[known], minlength=card)
        weight = (valid & known[:, None]).double()
        silent_sum.index_add_(0, tok, targets.double() * weight)
        seen.index_add_(0, tok, weight)
        state = silent.long()
        state_silent.index_add_(0, state, targets.double() * weight)
        state_seen.index_add_(0, state, weight)
    if seen[:, 0].sum() == 0:
        raise ValueError("fit_turn_taking_statistics: no frame to count")
    prior = silent_sum.sum(0) / seen.sum(0).clamp_min(1)
    token_table = (silent_sum + prior_weight * prior) / (seen + prior_weight)
    two_state = (state_silent + prior_weight * prior) / (state_seen + prior_weight)
    return TurnTakingStatistics(horizon=horizon, turn_end_frames=turn_end_frames, token_table=token_table.float(),
                                two_state_table=two_state.float(), silence_prob=token_table[:, 0].float(),
                                token_counts=token_counts, codebook=k, num_frames=int(seen[:, 0].sum()))


def future_silence_targets(
    silent: torch.Tensor, horizon: int, turn_end_frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every frame `t`: silent at `t + n - 1` (`n = 1 .. horizon`), then silent over all of frames
    `t + horizon - turn_end_frames .. t + horizon - 1`; and where that is known (inside the dialogue): the
    voice-activity head's targets ([`voice_activity_targets`]) of one dialogue.

    Returns:
        `targets`, `valid`: bool `[T, horizon + 1]`.
    """
    targets, known = voice_activity_targets((~silent).long()[None], silent.shape[0], 0, horizon, turn_end_frames)
    return targets[0].bool(), known[0]


class DialoguesWithVoiceActivity(torch.utils.data.Dataset):
    """`dataset`'s dialogues with the user's voice activity from their word alignments: item `i` is `dataset[i]`
    (codes, or a dict holding them as `"codes"`) as a dict with `"user_activity"` `[T]` (1 where the user speaks in a
    frame, else 0; see [`voice_activity`]), what the Trainer's collator cuts into the targets of a voice-activity
    head's loss.

    Raises:
        ValueError: the lengths differ.
    """

    def __init__(self, dataset: Sequence[Mapping | torch.Tensor], alignments: Sequence[Sequence],
                 main_speaker: str = "SPEAKER_MAIN"):
        if len(dataset) != len(alignments):
            raise ValueError(f"{len(dataset)} dialogues but {len(alignments)} alignment lists")
        self.dataset, self.main_speaker = dataset, main_speaker
        self.alignments = [validate_alignments(words) for words in alignments]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        out = dict(item) if isinstance(item, Mapping) else {"codes": item}
        frames = _codes(out).shape[1]
        out["user_activity"] = voice_activity(self.alignments[i], frames, self.main_speaker, user=True).long()
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


# ------------------------------------------------------------------------------------ activity and events
def voice_activity(
    alignments: Sequence[Sequence], num_frames: int, main_speaker: str = "SPEAKER_MAIN", *, user: bool,
    frame_rate: float = FRAME_RATE,
) -> torch.Tensor:
    """Bool `[num_frames]`: frame `f` (`[f / frame_rate, (f + 1) / frame_rate)`) overlaps a word of the user
    (`user=True`: every speaker but `main_speaker`) or of the system (`user=False`)."""
    active = torch.zeros(num_frames, dtype=torch.bool)
    for _, (start, end), speaker in validate_alignments(alignments):
        if (speaker != main_speaker) != user:
            continue
        first = math.floor(start * frame_rate)
        last = math.ceil(end * frame_rate) - 1 if end > start else first  # frames the word overlaps
        active[max(first, 0) : min(last, num_frames - 1) + 1] = True
    return active


def _runs(active: torch.Tensor, min_gap: int) -> list[tuple[int, int]]:
    """Inclusive `(first, last)` frames of the active runs, runs separated by fewer than `min_gap` silent frames
    merged (inter-pausal units)."""
    frames = active.nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for f in frames:
        if runs and f - runs[-1][1] - 1 < min_gap:
            runs[-1][1] = f
        else:
            runs.append([f, f])
    return [(a, b) for a, b in runs]


@dataclass
class Pause:
    """The end of a user inter-pausal unit while the system is silent: `end_frame` is its last active frame,
    `start_frame` its first; `shift` the system speaks next (the user's turn ended), else the user resumes (hold);
    `silence_frames` the user's silence after it (None: to the end of the dialogue); `system_onset` the frame the
    system starts (None: it does not before the user resumes)."""

    start_frame: int
    end_frame: int
    shift: bool
    silence_frames: int | None
    system_onset: int | None


@dataclass
class Onset:
    """A user inter-pausal unit starting while the system speaks: a backchannel (short, the system keeps the
    floor) or a barge-in (the user takes the floor)."""

    start_frame: int
    end_frame: int
    backchannel: bool


@dataclass
class TurnTakingEvents:
    pauses: list[Pause] = field(default_factory=list)
    onsets: list[Onset] = field(default_factory=list)
    user_activity: torch.Tensor | None = None
    system_activity: torch.Tensor | None = None

    @property
    def shifts(self) -> list[Pause]:
        return [p for p in self.pauses if p.shift]

    @property
    def holds(self) -> list[Pause]:
        return [p for p in self.pauses if not p.shift]


def find_events(
    user_activity: torch.Tensor, system_activity: torch.Tensor, *, min_pause_frames: int = 2,
    max_backchannel_frames: int = 12, context_frames: int = 3,
) -> TurnTakingEvents:
    """Turn-taking events on a frame grid, from the two speakers' voice activity (bool `[T]` each).

    - User inter-pausal units (IPUs): runs of user activity, gaps shorter than `min_pause_frames` merged.
    - **Pause** at the end of every user IPU after which the user is silent for at least `min_pause_frames`, the
      system silent at its last frame: a **shift** when the system starts speaking before the user speaks again
      (the user's turn ended), a **hold** when the user resumes first. An IPU end with neither after it (end of the
      dialogue) is no event.
    - **Onset** at every user IPU starting while the system speaks (active within the `context_frames` before
      it): a **backchannel** when it lasts at most `max_backchannel_frames` and the system still speaks within
      `context_frames` after it, otherwise a **barge-in**.
    """
    T = user_activity.shape[0]
    user_ipus = _runs(user_activity, min_pause_frames)
    events = TurnTakingEvents(user_activity=user_activity, system_activity=system_activity)
    for i, (first, last) in enumerate(user_ipus):
        next_user = user_ipus[i + 1][0] if i + 1 < len(user_ipus) else None
        if last + 1 < T and not bool(system_activity[last]):
            horizon_end = next_user if next_user is not None else T
            system_after = system_activity[last + 1 : horizon_end].nonzero().flatten()
            system_onset = last + 1 + int(system_after[0]) if system_after.numel() else None
            if system_onset is not None or next_user is not None:
                silence = None if next_user is None else next_user - last - 1
                if silence is None or silence >= min_pause_frames:
                    events.pauses.append(Pause(first, last, system_onset is not None, silence, system_onset))
        if bool(system_activity[max(first - context_frames, 0) : first + 1].any()):
            after = system_activity[last + 1 : last + 1 + context_frames]
            short = last - first + 1 <= max_backchannel_frames
            events.onsets.append(Onset(first, last, short and bool(after.any())))
    return events


def dialogue_events(
    alignments: Sequence[Sequence], num_frames: int, main_speaker: str = "SPEAKER_MAIN", *,
    frame_rate: float = FRAME_RATE, **find_events_kwargs: int,
) -> TurnTakingEvents:
    """[`find_events`] of one dialogue's word alignments over `num_frames` frames (both speakers' activity from
    [`voice_activity`], kept on the result as `user_activity` and `system_activity`)."""
    user = voice_activity(alignments, num_frames, main_speaker, user=True, frame_rate=frame_rate)
    system = voice_activity(alignments, num_frames, main_speaker, user=False, frame_rate=frame_rate)
    return find_events(user, system, **find_events_kwargs)


def stretch_hold_pauses(
    codes: torch.Tensor, alignments: Sequence[Sequence], extra_frames: int | Sequence[int], *,
    main_speaker: str = "SPEAKER_MAIN", min_pause_frames: int = 2, frame_rate: float = FRAME_RATE,
) -> tuple[torch.Tensor, list]:
    """One dialogue with its user pauses inside a turn (the holds of [`find_events`]) made longer.

    Why: in recorded conversation, pauses inside a turn are often as long as the gaps between turns (Heldner & Edlund
    2010), which is what makes a silence timer take the floor too early; the shipped sample's are all under 0.33 s,
    so a timer of 500 ms is never wrong on it. Lengthening them gives a harder test (and training data that does
    not reward reading a turn end off the silence's length).

    Each hold's last silent frame (both speakers silent; the user speaks next) is repeated `extra_frames` more times
    in every row of `codes` (text padding and both speakers' silence codes: the codec is causal, so that frame is
    what more silence encodes to, up to the codec's rare code changes in long silences), and every word from there
    on starts and ends that much later.

    Args:
        codes: `[1 + n_q, T]`.
        alignments: its moshi-finetune word alignments.
        extra_frames: frames added to every hold, or one count per hold in order.

    Returns:
        The new codes `[1 + n_q, T + added]` and alignments.

    Raises:
        ValueError: a count per hold that does not match the holds, or a negative count.
    """
    words = validate_alignments(alignments)
    holds = dialogue_events(words, codes.shape[1], main_speaker, frame_rate=frame_rate,
                            min_pause_frames=min_pause_frames).holds
    counts = [extra_frames] * len(holds) if isinstance(extra_frames, int) else list(extra_frames)
    if len(counts) != len(holds) or any(count < 0 for count in counts):
        raise ValueError(f"extra_frames must be a count >= 0 or one per hold ({len(holds)}), got {extra_frames!r}")
    pieces, start, shifts = [], 0, []
    for pause, count in zip(holds, counts):
        last_silent = pause.end_frame + pause.silence_frames  # the frame before the user speaks again
        pieces += [codes[:, start:last_silent], codes[:, last_silent : last_silent + 1].expand(-1, count)]
        start = last_silent
        shifts.append((last_silent / frame_rate, count / frame_rate))
    pieces.append(codes[:, start:])

    def later(time: float) -> float:
        return round(time + sum(seconds for at, seconds in shifts if time >= at - 1e-9), 6)

    stretched = [[word, [later(begin), later(end)], speaker] for word, (begin, end), speaker in words]
    return torch.cat(pieces, dim=1), stretched


# ---------------------------------------------------------------------------------------------------- metrics
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
                   median_anticipation_ms=_median(anticipation_ms),
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
        header = ("| predictor | decides at | balanced accuracy | F1 | AUC | shift recall | hold recall | "
                  "median anticipation | shifts detected |")
        lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, m in self.predictors.items():
            s = m.shift_hold
            lines.append(f"| {name} | +{m.decision_ms:.0f} ms | {_percent(s.balanced_accuracy)} | {_number(s.f1)} | "
                         f"{_number(s.auc)} | {_percent(s.recall)} | {_percent(s.specificity)} | "
                         f"{_ms(m.median_anticipation_ms)} | {_percent(m.detected)} |")
        if self.backchannel:
            lines += ["", "| predictor | backchannel vs barge-in: balanced accuracy | F1 | AUC |",
                      "|---|---:|---:|---:|"]
            lines += [f"| {name} | {_percent(m.balanced_accuracy)} | {_number(m.f1)} | {_number(m.auc)} |"
                      for name, m in self.backchannel.items()]
        lines += ["", "| predictor | P(turn end) per frame: AUC | log-loss | frames |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {_number(m.auc)} | {_number(m.log_loss)} | {m.count} |"
                  for name, m in self.frames.items()]
        horizon_ms = self.horizon * self.frame_ms
        lines.append(
            f"\n{self.num_shifts} shifts, {self.num_holds} holds, {self.num_backchannels} backchannels, "
            f"{self.num_barge_ins} barge-ins over {self.num_dialogues} dialogues. Signal ({self.kind} table): "
            f"P(user silent over the last {self.turn_end_frames * self.frame_ms:.0f} ms of the next "
            f"{horizon_ms:.0f} ms), threshold {self.threshold:g}; decisions at the end of the user's last speech "
            f"frame + {self.decision_delay} frame(s); anticipation before the end of that frame (positive: early).")
        return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0f} ms"


def _median(values: Sequence[float]) -> float | None:
    """The lower median; None when it is -inf (most shifts missed) or there is nothing."""
    if not values:
        return None
    value = sorted(values)[(len(values) - 1) // 2]
    return None if value == -math.inf else value


# ---------------------------------------------------------------------------------------------------- evaluation
def dialogue_alignments(encoded_dir: str | os.PathLike) -> list[list]:
    """The word alignments of an `encode_dataset` output, in the order of `EncodedDialogues(encoded_dir)`: each
    shard's source audio path (relative to the manifest recorded in `index.json`) with `.json` beside it.

    Raises:
        ValueError: no `index.json`, or an alignment file is missing or malformed.
    """
    index_path = Path(encoded_dir) / "index.json"
    if not index_path.is_file():
        raise ValueError(f"{encoded_dir} has no index.json (an `encode` output directory is needed for alignments)")
    index = read_json_object(index_path, "encoding index")
    if not isinstance(index.get("manifest"), str) or not isinstance(index.get("shards"), list):
        raise ValueError(f"{index_path} records no manifest and shards: the alignments are found through the "
                         "manifest an `encode` run records (re-run `encode` into this folder)")
    root = Path(index["manifest"]).parent
    out = []
    for shard in index["shards"]:
        path = (root / shard["source"]).with_suffix(".json")
        try:
            out.append(validate_alignments(json.loads(path.read_text(encoding="utf-8"))["alignments"]))
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise ValueError(f"cannot read the alignments of {shard['source']} ({path}): {error}") from error
    return out


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
    timers_ms: Sequence[float] = (200, 500, 700),
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
    predicts). A silence timer of `ms` decides shift once the user has been silent `timer_frames(ms)` frames, hold
    if the user speaks before; it fires that many frames after the turn end. Backchannel vs barge-in is scored at
    boundary `onset + onset_delay` with `turn_end` (a backchannel is followed by silence). Per frame, each signal's
    `turn_end` is also scored against what followed at every boundary where it is known ([`FrameMetrics`]: many
    more decisions than the pauses, so a steadier comparison of the signals; no timer has an opinion there).

    Args:
        model: a model with a user branch (put in eval mode for the call).
        dataset: held-out dialogues, codes `[1 + n_q, T]` or dicts with `"codes"`.
        alignments: their word alignments (see [`dialogue_alignments`]).
        statistics: from [`fit_turn_taking_statistics`] on the training dialogues.
        kind: `"token"` or `"two_state"` table ([`TurnTakingStatistics.table`]).
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
    timer_names = {f"timer_{ms:g}ms": timer_frames(ms) for ms in timers_ms}
    labels: list[bool] = []
    c = model.config
    signal_names = ("model", *(("vap_head",) if model.voice_activity_head is not None else ()), "repeat_last",
                    "unigram")
    signal_horizon = {name: (statistics.horizon, statistics.turn_end_frames) for name in signal_names}
    if model.voice_activity_head is not None:
        signal_horizon["vap_head"] = (c.voice_activity_horizon, c.voice_activity_turn_end_frames)
    frame_scores: dict[str, list[torch.Tensor]] = {name: [] for name in signal_names}
    frame_labels: dict[str, list[torch.Tensor]] = {name: [] for name in signal_names}
    scores: dict[str, list[float]] = {name: [] for name in (*signal_names, *timer_names)}
    anticipation: dict[str, list[float]] = {name: [] for name in scores}
    onset_labels: list[bool] = []
    onset_scores: dict[str, list[float]] = {name: [] for name in signal_names}
    counts = {"shifts": 0, "holds": 0, "backchannels": 0, "barge_ins": 0}
    timeline: dict[str, Any] = {}
    was_training = model.training
    model.eval()
    try:
        for i, (item, words) in enumerate(zip(dataset, alignments)):
            codes = _codes(item).long()
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
            for pause in events.pauses:
                decide = pause.end_frame + 1 + decision_delay
                if decide >= T or (pause.system_onset is not None and pause.system_onset <= decide):
                    continue
                labels.append(pause.shift)
                counts["shifts" if pause.shift else "holds"] += 1
                for name in signal_names:
                    turn_end = signals[name][1]
                    scores[name].append(float(turn_end[decide]))
                    if pause.shift:
                        ahead = anticipation_frames(turn_end, pause, threshold)
                        anticipation[name].append(-math.inf if ahead is None else ahead * frame_ms)
                for name, frames in timer_names.items():
                    fires = pause.silence_frames is None or pause.silence_frames >= frames
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
            scores[name], labels, anticipation[name], 0.5 if is_timer else threshold,
            (timer_names[name] if is_timer else decision_delay) * frame_ms)
    backchannel = {name: binary_metrics(onset_scores[name], onset_labels, threshold)
                   for name in signal_names} if onset_labels else {}
    frames = {name: frame_metrics(torch.cat(frame_scores[name]), torch.cat(frame_labels[name]))
              for name in signal_names}
    report = TurnTakingReport(
        predictors=predictors, backchannel=backchannel, frames=frames, num_shifts=counts["shifts"], num_holds=counts["holds"],
        num_backchannels=counts["backchannels"], num_barge_ins=counts["barge_ins"], num_dialogues=len(dataset),
        threshold=threshold, horizon=statistics.horizon, turn_end_frames=statistics.turn_end_frames, kind=kind,
        decision_delay=decision_delay, onset_delay=onset_delay, frame_ms=frame_ms, timeline=timeline,
    )
    report.timeline["scores"] = {"labels": labels, **scores}  # per pause, for pooling over runs and the ROC plot
    report.timeline["anticipation_ms"] = anticipation  # per shift (-inf: never detected)
    if plot_dir is not None:
        report.plots = plot_turn_taking(report, plot_dir)
    return report


def _codes(item: Mapping | torch.Tensor) -> torch.Tensor:
    codes = item["codes"] if isinstance(item, Mapping) else item
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError("a dialogue must be codes [1 + n_q, T] (or a dict holding them as 'codes')")
    return codes


def _name(item: Mapping | torch.Tensor, index: int) -> str:
    return str(item.get("name", index)) if isinstance(item, Mapping) else str(index)


# ---------------------------------------------------------------------------------------------------- plots
def plot_turn_taking(report: TurnTakingReport, plot_dir: str | os.PathLike) -> dict[str, str]:
    """Write `turn_taking_timeline.png` (one dialogue: both speakers' activity, the model's P(user silent) over the
    horizon as a heat map, P(turn end) of each predictor with the threshold, shifts and holds marked) and
    `turn_taking_roc.png` (shift-vs-hold ROC of the signal predictors, the timers as points).

    Raises:
        ImportError: matplotlib is missing (`pip install 'hf_moshi_userpred[plots]'`).
    """
    from .user_prediction import save_figures

    drawings = {"turn_taking_roc": (lambda figure: _plot_roc(report, figure), (5, 5))}
    if report.timeline.get("user") is not None:
        drawings["turn_taking_timeline"] = (lambda figure: _plot_timeline(report, figure), (11, 6))
    return save_figures(plot_dir, drawings)


def _spans(active: torch.Tensor) -> list[tuple[int, int]]:
    return [(a, b - a + 1) for a, b in _runs(active, 1)]


def _plot_timeline(report: TurnTakingReport, figure: Figure) -> Figure:
    t = report.timeline
    ms = report.frame_ms / 1000
    activity, heat, curves = figure.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2, 2]})
    for y, name, color in ((1, "user", "C1"), (0, "system", "C0")):
        activity.broken_barh([(a * ms, n * ms) for a, n in _spans(t[name])], (y - 0.4, 0.8), color=color)
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
            ax.plot(*_roc(scores[name], labels), label=f"{name} (AUC {_number(metrics.auc)})")
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


__all__ = [
    "STATISTICS_NAME",
    "BinaryMetrics",
    "DialoguesWithVoiceActivity",
    "FrameMetrics",
    "Onset",
    "Pause",
    "ShiftHoldMetrics",
    "TurnTakingEvents",
    "TurnTakingReport",
    "TurnTakingStatistics",
    "anticipation_frames",
    "auc",
    "binary_metrics",
    "delay0_user_codebook",
    "dialogue_events",
    "dialogue_alignments",
    "evaluate_turn_taking",
    "find_events",
    "fit_turn_taking_statistics",
    "frame_metrics",
    "future_silence_targets",
    "plot_turn_taking",
    "stretch_hold_pauses",
    "timer_frames",
    "turn_taking_signal",
    "user_signals",
    "voice_activity",
]
