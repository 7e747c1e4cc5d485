"""The voice-activity-projection (VAP) head: the user's voice activity over the next frames, from the user branch's
input.

At every position the main transformer's output (the hidden state the user Depformer reads) goes through one linear
layer to `horizon + 1` logits: P(the user is silent `n - 1` frames after the frame the user branch predicts at that
position), `n = 1 .. horizon`, and P(the user is silent over the last `turn_end_frames` frames of the horizon), the
probability that the user's turn ends within the horizon (Ekstedt & Skantze's voice activity projection, reduced to
the user's channel). These are the same outputs as the token-table signal of `turn_taking_signal`, learned directly
from voice-activity targets instead of read off the predicted next token.

By default the head reads the hidden state with its gradient stopped: its loss trains the head alone and never
changes what the model says or predicts (on the shipped sample, letting it reach the transformer cost 2 points of
delay-0 user accuracy and the head overfitted: held-out per-frame log-loss 1.53 against 0.57). With
`config.voice_activity_trains_transformer` the loss reaches the transformer, as in VAP models, which learn what ends
a turn only from such a target (`demo --data` trains so on a corpus of hours).
"""

from __future__ import annotations

import torch
from torch import nn

from .configuration_moshi_userpred import MoshiUserPredConfig


class MoshiVoiceActivityHead(nn.Module):
    """`hidden` `[..., dim]` -> logits `[..., voice_activity_horizon + 1]` (see the module docstring)."""

    def __init__(self, config: MoshiUserPredConfig):
        super().__init__()
        self.proj = nn.Linear(config.dim, config.voice_activity_horizon + 1)
        self.trains_transformer = config.voice_activity_trains_transformer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj((hidden if self.trains_transformer else hidden.detach()).to(self.proj.weight.dtype))

    def signal(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`silence` `[..., horizon]` and `turn_end` `[...]` probabilities (float32)."""
        probs = torch.sigmoid(self(hidden).float())
        return probs[..., :-1], probs[..., -1]


def voice_activity_targets(
    user_activity: torch.Tensor, num_positions: int, offset: int, horizon: int, turn_end_frames: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's targets from the user's voice activity per frame.

    Args:
        user_activity: `[B, F]` 1 where the user speaks in a frame, 0 where silent, -1 unknown (no alignment, or
            past the end of the dialogue); frames past `F` are unknown.
        num_positions: `T`, the positions to score.
        offset: the first frame position 0 predicts (`user_prediction_lookahead - 1`).
        horizon, turn_end_frames: as the config's `voice_activity_*`.

    Returns:
        `targets` (float) and `known` (bool), `[B, T, horizon + 1]`: position `s`, column `n - 1`: the user is silent in
        frame `s + offset + n - 1`; last column: silent over all of frames `s + offset + horizon - turn_end_frames ..
        s + offset + horizon - 1`.
    """
    B, F = user_activity.shape
    frames = offset + torch.arange(num_positions, device=user_activity.device)[:, None] + torch.arange(
        horizon, device=user_activity.device)[None]  # [T, horizon]
    padded = torch.cat([user_activity, user_activity.new_full((B, max(int(frames.max()) + 1 - F, 0)), -1)], 1)
    ahead = padded[:, frames]  # [B, T, horizon]
    silent, known = ahead == 0, ahead >= 0
    tail = slice(horizon - turn_end_frames, horizon)
    targets = torch.cat([silent, silent[..., tail].all(-1, keepdim=True)], -1)
    return targets.float(), torch.cat([known, known[..., tail].all(-1, keepdim=True)], -1)


__all__ = ["MoshiVoiceActivityHead", "voice_activity_targets"]
