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
- shifting only ever moves words later, so the one collision that cannot shift is the end of the dialogue: a word
  whose tokens run past `num_frames` keeps the tokens that fit (truncated), and a word with no frame left is dropped
  (moshi-finetune drops both silently); both are counted in the returned [`InterleavedText`], and the dialogue is
  refused only when more than `max_dropped_fraction` of its words were dropped or truncated;
- zero-duration words (`start == end`) are kept (moshi-finetune drops them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
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


def check_main_speaker(alignments: Sequence[tuple[str, tuple[float, float], str]], main_speaker: str) -> None:
    """Raises a ValueError naming the speakers found when no non-blank word of `alignments` (validated) belongs to
    `main_speaker`: its text row would be all padding (a mistyped label, or alignments labelled otherwise)."""
    if any(speaker == main_speaker and word.strip() for word, _, speaker in alignments):
        return
    speakers = sorted({speaker for _, _, speaker in alignments})
    if main_speaker in speakers:
        raise ValueError(f"every word of the main speaker {main_speaker!r} is blank")
    found = f"its speakers are {', '.join(speakers)}" if speakers else "it has no words at all"
    raise ValueError(f"no words of the main speaker {main_speaker!r} (--main-speaker); {found}")


DEFAULT_MAX_DROPPED_FRACTION = 0.1  # of a dialogue's words that may be dropped or truncated at its end


@dataclass
class InterleavedText:
    """The text row of a dialogue and what did not fit in it.

    Args:
        tokens (`torch.LongTensor` `[num_frames]`): the text row.
        num_words (`int`): words of the main speaker that tokenize to something (those that are placed).
        dropped (`list[str]`): words with no frame left before the end of the dialogue (not written).
        truncated (`list[str]`): words whose last tokens ran past the end (only the first ones are written).
    """

    tokens: torch.LongTensor
    num_words: int = 0
    dropped: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)

    @property
    def damaged_fraction(self) -> float:
        """Fraction of the words dropped or truncated (0 without words)."""
        return (len(self.dropped) + len(self.truncated)) / self.num_words if self.num_words else 0.0


def place_words(
    alignments: Sequence[Sequence[Any]],
    tokenizer: TextTokenizer,
    num_frames: int,
    *,
    frame_rate: float = 12.5,
    main_speaker: str = "SPEAKER_MAIN",
    padding_id: int = 3,
    end_padding_id: int = 0,
) -> InterleavedText:
    """The text row of a dialogue (see the module docstring for the rules) with the words dropped or truncated at
    its end. Arguments as [`interleave_text`]; never refuses a dialogue for words that do not fit.

    Raises:
        ValueError: on a malformed alignment entry or a negative `num_frames`.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be non-negative, got {num_frames}")
    words = [entry for entry in validate_alignments(alignments) if entry[2] == main_speaker]
    words.sort(key=lambda entry: entry[1][0])  # stable: simultaneous words keep their order
    result = InterleavedText(torch.full((num_frames,), padding_id, dtype=torch.long))
    next_free = 0  # frames before it hold tokens, padding or end-of-padding; frames from it are padding
    for word, (start, _), _ in words:
        tokens = tokenizer.encode(word.strip())
        if not tokens:
            continue
        result.num_words += 1
        first = max(math.floor(start * frame_rate), next_free)
        room = num_frames - first
        if room <= 0:
            result.dropped.append(word)
            continue
        if len(tokens) > room:
            result.truncated.append(word)
            tokens = tokens[:room]
        if first > next_free:  # the frame before is padding: mark the end of the padding run
            result.tokens[first - 1] = end_padding_id
        result.tokens[first : first + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        next_free = first + len(tokens)
    return result


def interleave_text(
    alignments: Sequence[Sequence[Any]],
    tokenizer: TextTokenizer,
    num_frames: int,
    *,
    frame_rate: float = 12.5,
    main_speaker: str = "SPEAKER_MAIN",
    padding_id: int = 3,
    end_padding_id: int = 0,
    max_dropped_fraction: float = DEFAULT_MAX_DROPPED_FRACTION,
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
        max_dropped_fraction (`float`): the largest fraction of the words that may be dropped or truncated at the
            end of the dialogue before the text counts as unusable.

    Returns:
        `torch.LongTensor` of shape `[num_frames]`.

    Raises:
        ValueError: on a malformed alignment entry, or more than `max_dropped_fraction` of the words dropped or
            truncated (naming them).
    """
    check_max_dropped_fraction(max_dropped_fraction)
    result = place_words(alignments, tokenizer, num_frames, frame_rate=frame_rate, main_speaker=main_speaker,
                         padding_id=padding_id, end_padding_id=end_padding_id)
    check_usable(result, num_frames, frame_rate, max_dropped_fraction)
    return result.tokens


def check_max_dropped_fraction(value: float) -> None:
    """Raises a ValueError naming `value` unless it is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"max_dropped_fraction={value!r}: must be a fraction of the words, in [0, 1]")


def check_usable(result: InterleavedText, num_frames: int, frame_rate: float, max_dropped_fraction: float) -> None:
    """Raises a ValueError when more than `max_dropped_fraction` of the words of `result` were dropped or truncated."""
    if result.damaged_fraction > max_dropped_fraction:
        lost = [*result.dropped, *result.truncated]
        shown = ", ".join(repr(word) for word in lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        raise ValueError(
            f"{len(result.dropped)} dropped and {len(result.truncated)} truncated of {result.num_words} words "
            f"({shown}) do not fit in the dialogue's {num_frames} frames ({num_frames / frame_rate:.3f}s): more than "
            f"max_dropped_fraction={max_dropped_fraction:g} of its words; the alignment does not match the audio"
        )


__all__ = ["DEFAULT_MAX_DROPPED_FRACTION", "InterleavedText", "TextTokenizer", "check_main_speaker",
           "check_max_dropped_fraction", "check_usable", "interleave_text", "place_words", "validate_alignments"]
