"""Moshi's token embedding and Depformer.

The Depformer is a small transformer over the *codebook axis*: for every time step it reads the main
transformer's output and generates `num_steps` codebooks one after the other, step k seeing the token
of step k-1 (the text token for k = 0). Moshi has one for the system's audio; this package adds a
second one, of the same kind, for the user's audio, or (`config.user_depformer="shared"`, the multistream layout)
continues the system's with the user's codebook steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .modeling_moshi_cache import MoshiKVCache
from .modeling_moshi_codes import ZERO_TOKEN_ID
from .modeling_moshi_transformer import MoshiTransformer, create_norm


class MoshiScaledEmbedding(nn.Embedding):
    """Embedding where token -1 maps to an exact zero vector; optional layer norm and low-rank projection.

    Parameters follow moshi's `ScaledEmbedding`: `weight` `[num_embeddings, low_rank or dim]`,
    `norm.*` (when `norm`), `low_rank.weight` `[dim, low_rank]` (when `low_rank`).
    """

    def __init__(self, num_embeddings: int, dim: int, norm: bool = False, low_rank: int | None = None):
        super().__init__(num_embeddings, low_rank or dim)
        self.norm = create_norm("layer_norm", self.embedding_dim) if norm else None
        self.low_rank = nn.Linear(low_rank, dim, bias=False) if low_rank else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` `[...]` (long, -1 allowed) -> `[..., dim]`."""
        y = super().forward(tokens.clamp(min=0))
        if self.norm is not None:
            y = self.norm(y)
        y = torch.where((tokens == ZERO_TOKEN_ID)[..., None], torch.zeros((), dtype=y.dtype, device=y.device), y)
        if self.low_rank is not None:
            y = self.low_rank(y)
        return y


class MoshiDepformer(nn.Module):
    """Generates `num_steps` codebooks for each time step from the main transformer's output.

    Step k's input is `in_projs[k](hidden) + emb_k(previous token)` where the previous token is the
    text token for k = 0 (`text_emb`) and codebook k-1 otherwise (`emb[k-1]`); step k's logits are
    `heads[k](norms[k](out_k))`. With `weights_per_step`, step k uses weight set `schedule[k]`.
    """

    def __init__(
        self,
        *,
        input_dim: int,
        dim: int,
        num_steps: int,
        num_heads: int,
        num_layers: int,
        dim_feedforward: int | list[int],
        card: int,
        text_card: int,
        multi_linear: bool,
        weights_per_step: bool,
        schedule: list[int] | None,
        low_rank_embeddings: int | None,
        pos_emb: str,
        out_norm: str | None,
        norm: str,
        gating: str,
        layer_scale: float | None,
        kv_repeat: int,
        max_period: float,
        positional_scale: float,
        norm_emb: bool,
        bias_proj: bool,
    ):
        super().__init__()
        self.num_steps = num_steps
        self.schedule = schedule
        num_weight_sets = (max(schedule) + 1 if schedule is not None else num_steps) if weights_per_step else 1
        self.in_projs = nn.ModuleList(
            [nn.Linear(input_dim, dim, bias=False) for _ in range(num_weight_sets if multi_linear else 1)]
        )
        self.text_emb = MoshiScaledEmbedding(text_card + 1, dim, norm=norm_emb, low_rank=low_rank_embeddings)
        self.emb = nn.ModuleList(
            [MoshiScaledEmbedding(card + 1, dim, norm=norm_emb, low_rank=low_rank_embeddings)
             for _ in range(num_steps - 1)]
        )
        self.transformer = MoshiTransformer(
            dim, num_heads, num_layers, dim_feedforward, norm, gating, pos_emb, max_period, positional_scale,
            layer_scale, kv_repeat, context=None,
            num_weight_sets=num_weight_sets if weights_per_step else 1, schedule=schedule,
        )
        self.norms = nn.ModuleList(
            [nn.Identity() if out_norm is None else create_norm(out_norm, dim) for _ in range(num_steps)]
        )
        self.heads = nn.ModuleList([nn.Linear(dim, card, bias=bias_proj) for _ in range(num_steps)])

    def in_proj_index(self, step: int) -> int:
        """Which input projection codebook step `step` uses."""
        if len(self.in_projs) == 1:
            return 0
        return self.schedule[step] if self.schedule is not None else step

    def forward(self, hidden: torch.Tensor, text_tokens: torch.Tensor, prev_tokens: torch.Tensor,
                num_steps: int | None = None) -> torch.Tensor:
        """Teacher-forced logits for every time step.

        Args:
            hidden: main transformer output `[B, T, input_dim]`.
            text_tokens: the text token of each step `[B, T]` (input of codebook step 0).
            prev_tokens: the ground-truth codebooks `0..num_steps-2` `[B, >= num_steps - 1, T]` (inputs of steps 1..).
            num_steps: run the first `num_steps` steps only (default all; the Depformer is causal over its steps, so
                they are what the full run gives).

        Returns:
            logits `[B, num_steps, T, card]`.
        """
        B, T, _ = hidden.shape
        num_steps = self.num_steps if num_steps is None else num_steps
        projected = [proj(hidden) for proj in self.in_projs]
        inputs = []
        for step in range(num_steps):
            token_emb = self.text_emb(text_tokens) if step == 0 else self.emb[step - 1](prev_tokens[:, step - 1])
            inputs.append(projected[self.in_proj_index(step)] + token_emb)
        # The Depformer runs over the codebook axis: a batch of B*T sequences of num_steps positions.
        x = torch.stack(inputs, dim=2).view(B * T, num_steps, -1)
        out = self.transformer(x).unbind(1)  # not out[:, k]: its backward zero-fills a full-size gradient per step
        logits = [self.heads[k](self.norms[k](out[k])).view(B, T, -1) for k in range(num_steps)]
        return torch.stack(logits, dim=1)

    def make_cache(self, batch_size: int) -> MoshiKVCache:
        """A streaming cache holding one frame's codebook steps for `batch_size` rows."""
        return self.transformer.make_cache(batch_size, self.num_steps)

    def generate_frame(
        self,
        hidden: torch.Tensor,
        text_tokens: torch.Tensor,
        cache: MoshiKVCache,
        sample: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
        num_steps: int | None = None,
        prefix: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate the codebooks of one frame, one step after the other (streaming inference).

        Args:
            hidden: main transformer output of the frame `[N, input_dim]`.
            text_tokens: the frame's text token `[N]` (input of step 0).
            cache: from `make_cache(N)`; emptied here.
            sample: `sample(step, logits [N, card], sequence [N, step + 1]) -> tokens [N]`, where `step` counts the
                generated steps from 0 and `sequence` is the text token followed by the tokens already generated in
                this frame.
            num_steps: stop after step `num_steps - 1` (default: all steps).
            prefix: `[N, P]` the tokens of steps `0..P-1`, already chosen (a shared user branch continues the system
                codebooks of the frame): their keys and values are computed in one prefill, and generation starts
                at step P.
            known: `[N, num_steps - P]` tokens that replace the sampled ones as the next step's input where they are
                >= 0 (the microphone's, where known); the returned tokens stay the sampled ones.

        Returns:
            tokens `[N, num_steps - P]` and logits `[N, num_steps - P, card]` of the generated steps.
        """
        cache.reset()
        num_steps = self.num_steps if num_steps is None else num_steps
        N, first = hidden.shape[0], 0 if prefix is None else prefix.shape[1]
        positions = torch.arange(num_steps, device=hidden.device).expand(N, -1)
        previous = text_tokens
        if first:
            inputs = [self._step_input(hidden, step, text_tokens if step == 0 else prefix[:, step - 1])
                      for step in range(first)]
            self.transformer(torch.stack(inputs, dim=1), positions[:, :first], cache=cache, prefill=True)
            cache.commit_sequence(cache.take_pending(), positions[:, :first])
            previous = prefix[:, -1]
        sequence, all_logits = text_tokens[:, None], []
        for step in range(first, num_steps):
            x = self._step_input(hidden, step, previous)[:, None]
            position = positions[:, step : step + 1]
            out = self.transformer(x, position, step_offset=step, cache=cache)
            cache.commit(cache.take_pending(), position[:, 0])
            logits = self.heads[step](self.norms[step](out[:, 0]))
            token = sample(step - first, logits, sequence)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            previous = token if known is None else torch.where(known[:, step - first] >= 0, known[:, step - first],
                                                               token)
            all_logits.append(logits)
        return sequence[:, 1:], torch.stack(all_logits, dim=1)

    def _step_input(self, hidden: torch.Tensor, step: int, previous: torch.Tensor) -> torch.Tensor:
        """Step `step`'s input `[N, dim]`: its projection of `hidden` `[N, input_dim]` plus the embedding of the
        previous step's token `previous` `[N]` (the text token for step 0)."""
        token_emb = self.text_emb(previous) if step == 0 else self.emb[step - 1](previous)
        return self.in_projs[self.in_proj_index(step)](hidden) + token_emb


__all__ = ["MoshiDepformer", "MoshiScaledEmbedding"]
