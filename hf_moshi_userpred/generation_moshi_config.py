"""Generation settings of Moshi's three token streams (text, system audio, user prediction) and how a stream's
logits become a token: Transformers logits processors, then greedy or exponential-race sampling.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p")
STREAMS = ("text", "audio", "user")  # the token streams a session samples; batch entries are "slots"


class MoshiUserPredGenerationConfig(GenerationConfig):
    r"""Sampling settings of the three streams, plus speculation and gap filling.

    The standard fields (`do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `typical_p`,
    `repetition_penalty`) set the **text** stream, as in any Transformers LM. The same sampling fields prefixed
    with `audio_` set the system's audio codebooks and with `user_` the user prediction. Defaults are moshi's
    (`LMGen`): text temperature 0.7 / top-k 25, audio 0.8 / 250, both sampled; the user prediction is greedy
    (the most likely next user token) by default.

    Args:
        speculate_top_k (`int`, defaults to 0): how many candidate next user tokens to precompute the next
            step for (0 turns speculation off). Needs a user branch with lookahead 1.
        gap_fill_threshold (`float`, *optional*): turns gap filling on: `step(None)` substitutes each predicted
            user token whose probability is at least this, else `gap_fill_fallback_token`.
        gap_fill_fallback_token (`int`, defaults to -1): token used for rows below the threshold (-1: zero token).
        repetition_history (`int`, defaults to 250): how many past text tokens the text processors see as
            `input_ids` (a fixed window keeps memory flat; entries before the conversation started hold the padding id).

    Raises:
        ValueError: a field that neither Transformers' `GenerationConfig` nor this class defines (named).
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("do_sample", True)
        if kwargs["do_sample"]:
            kwargs.setdefault("temperature", 0.7)
            kwargs.setdefault("top_k", 25)
        defaults = {"audio_do_sample": True, "audio_temperature": 0.8, "audio_top_k": 250, "user_do_sample": False,
                    "user_temperature": 1.0, "user_top_k": None}
        for prefix in ("audio_", "user_"):
            for name in SAMPLING_FIELDS:
                setattr(self, prefix + name, kwargs.pop(prefix + name, defaults.get(prefix + name)))
        self.speculate_top_k = kwargs.pop("speculate_top_k", 0)
        self.gap_fill_threshold = kwargs.pop("gap_fill_threshold", None)
        self.gap_fill_fallback_token = kwargs.pop("gap_fill_fallback_token", -1)
        self.repetition_history = kwargs.pop("repetition_history", 250)
        super().__init__(**kwargs)
        unknown = sorted(set(vars(self)) - _known_fields())
        if unknown:
            raise ValueError(f"unknown generation config field(s) {unknown}: text fields are Transformers' "
                             f"{list(SAMPLING_FIELDS)} and repetition_penalty, audio and user fields take the "
                             "prefixes 'audio_' and 'user_'")

    @classmethod
    def from_model_config(cls, model_config) -> "MoshiUserPredGenerationConfig":
        # The model config holds architecture only; generation defaults are moshi's.
        return cls()

    def validate(self, strict: bool = False, **kwargs) -> None:
        super().validate(strict=strict, **kwargs)
        if not isinstance(self.speculate_top_k, int) or self.speculate_top_k < 0:
            raise ValueError(f"speculate_top_k={self.speculate_top_k!r}: must be an integer >= 0")
        if self.gap_fill_threshold is not None and not 0.0 <= self.gap_fill_threshold <= 1.0:
            raise ValueError(f"gap_fill_threshold={self.gap_fill_threshold!r}: must be a probability in [0, 1]")
        if not isinstance(self.repetition_history, int) or self.repetition_history < 1:
            raise ValueError(f"repetition_history={self.repetition_history!r}: must be an integer >= 1")

    def stream_settings(self, stream: str) -> dict:
        """The sampling fields of `stream` ("text", "audio" or "user") without prefix."""
        prefix = "" if stream == "text" else stream + "_"
        return {name: getattr(self, prefix + name) for name in SAMPLING_FIELDS}


def _known_fields() -> set[str]:
    own = {p + n for p in ("audio_", "user_") for n in SAMPLING_FIELDS}
    own |= {"speculate_top_k", "gap_fill_threshold", "gap_fill_fallback_token", "repetition_history"}
    return set(vars(GenerationConfig())) | own | {"transformers_version", "_from_model_config", "_commit_hash"}


def build_logits_processor(
    settings: dict, repetition_penalty: float | None = None, custom: LogitsProcessorList | None = None
) -> LogitsProcessorList:
    """Transformers processors for one stream, in `generate`'s order: penalties, the user's own processors, then
    (when sampling) temperature, top-k, top-p, min-p, typical-p."""
    processors = LogitsProcessorList()
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    processors.extend(custom or [])
    if settings["do_sample"]:
        if settings["temperature"] is not None and settings["temperature"] != 1.0:
            processors.append(TemperatureLogitsWarper(settings["temperature"]))
        if settings["top_k"]:
            processors.append(TopKLogitsWarper(settings["top_k"]))
        if settings["top_p"] is not None and settings["top_p"] < 1.0:
            processors.append(TopPLogitsWarper(settings["top_p"]))
        if settings["min_p"] is not None:
            processors.append(MinPLogitsWarper(settings["min_p"]))
        if settings["typical_p"] is not None and settings["typical_p"] < 1.0:
            processors.append(TypicalLogitsWarper(settings["typical_p"]))
    return processors


def sample_from_scores(scores: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Token from processed scores `[..., V]`: argmax without `noise`, else the exponential race
    `argmax(softmax(scores) / noise)` with `noise ~ Exp(1)` `[..., V]` (a sample of `softmax(scores)`, as in
    moshi). Passing the noise in makes a sample a deterministic function of (scores, noise): speculation reuses
    the noise a normal step would have drawn."""
    if noise is None:
        return scores.argmax(dim=-1)
    return (torch.softmax(scores.float(), dim=-1) / noise).argmax(dim=-1)


__all__ = [
    "MoshiUserPredGenerationConfig",
    "SAMPLING_FIELDS",
    "STREAMS",
    "build_logits_processor",
    "sample_from_scores",
]
