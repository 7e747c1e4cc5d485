"""`hf-moshi-userpred encode`: a moshi-finetune manifest to encoded codes."""

from __future__ import annotations

import argparse

from .arguments import add_command, check_device


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = add_command(commands, "encode", run, "a moshi-finetune dataset (stereo audio + alignments) -> encoded codes",
                      "Encode a moshi-finetune .jsonl manifest (stereo audio, system left, user right, with word "
                      "alignments) into Mimi codes and interleaved text, one shard per dialogue; resumable.")
    sub.add_argument("manifest", help="the .jsonl manifest ({'path': ..., 'duration': ...} per line)")
    sub.add_argument("output", help="directory for codes/*.safetensors and index.json")
    sub.add_argument("--mimi", required=True, help="transformers Mimi folder or Hub id (e.g. kyutai/mimi)")
    sub.add_argument("--tokenizer", required=True, help="sentencepiece .model of the text stream")
    sub.add_argument("--num-codebooks", type=int, required=True, help="Mimi codebooks per speaker (moshiko: 8)")
    sub.add_argument("--main-speaker", default="SPEAKER_MAIN", help="alignment speaker label of the system")
    sub.add_argument("--max-dropped-fraction", type=float, default=0.1,
                     help="fail a file when more than this fraction of its words do not fit before the end of its "
                          "audio (fewer are dropped or truncated, and counted in index.json)")
    sub.add_argument("--device", default="cpu", help="device for Mimi")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    from ..data.encoding import encode_dataset

    check_device(args.device)
    summary = encode_dataset(args.manifest, args.output, mimi=args.mimi, tokenizer=args.tokenizer,
                             num_codebooks=args.num_codebooks, main_speaker=args.main_speaker, device=args.device,
                             progress=not args.quiet, max_dropped_fraction=args.max_dropped_fraction)
    print(summary)
