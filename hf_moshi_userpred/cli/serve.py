"""`hf-moshi-userpred serve`: live conversations over kyutai's protocol and the web page."""

from __future__ import annotations

import argparse
import logging
import math
import socket
from pathlib import Path

from .arguments import DTYPES, add_command, check_device, probability, torch_dtype

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
    sub.add_argument("--gap-fill-threshold", type=probability, default=None,
                     help="fill a late user frame with the predicted tokens of at least this probability "
                          "(off: a late slot pauses)")
    sub.add_argument("--idle-timeout", type=float, default=10.0,
                     help="close a client that sent no audio for this many seconds")
    sub.add_argument("--send-timeout", type=float, default=10.0,
                     help="close a client that stopped reading: its socket took none of the output for this many "
                          "seconds")
    sub.add_argument("--max-message-bytes", type=int, default=1 << 20,
                     help="close a client that sends a larger message (an 80 ms Opus page is a few hundred bytes)")
    sub.add_argument("--voice-prompt-dir", default=None,
                     help="a folder of voices for persona prompts (NAME.wav at Mimi's 24 kHz, or NAME.npy codes); a "
                          "connection picks one with ?voice_prompt=NAME, the page with its voice picker")
    sub.add_argument("--text-prompt", default=None,
                     help="the default role of a conversation that gives none (?text_prompt=...): PersonaPlex's "
                          "`<system> TEXT <system>` persona prompt")
    sub.add_argument("--voice-prompt", default=None,
                     help="the default voice: a name in --voice-prompt-dir, or a voice file")
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


def check_options(args: argparse.Namespace) -> None:
    """Refuses the numbers that would only fail once the model is loaded (seconds to minutes later), or never fail
    and serve nothing."""
    for flag, seconds in (("--idle-timeout", args.idle_timeout), ("--send-timeout", args.send_timeout)):
        if not 0 < seconds < math.inf:
            raise ValueError(f"{flag} must be a positive number of seconds, got {seconds}")
    for flag, value, low in (("--max-conversations", args.max_conversations, 1), ("--threads", args.threads, 1),
                             ("--max-message-bytes", args.max_message_bytes, 1024),
                             ("--speculate-top-k", args.speculate_top_k, 0)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low}, got {value}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be in [0, 2**64), got {args.seed}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")


def check_address(host: str, port: int) -> None:
    """Binds `(host, port)` once and lets it go, as the server will bind it (SO_REUSEADDR: a port in TIME_WAIT
    passes, one in use does not), so that a taken port or a foreign address fails before the model loads."""
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def run(args: argparse.Namespace) -> None:
    import functools

    import torch

    from ..serving.engine import RealtimeEngine, check_serving_folder

    check_options(args)
    check_device(args.device)
    model_dir = DEMO_MODEL if args.model is None else check_serving_folder(args.model)
    if args.voice_prompt_dir is not None and not Path(args.voice_prompt_dir).is_dir():
        raise ValueError(f"--voice-prompt-dir {args.voice_prompt_dir!r} does not exist or is not a folder")
    check_address(args.host, args.port)
    from ..serving.engine_process import EngineProcess
    from ..serving.server import MoshiServer, run_server

    if args.model is None and not (DEMO_MODEL / "config.json").is_file():
        from ..demo.pipeline import run_demo

        logging.getLogger(__name__).info("no model given and no demo model in %s: training it once (the demo)",
                                         DEMO_MODEL)
        run_demo(DEMO_MODEL.parent, progress=not args.quiet)
    torch.set_num_threads(args.threads)
    sampling = {"do_sample": False, "audio_do_sample": False} if args.greedy else {}
    if args.no_predict_user:
        sampling["predict_user"] = False  # also turns speculation off
    build = functools.partial(RealtimeEngine.from_pretrained, str(model_dir), dtype=torch_dtype(args.dtype),
                              device=args.device, max_conversations=args.max_conversations,
                              speculate_top_k=args.speculate_top_k, gap_fill_threshold=args.gap_fill_threshold,
                              seed=args.seed, threads=args.threads, voice_prompt_dir=args.voice_prompt_dir,
                              text_prompt=args.text_prompt, voice_prompt=args.voice_prompt, **sampling)
    engine = build() if args.in_process else EngineProcess(build)
    try:
        run_server(MoshiServer(engine, idle_timeout_s=args.idle_timeout, send_timeout_s=args.send_timeout,
                               max_message_bytes=args.max_message_bytes), host=args.host, port=args.port)
    finally:  # also when the server never started (its shutdown stops the engine otherwise): no orphaned process
        engine.stop()
