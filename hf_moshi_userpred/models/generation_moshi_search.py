"""Beam, diverse beam and contrastive search over the text stream of a whole user recording (offline `generate`).

A real-time stream cannot search: it must emit every frame's tokens before the next frame arrives, and a beam is
only known to be the best once the recording ends. Offline, the search runs one [`MoshiStreamingSession`] of
`B * m * m` slots, `m` being `num_beams` (beam search) or `top_k` (contrastive search): every hypothesis has `m`
copies, and copy `c` takes the hypothesis's `c`-th candidate text token. So one batched step gives every candidate
its text token, the system audio the Depformer generates for that token (greedy or sampled, per slot) and the user
prediction; nothing is recomputed. A text logits processor ([`TextSearchStep`]) chooses inside the step and forces
each slot's token; after the step `MoshiStreamingSession.reorder` gives the `m` copies of every surviving hypothesis
its state (KV cache rows, token ring, text history, user prediction, forced words, turn state), and back-pointers
recover the best hypothesis's tokens at the end.

- **Beam search** (Transformers' `BeamSearchScorer`): a hypothesis's score is the sum of its text log-probabilities
  (log-softmax of the processed text scores, one per frame); every frame keeps the `num_beams` best children of all
  beams. Every hypothesis has one text token per frame, so all have the same length and `length_penalty` only scales
  `sequences_scores = score / T ** length_penalty`.
- **Diverse beam search** (Vijayakumar et al., Transformers' `HammingDiversityLogitsProcessor`): the beams form
  `num_beam_groups` groups searched one after the other within a frame; a group's log-probabilities are lowered by
  `diversity_penalty` times the number of beams of the earlier groups that chose the token at this frame, and the
  penalised values add up in the score, as in Transformers. Moshi writes padding at most frames, so the padding and
  end-of-padding ids are exempt (as from the repetition penalty): the groups differ in the words they say and
  when, not by being pushed to talk over silence.
- **Contrastive search** (Su et al., Transformers' semantics): the candidates are the `top_k` most likely text
  tokens; candidate `v` scores `(1 - penalty_alpha) * p(v) - penalty_alpha * max_s cos(h_v, h_s)`. One frame is one
  position of the main transformer, and the hidden state is its output after `out_norm` (the input of the text
  head): `h_v` is the hidden state of the next frame's position, whose input holds `v` (with the system audio the
  Depformer produced for it and the user's next frame), and `h_s` are those of the positions already chosen,
  from the first frame on. A frame's choice is therefore made one step later, when its candidates' hidden states
  exist; the last frame, with no next user frame, takes its most likely token.

Costs: `m * m` slots per input (KV cache, Depformer runs), e.g. 16 for `num_beams=4`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.utils.logging import tqdm

from .generation_moshi_config import SEARCH_FIELDS, MoshiUserPredGenerationConfig
from .modeling_moshi_codes import check_codes

if TYPE_CHECKING:  # the model module imports the generation mixin, which imports this one
    from .generation_moshi_step_output import MoshiStreamStepOutput, SpeculationStats
    from .modeling_moshi_userpred import MoshiUserPredForConditionalGeneration


def requests_search(generation_config: GenerationConfig, overrides: Mapping) -> bool:
    """Whether `generate(..., **overrides)` with `generation_config` asks for beam (`num_beams > 1`) or contrastive
    (`penalty_alpha > 0`) search."""
    beams = overrides.get("num_beams", getattr(generation_config, "num_beams", None))
    alpha = overrides.get("penalty_alpha", getattr(generation_config, "penalty_alpha", None))
    return (isinstance(beams, int) and beams > 1) or (isinstance(alpha, (int, float)) and alpha > 0)


class TextSearchStep(LogitsProcessor):
    """The search over the text stream of a session of `B * m * m` slots: as the session's text processor it reads
    the processed text scores of every slot and forces each slot's token; `after_step` then says which slot each
    slot continues, and `best` gives the hypotheses at the end.

    Slots are laid out `[B, m, m]`: hypothesis `j` of input `b` owns slots `(b, j, 0 .. m - 1)`, identical copies,
    and copy `c` runs its `c`-th candidate.

    Args:
        batch_size: inputs `B`.
        width: `m`, `num_beams` or `top_k`.
        padding_ids: Moshi's text padding and end-of-padding, exempt from the diversity penalty.
        num_beam_groups, diversity_penalty: diverse beam search (1 and 0: plain beam search).
        penalty_alpha: contrastive search's degeneration weight (None: beam search).
    """

    def __init__(self, batch_size: int, width: int, padding_ids: tuple[int, int], *, num_beam_groups: int = 1,
                 diversity_penalty: float = 0.0, penalty_alpha: float | None = None):
        self.batch_size, self.width, self.padding_ids = batch_size, width, list(padding_ids)
        self.groups, self.diversity_penalty, self.penalty_alpha = num_beam_groups, diversity_penalty, penalty_alpha
        # Beam search: [B, m] summed (penalised) text log-probabilities of the hypotheses, the slots to continue.
        self.beam_scores: torch.Tensor | None = None
        self.reorder_index: torch.Tensor | None = None
        # Contrastive search: [B, m, m] p(candidate c') of hypothesis c at this frame, [B, m] those of the kept
        # hypothesis at the previous frame, [B, S, dim] the hidden states of the chosen positions, [B] log p(chosen).
        self.candidate_probs: torch.Tensor | None = None
        self.previous_probs: torch.Tensor | None = None
        self.context: torch.Tensor | None = None
        self.chosen_log_prob: torch.Tensor | float = 0.0

    @property
    def contrastive(self) -> bool:
        return self.penalty_alpha is not None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, m = self.batch_size, self.width
        log_probs = torch.log_softmax(scores.float(), dim=-1)
        if self.contrastive:  # slot (b, c, c') proposes the c'-th most likely token of its own distribution
            top = log_probs.topk(m, dim=-1)
            forced = top.indices.view(B, m, m, m).diagonal(dim1=2, dim2=3)  # [B, m, m]: rank c' in slot (b, c, c')
            self.candidate_probs = top.values.view(B, m, m, m)[:, :, 0].exp()
        else:
            forced = self._choose_children(log_probs.view(B, m, m, -1)[:, :, 0])
        return torch.full_like(scores, float("-inf")).scatter(-1, forced.reshape(-1, 1), 0.0)

    def _choose_children(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Beam selection from the beams' log-probabilities `[B, m, V]`: the `m // groups` best children of each group
        (after the Hamming penalty of the earlier groups), each forced in a free copy of its parent. Returns the token
        of every slot `[B, m, m]` and sets `reorder_index` and `beam_scores`."""
        B, m, V = log_probs.shape
        size = m // self.groups
        if self.beam_scores is None:  # the first frame: every group starts from its first beam only
            self.beam_scores = torch.full((B, m), float("-inf"), device=log_probs.device)
            self.beam_scores[:, ::size] = 0.0
        chosen_by_earlier = torch.zeros(B, V, device=log_probs.device)
        parents, tokens, scores = [], [], []
        for group in range(self.groups):
            beams = slice(group * size, (group + 1) * size)
            penalised = log_probs[:, beams] - self.diversity_penalty * chosen_by_earlier[:, None]
            best = (self.beam_scores[:, beams, None] + penalised).flatten(1).topk(size, dim=-1)
            parents.append(best.indices // V + group * size)
            tokens.append(best.indices % V)
            scores.append(best.values)
            chosen_by_earlier.scatter_add_(1, tokens[-1], torch.ones_like(best.values))
            chosen_by_earlier[:, self.padding_ids] = 0.0
        parent, token = torch.cat(parents, dim=1), torch.cat(tokens, dim=1)  # [B, m] per child
        self.beam_scores = torch.cat(scores, dim=1)
        # Child i runs in copy `copy[i]` of its parent: the number of earlier children of the same parent.
        same_parent = parent[:, :, None] == parent[:, None, :]
        copy = (same_parent & torch.ones(m, m, dtype=torch.bool, device=parent.device).tril(-1)).sum(-1)
        forced = log_probs.argmax(dim=-1)[:, :, None].repeat(1, 1, m)  # free copies: anything, they are dropped
        batch = torch.arange(B, device=parent.device)[:, None]
        forced[batch, parent, copy] = token
        self.reorder_index = self._continue((batch * m + parent) * m + copy)
        return forced

    def after_step(self, hidden: torch.Tensor) -> torch.Tensor:
        """The slot `[B * m * m]` each slot continues after the step (for `MoshiStreamingSession.reorder`).

        Contrastive search decides here, one frame late: `hidden` `[B * m * m, dim]` (the main transformer's output
        of the step) holds, for hypothesis `c`, the hidden state of its candidate of the previous frame; the kept
        hypothesis's candidates of this frame become the hypotheses.
        """
        if not self.contrastive:
            return self.reorder_index
        B, m = self.batch_size, self.width
        hidden = hidden.view(B, m, m, -1)[:, :, 0].float()  # [B, m, dim]
        batch = torch.arange(B, device=hidden.device)
        if self.context is None:  # the first frame: all hypotheses are the same (nothing chosen yet)
            choice = torch.zeros(B, dtype=torch.long, device=hidden.device)
            self.context = hidden[batch, choice][:, None]
        else:
            unit = torch.nn.functional.normalize
            similarity = (unit(hidden, dim=-1) @ unit(self.context, dim=-1).transpose(1, 2)).amax(-1)  # [B, m]
            score = (1 - self.penalty_alpha) * self.previous_probs - self.penalty_alpha * similarity
            choice = score.argmax(dim=-1)
            self.chosen_log_prob = self.chosen_log_prob + self.previous_probs[batch, choice].log()
            self.context = torch.cat([self.context, hidden[batch, choice][:, None]], dim=1)
        self.previous_probs = self.candidate_probs[batch, choice]
        candidates = torch.arange(m, device=hidden.device)[None]
        return self._continue((batch[:, None] * m + choice[:, None]) * m + candidates)

    def best(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """After the last step: the scores `[B, n]` of the `n` best hypotheses and their slots `[B, n]`.
        Contrastive search keeps one, whose last frame takes its most likely candidate."""
        B, m = self.batch_size, self.width
        if self.contrastive:
            scores = (self.chosen_log_prob + self.previous_probs[:, 0].log())[:, None]
            hypotheses = torch.zeros(B, 1, dtype=torch.long, device=scores.device)
        else:
            scores, hypotheses = self.beam_scores.topk(n, dim=-1)
        batch = torch.arange(B, device=scores.device)[:, None]
        return scores, (batch * m + hypotheses) * m

    def _continue(self, source: torch.Tensor) -> torch.Tensor:
        """`source` `[B, m]`, the slot that continues as hypothesis `j`, for all `m` copies of `j`: `[B * m * m]`."""
        B, m = source.shape
        return source[:, :, None].expand(B, m, m).reshape(-1)


@torch.no_grad()
def search_generate(
    model: MoshiUserPredForConditionalGeneration,
    user_codes: torch.Tensor,
    generation_config: GenerationConfig | None = None,
    *,
    progress: bool = True,
    seed: int | None = None,
    forced_text: Mapping[int, str | Sequence[Sequence[int]]] | None = None,
    **kwargs,
):
    """Beam, diverse beam or contrastive search over the text stream of `user_codes` (what `generate` runs for
    `num_beams > 1` or `penalty_alpha > 0`; called directly, `num_beams=1` and `penalty_alpha=0` run the search
    machinery too and give greedy decoding).

    Args:
        user_codes: `[B, n_q - dep_q, T]` the user's Mimi tokens.
        generation_config, progress, seed, forced_text, **kwargs: as for `generate`. The text stream must be greedy
            (`do_sample=False`); contrastive search when `penalty_alpha` is set (with `top_k` candidates), else beam
            search with `num_beams`, `num_beam_groups`, `diversity_penalty`, `length_penalty`,
            `num_return_sequences`. Speculation is off (it changes nothing offline).

    Returns:
        [`MoshiGenerateOutput`] of the best hypothesis per input (the `num_return_sequences` best, rows
        `b * n .. b * n + n - 1`), with `sequences_scores` `[B * n]`: the score over the `T` text tokens divided by
        `T ** length_penalty`.
    """
    c = model.config
    user_codes = check_codes(user_codes, c, name="user_codes", first_row=1 + c.dep_q)
    B, _, T = user_codes.shape
    if T == 0:
        raise ValueError("user_codes has no frame: a search needs at least one")
    # `generate`'s keyword arguments are generation config fields and `streaming`'s own arguments (processors, ...);
    # the config is resolved as `streaming` resolves it (the mixin's method: this module is the mixin's offline half).
    session_args = {k: v for k, v in kwargs.items() if k in inspect.signature(model.streaming).parameters}
    config: MoshiUserPredGenerationConfig = model._resolve_generation_config(
        generation_config, **{k: v for k, v in kwargs.items() if k not in session_args})
    if config.do_sample:  # reached by direct calls: the config refuses it with num_beams > 1 or penalty_alpha > 0
        raise ValueError("do_sample=True: the search chooses the text tokens itself; pass do_sample=False")
    contrastive = config.penalty_alpha is not None and (config.num_beams or 1) == 1
    width = (config.top_k or 1) if contrastive else (config.num_beams or 1)
    returned = config.num_return_sequences or 1
    if contrastive and returned != 1:
        raise ValueError(f"num_return_sequences={returned}: contrastive search keeps one hypothesis")
    search = TextSearchStep(B, width, (c.existing_text_padding_id, c.existing_text_end_padding_id),
                            num_beam_groups=config.num_beam_groups or 1,
                            diversity_penalty=config.diversity_penalty or 0.0,
                            penalty_alpha=config.penalty_alpha if contrastive else None)
    session_args["text_logits_processor"] = LogitsProcessorList([*(session_args.get("text_logits_processor") or []),
                                                                 search])
    steps, reorders = [], []
    # The session holds the search's slots; the processor above does the searching (no graphs: it keeps state).
    with model.streaming(B * width * width, config, seed=seed, cuda_graphs=False, speculate_top_k=0,
                         **SEARCH_FIELDS, **session_args) as stream:
        for t in tqdm(range(T), desc="searching", unit="frame", disable=not progress):
            if forced_text and t in forced_text:
                stream.say(forced_text[t])
            step = stream.step(user_codes[:, :, t : t + 1].repeat_interleave(width * width, dim=0), look_ahead=False)
            hidden = stream.deferred[0]  # the step's main-transformer output, until `look_ahead` completes the step
            steps.append((step, stream.look_ahead()))
            reorders.append(search.after_step(hidden))
            stream.reorder(reorders[-1])
        stats = stream.stats
    scores, rows = search.best(returned)
    length_penalty = 1.0 if config.length_penalty is None else config.length_penalty
    return _gather_output(steps, reorders, rows.flatten(), c.dep_q, stats,
                          sequences_scores=scores.flatten() / T ** length_penalty)


def _gather_output(steps: list[tuple[MoshiStreamStepOutput, MoshiStreamStepOutput]], reorders: list[torch.Tensor],
                   rows: torch.Tensor, dep_q: int, stats: SpeculationStats, **extra):
    """`generate`'s output for the hypotheses in slots `rows` `[n]` after the last step: back from there through
    each step's reorder index, the slot each was in at that step, and that slot's tokens and user-branch outputs.
    `steps` holds each step's output and its `look_ahead`'s."""
    from .generation_moshi_userpred import MoshiGenerateOutput  # that module imports this one (dispatch)

    path = []
    for index in reversed(reorders):
        rows = index[rows]
        path.append(rows)
    entries = [(step, ahead, slots) for (step, ahead), slots in zip(steps, reversed(path))]
    return MoshiGenerateOutput.from_steps(entries, len(rows), dep_q, rows.device, stats, **extra)


__all__ = ["TextSearchStep", "requests_search", "search_generate"]
