"""A streaming session: `B` independent real-time conversations ("slots") through the model, one Mimi frame per
`step`, with lossless speculative streaming and gap filling.

One streaming call `o` (docs/design.md §2) reads user frame `o` and, like moshi's `LMGen.step`:

1. feeds the main transformer the tokens of the previous call plus the user rows (delayed), one position;
2. samples the text token, then the system's audio codebooks with the Depformer (the critical path);
3. only then runs the user Depformer, which predicts the user tokens the main transformer will read
   `user_prediction_lookahead` calls later (for the delay-0 rows: the user's *next* frame);
4. with speculation on, precomputes step 1-2 of call `o + 1` for the `k` most likely next user tokens in
   one batched forward against the shared cache, so that a correct guess leaves nothing on the critical
   path when the frame arrives (docs/design.md §3).

The session drives the model only through its streaming step API (modeling_moshi_streaming_step.py), never its
caches or modules; it owns the per-slot state: the token ring that realises the delays, the offsets, the pending
user predictions and the precomputed speculative step. What the text stream may say next (forced text,
the turn holds) and the turn-taking signal are `MoshiTextConstraints`'s (generation_moshi_text_constraints.py),
which the step consults for a mask on the text logits and updates once the step's text token is known.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessorList

from .generation_moshi_config import STREAMS, MoshiUserPredGenerationConfig, build_logits_processor, sample_from_scores
from .generation_moshi_cuda_graphs import CUDAGraphed
from .generation_moshi_step_output import MoshiStreamStepOutput, SpeculationStats
from .generation_moshi_persona import MoshiPersonaPrompt, MoshiPromptState, prefill_persona_prompt, prompt_key
from .generation_moshi_text_constraints import MoshiTextConstraints, MoshiUserTurnOutput, WordTokenizer
from .modeling_moshi_codes import UNGENERATED_TOKEN_ID, ZERO_TOKEN_ID, check_codes

if TYPE_CHECKING:  # the model module imports this one (through the generation mixin)
    from .modeling_moshi_streaming_step import MoshiSystemStepOutput
    from .modeling_moshi_userpred import MoshiUserPredForConditionalGeneration


# Persona prompts whose prefill a session keeps (by a digest of the codes): 0.5 MB per frame for moshiko's 7B in
# bfloat16 (32 layers of 32 heads of 128 keys and values), about 100 MB for a 200-frame prompt.
PROMPT_CACHE_SIZE = 8


@dataclass
class _Speculation:
    """Call `o + 1` precomputed for `k` candidate delay-0 user tokens per slot."""

    candidates: torch.Tensor  # [B, k]
    valid: torch.Tensor  # [B] slots it was computed for
    pending: list  # MoshiKVCache entries not yet committed, k alternatives per slot
    hidden: torch.Tensor  # [B, k, dim]
    text: torch.Tensor  # [B, k]
    audio: torch.Tensor  # [B, k, dep_q]


class MoshiStreamingSession:
    """`B` independent real-time conversations ("slots") through the model, one Mimi frame per `step` (see
    `model.streaming`).

    State per slot: a ring-buffer KV cache of `config.streaming_window` positions (flat memory), moshi's small token
    ring that realises the delays, the pending user predictions, the precomputed speculative step, the forced words
    still to say and the turn state (words since the user last spoke, the user's silent frames, P(turn end)).

    Args:
        turn_taking_table (`torch.FloatTensor` `[card, horizon + 1]`, *optional*): `TurnTakingStatistics.table()`:
            turns on `user_turn` in the step output (with the user branch; a model with a voice-activity head emits
            its own signal instead) and gives the user's voice activity that `max_turn_words` / `min_silence_frames`
            need.
        tokenizer (*optional*): the default tokenizer of `say` for strings.
    """

    def __init__(self, model: MoshiUserPredForConditionalGeneration, batch_size: int,
                 generation_config: MoshiUserPredGenerationConfig, logits_processors: dict[str, LogitsProcessorList | None], generator: torch.Generator,
                 cuda_graphs: bool = False, turn_taking_table: torch.Tensor | None = None,
                 tokenizer: WordTokenizer | None = None):
        c = model.config
        self.model, self.config, self.batch_size = model, generation_config, batch_size
        self.generator = generator
        self.graphs: dict[int, CUDAGraphed] | None = {} if cuda_graphs else None
        self.active = True
        device = model.device
        self.delays = torch.tensor(c.delays, device=device)
        self.max_delay = max(c.delays)
        self.user_offset = 1 + c.dep_q
        self.num_user_rows = c.n_q - c.dep_q
        # `predict_user=False` switches the user branch off at run time: no user Depformer, no speculation.
        self.predicts_user = c.predict_user_audio and generation_config.predict_user
        self.initial = torch.tensor(model.initial_tokens(), device=device)
        # moshi's token ring: what call o reads lives at o % ring, user rows are written `delay` calls ahead.
        self.ring = self.max_delay + 2
        self.tokens = torch.full((batch_size, c.num_codebooks, self.ring), UNGENERATED_TOKEN_ID, device=device)
        self.offsets = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.exec_mask = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.top_k = generation_config.speculate_top_k if self.predicts_user else 0
        self.caches = model.make_streaming_caches(batch_size, self.top_k)
        self.text_history = torch.full((batch_size, generation_config.repetition_history),
                                       c.existing_text_padding_id, device=device)
        padding_ids = (c.existing_text_padding_id, c.existing_text_end_padding_id)
        self.processors = {stream: build_logits_processor(generation_config, stream, logits_processors.get(stream),
                                                          padding_ids) for stream in STREAMS}
        self.do_sample = {s: generation_config.stream_settings(s)["do_sample"] for s in STREAMS}
        self.next_noise: tuple | None = None  # system noise of the next call, when speculation drew it early
        if self.predicts_user:
            L, uq = c.user_prediction_lookahead, c.user_dep_q
            self.user_prediction = torch.full((batch_size, uq, L), -1, dtype=torch.long, device=device)
            self.user_probs = torch.full((batch_size, uq, L), float("nan"), device=device)
            self.user_entropy = torch.full((batch_size, uq, L), float("nan"), device=device)
            self.last_user_logits: torch.Tensor | None = None  # [B, user_dep_q, card] of the last call
        self.stats = SpeculationStats(top_k=self.top_k)
        self.speculation: _Speculation | None = None
        self.missing = torch.zeros(batch_size, dtype=torch.bool, device=device)  # frame `o` was gap-filled
        # the idle-time half of the last step when it was deferred (`step(..., look_ahead=False)`): hidden, text,
        # system audio, gap-filled rows
        self.deferred: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.constraints = MoshiTextConstraints(c, generation_config, batch_size, device, turn_taking_table, tokenizer,
                                                self.predicts_user, model.has_voice_activity_head)
        self.user_turn: MoshiUserTurnOutput | None = None  # the turn-taking signal of the last look-ahead
        self.prompt_states: dict[str, MoshiPromptState] = {}  # persona prompts' prefills, least recent first
        # a shared user branch's predicted rows that hold a received frame (delayed), and those of delay 1
        predicted = self.delays[self.user_offset : self.user_offset + c.user_dep_q]
        shared = self.predicts_user and c.user_depformer == "shared"
        self.known_user_rows = (predicted > 0, predicted == 1) if shared else None

    # ------------------------------------------------------------------------------------------ control
    def say(self, text: str | Sequence[Sequence[int]], *, tokenizer: WordTokenizer | None = None,
            mask: torch.Tensor | None = None, max_wait_frames: int | None = 12) -> int:
        """Force the inner monologue of the slots where `mask` `[B]` is True (all by default) to say `text` next,
        after what they were already told to say.

        The model keeps its own rhythm: between forced words it may write padding (and end-of-padding just before a
        word) or start the next forced word; once a word has started (or after an end-of-padding), its next token is
        forced. A word the model has not started `max_wait_frames` steps after the previous forced token (or after
        `say`) is overdue: padding is no longer allowed, so it starts (after an end-of-padding, if the model
        chooses). The system audio follows the text as always. The turn holds still apply (a held slot waits on
        padding, overdue or not). A forced token that `bad_words_ids`/`suppress_tokens` ban cannot come out: do not
        ban it.

        Args:
            text: a string, split on whitespace and encoded word by word with `tokenizer` (as the training text was),
                or the words as token ids (a list of words, each a non-empty list of text token ids).
            tokenizer: anything whose `encode(str)` returns token ids (the model folder's sentencepiece
                `tokenizer.model`); default the session's (`model.streaming(..., tokenizer=)`).
            mask (`torch.BoolTensor` `[B]`, *optional*): the slots that say it.
            max_wait_frames: steps the model may wait before each word of `text` (12: about a second); None: as long
                as it likes.

        Returns:
            the number of tokens queued per slot.

        Raises:
            ValueError: a string without a tokenizer, an empty word, or a token that is padding or outside the text
                vocabulary (`text_card_out`).
        """
        mask = self._check_mask(mask, "say")
        queued = self.constraints.say(text, mask.nonzero().flatten().tolist(), tokenizer, max_wait_frames)
        if self.speculation is not None:  # it was computed without these words
            self.speculation.valid &= ~mask
        return queued

    def prompt(self, prompt: MoshiPersonaPrompt, mask: torch.Tensor | None = None) -> int:
        """Restart the slots where `mask` `[B]` is True (all by default) from a persona prompt (a voice and a role,
        PersonaPlex's procedure: `MoshiPersonaPrompt.build`): each slot then holds what stepping through the
        prompt's frames would leave (keys and values, token ring, text history) and continues at position `P`.

        The prompt runs as one prefill, and its result is kept (the last `PROMPT_CACHE_SIZE` prompts, by a digest of
        their codes): a slot started with a prompt seen before copies it. The other slots are untouched.

        Returns:
            `P`, the prompt's frames (they count against the context).

        Raises:
            ValueError: bad prompt codes (naming the place), or a prompt that leaves no room in the context.
        """
        mask = self._check_mask(mask, "prompt")
        c = self.model.config
        codes = check_codes(prompt.codes, c, name="prompt.codes", batched=False)
        frames, window = codes.shape[1], c.streaming_window
        if frames >= window:
            raise ValueError(f"the persona prompt has {frames} frames: it leaves no room in the model's context of "
                             f"{window} frames (shorten the voice sample or the role text)")
        key = prompt_key(codes)
        state = self.prompt_states.pop(key, None)  # re-inserted below: the dict's order is the recency
        if state is None:
            state = prefill_persona_prompt(self.model, MoshiPersonaPrompt(codes), self.ring, self.text_history.shape[1])
        self.prompt_states[key] = state
        while len(self.prompt_states) > PROMPT_CACHE_SIZE:
            self.prompt_states.pop(next(iter(self.prompt_states)))
        self.reset(mask)
        self.model.load_prompt(self.caches, state.kv, mask)
        self.tokens.copy_(torch.where(mask[:, None, None], state.ring[None], self.tokens))
        self.text_history.copy_(torch.where(mask[:, None], state.text_history[None], self.text_history))
        self.offsets.masked_fill_(mask, state.num_frames)
        return state.num_frames

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Restart the slots where `mask` `[B]` is True (all by default): a new conversation in each."""
        mask = self._check_mask(mask, "reset")
        if self.deferred is not None:
            self.look_ahead()
        self.offsets.masked_fill_(mask, 0)
        self.tokens.masked_fill_(mask[:, None, None], UNGENERATED_TOKEN_ID)
        self.model.reset_streaming_caches(self.caches, mask)
        self.text_history.masked_fill_(mask[:, None], self.model.config.existing_text_padding_id)
        self.missing.masked_fill_(mask, False)
        self.constraints.reset(mask)
        if self.predicts_user:
            self.user_prediction.masked_fill_(mask[:, None, None], -1)
            self.user_probs.masked_fill_(mask[:, None, None], float("nan"))
            self.user_entropy.masked_fill_(mask[:, None, None], float("nan"))
        if self.speculation is not None:
            self.speculation.valid &= ~mask

    def set_exec_mask(self, mask: torch.Tensor) -> None:
        """Only slots where `mask` `[B]` is True advance on the next steps; the others keep their state."""
        self.exec_mask.copy_(self._check_mask(mask, "set_exec_mask"))

    def reorder(self, index: torch.Tensor) -> None:
        """Make slot `b` continue the conversation of slot `index[b]` (`torch.LongTensor` `[B]`, repeats allowed): beam
        search keeps each surviving beam in the slots of its parent. Every per-slot state moves (KV cache, token ring,
        offsets, pause and gap flags, text history, forced words, turn state, user prediction); a precomputed
        speculative step is dropped. In place, so the buffers stay put for CUDA graphs."""
        self._check_active()
        if self.deferred is not None:
            self.look_ahead(speculate=False)
        index = index.to(self.model.device)
        self.model.reorder_streaming_caches(self.caches, index)
        self.constraints.reorder(index)
        state = [self.tokens, self.offsets, self.exec_mask, self.missing, self.text_history]
        if self.predicts_user:
            state += [self.user_prediction, self.user_probs, self.user_entropy]
            if self.last_user_logits is not None:
                state.append(self.last_user_logits)
        for tensor in state:
            tensor.copy_(tensor[index])
        self.speculation, self.next_noise = None, None

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

    @property
    def kv(self):
        """The main transformer's KV cache, to inspect (tests, benchmarks); changed only through the model's API."""
        return self.caches.transformer

    def nbytes(self) -> int:
        """Bytes of the state allocated for the session (caches, token ring, prediction buffers): constant over a
        session. The transient tensors of a speculative step (its k alternatives) are not counted."""
        tensors = [self.tokens, self.offsets, self.text_history, *self.constraints.tensors()]
        if self.predicts_user:
            tensors += [self.user_prediction, self.user_probs, self.user_entropy]
        prompts = sum(state.nbytes() for state in self.prompt_states.values())
        return self.caches.nbytes() + prompts + sum(t.numel() * t.element_size() for t in tensors)

    # --------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, user_codes: torch.Tensor | None, *, missing: torch.Tensor | None = None,
             look_ahead: bool = True) -> MoshiStreamStepOutput:
        """Feed one user frame and get the model's tokens for it.

        Args:
            user_codes: `[B, n_q - dep_q, 1]` Mimi tokens of the user (0..card-1, or -1 for no input), or None when
                the frame is late or lost in every slot (needs `gap_fill_threshold`).
            missing (`torch.BoolTensor` `[B]`, *optional*): the slots whose frame is late or lost (their rows of
                `user_codes`, valid codes such as -1, are replaced): they are gap-filled like `step(None)`, the others
                take their frame.
            look_ahead: run the idle-time half of the step now (the user Depformer, then speculation). A real-time
                loop passes False, sends the tokens, then calls [`look_ahead`] while it waits for the next frame;
                otherwise the next `step` (or `reset`) runs it first.

        Returns:
            [`MoshiStreamStepOutput`]; with `look_ahead=False` without the user prediction fields (`look_ahead()`
            returns them).
        """
        self._check_active()
        if self.deferred is not None:
            self.look_ahead()
        start = time.perf_counter()
        B, run = self.batch_size, self.exec_mask
        gap_filled = None
        if user_codes is None:
            missing = torch.ones(B, dtype=torch.bool, device=run.device)
        elif missing is not None:
            missing = self._check_mask(missing, "step")
        if missing is not None:
            gap_codes, gap_filled = self._fill_gap(missing)
            if user_codes is not None:
                user_codes = torch.where(missing[:, None, None], gap_codes, self._check_user_codes(user_codes))
            else:
                user_codes = gap_codes
        else:
            user_codes = self._check_user_codes(user_codes)
            self.missing.fill_(False)
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
            self.model.commit_system_step(self.caches, step.pending, self.offsets, mask=run & ~hit)
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
            self.model.commit_system_step(self.caches, spec.pending, self.offsets, choice, mask=hit)
        self.constraints.advance(text, self.text_history[:, -1], inputs[:, self.user_offset :], self.exec_mask)
        tokens = self._commit_tokens(text, audio)
        critical = time.perf_counter() - start
        status = self._speculation_status(spec, hit, run, critical)
        self.deferred = (hidden, text, audio, gap_filled)
        if not look_ahead:
            return MoshiStreamStepOutput(tokens=tokens, speculative=status, gap_filled=gap_filled, critical_s=critical)
        ahead = self.look_ahead()
        return MoshiStreamStepOutput(
            tokens=tokens,
            user_prediction=ahead.user_prediction,
            user_probs=ahead.user_probs,
            user_entropy=ahead.user_entropy,
            user_turn=ahead.user_turn,
            speculative=status,
            gap_filled=ahead.gap_filled,
            critical_s=critical,
            speculate_s=ahead.speculate_s,
        )

    @torch.no_grad()
    def look_ahead(self, speculate: bool = True) -> MoshiStreamStepOutput:
        """The idle-time half of the last `step(..., look_ahead=False)`: the user Depformer predicts the user's next
        tokens (and completes a gap fill's delayed rows), then speculation precomputes the next call.

        Args:
            speculate: precompute the next call (when the session speculates). A real-time loop with no idle time
                left passes False: the next call then runs a normal step, with the same tokens.

        Returns:
            [`MoshiStreamStepOutput`] with `user_prediction`, `user_probs`, `user_entropy`, `user_turn`,
            `gap_filled` and `speculate_s` (the other fields are the step's).

        Raises:
            RuntimeError: if there is no deferred step to complete.
        """
        self._check_active()
        if self.deferred is None:
            raise RuntimeError("look_ahead() completes a step(..., look_ahead=False); there is none pending")
        (hidden, text, audio, gap_filled), self.deferred = self.deferred, None
        speculate_s = 0.0
        if self.predicts_user:
            self._predict_user(hidden, text, audio)
            if gap_filled is not None:
                gap_filled = gap_filled | self._fill_gap_late_rows()
            if self.top_k and speculate:
                spec_start = time.perf_counter()
                self.speculation = self._speculate()
                speculate_s = time.perf_counter() - spec_start
                self.stats.speculate_s += speculate_s
        return MoshiStreamStepOutput(
            user_prediction=None if not self.predicts_user else self.user_prediction.clone(),
            user_probs=None if not self.predicts_user else self.user_probs.clone(),
            user_entropy=None if not self.predicts_user else self.user_entropy.clone(),
            user_turn=self.user_turn,
            gap_filled=gap_filled,
            speculate_s=speculate_s,
        )

    def _check_user_codes(self, user_codes: torch.Tensor) -> torch.Tensor:
        c = self.model.config
        user_codes = check_codes(user_codes, c, name="user_codes", first_row=self.user_offset, frames=1)
        if user_codes.shape[0] != self.batch_size:
            raise ValueError(f"user_codes has batch size {user_codes.shape[0]} but the session was opened with "
                             f"batch_size={self.batch_size}")
        return user_codes.to(self.model.device)

    def _inputs(self, offsets: torch.Tensor) -> torch.Tensor:
        """Main-transformer input `[B, K]` of the call at `offsets`: its ring cell, or initial tokens early on."""
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

    def _run_system_step(self, inputs: torch.Tensor, noise: tuple) -> MoshiSystemStepOutput:
        """`_system_step`, replayed as a CUDA graph per input shape when the session uses graphs."""
        if self.graphs is None:
            return self._system_step(inputs, *noise)
        if inputs.shape[1] not in self.graphs:
            self.graphs[inputs.shape[1]] = CUDAGraphed(self._system_step)
        return self.graphs[inputs.shape[1]](inputs, *noise)

    def _system_step(self, inputs: torch.Tensor, text_noise: torch.Tensor | None,
                     audio_noise: torch.Tensor | None) -> MoshiSystemStepOutput:
        """The model's system step for `n` alternative inputs `[B, n, K]` of the current position of every slot,
        sampled through the session's processors and noise.

        Pure tensor work on the session's static state (no host synchronisation), so it can be CUDA-graphed.
        """
        n = inputs.shape[1]
        history = self.text_history.repeat_interleave(n, dim=0)
        constrain = self.graphs is not None or self.constraints.active

        def sample_text(logits: torch.Tensor) -> torch.Tensor:
            scores = logits.float()
            if constrain:
                scores = self.constraints.mask(scores, self.text_history[:, -1], n)
            scores = self.processors["text"](history, scores)
            return sample_from_scores(scores, _expand(text_noise, n))

        def sample_audio(step: int, logits: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            scores = self.processors["audio"](sequence, logits.float())
            return sample_from_scores(scores, None if audio_noise is None else _expand(audio_noise[:, step], n))

        return self.model.system_step(inputs, self.offsets, self.caches, sample_text, sample_audio)

    def _commit_tokens(self, text: torch.Tensor, audio: torch.Tensor) -> torch.Tensor | None:
        """Write the call's text/audio into the ring, advance executing slots, return moshi-aligned tokens."""
        run, c = self.exec_mask, self.model.config
        self.offsets.add_(run.long())
        cell = (self.offsets % self.ring)[:, None, None]
        produced = torch.cat([text[:, None], audio], dim=1)[..., None]  # [B, 1 + dep_q, 1]
        system = self.tokens[:, : 1 + c.dep_q]
        system.scatter_(-1, cell.expand(-1, 1 + c.dep_q, 1),
                        torch.where(run[:, None, None], produced, system.gather(-1, cell.expand(-1, 1 + c.dep_q, 1))))
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
    def _predict_user(self, hidden: torch.Tensor, text: torch.Tensor, audio: torch.Tensor) -> None:
        """Run the user branch (after the system tokens exist) and slide the prediction window."""
        noise = None
        if self.do_sample["user"]:
            noise = self._draw((self.batch_size, self.model.config.user_dep_q, self.model.config.card),
                               self.model.device)

        def sample_user(step: int, logits: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            scores = self.processors["user"](sequence, logits.float())
            return sample_from_scores(scores, None if noise is None else noise[:, step])

        # only a shared user branch reads the microphone's known tokens (PersonaPlex's rule)
        known = self._known_user_tokens() if self.known_user_rows is not None else None
        tokens, logits = self.model.user_step(hidden, text, self.caches, sample_user, audio=audio, known=known)
        # The signal: the model's voice-activity head when it has one, else the turn-taking table's.
        signal = (self.model.voice_activity_signal(hidden) if self.constraints.head_signal
                  else self.constraints.table_signal(logits))
        self.user_turn = self.constraints.observe_turn(signal, self.exec_mask)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        probs = log_probs.gather(-1, tokens[..., None])[..., 0].exp()
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        run = self.exec_mask[:, None, None]
        for window, new in ((self.user_prediction, tokens), (self.user_probs, probs),
                            (self.user_entropy, entropy)):
            window.copy_(torch.where(run, torch.cat([window[..., 1:], new[..., None]], dim=-1), window))
        self.last_user_logits = logits

    def _known_user_tokens(self) -> torch.Tensor:
        """`[B, user_dep_q]` the user tokens of the position the user branch predicts that the model will read
        anyway: the rows with a delay, which hold a frame already received (-1 for the rows of a frame not received
        yet, and of a gap-filled frame)."""
        delayed, delay_one = self.known_user_rows
        rows = slice(self.user_offset, self.user_offset + delayed.shape[0])
        cell = (self.offsets % self.ring)[:, None, None].expand(-1, delayed.shape[0], 1)
        received = self.tokens[:, rows].gather(-1, cell)[..., 0]
        return torch.where(delayed & ~(self.missing[:, None] & delay_one), received, ZERO_TOKEN_ID)

    def _speculate(self) -> _Speculation:
        """Precompute the next call for the top-k next delay-0 user tokens (one batched forward)."""
        k = self.top_k
        probs = torch.softmax(self.last_user_logits[:, 0].float(), dim=-1)
        candidates = probs.topk(k, dim=-1).indices  # [B, k]
        inputs = self._inputs(self.offsets)[:, None].repeat(1, k, 1)
        inputs[:, :, self.user_offset] = candidates
        self.next_noise = self._noise()
        step = self._run_system_step(inputs, self.next_noise)
        return _Speculation(candidates, self.exec_mask.clone(), step.pending, step.hidden, step.text, step.audio)

    # ------------------------------------------------------------------------------------- gap filling
    def _fill_gap(self, missing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User codes for the slots whose frame is `missing` `[B]`: delay-0 rows from the prediction made for this
        call, where confident (codes of the other slots are the fallback token, their `filled` rows False)."""
        cfg, c = self.config, self.model.config
        if cfg.gap_fill_threshold is None:
            raise ValueError("a user frame is missing (step(None) or missing=), but gap filling is off: set "
                             "gap_fill_threshold in the generation config")
        codes = torch.full((self.batch_size, self.num_user_rows, 1), cfg.gap_fill_fallback_token,
                           device=self.model.device)
        filled = torch.zeros(self.batch_size, self.num_user_rows, dtype=torch.bool, device=self.model.device)
        if self.predicts_user:
            zero_rows = [k for k in range(c.user_dep_q) if c.delays[self.user_offset + k] == 0]
            for k in zero_rows:
                confident = missing & (self.user_probs[:, k, 0] >= cfg.gap_fill_threshold)
                codes[:, k, 0] = torch.where(confident, self.user_prediction[:, k, 0], codes[:, k, 0])
                filled[:, k] = confident
        self.missing.copy_(self.exec_mask & missing)
        return codes, filled

    def _fill_gap_late_rows(self) -> torch.Tensor:
        """Delay-1 rows of a missing frame, from the prediction the user branch just made (read next call)."""
        cfg, c = self.config, self.model.config
        filled = torch.zeros(self.batch_size, self.num_user_rows, dtype=torch.bool, device=self.model.device)
        cell = self.offsets % self.ring
        b = torch.arange(self.batch_size, device=cell.device)
        for k in range(c.user_dep_q):
            if c.delays[self.user_offset + k] != 1:
                continue
            confident = self.missing & (self.user_probs[:, k, 0] >= cfg.gap_fill_threshold)
            row = self.tokens[:, self.user_offset + k]
            row[b, cell] = torch.where(confident, self.user_prediction[:, k, 0], row[b, cell])
            filled[:, k] = confident
        return filled

    def close(self) -> None:
        self.active = False


def _expand(noise: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Share each slot's noise across its `n` alternatives: `[B, ...]` -> `[B * n, ...]`."""
    return None if noise is None else noise.repeat_interleave(n, dim=0)


def _pick(values: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """`values[b, choice[b]]` for `values` `[B, k, ...]`."""
    return values[torch.arange(values.shape[0], device=values.device), choice]


__all__ = ["MoshiStreamingSession"]
