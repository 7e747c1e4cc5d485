"""What a server needs of an engine: the interface that [`RealtimeEngine`] (in the server's process) and
[`EngineProcess`] (in a process of its own) both offer, and what they hand each live conversation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class FrameOutput:
    """What a conversation receives for one of its frames.

    Args:
        frame: index of the conversation's frame (0 for the first one it sent).
        audio: the system's next 80 ms, `[frame_size]` float32 at Mimi's rate within [-1, 1] (the output limiter's),
            or None while the model warms up (its first `max(delays)` frames).
        text: the text piece the model wrote ("" for padding).
        extras: the per-frame extras (see [`RealtimeEngine`]), sent after the look-ahead; None in the audio message.
    """

    frame: int
    audio: np.ndarray | None = None
    text: str = ""
    extras: dict | None = None


def user_audio(pcm: np.ndarray) -> np.ndarray:
    """The user's samples as a flat float32 array, checked at the door so the caller gets the error at once.

    Raises:
        ValueError: a sample is NaN or infinite (Mimi would turn the frame, and the conversation, into noise).
    """
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    if not np.isfinite(pcm).all():
        raise ValueError("audio samples must be finite (got NaN or infinity)")
    return pcm


class LiveConversation(Protocol):
    """One live conversation in an engine slot."""

    slot: int

    def push_audio(self, pcm: np.ndarray) -> None:
        """Appends the user's audio (float32 at Mimi's rate, any length); refuses non-finite samples."""


class ConversationEngine(Protocol):
    """A batched engine of `max_conversations` slots ticking every 80 ms (see [`RealtimeEngine`])."""

    max_conversations: int
    sampling_rate: int
    frame_size: int
    running: bool
    error: BaseException | None

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def join(self, deliver: Callable[[FrameOutput], None], text_prompt: str | None = None,
             voice_prompt: str | None = None) -> LiveConversation | None:
        """A free slot for a new conversation starting from a persona prompt (None: the engine's default), None when
        all are in use; `deliver` must not block. Raises `ValueError` for a bad prompt."""

    def persona_options(self) -> dict:
        """`{"voices": [names], "text_prompt": default, "voice_prompt": default}` (the page's picker)."""

    def leave(self, conversation: LiveConversation) -> None:
        """Frees the conversation's slot (idempotent)."""

    @property
    def active_conversations(self) -> int: ...

    def metrics(self) -> dict: ...
