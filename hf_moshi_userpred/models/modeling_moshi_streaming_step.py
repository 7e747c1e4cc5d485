"""The model's streaming step API: everything a streaming session (`generation_moshi_streaming.py`) asks of the model.

A session allocates its caches once (`make_streaming_caches`), then per call runs `system_step` (the critical path:
main transformer, text token, system audio), commits the alternative it keeps (`commit_system_step`), and later runs
`user_step` and reads the turn-taking signal (`voice_activity_signal`) off the committed hidden state. Per-slot
restarts and beam reordering go through `reset_streaming_caches` / `reorder_streaming_caches`. The session owns the
token ring, the offsets and the sampling; it never touches the caches' or the modules' insides, so the cache layout
can change here alone.

The model runs each Depformer's codebook loop and calls the session's samplers back once per codebook (docs/design.md
§2, "Who runs the Depformer loop").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .modeling_moshi_cache import MoshiKVCache


@dataclass
class MoshiStreamingCaches:
    """The key/value caches of one streaming session of `B` slots (see [`MoshiKVCache`]).

    Attributes:
        transformer: the main transformer's ring buffer, `config.streaming_window` positions, room for `k`
            alternatives per step when speculating.
        depformer: the system Depformer's cache for one frame of `B` slots (a shared user branch runs in it too).
        speculative_depformer: the same for `B * k` alternatives (speculation on), else None.
        user_depformer: the user Depformer's cache (a separate user branch), else None.
    """

    transformer: MoshiKVCache
    depformer: MoshiKVCache
    speculative_depformer: MoshiKVCache | None = None
    user_depformer: MoshiKVCache | None = None

    def nbytes(self) -> int:
        caches = (self.transformer, self.depformer, self.speculative_depformer, self.user_depformer)
        return sum(cache.nbytes() for cache in caches if cache is not None)


@dataclass
class MoshiSystemStepOutput(ModelOutput):
    r"""What [`MoshiStreamingStepMixin.system_step`] produced for `n` alternative inputs per slot.

    Args:
        hidden (`torch.FloatTensor` `[B, n, dim]`): the main transformer's output (after `out_norm`).
        text (`torch.LongTensor` `[B, n]`): the sampled text token.
        audio (`torch.LongTensor` `[B, n, dep_q]`): the sampled system audio codebooks.
        pending (`list`): the main transformer's new key/value entries, not yet in the cache: the caller commits
            the alternative it keeps (`commit_system_step`).
    """

    hidden: torch.Tensor | None = None
    text: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    pending: list | None = None


class MoshiStreamingStepMixin:
    """The streaming step API of [`MoshiUserPredForConditionalGeneration`] (mixed into it, as the generation mixin is):
    it runs the model's modules (`embed`, `transformer`, `out_norm`, `text_linear`, `depformer`, `user_depformer`,
    `voice_activity_head`) one streaming position at a time."""

    def make_streaming_caches(self, batch_size: int, speculate_top_k: int = 0) -> MoshiStreamingCaches:
        """Allocate the caches of a streaming session of `batch_size` slots, once (flat memory, CUDA-graph safe).

        Args:
            batch_size: slots.
            speculate_top_k: alternatives per step a speculative session runs (0: none).
        """
        transformer = self.transformer.make_cache(batch_size, self.config.streaming_window)
        speculative = None
        if speculate_top_k:
            transformer.reserve(speculate_top_k)
            speculative = self.depformer.make_cache(batch_size * speculate_top_k)
        user = self.user_depformer.make_cache(batch_size) if self.user_depformer is not None else None
        return MoshiStreamingCaches(transformer, self.depformer.make_cache(batch_size), speculative, user)

    def system_step(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        caches: MoshiStreamingCaches,
        sample_text: Callable[[torch.Tensor], torch.Tensor],
        sample_audio: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> MoshiSystemStepOutput:
        """One streaming position of the main transformer, then the text token and the system's audio codebooks:
        the critical path of a frame. Pure tensor work (no host synchronisation), so it can be CUDA-graphed.

        Args:
            inputs: `[B, n, 1 + n_q]` delayed tokens of the position, `n` alternatives per slot (n > 1: speculation;
                each alternative attends to the cache and itself).
            positions: `[B]` the position of every slot.
            caches: from `make_streaming_caches`; the transformer's new entries are left pending.
            sample_text: `sample_text(logits [B * n, text_card_out]) -> tokens [B * n]`.
            sample_audio: `sample_audio(step, logits [B * n, card], sequence [B * n, step + 1]) -> tokens [B * n]`
                (see `MoshiDepformer.generate_frame`).

        Returns:
            [`MoshiSystemStepOutput`].
        """
        B, n, K = inputs.shape
        x = self.embed(inputs.reshape(B * n, K, 1)).view(B, n, -1)
        hidden = self.out_norm(self.transformer(x, positions[:, None].expand(B, n), cache=caches.transformer))
        text = sample_text(self.text_linear(hidden).reshape(B * n, -1))
        depformer_cache = caches.depformer if n == 1 else caches.speculative_depformer
        audio, _ = self.depformer.generate_frame(hidden.reshape(B * n, -1), text, depformer_cache, sample_audio,
                                                 num_steps=self.config.dep_q)
        return MoshiSystemStepOutput(hidden=hidden, text=text.view(B, n), audio=audio.view(B, n, -1),
                                     pending=caches.transformer.take_pending())

    def commit_system_step(
        self,
        caches: MoshiStreamingCaches,
        pending: list,
        positions: torch.Tensor,
        choice: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Write the main transformer's entries of a `system_step` into the cache: alternative `choice[b]` at
        `positions[b]` for every slot `b` where `mask[b]`. The other slots keep their cache as it was.

        Args:
            caches: from `make_streaming_caches`.
            pending: `MoshiSystemStepOutput.pending` of that step.
            positions: `[B]` the positions the step ran at.
            choice: `[B]` the alternative each slot keeps (default 0, the only one of a plain step).
            mask: `[B]` bool, the slots to write (default all).
        """
        caches.transformer.commit(pending, positions, choice, mask=mask)

    def prefill_prompt(self, inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The main transformer over `P` consecutive positions `0..P-1` of delayed tokens `[1 + n_q, P]` (a persona
        prompt) in one call.

        Returns:
            per layer, the keys and values `[1, kv_heads, P, head_dim]` that feeding the positions one at a time
            would write into a cache (for `load_prompt`).
        """
        P = inputs.shape[1]
        cache = self.transformer.make_cache(1, P)
        self.transformer(self.embed(inputs[None]), torch.arange(P, device=inputs.device)[None], cache=cache,
                         prefill=True)
        return cache.take_pending()

    def load_prompt(self, caches: MoshiStreamingCaches, kv: list[tuple[torch.Tensor, torch.Tensor]],
                    mask: torch.Tensor) -> None:
        """Write a prompt's keys and values (`prefill_prompt`) at positions `0..P-1` of the main transformer's cache of
        the slots where `mask` `[B]` is True; the other slots keep theirs."""
        B, P = mask.shape[0], kv[0][0].shape[2]
        positions = torch.arange(P, device=mask.device)[None].expand(B, -1)
        caches.transformer.commit_sequence([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in kv],
                                           positions, mask)

    def reset_streaming_caches(self, caches: MoshiStreamingCaches, mask: torch.Tensor | None = None) -> None:
        """Empty the main transformer's cache of the slots where `mask` `[B]` is True (all for None): they start a new
        conversation at position 0. (The Depformer caches hold one frame and are emptied at every frame anyway.)"""
        caches.transformer.reset(mask)

    def reorder_streaming_caches(self, caches: MoshiStreamingCaches, index: torch.Tensor) -> None:
        """Make slot `b` continue the main-transformer cache of slot `index[b]` (`torch.LongTensor` `[B]`, repeats
        allowed; beam search). In place, so the buffers stay put for CUDA graphs."""
        caches.transformer.reorder(index)

    def user_step(
        self,
        hidden: torch.Tensor,
        text: torch.Tensor,
        caches: MoshiStreamingCaches,
        sample: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
        audio: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The user branch on one frame: run after `system_step`, so it adds nothing to the critical path.

        A shared user branch (`config.user_depformer="shared"`) continues the system Depformer: the frame's system
        codebooks `audio` are prefilled in one call, then the user steps run. It follows PersonaPlex's rule: the
        microphone's tokens (`known`) replace the sampled ones as the next step's input wherever they are known.

        Args:
            hidden: `[B, dim]` the committed `system_step` hidden state of every slot.
            text: `[B]` the committed text token.
            caches: from `make_streaming_caches`.
            sample: as `sample_audio` of `system_step`, over the user codebooks (it sees the calibrated logits).
            audio: `[B, dep_q]` the committed system codebooks (needed by a shared user branch).
            known: `[B, user_dep_q]` the user tokens this step predicts that are already known (-1: unknown); a
                shared user branch reads them in place of its samples.

        Returns:
            tokens `[B, user_dep_q]` and logits `[B, user_dep_q, card]` (calibrated by
            `config.user_logit_temperature` when set).
        """
        c = self.config
        if not c.predict_user_audio:
            raise ValueError("user_step: the model has no user branch (predict_user_audio=False)")
        temperature = c.user_logit_temperature

        def sample_calibrated(step: int, logits: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            return sample(step, logits if temperature is None else logits / temperature[step], sequence)

        if c.user_depformer == "shared":
            if audio is None:
                raise ValueError("user_step: a shared user Depformer continues the frame's system codebooks: pass "
                                 "`audio`")
            tokens, logits = self.depformer.generate_frame(hidden, text, caches.depformer, sample_calibrated,
                                                           prefix=audio, known=known)
        else:
            tokens, logits = self.user_depformer.generate_frame(hidden, text, caches.user_depformer,
                                                                sample_calibrated)
        return tokens, self.calibrate_user_logits(logits, codebook_dim=1)

    @property
    def has_voice_activity_head(self) -> bool:
        """Whether the model has a voice-activity head (`config.voice_activity_horizon > 0`): `voice_activity_signal`
        then gives the turn-taking signal."""
        return self.voice_activity_head is not None

    def voice_activity_signal(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The voice-activity head's turn-taking signal at the hidden state `user_step` read.

        Args:
            hidden: `[..., dim]` e.g. `[B, dim]`, the committed `system_step` hidden state.

        Returns:
            `silence` `[..., voice_activity_horizon]` (P(the user is silent `n - 1` frames after the frame the user
            branch predicts)) and `turn_end` `[...]` (P(the user's turn ends within the horizon)), float32.
        """
        if self.voice_activity_head is None:
            raise ValueError("voice_activity_signal: the model has no voice-activity head (voice_activity_horizon=0)")
        return self.voice_activity_head.signal(hidden)


__all__ = ["MoshiStreamingCaches", "MoshiStreamingStepMixin", "MoshiSystemStepOutput"]
