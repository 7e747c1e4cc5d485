"""Streaming generation for Moshi with a user-audio Depformer: the dual-Depformer step, logits processors,
user prediction, lossless speculative streaming and gap filling.

One streaming call `o` (DESIGN.md §2) reads user frame `o` and, like moshi's `LMGen.step`:

1. feeds the main transformer the tokens of the previous call plus the user rows (delayed), one position;
2. samples the text token, then the system's audio codebooks with the Depformer (the critical path);
3. only then runs the user Depformer, which predicts the user tokens the main transformer will read
   `user_prediction_lookahead` calls later (for the delay-0 rows: the user's *next* frame);
4. with speculation on, precomputes step 1-2 of call `o + 1` for the `k` most likely next user tokens in
   one batched forward against the shared cache, so that a correct guess leaves nothing on the critical
   path when the frame arrives.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

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
from transformers.utils import ModelOutput
from transformers.utils.logging import tqdm

UNGENERATED_TOKEN_ID = -2  # moshi's marker for "no output yet" (streams warming up or paused)
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p")
STREAMS = ("text", "audio", "user")
UNBOUNDED_CONTEXT_WINDOW = 3000  # cache size for a model trained without a window (moshiko's context)


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
            `input_ids` (a fixed window keeps memory flat; slots before a stream's start hold the padding id).

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


@dataclass
class MoshiStreamStepOutput(ModelOutput):
    r"""What one [`MoshiStreamingSession.step`] produced.

    Args:
        tokens (`torch.LongTensor` `[B, 1 + dep_q, 1]`, *optional*): text and system audio tokens aligned like moshi's
            `LMGen.step` (the text token of the previous call with the audio of this one). None while every
            stream is within its first `max(delays)` calls; -2 for a stream still warming up or paused.
        user_prediction (`torch.LongTensor` `[B, user_dep_q, L]`): the user tokens the main transformer will read
            in row `1 + dep_q + k` at calls `o + 1 .. o + L` (`L = user_prediction_lookahead`), each from the
            latest call that predicted it; for a delay-0 row, entry 0 is the user's next frame. -1 before any
            prediction exists.
        user_probs (`torch.FloatTensor` `[B, user_dep_q, L]`): probability of each predicted token under the user
            Depformer's own softmax (NaN where none).
        user_entropy (`torch.FloatTensor` `[B, user_dep_q, L]`): entropy (nats) of that softmax.
        speculative (`list[str]`): per stream, "hit" (the precomputed step was committed), "miss" (the user's
            tokens were not among the candidates: a normal step ran) or "not_tried".
        gap_filled (`torch.BoolTensor` `[B, n_q - dep_q]`, *optional*): after `step(None)`, the user rows of the
            missing frame that got the predicted token (the others got the fallback token).
    """

    tokens: torch.Tensor | None = None
    user_prediction: torch.Tensor | None = None
    user_probs: torch.Tensor | None = None
    user_entropy: torch.Tensor | None = None
    speculative: list[str] | None = None
    gap_filled: torch.Tensor | None = None


@dataclass
class SpeculationStats:
    """Counts per stream-step and wall-clock seconds of speculative streaming.

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


@dataclass
class MoshiGenerateOutput(ModelOutput):
    r"""Result of [`MoshiUserPredGenerationMixin.generate`] over `T` user frames.

    Args:
        text_tokens (`torch.LongTensor` `[B, T - max(delays)]`): the text stream, frame-aligned with `audio_codes`.
        audio_codes (`torch.LongTensor` `[B, dep_q, T - max(delays)]`): the system's audio codebooks.
        user_prediction (`torch.LongTensor` `[B, user_dep_q, T]`): at call `o`, the prediction for the position
            `o + L` (see [`MoshiStreamStepOutput`]).
        user_probs, user_entropy (`torch.FloatTensor` `[B, user_dep_q, T]`).
        speculation ([`SpeculationStats`]).
    """

    text_tokens: torch.Tensor | None = None
    audio_codes: torch.Tensor | None = None
    user_prediction: torch.Tensor | None = None
    user_probs: torch.Tensor | None = None
    user_entropy: torch.Tensor | None = None
    speculation: SpeculationStats | None = None


@dataclass
class _Speculation:
    """Call `o + 1` precomputed for `k` candidate delay-0 user tokens per stream."""

    candidates: torch.Tensor  # [B, k]
    valid: torch.Tensor  # [B] streams it was computed for
    kv: list  # MoshiKVCache pending entries, k alternatives per stream
    hidden: torch.Tensor  # [B, k, dim]
    text: torch.Tensor  # [B, k]
    audio: torch.Tensor  # [B, k, dep_q]


@dataclass
class _SystemStep:
    hidden: torch.Tensor  # [B, n, dim]
    text: torch.Tensor  # [B, n]
    audio: torch.Tensor  # [B, n, dep_q]
    kv: list = field(default_factory=list)


class MoshiStreamingSession:
    """`B` independent real-time streams through the model, one Mimi frame per `step` (see `model.streaming`).

    State per stream: a ring-buffer KV cache of `context` positions (flat memory; a model configured without a
    window streams with `UNBOUNDED_CONTEXT_WINDOW` positions, since moshi cannot stream one at all), moshi's small token ring
    that realises the delays, the pending user predictions, and the precomputed speculative step.
    """

    def __init__(self, model, batch_size: int, generation_config: MoshiUserPredGenerationConfig,
                 logits_processors: dict[str, LogitsProcessorList | None], generator: torch.Generator,
                 cuda_graphs: bool = False):
        c = model.config
        self.model, self.config, self.batch_size = model, generation_config, batch_size
        self.generator = generator
        self.graphs: dict[int, _CUDAGraphed] | None = {} if cuda_graphs else None
        self.active = True
        device = model.device
        self.delays = torch.tensor(c.delays, device=device)
        self.max_delay = max(c.delays)
        self.user_offset = 1 + c.dep_q
        self.num_user_rows = c.n_q - c.dep_q
        self.initial = torch.tensor(model.initial_tokens(), device=device)
        # moshi's token ring: what call o reads lives at o % ring, user rows are written `delay` calls ahead.
        self.ring = self.max_delay + 2
        self.tokens = torch.full((batch_size, c.num_codebooks, self.ring), UNGENERATED_TOKEN_ID, device=device)
        self.offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.exec_mask = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.kv = model.transformer.make_cache(batch_size, c.context or UNBOUNDED_CONTEXT_WINDOW)
        self.depformer_kv = model.depformer.make_cache(batch_size)
        self.text_history = torch.full((batch_size, generation_config.repetition_history),
                                       c.existing_text_padding_id, device=device)
        self.processors = {
            "text": build_logits_processor(generation_config.stream_settings("text"),
                                           generation_config.repetition_penalty, logits_processors.get("text")),
            "audio": build_logits_processor(generation_config.stream_settings("audio"),
                                            custom=logits_processors.get("audio")),
            "user": build_logits_processor(generation_config.stream_settings("user"),
                                           custom=logits_processors.get("user")),
        }
        self.do_sample = {s: generation_config.stream_settings(s)["do_sample"] for s in STREAMS}
        self.next_noise: tuple | None = None  # system noise of the next call, when speculation drew it early
        self.user = model.user_depformer
        if self.user is not None:
            L, uq = c.user_prediction_lookahead, c.user_dep_q
            self.user_kv = self.user.make_cache(batch_size)
            self.user_prediction = torch.full((batch_size, uq, L), -1, dtype=torch.long, device=device)
            self.user_probs = torch.full((batch_size, uq, L), float("nan"), device=device)
            self.user_entropy = torch.full((batch_size, uq, L), float("nan"), device=device)
            self.last_user_logits: torch.Tensor | None = None  # [B, user_dep_q, card] of the last call
        self.top_k = generation_config.speculate_top_k
        self.stats = SpeculationStats(top_k=self.top_k)
        self.speculation: _Speculation | None = None
        if self.top_k:
            self.kv.reserve(self.top_k)  # room for the k alternatives of a speculative step, allocated once
            self.spec_depformer_kv = model.depformer.make_cache(batch_size * self.top_k)
        self.missing = torch.zeros(batch_size, dtype=torch.bool, device=device)  # frame `o` was gap-filled

    # ------------------------------------------------------------------------------------------ control
    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Restart the streams where `mask` `[B]` is True (all by default): a new conversation in that slot."""
        mask = self._check_mask(mask, "reset")
        self.offsets.masked_fill_(mask, 0)
        self.tokens.masked_fill_(mask[:, None, None], UNGENERATED_TOKEN_ID)
        self.kv.reset(mask)
        self.text_history.masked_fill_(mask[:, None], self.model.config.existing_text_padding_id)
        self.missing.masked_fill_(mask, False)
        if self.user is not None:
            self.user_prediction.masked_fill_(mask[:, None, None], -1)
            self.user_probs.masked_fill_(mask[:, None, None], float("nan"))
            self.user_entropy.masked_fill_(mask[:, None, None], float("nan"))
        if self.speculation is not None:
            self.speculation.valid &= ~mask

    def set_exec_mask(self, mask: torch.Tensor) -> None:
        """Only streams where `mask` `[B]` is True advance on the next steps; the others keep their state."""
        self.exec_mask.copy_(self._check_mask(mask, "set_exec_mask"))

    def _check_mask(self, mask: torch.Tensor | None, name: str) -> torch.Tensor:
        self._check_active()
        if mask is None:
            return torch.ones(self.batch_size, dtype=torch.bool, device=self.model.device)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (self.batch_size,):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name}: mask must be a BoolTensor of shape [{self.batch_size}], got {shape}")
        return mask.to(self.model.device)

    def _check_active(self) -> None:
        if not self.active:
            raise RuntimeError("this streaming session is closed: call step() inside "
                               "`with model.streaming(batch_size=B) as stream:`")

    def nbytes(self) -> int:
        """Bytes of the state allocated for the session (caches, token ring, prediction buffers): constant over a
        session. The transient tensors of a speculative step (its k alternatives) are not counted."""
        tensors = [self.tokens, self.offsets, self.text_history]
        caches = [self.kv, self.depformer_kv]
        if self.user is not None:
            tensors += [self.user_prediction, self.user_probs, self.user_entropy]
            caches.append(self.user_kv)
        if self.top_k:
            caches.append(self.spec_depformer_kv)
        return sum(cache.nbytes() for cache in caches) + sum(t.numel() * t.element_size() for t in tensors)

    # --------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, user_codes: torch.Tensor | None) -> MoshiStreamStepOutput:
        """Feed one user frame and get the model's tokens for it.

        Args:
            user_codes: `[B, n_q - dep_q, 1]` Mimi tokens of the user (0..card-1, or -1 for no input), or None when
                the frame is late or lost (needs `gap_fill_threshold`).

        Returns:
            [`MoshiStreamStepOutput`].
        """
        self._check_active()
        start = time.perf_counter()
        B, run = self.batch_size, self.exec_mask
        gap_filled = None
        if user_codes is None:
            user_codes, gap_filled = self._fill_gap()
        else:
            user_codes = self._check_user_codes(user_codes)
            self.missing.masked_fill_(run, False)
        # User rows: delay-d rows are read d calls later.
        write = (self.offsets[:, None] + self.delays[self.user_offset:]) % self.ring
        user_rows = self.tokens[:, self.user_offset:]
        user_rows.scatter_(-1, write[..., None], torch.where(run[:, None, None], user_codes,
                                                              user_rows.gather(-1, write[..., None])))
        inputs = self._inputs(self.offsets)  # [B, K]

        spec, hit, choice = self.speculation, torch.zeros(B, dtype=torch.bool, device=inputs.device), None
        self.speculation = None
        if spec is not None:
            match = spec.candidates == inputs[:, self.user_offset, None]  # [B, k]
            hit = spec.valid & run & match.any(dim=1)
            choice = match.float().argmax(dim=1)
        if spec is None or bool((run & ~hit).any()):
            step = self._run_system_step(inputs[:, None], self._noise())
            self.kv.commit(step.kv, self.offsets, mask=run & ~hit)
            if spec is None:
                hidden, text, audio = step.hidden[:, 0], step.text[:, 0], step.audio[:, 0]
            else:
                take = hit[:, None]
                hidden = torch.where(take, _pick(spec.hidden, choice), step.hidden[:, 0])
                text = torch.where(hit, _pick(spec.text, choice), step.text[:, 0])
                audio = torch.where(take, _pick(spec.audio, choice), step.audio[:, 0])
        else:
            self.next_noise = None
            hidden, text, audio = _pick(spec.hidden, choice), _pick(spec.text, choice), _pick(spec.audio, choice)
        if spec is not None:
            self.kv.commit(spec.kv, self.offsets, choice, mask=hit)
        tokens = self._commit_tokens(text, audio)
        critical = time.perf_counter() - start
        status = self._speculation_status(spec, hit, run, critical)

        if self.user is not None:
            self._predict_user(hidden, text)
            if gap_filled is not None:
                gap_filled |= self._fill_gap_late_rows()
            if self.top_k:
                spec_start = time.perf_counter()
                self.speculation = self._speculate()
                self.stats.speculate_s += time.perf_counter() - spec_start
        return MoshiStreamStepOutput(
            tokens=tokens,
            user_prediction=None if self.user is None else self.user_prediction.clone(),
            user_probs=None if self.user is None else self.user_probs.clone(),
            user_entropy=None if self.user is None else self.user_entropy.clone(),
            speculative=status,
            gap_filled=gap_filled,
        )

    def _check_user_codes(self, user_codes: torch.Tensor) -> torch.Tensor:
        c, n = self.model.config, self.num_user_rows
        if not isinstance(user_codes, torch.Tensor):
            raise ValueError(f"user_codes must be a LongTensor [B, {n}, 1], got {type(user_codes).__name__}")
        if user_codes.dtype.is_floating_point or user_codes.dtype.is_complex or user_codes.dtype == torch.bool:
            raise ValueError(f"user_codes must be an integer tensor, got dtype {user_codes.dtype}")
        if user_codes.dim() != 3 or user_codes.shape[1:] != (n, 1):
            raise ValueError(f"user_codes must have shape [B, n_q - dep_q = {n}, 1] (one frame), "
                             f"got {tuple(user_codes.shape)}")
        if user_codes.shape[0] != self.batch_size:
            raise ValueError(f"user_codes has batch size {user_codes.shape[0]} but the session was opened with "
                             f"batch_size={self.batch_size}")
        user_codes = user_codes.to(self.model.device, torch.long)
        bad = (user_codes < -1) | (user_codes >= c.card)
        if bad.any():
            b, row, _ = bad.nonzero()[0].tolist()
            raise ValueError(f"user_codes[{b}, {row}, 0] = {user_codes[b, row, 0].item()} is out of range: user "
                             f"audio tokens are 0..{c.card - 1}, or -1 for no input")
        return user_codes

    def _inputs(self, offsets: torch.Tensor) -> torch.Tensor:
        """Main-transformer input `[B, K]` of the call at `offsets`: the ring slot, or initial tokens early on."""
        index = (offsets % self.ring)[:, None, None].expand(-1, self.tokens.shape[1], 1)
        inputs = self.tokens.gather(-1, index)[..., 0]
        is_init = (offsets[:, None] <= self.delays[None]) | ~self.exec_mask[:, None]
        return torch.where(is_init, self.initial[None], inputs)

    def _noise(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Exponential noise for the text and audio samples of the current call (drawn once per call)."""
        if self.next_noise is not None:
            noise, self.next_noise = self.next_noise, None
            return noise
        c, B, device = self.model.config, self.batch_size, self.model.device
        text = self._draw((B, c.text_card_out), device) if self.do_sample["text"] else None
        audio = self._draw((B, c.dep_q, c.card), device) if self.do_sample["audio"] else None
        return text, audio

    def _draw(self, shape: tuple, device: torch.device) -> torch.Tensor:
        return torch.empty(shape, device=device).exponential_(generator=self.generator)

    def _run_system_step(self, inputs: torch.Tensor, noise: tuple) -> _SystemStep:
        """`_system_step`, replayed as a CUDA graph per input shape when the session uses graphs."""
        if self.graphs is None:
            return self._system_step(inputs, *noise)
        if inputs.shape[1] not in self.graphs:
            self.graphs[inputs.shape[1]] = _CUDAGraphed(self._system_step)
        return self.graphs[inputs.shape[1]](inputs, *noise)

    def _system_step(self, inputs: torch.Tensor, text_noise: torch.Tensor | None,
                     audio_noise: torch.Tensor | None) -> _SystemStep:
        """Text and system audio for `n` alternative inputs `[B, n, K]` of the current position of every stream.

        Pure tensor work on the session's static state (no host synchronisation), so it can be CUDA-graphed.
        """
        model, c = self.model, self.model.config
        B, n, K = inputs.shape
        x = model.embed(inputs.reshape(B * n, K, 1)).view(B, n, -1)
        positions = self.offsets[:, None].expand(B, n)
        hidden = model.out_norm(model.transformer(x, positions, cache=self.kv))
        history = self.text_history.repeat_interleave(n, dim=0)
        text_logits = model.text_linear(hidden).reshape(B * n, -1)
        scores = self.processors["text"](history, text_logits.float())
        text = sample_from_scores(scores, _expand(text_noise, n))

        def sample_audio(step: int, logits: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            scores = self.processors["audio"](sequence, logits.float())
            return sample_from_scores(scores, None if audio_noise is None else _expand(audio_noise[:, step], n))

        cache = self.depformer_kv if n == 1 else self.spec_depformer_kv
        audio, _ = model.depformer.generate_frame(hidden.reshape(B * n, -1), text, cache, sample_audio)
        return _SystemStep(hidden, text.view(B, n), audio.view(B, n, c.dep_q), self.kv.take_pending())

    def _commit_tokens(self, text: torch.Tensor, audio: torch.Tensor) -> torch.Tensor | None:
        """Write the call's text/audio into the ring, advance executing streams, return moshi-aligned tokens."""
        run, c = self.exec_mask, self.model.config
        self.offsets.add_(run.long())
        slot = (self.offsets % self.ring)[:, None, None]
        produced = torch.cat([text[:, None], audio], dim=1)[..., None]  # [B, 1 + dep_q, 1]
        system = self.tokens[:, : 1 + c.dep_q]
        system.scatter_(-1, slot.expand(-1, 1 + c.dep_q, 1),
                        torch.where(run[:, None, None], produced, system.gather(-1, slot.expand(-1, 1 + c.dep_q, 1))))
        self.text_history.copy_(torch.where(run[:, None], torch.cat([self.text_history[:, 1:], text[:, None]], 1),
                                            self.text_history))
        if not bool((self.offsets > self.max_delay).any()):
            return None
        gen_delays = self.delays[: 1 + c.dep_q]
        index = (self.offsets[:, None] - self.max_delay + gen_delays[None]) % self.ring
        out = self.tokens[:, : 1 + c.dep_q].gather(-1, index[..., None])
        warming = (self.offsets <= self.max_delay) | ~run
        return out.masked_fill(warming[:, None, None], UNGENERATED_TOKEN_ID)

    def _speculation_status(self, spec, hit, run, critical: float) -> list[str]:
        tried = run & (spec.valid if spec is not None else torch.zeros_like(run))
        codes = torch.where(tried, torch.where(hit, 0, 1), 2).tolist()  # one host sync for the whole batch
        status = [("hit", "miss", "not_tried")[code] for code in codes]
        self.stats.hits += status.count("hit")
        self.stats.misses += status.count("miss")
        self.stats.not_tried += status.count("not_tried")
        if bool(hit.any()) and bool((hit == run).all()):
            self.stats.hit_steps += 1
            self.stats.critical_hit_s += critical
        else:
            self.stats.normal_steps += 1
            self.stats.critical_normal_s += critical
        return status

    # ------------------------------------------------------------------------------------- user branch
    def _predict_user(self, hidden: torch.Tensor, text: torch.Tensor) -> None:
        """Run the user Depformer (after the system tokens exist) and slide the prediction window."""
        noise = None
        if self.do_sample["user"]:
            noise = self._draw((self.batch_size, self.model.config.user_dep_q, self.model.config.card),
                               self.model.device)

        def sample_user(step: int, logits: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            scores = self.processors["user"](sequence, logits.float())
            return sample_from_scores(scores, None if noise is None else noise[:, step])

        tokens, logits = self.user.generate_frame(hidden, text, self.user_kv, sample_user)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        probs = log_probs.gather(-1, tokens[..., None])[..., 0].exp()
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        run = self.exec_mask[:, None, None]
        for window, new in ((self.user_prediction, tokens), (self.user_probs, probs),
                            (self.user_entropy, entropy)):
            window.copy_(torch.where(run, torch.cat([window[..., 1:], new[..., None]], dim=-1), window))
        self.last_user_logits = logits

    def _speculate(self) -> _Speculation:
        """Precompute the next call for the top-k next delay-0 user tokens (one batched forward)."""
        k, c = self.top_k, self.model.config
        probs = torch.softmax(self.last_user_logits[:, 0].float(), dim=-1)
        candidates = probs.topk(k, dim=-1).indices  # [B, k]
        inputs = self._inputs(self.offsets)[:, None].repeat(1, k, 1)
        inputs[:, :, self.user_offset] = candidates
        self.next_noise = self._noise()
        step = self._run_system_step(inputs, self.next_noise)
        return _Speculation(candidates, self.exec_mask.clone(), step.kv, step.hidden, step.text, step.audio)

    # ------------------------------------------------------------------------------------- gap filling
    def _fill_gap(self) -> tuple[torch.Tensor, torch.Tensor]:
        """User codes for a missing frame: delay-0 rows from the prediction made for this call, where confident."""
        cfg, c = self.config, self.model.config
        if cfg.gap_fill_threshold is None:
            raise ValueError("step(None) means the user frame is missing, but gap filling is off: set "
                             "gap_fill_threshold in the generation config")
        codes = torch.full((self.batch_size, self.num_user_rows, 1), cfg.gap_fill_fallback_token,
                           device=self.model.device)
        filled = torch.zeros(self.batch_size, self.num_user_rows, dtype=torch.bool, device=self.model.device)
        if self.user is not None:
            zero_rows = [k for k in range(c.user_dep_q) if c.delays[self.user_offset + k] == 0]
            for k in zero_rows:
                confident = self.user_probs[:, k, 0] >= cfg.gap_fill_threshold
                codes[:, k, 0] = torch.where(confident, self.user_prediction[:, k, 0], codes[:, k, 0])
                filled[:, k] = confident
        self.missing.copy_(self.exec_mask)
        return codes, filled

    def _fill_gap_late_rows(self) -> torch.Tensor:
        """Delay-1 rows of a missing frame, from the prediction the user branch just made (read next call)."""
        cfg, c = self.config, self.model.config
        filled = torch.zeros(self.batch_size, self.num_user_rows, dtype=torch.bool, device=self.model.device)
        slot = self.offsets % self.ring
        b = torch.arange(self.batch_size, device=slot.device)
        for k in range(c.user_dep_q):
            if c.delays[self.user_offset + k] != 1:
                continue
            confident = self.missing & (self.user_probs[:, k, 0] >= cfg.gap_fill_threshold)
            row = self.tokens[:, self.user_offset + k]
            row[b, slot] = torch.where(confident, self.user_prediction[:, k, 0], row[b, slot])
            filled[:, k] = confident
        return filled

    def close(self) -> None:
        self.active = False


class _CUDAGraphed:
    """Replays `func` as one CUDA graph, as moshi does for its step: an eager warm-up call, then a capture.

    Tensor arguments are copied into static buffers, so every call must use the same shapes; the outputs are
    static tensors that the next call overwrites. Non-tensor arguments must not change.
    """

    def __init__(self, func):
        self.func, self.graph, self.args, self.output, self.warm = func, None, None, None, False

    def __call__(self, *args):
        if not self.warm:
            self.warm = True
            return self.func(*args)
        if self.graph is None:
            self.args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.func(*self.args)
        else:
            for static, value in zip(self.args, args):
                if isinstance(static, torch.Tensor):
                    static.copy_(value)
        self.graph.replay()
        return self.output


def _expand(noise: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Share each stream's noise across its `n` alternatives: `[B, ...]` -> `[B * n, ...]`."""
    return None if noise is None else noise.repeat_interleave(n, dim=0)


def _pick(values: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """`values[b, choice[b]]` for `values` `[B, k, ...]`."""
    return values[torch.arange(values.shape[0], device=values.device), choice]


class MoshiUserPredGenerationMixin:
    """Streaming (`streaming`) and offline (`generate`) inference for [`MoshiUserPredForConditionalGeneration`]."""

    generation_config_class = MoshiUserPredGenerationConfig

    def _resolve_generation_config(self, generation_config: GenerationConfig | None, **kwargs):
        base = self.generation_config if generation_config is None else generation_config
        if not isinstance(base, GenerationConfig):
            raise ValueError(f"generation_config must be a GenerationConfig, got {type(base).__name__}")
        values = base.to_dict()
        if not kwargs.get("do_sample", values.get("do_sample", True)):
            # Greedy text: the inherited warpers are irrelevant (and Transformers warns about them).
            for name in SAMPLING_FIELDS[1:]:
                values.pop(name, None)
        values.update(kwargs)
        for key in ("transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash"):
            values.pop(key, None)
        config = MoshiUserPredGenerationConfig(**values)
        config.validate()
        c = self.config
        if c.text_card_out > c.text_card:
            raise ValueError(f"text_card_out={c.text_card_out} > text_card={c.text_card}: sampled text tokens could "
                             "not be fed back to the model, so it cannot stream")
        if config.speculate_top_k:
            if self.user_depformer is None or c.user_prediction_lookahead != 1:
                raise ValueError(f"speculate_top_k={config.speculate_top_k} needs a user branch with "
                                 f"user_prediction_lookahead=1 (predict_user_audio={c.predict_user_audio}, "
                                 f"lookahead={c.user_prediction_lookahead})")
            user_delays = c.delays[1 + c.dep_q :]
            if user_delays[0] != 0 or user_delays.count(0) != 1:
                raise ValueError(f"speculation needs exactly one delay-0 user codebook, the first; user delays "
                                 f"are {user_delays}")
            if config.speculate_top_k > c.card:
                raise ValueError(f"speculate_top_k={config.speculate_top_k} exceeds the audio vocabulary ({c.card})")
        if config.gap_fill_threshold is not None and any(d > 1 for d in c.delays[1 + c.dep_q :]):
            raise ValueError(f"gap filling supports user delays 0 and 1, got {c.delays[1 + c.dep_q:]}")
        return config

    @contextlib.contextmanager
    def streaming(
        self,
        batch_size: int = 1,
        generation_config: GenerationConfig | None = None,
        *,
        text_logits_processor: LogitsProcessorList | None = None,
        audio_logits_processor: LogitsProcessorList | None = None,
        user_logits_processor: LogitsProcessorList | None = None,
        seed: int | None = None,
        cuda_graphs: bool | None = None,
        **kwargs,
    ) -> Iterator[MoshiStreamingSession]:
        """Open `batch_size` real-time streams: `with model.streaming(B) as stream: out = stream.step(frame)`.

        Args:
            batch_size: number of independent streams (slots a server can `reset` and pause).
            generation_config: a [`MoshiUserPredGenerationConfig`] (or any `GenerationConfig`: its fields are read
                with the same names); default `model.generation_config`.
            text_logits_processor, audio_logits_processor, user_logits_processor: extra Transformers processors per
                stream, applied after the penalties and before the sampling warpers. Text processors see the last
                `repetition_history` text tokens as `input_ids`; audio and user processors see the Depformer's
                sequence of the frame so far (the text token, then the codebooks already chosen).
            seed: seeds the session's sampling generator (reproducible sampling).
            cuda_graphs: replay the critical-path step (main transformer, text sampling, system Depformer) as CUDA
                graphs, one per shape; default: on for a CUDA model.
            **kwargs: generation config fields overriding `generation_config` (e.g. `speculate_top_k=4`).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        config = self._resolve_generation_config(generation_config, **kwargs)
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        elif cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {self.device}")
        processors = {"text": text_logits_processor, "audio": audio_logits_processor, "user": user_logits_processor}
        session = MoshiStreamingSession(self, batch_size, config, processors, generator, cuda_graphs)
        try:
            yield session
        finally:
            session.close()

    @torch.no_grad()
    def generate(
        self,
        user_codes: torch.Tensor,
        generation_config: GenerationConfig | None = None,
        *,
        progress: bool = True,
        seed: int | None = None,
        **kwargs,
    ) -> MoshiGenerateOutput:
        """Run the streaming loop over a whole user stream (offline convenience).

        Args:
            user_codes: `[B, n_q - dep_q, T]` the user's Mimi tokens.
            generation_config, seed, **kwargs: as for `streaming` (processors included).
            progress: show a progress bar.

        Returns:
            [`MoshiGenerateOutput`].
        """
        c = self.config
        if not isinstance(user_codes, torch.Tensor) or user_codes.dim() != 3:
            shape = tuple(user_codes.shape) if isinstance(user_codes, torch.Tensor) else type(user_codes).__name__
            raise ValueError(f"user_codes must be a LongTensor [B, n_q - dep_q = {c.n_q - c.dep_q}, T], got {shape}")
        B, _, T = user_codes.shape
        texts, audios, preds, probs, entropies = [], [], [], [], []
        with self.streaming(B, generation_config, seed=seed, **kwargs) as stream:
            for t in tqdm(range(T), desc="streaming", unit="frame", disable=not progress):
                out = stream.step(user_codes[:, :, t : t + 1])
                if out.tokens is not None:
                    texts.append(out.tokens[:, 0, 0])
                    audios.append(out.tokens[:, 1:, 0])
                if out.user_prediction is not None:
                    preds.append(out.user_prediction[..., -1])
                    probs.append(out.user_probs[..., -1])
                    entropies.append(out.user_entropy[..., -1])
            stats = stream.stats
        device = self.device
        return MoshiGenerateOutput(
            text_tokens=torch.stack(texts, dim=1) if texts else torch.empty(B, 0, dtype=torch.long, device=device),
            audio_codes=(torch.stack(audios, dim=2) if audios
                         else torch.empty(B, c.dep_q, 0, dtype=torch.long, device=device)),
            user_prediction=torch.stack(preds, dim=2) if preds else None,
            user_probs=torch.stack(probs, dim=2) if probs else None,
            user_entropy=torch.stack(entropies, dim=2) if entropies else None,
            speculation=stats,
        )

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             cache_dir=None, force_download=False, proxies=None, local_files_only=False, token=None,
                             revision=None, subfolder="", trust_remote_code=None, **kwargs) -> None:
        """Called by `from_pretrained`: load the saved `generation_config.json` into our config class."""
        if generation_config is not None:
            self.generation_config = MoshiUserPredGenerationConfig(**generation_config.to_diff_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        try:
            self.generation_config = MoshiUserPredGenerationConfig.from_pretrained(
                pretrained_model_name_or_path, cache_dir=cache_dir, force_download=force_download, proxies=proxies,
                local_files_only=local_files_only, token=token, revision=revision, subfolder=subfolder,
            )
        except OSError:
            pass  # no generation_config.json: keep moshi's defaults


__all__ = [
    "MoshiGenerateOutput",
    "MoshiStreamStepOutput",
    "MoshiStreamingSession",
    "MoshiUserPredGenerationConfig",
    "MoshiUserPredGenerationMixin",
    "SpeculationStats",
    "build_logits_processor",
    "sample_from_scores",
]
