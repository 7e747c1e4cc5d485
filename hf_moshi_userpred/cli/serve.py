"""`hf-moshi-userpred serve`: live conversations over kyutai's protocol and the web page."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .arguments import DTYPES, add_command, check_device, existing_path, torch_dtype

DEMO_MODEL = Path("outputs/demo/model")  # where `demo` (the README's main job) saves its model


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = add_command(commands, "serve", run, "talk to the model live: a real-time server speaking moshi's WebSocket protocol",
                      "Serve live full-duplex conversations over kyutai's moshi protocol at ws://HOST:PORT/api/chat "
                      "(kyutai's clients connect unchanged) and the web page at http://HOST:PORT/, several at once in "
                      "one batched streaming session ticking every 80 ms. Without MODEL it serves the demo's model "
                      f"({DEMO_MODEL}), training it once with the demo if it is not there. Ctrl-C stops it cleanly.")
    sub.add_argument("model", nargs="?", default=None, help=f"model directory (default: {DEMO_MODEL})")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sub.add_argument("--port", type=int, default=8998, help="port to listen on")
    sub.add_argument("--max-conversations", "--max-sessions", type=int, default=8,
                     help="conversations served at once (slots); --max-sessions is the former name")
    sub.add_argument("--speculate-top-k", type=int, default=4, help="candidates precomputed per frame (0: off)")
    sub.add_argument("--gap-fill-threshold", type=float, default=None,
                     help="fill a late user frame with the predicted tokens of at least this probability "
                          "(off: a late slot pauses)")
    sub.add_argument("--idle-timeout", type=float, default=10.0, help="close a client silent for this many seconds")
    sub.add_argument("--max-message-bytes", type=int, default=1 << 20,
                     help="close a client that sends a larger message (an 80 ms Opus page is a few hundred bytes)")
    sub.add_argument("--greedy", action="store_true", help="greedy text and audio instead of the generation config")
    sub.add_argument("--no-predict-user", action="store_true",
                     help="switch the user branch off: moshi's tokens and cost, no speculation, no prediction extras")
    sub.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    sub.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the engine")
    sub.add_argument("--in-process", action="store_true",
                     help="run the engine in the server's process (default: a process of its own, so that the "
                          "WebSocket and Opus work and the model steps run on different cores)")
    sub.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: as saved)")
    sub.add_argument("--device", default="cpu", help="device for the model and Mimi")
    sub.add_argument("--quiet", action="store_true", help="no progress bars or connection log")


def run(args: argparse.Namespace) -> None:
    import functools

    import torch

    from ..serving.engine import RealtimeEngine
    from ..serving.engine_process import EngineProcess
    from ..serving.server import MoshiServer, run_server

    if args.max_conversations < 1:
        raise ValueError(f"--max-conversations must be at least 1, got {args.max_conversations}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.max_message_bytes < 1024:
        raise ValueError(f"--max-message-bytes must be at least 1024, got {args.max_message_bytes}")
    check_device(args.device)
    model_dir = args.model
    if model_dir is None:
        model_dir = DEMO_MODEL
        if not (DEMO_MODEL / "config.json").is_file():
            from ..demo.pipeline import run_demo

            logging.getLogger(__name__).info("no model given and no demo model in %s: training it once (the demo)",
                                             DEMO_MODEL)
            run_demo(DEMO_MODEL.parent, progress=not args.quiet)
    existing_path(str(model_dir))
    torch.set_num_threads(args.threads)
    sampling = {"do_sample": False, "audio_do_sample": False} if args.greedy else {}
    if args.no_predict_user:
        sampling["predict_user"] = False  # also turns speculation off
    build = functools.partial(RealtimeEngine.from_pretrained, str(model_dir), dtype=torch_dtype(args.dtype),
                              device=args.device, max_conversations=args.max_conversations,
                              speculate_top_k=args.speculate_top_k, gap_fill_threshold=args.gap_fill_threshold,
                              seed=args.seed, threads=args.threads, **sampling)
    engine = build() if args.in_process else EngineProcess(build)
    server = MoshiServer(engine, idle_timeout_s=args.idle_timeout, max_message_bytes=args.max_message_bytes)
    run_server(server, host=args.host, port=args.port)
