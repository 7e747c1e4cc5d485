"""`hf-moshi-userpred demo`: the whole pipeline on the shipped dialogue sample, offline (the README's main job)."""

from __future__ import annotations

import argparse

from .arguments import add_command


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = add_command(commands, "demo", run,
                      "the whole pipeline on the shipped dialogue sample, offline (the README's run command)",
                      "Encode the shipped dialogue sample with its small Mimi, train a tiny model with the user-loss "
                      "curriculum, evaluate user prediction against the baselines, stream a held-out dialogue with "
                      "speculation, save and reload through trust_remote_code, and write a report with plots.")
    sub.add_argument("--out", default="outputs/demo", help="output directory (encoded data, model, report)")
    sub.add_argument("--steps", type=int, default=900, help="training steps")
    sub.add_argument("--speculate-top-k", type=int, default=4, help="speculation candidates per frame")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    from ..demo.pipeline import run_demo

    result = run_demo(args.out, steps=args.steps, speculate_top_k=args.speculate_top_k, progress=not args.quiet)
    print("\n" + result.describe())
