"""What a streaming session's text stream may say next: forced text (`say`, `prompt_text`) and the turn holds
(`max_turn_words`, `min_silence_frames`, `turn_hold_threshold`), with the turn-taking signal they read.

[`MoshiTextConstraints`] holds the per-slot state (the forced words still to say, the words said since the user
last spoke, the user's silent frames in a row, P(turn end)) and turns it into a mask on the text logits. The mask is
pure tensor work on static state, so it runs inside a CUDA-graphed step; the forced-word queues live on the host and
advance after the step's text token is known.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from transformers.utils import ModelOutput

if TYPE_CHECKING:
    from .configuration_moshi_userpred import MoshiUserPredConfig
    from .generation_moshi_config import MoshiUserPredGenerationConfig


class WordTokenizer(Protocol):
    """What `say` needs to turn a string into words of token ids, e.g. a `sentencepiece.SentencePieceProcessor` (the
    model folder's `tokenizer.model`); each word is encoded on its own, as the training text was."""

    def encode(self, text: str) -> list[int]: ...


def turn_taking_signal(logits: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The turn-taking signal from the user branch's logits of its delay-0 codebook (torch only, no state).

    Args:
        logits: `[..., card]` scores of the user's next semantic token (e.g. `user_logits[:, k0]` `[B, T, card]`
            from `forward`, or one streaming step's `[B, card]`); NaN rows give NaN.
        table: `[card, horizon + 1]` from `TurnTakingStatistics.table` (turn_taking.py): per token, P(user silent
            `n - 1` frames later) for `n = 1 .. horizon`, then P(user silent over the last `turn_end_frames` of the
            horizon).

    Returns:
        `silence` `[..., horizon]`: P(user silent in frame `t + n - 1`) where `t` is the predicted frame;
        `turn_end` `[...]`: P(the user's turn ends within the horizon).
    """
    out = logits.float().softmax(-1) @ table.to(logits.device, torch.float32)
    return out[..., :-1], out[..., -1]


@dataclass
class MoshiUserTurnOutput(ModelOutput):
    r"""The turn-taking signal of one step: the model's voice-activity head on the step's hidden state, or
    [`turn_taking_signal`] of the user branch's delay-0 logits.

    Args:
        silence (`torch.FloatTensor` `[B, horizon]`): P(the user is silent `n - 1` frames after the predicted frame),
            `n = 1 .. horizon`; NaN for a slot that did not run this step.
        turn_end (`torch.FloatTensor` `[B]`): P(the user's turn ends within the horizon); NaN likewise.
    """

    silence: torch.Tensor | None = None
    turn_end: torch.Tensor | None = None


class MoshiTextConstraints:
    """The text-stream constraints of `batch_size` slots.

    Args:
        config: the model's config (vocabularies, padding ids, delays).
        generation_config: the turn settings (`max_turn_words`, `min_silence_frames`, `turn_hold_threshold`).
        turn_taking_table (`torch.FloatTensor` `[card, horizon + 1]`, *optional*): `TurnTakingStatistics.table()`:
            the turn-taking signal (with the user branch) and the user's voice activity the turn settings need.
        tokenizer (*optional*): the default tokenizer of [`say`] for strings.
        predicts_user: the session runs the user branch (the signal and `turn_hold_threshold` need it).

    Raises:
        ValueError: a turn setting without a table, a malformed table, `turn_hold_threshold` without the user branch.
    """

    def __init__(self, config: MoshiUserPredConfig, generation_config: MoshiUserPredGenerationConfig, batch_size: int,
                 device: torch.device, turn_taking_table: torch.Tensor | None, tokenizer: WordTokenizer | None,
                 predicts_user: bool, has_voice_activity_head: bool = False):
        self.config, self.settings, self.tokenizer = config, generation_config, tokenizer
        self.padding_ids = (config.existing_text_padding_id, config.existing_text_end_padding_id)
        self.padding_id, self.end_padding_id = self.padding_ids
        vocab = torch.arange(config.text_card_out, device=device)[None]  # [1, V]
        self.is_padding, self.is_end_padding = vocab == self.padding_id, vocab == self.end_padding_id
        self.vocab = vocab
        # per slot: (token, continues a word, frames the model may wait before the word starts)
        self.forced_words: list[deque[tuple[int, bool, int | None]]] = [deque() for _ in range(batch_size)]
        self.forced_waited = [0] * batch_size  # steps since the last forced token was said (or since `say`)
        # Read by `mask` inside the (graphed) step: updated in place only.
        self.forced_token = torch.full((batch_size,), -1, device=device)  # next forced token, -1: none
        self.forced_continues = torch.zeros(batch_size, dtype=torch.bool, device=device)  # it continues a word
        self.forced_overdue = torch.zeros(batch_size, dtype=torch.bool, device=device)  # its word must start now
        self.turn_words = torch.zeros(batch_size, dtype=torch.long, device=device)  # words since the user spoke
        self.silent_frames = torch.zeros(batch_size, dtype=torch.long, device=device)  # the user's, in a row
        self.turn_end = torch.zeros(batch_size, device=device)  # P(user turn ends) after the last step; 0 before
        self.head_signal = has_voice_activity_head and predicts_user  # the signal comes from the model's VAP head
        self.table = self._check_table(turn_taking_table, predicts_user, device)

    def _check_table(self, table: torch.Tensor | None, predicts_user: bool, device: torch.device) -> torch.Tensor | None:
        """Checks the turn settings against `table` and keeps the user's voice activity per delay-0 token."""
        c, cfg = self.config, self.settings
        if table is None:
            if cfg.max_turn_words is not None or cfg.min_silence_frames:
                raise ValueError(f"max_turn_words={cfg.max_turn_words!r}, min_silence_frames={cfg.min_silence_frames!r}"
                                 ": these turn settings need turn_taking_table (TurnTakingStatistics.table(), the "
                                 "user's voice activity)")
            if cfg.turn_hold_threshold is not None and not self.head_signal:
                raise ValueError(f"turn_hold_threshold={cfg.turn_hold_threshold!r} needs a turn-taking signal: "
                                 "turn_taking_table (TurnTakingStatistics.table()) or a model with a voice-activity "
                                 "head (config.voice_activity_horizon)")
            return None
        if (not isinstance(table, torch.Tensor) or not table.is_floating_point() or table.dim() != 2
                or table.shape[0] != c.card or table.shape[1] < 2):
            got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(f"turn_taking_table must be a float tensor [card={c.card}, horizon + 1] "
                             f"(TurnTakingStatistics.table()), got {got}")
        user_delays = c.delays[1 + c.dep_q :]
        if 0 not in user_delays or (predicts_user and user_delays.index(0) >= c.user_dep_q):
            raise ValueError(f"turn_taking_table needs a delay-0 user codebook the user branch predicts; user delays "
                             f"are {user_delays}, user_dep_q={c.user_dep_q}")
        if cfg.turn_hold_threshold is not None and not predicts_user:
            raise ValueError(f"turn_hold_threshold={cfg.turn_hold_threshold!r} needs the user branch (predict_user="
                             f"{cfg.predict_user}, predict_user_audio={c.predict_user_audio})")
        self.delay0_row = user_delays.index(0)  # of the user rows (and of the user branch's codebooks)
        table = table.to(device, torch.float32)
        # P(silent | token) >= 0.5, indexed by token + 1: the zero token (-1) and the initial token (card) are silent
        self.user_silent = torch.ones(c.card + 2, dtype=torch.bool, device=device)
        self.user_silent[1:-1] = table[:, 0] >= 0.5
        return table

    def tensors(self) -> list[torch.Tensor]:
        """The per-slot tensors (`[B]` each): what a session counts, reorders and resets."""
        return [self.forced_token, self.forced_continues, self.forced_overdue, self.turn_words, self.silent_frames,
                self.turn_end]

    # --------------------------------------------------------------------------------------- forced text
    def say(self, text: str | Sequence[Sequence[int]], slots: list[int], tokenizer: WordTokenizer | None,
            max_wait_frames: int | None) -> int:
        """Queue `text` after what `slots` were already told to say (see `MoshiStreamingSession.say`); returns the
        number of tokens queued per slot."""
        if max_wait_frames is not None and (isinstance(max_wait_frames, bool) or not isinstance(max_wait_frames, int)
                                            or max_wait_frames < 0):
            raise ValueError(f"max_wait_frames={max_wait_frames!r}: must be an integer >= 0 or None")
        tokens = [(token, i > 0, max_wait_frames) for word in self._word_ids(text, tokenizer)
                  for i, token in enumerate(word)]
        for slot in slots:
            if not self.forced_words[slot]:
                self.forced_waited[slot] = 0
            self.forced_words[slot].extend(tokens)
        self._refresh_forced()
        return len(tokens)

    def _word_ids(self, text: str | Sequence[Sequence[int]], tokenizer: WordTokenizer | None) -> list[list[int]]:
        if isinstance(text, str):
            tokenizer = tokenizer if tokenizer is not None else self.tokenizer
            if tokenizer is None:
                raise ValueError(f"say({text!r}): a string needs a tokenizer (say(text, tokenizer=...) or "
                                 "model.streaming(..., tokenizer=...)), or pass the words as token ids")
            words = [list(tokenizer.encode(word)) for word in text.split()]
            words = [word for word in words if word]  # a word that tokenizes to nothing is skipped, as in training
        else:
            words = [list(word) if isinstance(word, (list, tuple)) else word for word in text]
        vocab_size = self.config.text_card_out
        for word in words:
            if not isinstance(word, list) or not word or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                    and t not in self.padding_ids for t in word):
                raise ValueError(f"say: word {word!r} must be a non-empty list of text token ids in [0, {vocab_size}) "
                                 f"other than the padding ids {self.padding_id} and {self.end_padding_id}")
        return words

    def _refresh_forced(self) -> None:
        """Copy the head of every slot's forced-word queue into the step's static state."""
        heads = [queue[0] if queue else (-1, False, None) for queue in self.forced_words]
        self.forced_token.copy_(torch.tensor([token for token, _, _ in heads]))
        self.forced_continues.copy_(torch.tensor([continues for _, continues, _ in heads]))
        self.forced_overdue.copy_(torch.tensor([wait is not None and waited >= wait
                                                for (_, _, wait), waited in zip(heads, self.forced_waited)]))

    # --------------------------------------------------------------------------------------- in the step
    @property
    def active(self) -> bool:
        """Whether [`mask`] can forbid anything now: a turn setting is on or some slot has words to say (host state
        only, no sync). A step without CUDA graphs skips the mask otherwise; a graphed step always applies it, since
        words said later must reach the captured graph."""
        return self.settings.holds_turns or any(self.forced_words)

    def mask(self, logits: torch.Tensor, last_text: torch.Tensor, n: int) -> torch.Tensor:
        """Text logits `[B * n, V]` with what the forced words and the turn hold forbid set to -inf (before the
        processors, so that the warpers choose among the allowed tokens), given each slot's last text token
        `last_text` `[B]`. Pure tensor work on static state."""
        vocab, last = self.vocab, last_text[:, None]  # [1, V], [B, 1]
        pad, end_pad = self.is_padding, self.is_end_padding
        held = self.held()[:, None]  # may not start a word
        # Inside a forced word, or after an end-of-padding, the next forced token. Between words: the next forced
        # word's first token or end-of-padding (unless held), and padding (unless the word is overdue and not held).
        forced = self.forced_token[:, None]
        exact = self.forced_continues[:, None] | ((last == self.end_padding_id) & ~held)
        between = (((vocab == forced) | end_pad) & ~held) | (pad & ~(self.forced_overdue[:, None] & ~held))
        allowed = torch.where(forced >= 0, torch.where(exact, vocab == forced, between), True)
        # A held slot writes padding after padding (or an end-of-padding); a word already started finishes.
        after_padding = (last == self.padding_id) | (last == self.end_padding_id)
        allowed &= torch.where(held & after_padding, pad, True)
        return logits.masked_fill(~allowed.repeat_interleave(n, dim=0), float("-inf"))

    def held(self) -> torch.Tensor:
        """`[B]` slots whose text may not start a word now: the one hold of the three turn settings."""
        cfg = self.settings
        held = torch.zeros_like(self.forced_continues)
        if cfg.max_turn_words is not None:
            held |= self.turn_words >= cfg.max_turn_words
        if cfg.min_silence_frames:
            held |= (self.turn_words == 0) & (self.silent_frames < cfg.min_silence_frames)
        if cfg.turn_hold_threshold is not None:
            held |= self.turn_end < cfg.turn_hold_threshold
        return held

    def advance(self, text: torch.Tensor, last_text: torch.Tensor, user_rows: torch.Tensor, run: torch.Tensor) -> None:
        """After a step's text `[B]` is known (`last_text` `[B]`: the token before it): pop the forced tokens said (host
        bookkeeping, one sync, only while some slot has words to say), count the words started since the user last
        spoke and the user's silent frames in a row from the user tokens the step read (`user_rows` `[B, n_q -
        dep_q]`), for the slots that ran (`run` `[B]`). The next step's hold reads them, so a speculative step knows
        them too."""
        if self.table is not None:
            started = _is_word(text, self.padding_ids) & ~_is_word(last_text, self.padding_ids)
            spoke = ~self.user_silent[user_rows[:, self.delay0_row] + 1]
            self.turn_words.copy_(torch.where(run & spoke, 0, self.turn_words + (run & started).long()))
            self.silent_frames.copy_(torch.where(run, torch.where(spoke, 0, self.silent_frames + 1),
                                                 self.silent_frames))
        if any(self.forced_words):
            said, running = torch.stack([text, run.long()]).tolist()
            for slot, queue in enumerate(self.forced_words):
                if not (running[slot] and queue):
                    continue
                if queue[0][0] == said[slot]:
                    queue.popleft()
                    self.forced_waited[slot] = 0
                else:
                    self.forced_waited[slot] += 1
            self._refresh_forced()

    def table_signal(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The table's turn-taking signal of the user branch's logits `[B, user_dep_q, card]` (None without a
        table)."""
        if self.table is None:
            return None
        return turn_taking_signal(logits[:, self.delay0_row], self.table)

    def observe_turn(self, signal: tuple[torch.Tensor, torch.Tensor] | None, run: torch.Tensor
                     ) -> MoshiUserTurnOutput | None:
        """Keeps P(turn end) of `signal` for the slots that ran (`run` `[B]`) and returns it as a step output (NaN for
        the others); None without a signal."""
        if signal is None:
            return None
        silence, turn_end = signal
        self.turn_end.copy_(torch.where(run, turn_end, self.turn_end))
        return MoshiUserTurnOutput(silence=silence.masked_fill(~run[:, None], float("nan")),
                                   turn_end=turn_end.masked_fill(~run, float("nan")))

    # -------------------------------------------------------------------------------------- slot changes
    def reset(self, mask: torch.Tensor) -> None:
        """Forget the queued words and the turn state of the slots where `mask` `[B]` is True."""
        for slot in mask.nonzero().flatten().tolist():
            self.forced_words[slot].clear()
            self.forced_waited[slot] = 0
        self._refresh_forced()
        for turn_state in (self.turn_words, self.silent_frames, self.turn_end):
            turn_state.masked_fill_(mask, 0)

    def reorder(self, index: torch.Tensor) -> None:
        """Slot `b` takes the state of slot `index[b]` (`[B]`, repeats allowed)."""
        for tensor in self.tensors():
            tensor.copy_(tensor[index])
        self.forced_words = [deque(self.forced_words[b]) for b in index.tolist()]
        self.forced_waited = [self.forced_waited[b] for b in index.tolist()]


def _is_word(text: torch.Tensor, padding_ids: tuple[int, int]) -> torch.Tensor:
    """Where text tokens are part of a word (neither padding nor end-of-padding)."""
    return (text != padding_ids[0]) & (text != padding_ids[1])


__all__ = ["MoshiTextConstraints", "MoshiUserTurnOutput", "WordTokenizer", "turn_taking_signal"]
