"""`hf-moshi-userpred stream`: a user recording through the model, frame by frame, with speculation."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import DTYPES, add_command, existing_path, load_model


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = add_command(commands, "stream", run, "stream a user recording through the model frame by frame, with speculation",
                      "Read a user recording (mono, any sample rate) a block at a time, encode it with Mimi and run "
                      "the real-time streaming step frame by frame (only the frames streamed are read): writes the "
                      "system's audio (system.wav, and dialogue.wav with both speakers), its text, and a per-frame "
                      "log of the user prediction, its confidence and speculation hits.")
    sub.add_argument("model", help="model directory")
    sub.add_argument("user_audio", help="the user's audio file (mono; any rate, resampled to Mimi's)")
    sub.add_argument("--out", default="outputs/stream", help="output directory")
    sub.add_argument("--mimi", default=None, help="transformers Mimi folder or Hub id (default: MODEL/mimi)")
    sub.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: MODEL/tokenizer.model)")
    sub.add_argument("--channel", type=int, default=None, help="channel to take from a multi-channel file")
    sub.add_argument("--text-prompt", default=None,
                     help="a role for the agent (PersonaPlex's persona prompt: `<system> TEXT <system>`, read before "
                          "the user speaks)")
    sub.add_argument("--voice-prompt", default=None,
                     help="a voice for the agent: a WAV at Mimi's rate (24 kHz), or its codes as .npy [dep_q, frames]")
    sub.add_argument("--speculate-top-k", type=int, default=4, help="candidates precomputed per frame (0: off)")
    sub.add_argument("--realtime", action="store_true", help="deliver frames at 12.5 Hz, like a live microphone")
    sub.add_argument("--greedy", action="store_true", help="greedy text and audio instead of the generation config")
    sub.add_argument("--seed", type=int, default=0, help="sampling seed")
    sub.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    sub.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: as saved)")
    sub.add_argument("--device", default="cpu", help="device for the model and Mimi")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> None:
    from ..data.audio import check_audio_file, load_mimi, load_tokenizer
    from ..data.persona import PersonaLibrary
    from ..serving.stream_recording import stream_user_audio
    from ..utils.files import MIMI_FOLDER, TOKENIZER_NAME

    existing_path(args.model)
    # before the model load: a typo, a folder or a device fails at once
    user_audio = check_audio_file(existing_path(args.user_audio))
    if args.voice_prompt:
        check_audio_file(existing_path(args.voice_prompt))
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    mimi_path = args.mimi or Path(args.model) / MIMI_FOLDER
    if args.mimi is None and not Path(mimi_path).is_dir():
        raise ValueError(f"{args.model} has no mimi/ folder: pass --mimi (a transformers Mimi folder or kyutai/mimi)")
    tokenizer = args.tokenizer
    if tokenizer is None and (Path(args.model) / TOKENIZER_NAME).is_file():
        tokenizer = Path(args.model) / TOKENIZER_NAME
    sampling = {"do_sample": False, "audio_do_sample": False} if args.greedy else {}
    mimi = load_mimi(mimi_path, args.device)
    if args.text_prompt or args.voice_prompt:
        personas = PersonaLibrary(model.config, mimi, load_tokenizer(tokenizer) if tokenizer is not None else None)
        sampling["persona"] = personas.prompt(args.text_prompt, Path(args.voice_prompt) if args.voice_prompt else None)
    result = stream_user_audio(model, user_audio, args.out, mimi=mimi,
                               tokenizer=tokenizer, speculate_top_k=args.speculate_top_k, realtime=args.realtime,
                               seed=args.seed, max_frames=args.max_frames, channel=args.channel,
                               progress=not args.quiet, **sampling)
    print(result.describe())
