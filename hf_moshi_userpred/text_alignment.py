"""The inner-monologue text row: word alignments placed on Mimi's frame grid.

A moshi-finetune dialogue comes with `file.json` = `{"alignments": [[word, [start_s, end_s], speaker], ...]}`.
Moshi is trained to say its words in text a little before (or as) it says them in audio, so row 0 of the codes
holds the system speaker's words, each tokenized on its own and written from the frame in which it starts.

This mirrors `Interleaver.build_token_stream` of kyutai-labs/moshi-finetune (`finetune/data/interleaver.py`), as
its `train.py` builds it (`keep_main_only=True`, no BOS/EOS, no audio delay):
- each word is `tokenizer.encode(word.strip())`, and words are sorted by start time;
- a word starting at `start` seconds is written from frame `floor(start * frame_rate)` (its `start * frame_rate <
  t + 1` test), one token per frame;
- frames without a token hold the text padding id, and the frame just before a word's first token holds the
  end-of-padding id when it would otherwise be padding (never frame -1).
Where it departs, so that no word is lost silently:
- a word whose start frame is still taken by the previous word's tokens is written from the next free frame
  (moshi-finetune's `keep_and_shift=True`; its default drops the rest of the previous word instead);
- a word that cannot be written before `num_frames` raises (moshi-finetune drops it);
- zero-duration words (`start == end`) are kept (moshi-finetune drops them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch


class TextTokenizer(Protocol):
    """What `interleave_text` needs from a tokenizer, e.g. a `sentencepiece.SentencePieceProcessor`."""

    def encode(self, text: str) -> list[int]: ...


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with one alignment entry, or None."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 3:
        return "expected [word, [start, end], speaker]"
    word, times, speaker = entry
    if not isinstance(word, str):
        return f"the word must be a string, got {type(word).__name__}"
    if not isinstance(speaker, str):
        return f"the speaker must be a string, got {type(speaker).__name__}"
    if not isinstance(times, (list, tuple)) or len(times) != 2:
        return "the times must be [start, end] in seconds"
    # bool is an int subclass: `true` in a json file is not a time
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
        return "start and end must be numbers (seconds)"
    start, end = times
    if not (math.isfinite(start) and math.isfinite(end)):
        return "start and end must be finite"
    if start < 0:
        return "start must be non-negative"
    if start > end:
        return "start is after end"
    return None


def validate_alignments(alignments: Any) -> list[tuple[str, tuple[float, float], str]]:
    """Checks the structure of a moshi-finetune alignment list and returns it as tuples.

    Args:
        alignments (`list`): `[[word: str, [start: float, end: float], speaker: str], ...]`, times in seconds.

    Returns:
        `list[tuple[str, tuple[float, float], str]]`: the entries, times as floats.

    Raises:
        ValueError: naming the index and value of the first malformed entry.
    """
    if not isinstance(alignments, (list, tuple)):
        raise ValueError(
            f"alignments must be a list of [word, [start, end], speaker], got {type(alignments).__name__}"
        )
    for index, entry in enumerate(alignments):
        problem = _entry_problem(entry)
        if problem is not None:
            raise ValueError(f"alignment entry {index} {entry!r}: {problem}")
    return [(word, (float(start), float(end)), speaker) for word, (start, end), speaker in alignments]


def interleave_text(
    alignments: Sequence[Sequence[Any]],
    tokenizer: TextTokenizer,
    num_frames: int,
    *,
    frame_rate: float = 12.5,
    main_speaker: str = "SPEAKER_MAIN",
    padding_id: int = 3,
    end_padding_id: int = 0,
) -> torch.LongTensor:
    """Builds the text row of a dialogue from its word alignments (see the module docstring for the rules).

    Args:
        alignments (`list`): `[[word, [start_s, end_s], speaker], ...]`, the `"alignments"` of a moshi-finetune json.
            Only the words of `main_speaker` (the system) are written.
        tokenizer: a `sentencepiece.SentencePieceProcessor` (anything whose `encode(str)` returns token ids).
        num_frames (`int`): length of the row, the number of Mimi frames of the dialogue.
        frame_rate (`float`): Mimi frames per second.
        main_speaker (`str`): speaker label of the system.
        padding_id (`int`): id of frames without a token (moshiko: 3).
        end_padding_id (`int`): id of the padding frame just before a word (moshiko: 0).

    Returns:
        `torch.LongTensor` of shape `[num_frames]`.

    Raises:
        ValueError: on a malformed alignment entry, or a word whose tokens do not fit before `num_frames`.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be non-negative, got {num_frames}")
    words = [entry for entry in validate_alignments(alignments) if entry[2] == main_speaker]
    words.sort(key=lambda entry: entry[1][0])  # stable: simultaneous words keep their order
    text = torch.full((num_frames,), padding_id, dtype=torch.long)
    next_free = 0  # frames before it hold tokens, padding or end-of-padding; frames from it are padding
    for word, (start, _), _ in words:
        tokens = tokenizer.encode(word.strip())
        if not tokens:
            continue
        first = max(math.floor(start * frame_rate), next_free)
        if first + len(tokens) > num_frames:
            raise ValueError(
                f"word {word!r} starting at {start:.3f}s needs frames {first} to {first + len(tokens) - 1} for its "
                f"{len(tokens)} token(s), but the dialogue has {num_frames} frames ({num_frames / frame_rate:.3f}s)"
            )
        if first > next_free:  # the frame before is padding: mark the end of the padding run
            text[first - 1] = end_padding_id
        text[first : first + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        next_free = first + len(tokens)
    return text


__all__ = ["TextTokenizer", "interleave_text", "validate_alignments"]
