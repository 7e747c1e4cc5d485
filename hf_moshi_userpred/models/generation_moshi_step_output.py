"""What a streaming step returns (`MoshiStreamStepOutput`) and the session's speculation counts (`SpeculationStats`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .generation_moshi_text_constraints import MoshiUserTurnOutput


@dataclass
class MoshiStreamStepOutput(ModelOutput):
    r"""What one [`MoshiStreamingSession.step`] produced.

    Args:
        tokens (`torch.LongTensor` `[B, 1 + dep_q, 1]`, *optional*): text and system audio tokens aligned like moshi's
            `LMGen.step` (the text token of the previous call with the audio of this one). None while every
            slot is within its first `max(delays)` calls; -2 for a slot still warming up or paused.
        user_prediction (`torch.LongTensor` `[B, user_dep_q, L]`): the user tokens the main transformer will read
            in row `1 + dep_q + k` at calls `o + 1 .. o + L` (`L = user_prediction_lookahead`), each from the
            latest call that predicted it; for a delay-0 row, entry 0 is the user's next frame. -1 before any
            prediction exists.
        user_probs (`torch.FloatTensor` `[B, user_dep_q, L]`): probability of each predicted token under the user
            Depformer's own softmax (NaN where none).
        user_entropy (`torch.FloatTensor` `[B, user_dep_q, L]`): entropy (nats) of that softmax.
        user_turn ([`MoshiUserTurnOutput`], *optional*): the turn-taking signal, with the user branch on, for a
            model with a voice-activity head (from it) or a session opened with `turn_taking_table`.
        speculative (`list[str]`): per slot, "hit" (the precomputed step was committed), "miss" (the user's
            tokens were not among the candidates: a normal step ran) or "not_tried".
        gap_filled (`torch.BoolTensor` `[B, n_q - dep_q]`, *optional*): after `step(None)`, the user rows of the
            missing frame that got the predicted token (the others got the fallback token).
        critical_s (`float`): seconds from the frame's arrival to its tokens (the critical path of this call).
        speculate_s (`float`): seconds this call spent precomputing the next one (0 without speculation); a
            real-time loop spends them while it waits for the next frame.
    """

    tokens: torch.Tensor | None = None
    user_prediction: torch.Tensor | None = None
    user_probs: torch.Tensor | None = None
    user_entropy: torch.Tensor | None = None
    user_turn: MoshiUserTurnOutput | None = None
    speculative: list[str] | None = None
    gap_filled: torch.Tensor | None = None
    critical_s: float | None = None
    speculate_s: float | None = None


@dataclass
class SpeculationStats:
    """Counts per slot-step and wall-clock seconds of speculative streaming.

    `critical_hit_s` / `critical_normal_s` are the time from a frame's arrival to its tokens on steps that
    committed a speculation and on the others; `speculate_s` is the time spent precomputing, which a real-time
    loop spends while waiting for the next frame.
    """

    top_k: int = 0
    hits: int = 0
    misses: int = 0
    not_tried: int = 0
    hit_steps: int = 0
    normal_steps: int = 0
    speculate_s: float = 0.0
    critical_hit_s: float = 0.0
    critical_normal_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        tried = self.hits + self.misses
        return self.hits / tried if tried else 0.0

    @property
    def saved_s(self) -> float:
        """Critical-path time saved: hit steps would have cost a normal step each."""
        if not self.normal_steps:
            return 0.0
        return self.hit_steps * self.critical_normal_s / self.normal_steps - self.critical_hit_s

    def to_dict(self) -> dict:
        return {**vars(self), "hit_rate": self.hit_rate, "saved_s": self.saved_s}


__all__ = ["MoshiStreamStepOutput", "SpeculationStats"]
