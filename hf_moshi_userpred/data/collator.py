"""Fixed-length training segments cut from whole encoded dialogues.

Dialogues are minutes long and of different lengths; a batch is `[B, 1 + n_q, segment_frames]`. Training takes one
segment at a random offset of each dialogue per draw (moshi-finetune's sampling); evaluation covers every frame
once with consecutive segments (`DialogueSegments`). Short dialogues and the last segment are padded with the zero
token -1, which the model embeds as nothing and never scores.

Dialogues may carry the user's voice activity per frame (`"user_activity"` `[T]`: 1 speaks, 0 silent, -1 unknown;
`voice_activity.DialoguesWithVoiceActivity` adds it from word alignments): for a model with a voice-activity head the
batch then holds `"user_activity"` `[B, segment_frames + lookahead - 1 + horizon]`, cut at the segment's offset and
reaching past it by the frames the head forecasts, the targets of its loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..models.modeling_moshi_codes import ZERO_TOKEN_ID, check_codes


def _codes_of(item: Mapping | torch.Tensor) -> torch.Tensor:
    codes = item["codes"] if isinstance(item, Mapping) else item
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"a dialogue must be codes [1 + n_q, T] (or a dict holding them as 'codes'), got {shape}")
    return codes


@dataclass
class MoshiSegmentCollator:
    """Collate dialogues `{"codes": [1 + n_q, T]}` into `{"codes": LongTensor [B, 1 + n_q, segment_frames]}`.

    A dialogue with a persona prompt (`"prompt"` `[1 + n_q, P]`, from its `text_prompt`/`voice_prompt` fields, see
    `encode`) starts each of its segments with the prompt, then `segment_frames - P` frames of the dialogue; the batch
    then holds `"prompt_frames"` `[B]` (0 for the dialogues without one), which the model reads and does not learn.

    Args:
        segment_frames: frames per segment (12.5 per second).
        random_offset: a uniformly random start in `[0, T - segment_frames]` for each dialogue (training), drawn from
            torch's global generator so a `Trainer` checkpoint restores it; False starts at frame 0 (evaluation of
            items that already are segments, see [`DialogueSegments`]).
        config: the model's config: every batch's values are checked against its vocabularies here, on the CPU, so
            the training forward does not have to (the check would cost a host sync per step on a GPU).
    """

    segment_frames: int
    random_offset: bool = True
    config: Any = None

    def __post_init__(self) -> None:
        if self.segment_frames < 1:
            raise ValueError(f"segment_frames must be >= 1, got {self.segment_frames}")

    def __call__(self, items: Sequence[Mapping | torch.Tensor]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        codes = [_codes_of(item) for item in items]
        rows = {c.shape[0] for c in codes}
        if len(rows) != 1:
            raise ValueError(f"dialogues in a batch have different numbers of rows: {sorted(rows)}")
        batch = torch.full((len(codes), rows.pop(), self.segment_frames), ZERO_TOKEN_ID, dtype=torch.long)
        activity = self._activity_batch(items)
        prompt_frames = torch.zeros(len(codes), dtype=torch.long)
        for i, c in enumerate(codes):
            prompt = items[i].get("prompt") if isinstance(items[i], Mapping) else None
            if prompt is not None:  # a persona prompt starts every segment of its dialogue
                prompt_frames[i] = self._check_prompt(prompt, c, items[i].get("name", f"item {i}"))
                batch[i, :, : prompt_frames[i]] = prompt
            room = self.segment_frames - int(prompt_frames[i])
            spare = c.shape[1] - room
            start = int(torch.randint(spare + 1, ())) if self.random_offset and spare > 0 else 0
            segment = c[:, start : start + room]
            batch[i, :, prompt_frames[i] : prompt_frames[i] + segment.shape[1]] = segment
            if activity is not None and isinstance(items[i], Mapping) and "user_activity" in items[i]:
                ahead = items[i]["user_activity"][start : start + activity.shape[1] - int(prompt_frames[i])]
                activity[i, prompt_frames[i] : prompt_frames[i] + ahead.shape[0]] = ahead
        out = {"codes": check_codes(batch, self.config, name="batch codes")}
        if activity is not None:
            out["user_activity"] = activity
        if bool(prompt_frames.any()):
            out["prompt_frames"] = prompt_frames
        return out

    def _check_prompt(self, prompt: torch.Tensor, codes: torch.Tensor, name: str) -> int:
        """The frames of a dialogue's persona prompt `[rows, P]`, refused when it leaves no room for the dialogue."""
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[0] != codes.shape[0]:
            shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
            raise ValueError(f"{name}: its persona prompt must be codes [{codes.shape[0]}, frames], got {shape}")
        if prompt.shape[1] >= self.segment_frames:
            raise ValueError(f"{name}: its persona prompt has {prompt.shape[1]} frames, which leaves no room for the "
                             f"dialogue in segments of {self.segment_frames} frames (raise segment_frames)")
        return prompt.shape[1]

    def _activity_batch(self, items: Sequence[Mapping | torch.Tensor]) -> torch.Tensor | None:
        """`[B, segment_frames + lookahead - 1 + horizon]` of -1 (unknown) when the model has a voice-activity head
        and some item carries `"user_activity"`, else None."""
        horizon = getattr(self.config, "voice_activity_horizon", 0)
        if not horizon or not any(isinstance(item, Mapping) and "user_activity" in item for item in items):
            return None
        frames = self.segment_frames + self.config.user_prediction_lookahead - 1 + horizon
        return torch.full((len(items), frames), -1, dtype=torch.long)


class DialogueSegments(Dataset):
    """Every dialogue of `dataset` cut into consecutive `segment_frames` segments (the last one shorter).

    Deterministic and covering each frame exactly once, for evaluation. Items are `{"codes": [1 + n_q, <=S],
    "name": "<dialogue>@<start frame>"}`, and `"user_activity"` from the segment's start to the dialogue's end when the
    dialogue carries it.
    """

    def __init__(self, dataset: Sequence[Mapping | torch.Tensor], segment_frames: int):
        if segment_frames < 1:
            raise ValueError(f"segment_frames must be >= 1, got {segment_frames}")
        self.dataset = dataset
        self.index = []  # (dialogue, start frame)
        for i in range(len(dataset)):
            frames = _codes_of(dataset[i]).shape[1]
            self.index.extend((i, start) for start in range(0, frames, segment_frames))
        self.segment_frames = segment_frames

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | str]:
        dialogue, start = self.index[i]
        item = self.dataset[dialogue]
        name = item.get("name", str(dialogue)) if isinstance(item, Mapping) else str(dialogue)
        segment = {"codes": _codes_of(item)[:, start : start + self.segment_frames], "name": f"{name}@{start}"}
        if isinstance(item, Mapping) and "user_activity" in item:  # the frames after the segment too: targets
            segment["user_activity"] = item["user_activity"][start:]
        return segment


__all__ = ["DialogueSegments", "MoshiSegmentCollator"]
