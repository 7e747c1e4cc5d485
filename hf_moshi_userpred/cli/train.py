"""`hf-moshi-userpred train`: fine-tuning with the Trainer; the arguments go to its entry point, whose parser owns
`--help` (the same parser as `accelerate launch -m hf_moshi_userpred.training.train`)."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("train", help="fine-tune with the Trainer from a YAML file or flags (`train --help`)",
                              add_help=False, prefix_chars="\0")
    sub.add_argument("train_args", nargs=argparse.REMAINDER)
    sub.set_defaults(run=run)


def run(args: argparse.Namespace, prog: str) -> int:
    from ..training.train import main as train_main

    return train_main(args.train_args, prog=prog)
