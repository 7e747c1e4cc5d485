"""`hf-moshi-userpred demo`: the whole pipeline on the shipped dialogue sample, offline (the README's main job); with
`--data DIR`, the recipe on any moshi-finetune folder (a `synthesize` corpus or a converted real one)."""

from __future__ import annotations

import argparse

from .arguments import add_command, positive_int


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = add_command(commands, "demo", run,
                      "the whole pipeline on the shipped dialogue sample, offline (the README's run command)",
                      "Encode the shipped dialogue sample with its small Mimi, train a tiny model with the user-loss "
                      "curriculum, evaluate user prediction against the baselines, stream a held-out dialogue with "
                      "speculation, save and reload through trust_remote_code, and write a report with plots. With "
                      "--data DIR: encode DIR's train.jsonl and eval.jsonl, train a model sized to the data with its "
                      "voice-activity head, calibrate on a validation tenth of the training dialogues, evaluate user "
                      "prediction and turn taking on the held-out dialogues, and write the report.")
    sub.add_argument("--out", default=None, help="output directory (default: outputs/demo, or outputs/recipe with "
                                                 "--data)")
    sub.add_argument("--data", default=None,
                     help="a moshi-finetune folder with train.jsonl and eval.jsonl (and mimi/ and tokenizer.model "
                          "unless --mimi and --tokenizer are given) to run the recipe on instead of the sample")
    sub.add_argument("--mimi", default=None, help="--data: the Mimi codec folder (default: DATA/mimi)")
    sub.add_argument("--tokenizer", default=None, help="--data: the sentencepiece model (default: DATA/tokenizer.model)")
    sub.add_argument("--num-codebooks", type=positive_int, default=4, help="--data: Mimi codebooks per speaker")
    sub.add_argument("--steps", type=int, default=None,
                     help="training steps (default: 900 on the sample; with --data, scaled to the data's hours)")
    sub.add_argument("--speculate-top-k", type=int, default=4, help="speculation candidates per frame (sample)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the initialisation, sampling and streaming")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    if args.data is not None:
        from ..demo.corpus_recipe import run_corpus_recipe

        result = run_corpus_recipe(args.data, args.out or "outputs/recipe", mimi=args.mimi, tokenizer=args.tokenizer,
                                   num_codebooks=args.num_codebooks, steps=args.steps, seed=args.seed,
                                   progress=not args.quiet)
        print("\n" + result.describe())
        return
    from ..demo.pipeline import run_demo

    result = run_demo(args.out or "outputs/demo", steps=900 if args.steps is None else args.steps, speculate_top_k=args.speculate_top_k,
                      seed=args.seed, progress=not args.quiet)
    print("\n" + result.describe())
