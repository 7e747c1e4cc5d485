"""`hf-moshi-userpred`: the command line (synthesize, convert, encode, train, evaluate, stream, serve, demo, push).

Each command lives in its own module of this folder (its arguments and a `run` that calls the package); this one
builds the parser and turns a user mistake (bad path, bad value, incompatible files) into one line on stderr and
exit code 2, never a traceback.

    hf-moshi-userpred demo                                   # the whole pipeline on the shipped sample, offline
    hf-moshi-userpred synthesize --out DIR [--hours 1.0] [--seed 0]   # a conversational corpus (espeak-ng)
    hf-moshi-userpred convert KYUTAI_DIR OUT [--user-init copy_system|random] [--to-moshi] [--quantize int8|int4]
    hf-moshi-userpred encode MANIFEST.jsonl OUT --mimi MIMI --tokenizer TOKENIZER --num-codebooks N
    hf-moshi-userpred train CONFIG.yaml | --flag value ...   (also `accelerate launch -m hf_moshi_userpred.training.train`)
    hf-moshi-userpred evaluate MODEL ENCODED [--reference ENCODED_TRAIN] [--out DIR]
    hf-moshi-userpred stream MODEL USER.wav [--out DIR] [--speculate-top-k 4] [--realtime]
    hf-moshi-userpred serve [MODEL] [--host 127.0.0.1] [--port 8998] [--max-conversations 8] [--speculate-top-k 4]
    hf-moshi-userpred push MODEL REPO_ID [--private] [--dataset NAME]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..utils.errors import error_summary
from . import convert, demo, encode, evaluate, push, serve, stream, synthesize, train
from .arguments import Formatter, Parser

PROG = "hf-moshi-userpred"
COMMANDS = (demo, synthesize, convert, encode, train, evaluate, stream, serve, push)  # in the order `--help` lists them


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=Formatter,
                    epilog="Run `hf-moshi-userpred COMMAND --help` for a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the message (tests and callers swap it), through
    `tqdm.write`: a message logged while a progress bar runs gets its own line, and the bar is redrawn below it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_progress_messages(quiet: bool) -> None:
    """The package's progress messages (`[demo] 2/6 training ...`, encoding summaries) on stderr, unless `quiet`;
    results go to stdout."""
    package_logger = logging.getLogger("hf_moshi_userpred")
    if not any(isinstance(handler, _StderrHandler) for handler in package_logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(module)s] %(message)s"))
        package_logger.addHandler(handler)
        package_logger.propagate = False
    package_logger.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _show_progress_messages(getattr(args, "quiet", False))
    if args.command == "train":
        return train.run(args, prog=f"{PROG} train")
    from ..hub.conversion import progress_bars

    try:
        with progress_bars(not getattr(args, "quiet", False)):  # Transformers' loading and saving bars too
            args.run(args)
    except (ValueError, ImportError, OSError) as error:  # user mistakes, missing files and extras
        print(f"{PROG} {args.command}: error: {error_summary(error, max_lines=2)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
