"""`hf-moshi-userpred synthesize`: a synthetic conversational corpus (moshi-finetune format) where silence cannot decide
the turn, with its tokenizer, a small fitted Mimi and its statistics. Every setting of the conversations and of the
corpus is a flag, named after its field in `ConversationSettings` and `CorpusOptions`."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from .arguments import add_command

HELP = {
    "hours": "hours of dialogue in all (both splits)",
    "eval_hours": "hours held out (eval.jsonl); default: a fifth of --hours",
    "dialogue_seconds": "length range of one dialogue",
    "vocab_size": "sentencepiece vocabulary size",
    "codebook_size": "entries per Mimi codebook",
    "codec_minutes": "minutes of training audio (both channels) the Mimi encoder, codebooks and decoder are fitted on",
    "encoder_steps": "Adam steps of the Mimi encoder fit (0: a random encoder, whose codes barely carry the cues)",
    "decoder_steps": "Adam steps of the Mimi decoder fit",
    "mimi": "a fitted Mimi folder to reuse as it is (e.g. another corpus' mimi/) instead of fitting one",
    "gap_median_s": "median gap before the next turn (log-normal; Stivers et al. 2009)",
    "gap_sigma": "log-normal shape of the gaps",
    "overlap_share": "share of turn changes that overlap the previous turn (Heldner & Edlund 2010)",
    "overlap_s": "overlap range",
    "hold_median_s": "median pause inside a turn (log-normal; longer than gaps, Heldner & Edlund 2010)",
    "hold_s": "pause range inside a turn",
    "user_mean_holds": "pauses per user turn (geometric mean)",
    "system_mean_holds": "pauses per system turn (geometric mean)",
    "finished_hold_share": "share of pauses inside a turn that follow a finished sentence (no lexical cue)",
    "question_share": "share of turns ending with a question",
    "tag_share": "share of turns ending with a tag question (right?, you know?)",
    "backchannels_per_minute": "listener backchannels per minute of the speaker's speech",
    "user_barge_in_share": "share of system turns the user barges into",
    "system_barge_in_share": "share of user turns the system barges into",
    "yield_after_s": "how long an interrupted speaker goes on before yielding",
    "barge_in_hold_on_share": "share of user barge-ins the system talks through",
    "speaking_rate_wpm": "espeak-ng speaking rate range (words per minute), drawn per dialogue and speaker",
    "pitch": "espeak-ng base pitch range (0-100), drawn per dialogue and speaker",
    "system_voices": "espeak-ng voices of the system side, one drawn per dialogue",
    "user_voices": "espeak-ng voices of the user side, one drawn per dialogue",
}


def _add_fields(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        kwargs: dict = {"default": field.default, "help": HELP.get(field.name, field.name.replace("_", " "))}
        arguments = typing.get_args(hint)
        if typing.get_origin(hint) is tuple:
            kwargs.update(type=arguments[0], nargs="+" if arguments[-1] is Ellipsis else len(arguments))
        elif type(None) in arguments:  # `float | None`
            kwargs.update(type=next(a for a in arguments if a is not type(None)))
        else:
            kwargs.update(type=hint)
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, **kwargs)


def add_parser(commands: argparse._SubParsersAction) -> None:
    from ..corpus.conversation import ConversationSettings
    from ..corpus.corpus_options import CorpusOptions

    sub = add_command(commands, "synthesize", run,
                      "a synthetic conversational corpus where silence cannot decide the turn (needs espeak-ng)",
                      "Synthesise two-voice English conversations with espeak-ng: turns decided by words and melody "
                      "(unfinished clauses before pauses, finished sentences, questions and tags before turn changes), "
                      "pauses inside turns longer on average than the gaps between them, overlaps, backchannels and "
                      "barge-ins. Writes moshi-finetune audio and alignments, train.jsonl/eval.jsonl, a tokenizer, a "
                      "small fitted Mimi, statistics.json and statistics.png into a new folder.")
    sub.add_argument("--out", required=True, help="the new corpus folder")
    sub.add_argument("--seed", type=int, default=0, help="random seed (the corpus is deterministic for it)")
    sub.add_argument("--quiet", action="store_true", help="no progress messages")
    _add_fields(sub, CorpusOptions, "corpus")
    _add_fields(sub, ConversationSettings, "conversations")


def run(args: argparse.Namespace) -> None:
    from ..corpus.conversation import ConversationSettings
    from ..corpus.corpus_options import CorpusOptions
    from ..corpus.synthesize import synthesize_corpus

    def build(cls: type):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    summary = synthesize_corpus(args.out, build(CorpusOptions), build(ConversationSettings), seed=args.seed)
    print(summary)
