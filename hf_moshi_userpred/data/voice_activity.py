"""The user's voice activity from word alignments, and the turn-taking signal's token table fitted on it.

**Voice activity** ([`voice_activity`]): per 80 ms frame, whether a speaker's word overlaps it; [`activity_runs`] its
runs (inter-pausal units). [`DialoguesWithVoiceActivity`] adds the user's to each dialogue, the targets of a
voice-activity head's loss (the Trainer's collator cuts them into segments); [`dialogue_alignments`] reads the word
alignments of an `encode` output.

**The signal's table** ([`fit_turn_taking_statistics`]). At each frame the user Depformer gives a distribution over
the user's next semantic (delay-0) token. A table fitted on training dialogues (their codes and word alignments)
says, for every token value `c`, how often the user was silent `n - 1` frames after a frame holding `c`
(`n = 1 .. horizon`), and how often the user was silent over the last `turn_end_frames` frames of the horizon. The
signal is that table averaged under the predicted distribution (a first-order rollout in token space: the future is
assumed to depend on the context only through the next token):

    silence[..., n - 1] = sum_c p(c) * P(user silent at frame t + n - 1 | token at t = c)     n = 1 .. horizon
    turn_end[...]       = sum_c p(c) * P(user silent over frames t + horizon - turn_end_frames .. t + horizon - 1
                                         | token at t = c)

`turn_end` is the probability that the user's turn ends within the horizon: a user who is silent over the end of
the horizon has stopped (the sample's in-turn pauses are shorter than `turn_end_frames`). `turn_taking_signal` is
that computation, a pure function of tensors (torch only) in the remote-code file
`models/generation_moshi_text_constraints.py` (the streaming session emits it each step as `user_turn`).
`kind="two_state"` replaces the per-token rows by two rows (silence token or not: the mass the branch puts on the
silence tokens, rolled out with the training data's silence/speech persistence), the variant that needs only
[`TurnTakingStatistics.silence_tokens`]. A model with a voice-activity-projection head
(`config.voice_activity_horizon`, `modeling_moshi_voice_activity.py`) has the same outputs learned directly from
voice-activity targets.

This lives in the data room, not with the evaluation: the serving engine loads the table and training reads the
voice activity, and neither may import an evaluation module.

    stats = fit_turn_taking_statistics(train, dialogue_alignments("encoded/train"), model.config)
    stats.save(model_dir)  # STATISTICS_NAME, what the serving engine loads beside the weights
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.configuration_moshi_userpred import FRAME_RATE, MoshiUserPredConfig
from ..models.modeling_moshi_codes import ZERO_TOKEN_ID
from ..models.modeling_moshi_voice_activity import voice_activity_targets
from ..utils.files import read_json_object
from .text_alignment import validate_alignments

DEFAULT_HORIZON = 10  # frames (800 ms)
DEFAULT_TURN_END_FRAMES = 5  # the last 400 ms of the horizon
STATISTICS_NAME = "turn_taking_statistics.json"  # where a model directory keeps them
KINDS = ("token", "two_state")


# ------------------------------------------------------------------------------------------- voice activity
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


def activity_runs(active: torch.Tensor, min_gap: int) -> list[tuple[int, int]]:
    """Inclusive `(first, last)` frames of the active runs of `active` `[T]`, runs separated by fewer than `min_gap`
    silent frames merged (inter-pausal units)."""
    frames = active.nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for f in frames:
        if runs and f - runs[-1][1] - 1 < min_gap:
            runs[-1][1] = f
        else:
            runs.append([f, f])
    return [(a, b) for a, b in runs]


def activity_spans(active: torch.Tensor, frame_seconds: float) -> list[tuple[float, float]]:
    """`(start_s, duration_s)` of the runs of `active` `[T]` (frames of `frame_seconds`), what a timeline plot's
    `broken_barh` draws."""
    return [(first * frame_seconds, (last - first + 1) * frame_seconds) for first, last in activity_runs(active, 1)]


def dialogue_codes(item: Mapping | torch.Tensor) -> torch.Tensor:
    """The codes `[1 + n_q, T]` of one dialogue given as codes or as a dict holding them as `"codes"`.

    Raises:
        ValueError: not a 2-D tensor.
    """
    codes = item["codes"] if isinstance(item, Mapping) else item
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError("a dialogue must be codes [1 + n_q, T] (or a dict holding them as 'codes')")
    return codes


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
        frames = dialogue_codes(out).shape[1]
        out["user_activity"] = voice_activity(self.alignments[i], frames, self.main_speaker, user=True).long()
        return out


# ---------------------------------------------------------------------------------------------- the token table
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
        tokens = dialogue_codes(item)[row].long()
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


__all__ = [
    "DEFAULT_HORIZON",
    "DEFAULT_TURN_END_FRAMES",
    "KINDS",
    "STATISTICS_NAME",
    "DialoguesWithVoiceActivity",
    "TurnTakingStatistics",
    "activity_runs",
    "activity_spans",
    "delay0_user_codebook",
    "dialogue_alignments",
    "dialogue_codes",
    "fit_turn_taking_statistics",
    "future_silence_targets",
    "voice_activity",
]
