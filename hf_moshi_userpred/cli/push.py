"""`hf-moshi-userpred push`: a model folder to the Hugging Face Hub with its model card."""

from __future__ import annotations

import argparse

from .arguments import add_command


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = add_command(commands, "push", run, "upload a model directory to the Hugging Face Hub with a model card",
                      "Upload the weights (safetensors only), config, generation config, remote code, tokenizer and "
                      "Mimi of a model directory, with a README.md model card rendered from the package's template "
                      "(training hyper-parameters from training_config.json and metrics from "
                      "user_prediction_metrics.json when present). Needs network and a token (HF_TOKEN or --token).")
    sub.add_argument("model", help="model directory")
    sub.add_argument("repo_id", help="Hub repository, e.g. you/moshiko-userpred")
    sub.add_argument("--private", action="store_true", help="create the repository private")
    sub.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    sub.add_argument("--revision", default=None, help="branch to commit to")
    sub.add_argument("--commit-message", default="Upload Moshi user-prediction model", help="commit message")
    sub.add_argument("--base-model", default="kyutai/moshiko-pytorch-bf16", help="card's base_model ('' for none)")
    sub.add_argument("--dataset", action="append", default=[], help="card's datasets (repeatable)")
    sub.add_argument("--license", default="cc-by-4.0", help="card's license")
    sub.add_argument("--tag", action="append", default=[], help="extra card tags (repeatable)")
    sub.add_argument("--training", default=None, help="training record json (default: MODEL/training_config.json)")
    sub.add_argument("--metrics", default=None,
                     help="metrics json from `evaluate` (default: MODEL/user_prediction_metrics.json)")


def run(args: argparse.Namespace) -> None:
    from ..hub.push import push_to_hub
    from ..utils.files import read_json_object

    training = read_json_object(args.training, "training record") if args.training else None
    metrics = read_json_object(args.metrics, "metrics file") if args.metrics else None
    result = push_to_hub(args.model, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, base_model=args.base_model or None,
                         datasets=args.dataset, license=args.license, tags=args.tag, training=training,
                         metrics=metrics)
    print(f"pushed {len(result.files)} files to {result.repo_id}: {', '.join(result.files)}")
    if result.commit_url:
        print(result.commit_url)
