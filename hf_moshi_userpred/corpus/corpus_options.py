"""[`CorpusOptions`]: the size of a synthetic corpus and how its codec is fitted (the conversations themselves:
[`ConversationSettings`]). Kept apart from `synthesize.py` so that the command line can list them as flags without
importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CorpusOptions:
    """The size and the codec of a corpus (the conversations themselves: [`ConversationSettings`])."""

    hours: float = 1.0
    eval_hours: float | None = None  # default: a fifth of `hours`
    dialogue_seconds: tuple[float, float] = (60.0, 120.0)
    vocab_size: int = 1000
    codebook_size: int = 64
    kmeans_iterations: int = 30
    codec_minutes: float = 10.0  # of training audio (both channels) the codec is fitted on
    encoder_steps: int = 1000  # 0: keep the encoder random (its codes then barely separate clause endings)
    decoder_steps: int = 400
    mimi: str | None = None  # a fitted Mimi folder to reuse (another corpus' mimi/) instead of fitting one

    def __post_init__(self) -> None:
        if not self.hours > 0:
            raise ValueError(f"hours must be > 0, got {self.hours}")
        if self.eval_hours is not None and not 0 < self.eval_hours < self.hours:
            raise ValueError(f"eval_hours must be > 0 and < hours={self.hours}, got {self.eval_hours}")
        low, high = self.dialogue_seconds
        if not 10 <= low <= high:
            raise ValueError(f"dialogue_seconds must be a range 10 <= low <= high, got {self.dialogue_seconds}")
        for name in ("vocab_size", "codebook_size", "kmeans_iterations", "decoder_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder_steps < 0:
            raise ValueError(f"encoder_steps must be >= 0, got {self.encoder_steps}")
        if not self.codec_minutes > 0:
            raise ValueError(f"codec_minutes must be > 0, got {self.codec_minutes}")

    @property
    def held_out_hours(self) -> float:
        return self.hours / 5 if self.eval_hours is None else self.eval_hours


__all__ = ["CorpusOptions"]
