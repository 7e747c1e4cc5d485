"""`hf-moshi-userpred`: the command line (convert, encode, train, evaluate, stream, serve, demo, push).

Every command parses its arguments here and calls the package's function for it; a user mistake (bad path, bad
value, incompatible files) is one line on stderr and exit code 2, never a traceback.

    hf-moshi-userpred demo                                   # the whole pipeline on the shipped sample, offline
    hf-moshi-userpred convert KYUTAI_DIR OUT [--user-init copy_system|random] [--to-moshi] [--quantize int8|int4]
    hf-moshi-userpred encode MANIFEST.jsonl OUT --mimi MIMI --tokenizer TOKENIZER --num-codebooks N
    hf-moshi-userpred train CONFIG.yaml | --flag value ...   (also under `accelerate launch -m hf_moshi_userpred`)
    hf-moshi-userpred evaluate MODEL ENCODED [--reference ENCODED_TRAIN] [--out DIR]
    hf-moshi-userpred stream MODEL USER.wav [--out DIR] [--speculate-top-k 4] [--realtime]
    hf-moshi-userpred serve [MODEL] [--host 127.0.0.1] [--port 8998] [--max-sessions 8] [--speculate-top-k 4]
    hf-moshi-userpred push MODEL REPO_ID [--private] [--dataset NAME]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

PROG = "hf-moshi-userpred"
DTYPES = ("float32", "bfloat16", "float16")


class _Parser(argparse.ArgumentParser):
    """argparse with its mistakes (unknown flag, missing argument) on one stderr line, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to the help, except where the help already says its default (`(default: all)`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        return help if "default:" in help or "%(default)" in help else super()._get_help_string(action)


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _existing_path(value: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise ValueError(f"{value!r} does not exist")
    return path


def _check_device(name: str) -> str:
    """`name` if torch can put tensors there, else a ValueError saying why (misspelled, no CUDA build, no GPU)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from error
    if device.type == "cuda":
        if torch.version.cuda is None or not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name!r}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name!r}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu" and not getattr(getattr(torch, device.type, None), "is_available", lambda: False)():
        raise ValueError(f"--device {name!r}: {device.type} is not available here; use --device cpu")
    return name


def _load_model(path: str, dtype: str | None = None, device: str = "cpu"):
    """The model directory at `path` (refused unless it is a complete model of this package), on `device`."""
    import torch

    from ..utils.cpu_threads import set_torch_threads
    from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration

    _check_device(device)
    folder = _existing_path(path)
    model = MoshiUserPredForConditionalGeneration.from_pretrained(folder, dtype=_dtype(dtype))
    if torch.device(device).type == "cpu":  # logged at debug: the long jobs (demo, train) say it at info
        set_torch_threads(model.num_parameters(), logging.DEBUG)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------- commands
def _convert(args: argparse.Namespace) -> None:
    from ..hub.conversion import convert_kyutai_checkpoint, export_to_moshi, quantize_model_directory
    from ..models.modeling_moshi_userpred import describe_model_folder

    _check_device(args.device)
    if args.to_moshi and args.quantize:
        raise ValueError(f"--quantize {args.quantize} with --to-moshi: kyutai's layout has no quantized weights; "
                         "quantize a model directory of this package instead")
    if args.to_moshi:
        result = export_to_moshi(args.source, args.output, dtype=_dtype(args.dtype), overwrite=args.overwrite,
                                 progress=not args.quiet)
    elif args.quantize and Path(args.source).is_dir() and describe_model_folder(args.source) is None:
        result = quantize_model_directory(args.source, args.output, args.quantize, device=args.device,
                                          overwrite=args.overwrite, progress=not args.quiet)
    else:
        overrides = {} if args.user_dep_q is None else {"user_dep_q": args.user_dep_q}
        result = convert_kyutai_checkpoint(args.source, args.output, user_init=args.user_init, config_path=args.config,
                                           dtype=_dtype(args.dtype), overwrite=args.overwrite,
                                           progress=not args.quiet, quantize=args.quantize, device=args.device,
                                           **overrides)
    for note in result.notes:
        print(note)
    print(f"wrote {result.output_dir}: {result.num_tensors} tensors, {result.num_parameters / 1e6:.1f} M parameters "
          f"({', '.join(result.files)})")


def _encode(args: argparse.Namespace) -> None:
    from ..data.encoding import encode_dataset

    _check_device(args.device)
    summary = encode_dataset(args.manifest, args.output, mimi=args.mimi, tokenizer=args.tokenizer,
                             num_codebooks=args.num_codebooks, main_speaker=args.main_speaker, device=args.device,
                             progress=not args.quiet, max_dropped_fraction=args.max_dropped_fraction)
    print(summary)
    if not summary.encoded and not summary.skipped:
        raise ValueError(f"no dialogue of {args.manifest} could be encoded "
                         f"(reasons in {summary.output_dir}/index.json)")


def _evaluate(args: argparse.Namespace) -> None:
    from ..data.encoding import EncodedDialogues
    from ..evaluation.user_prediction import evaluate_user_prediction
    from ..utils.files import METRICS_NAME, write_json

    dataset = EncodedDialogues(args.data)
    reference = EncodedDialogues(args.reference) if args.reference else None
    model = _load_model(args.model, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calibration = _calibrate(args, model, dataset) if args.calibrate else None
    report = evaluate_user_prediction(model, dataset, batch_size=args.batch_size, window=args.window,
                                      top_k=args.top_k, reference=reference,
                                      plot_dir=None if args.no_plots else out / "plots")
    record = {"metrics": report.to_dict(), "markdown": report.to_markdown(), "dataset": str(args.data)}
    if calibration is not None:
        record["calibration"] = calibration.to_dict()
        print(calibration.to_markdown() + "\n")
    write_json(out / METRICS_NAME, record)
    print(report.to_markdown())
    print(f"\nwrote {out / METRICS_NAME}" + "".join(f", {path}" for path in report.plots.values()))
    if args.turn_taking:
        _evaluate_turn_taking(args, model, dataset, out)


def _calibrate(args: argparse.Namespace, model, dataset):
    """`evaluate --calibrate`: fit the user branch's temperatures on DATA, apply them to `model` and write them into
    MODEL/config.json (that one key; the file is replaced atomically)."""
    from ..evaluation.user_prediction import calibrate_user_prediction
    from ..utils.files import read_json_object, write_json

    calibration = calibrate_user_prediction(model, dataset, batch_size=args.batch_size, window=args.window)
    model.config.user_logit_temperature = calibration.temperature
    config_path = Path(args.model) / "config.json"
    config = read_json_object(config_path, "model config")
    config["user_logit_temperature"] = calibration.temperature
    write_json(config_path, config)
    logging.getLogger(__name__).info(f"wrote user_logit_temperature={[round(t, 3) for t in calibration.temperature]} into {config_path}")
    return calibration


def _evaluate_turn_taking(args: argparse.Namespace, model, dataset, out: Path) -> None:
    """`evaluate --turn-taking`: the turn-taking signal's statistics from MODEL/turn_taking_statistics.json, else
    fitted on --reference; shift/hold, anticipation and backchannel metrics on DATA's alignments; the system's
    dialogue behaviour streaming DATA without and with the turn hold at --threshold; turn_taking_report.md."""
    from ..evaluation.dialogue_behaviour import evaluate_dialogue_behaviour
    from ..data.encoding import EncodedDialogues
    from ..utils.files import atomic_write, write_json
    from ..evaluation.turn_taking import (STATISTICS_NAME, TurnTakingStatistics, dialogue_alignments, evaluate_turn_taking,
                              fit_turn_taking_statistics)

    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be a probability in [0, 1], got {args.threshold}")
    saved = Path(args.model) / STATISTICS_NAME
    if saved.is_file() and args.horizon is None:
        statistics = TurnTakingStatistics.load(saved)
    elif args.reference:
        statistics = fit_turn_taking_statistics(EncodedDialogues(args.reference), dialogue_alignments(args.reference),
                                                model.config, **({} if args.horizon is None else {
                                                    "horizon": args.horizon,
                                                    "turn_end_frames": max(args.horizon // 2, 1)}))
    else:
        raise ValueError(f"--turn-taking needs --reference (encoded training dialogues with alignments) to fit the "
                         f"signal's statistics, or {saved}")
    alignments = dialogue_alignments(args.data)
    plot_dir = None if args.no_plots else out / "plots"
    report = evaluate_turn_taking(model, dataset, alignments, statistics, threshold=args.threshold,
                                  window=args.window, plot_dir=plot_dir)
    behaviour = evaluate_dialogue_behaviour(model, dataset, alignments, statistics,
                                            hold_thresholds=(None, args.threshold), seed=args.seed, plot_dir=plot_dir)
    path = out / "turn_taking_metrics.json"
    write_json(path, {"metrics": {**report.to_dict(), **behaviour.to_dict()}, "markdown": report.to_markdown(),
                      "dialogue_behaviour_markdown": behaviour.to_markdown(), "dataset": str(args.data)})
    plots = {**report.plots, **behaviour.plots}
    images = "\n".join(f"![{name}](plots/{Path(plot).name})" for name, plot in plots.items())
    markdown = (f"# Turn taking on {args.data}\n\n## The signal: shift vs hold, backchannel vs barge-in\n\n"
                f"{report.to_markdown()}\n\n## The system's dialogue behaviour, without and with the turn hold\n\n"
                f"{behaviour.to_markdown()}\n\n{images}\n")
    atomic_write(out / "turn_taking_report.md", lambda target: target.write_text(markdown, encoding="utf-8"))
    print("\n" + report.to_markdown() + "\n\n" + behaviour.to_markdown())
    print(f"\nwrote {path}, {out / 'turn_taking_report.md'}" + "".join(f", {plot}" for plot in plots.values()))


def _stream(args: argparse.Namespace) -> None:
    from ..data.audio import load_mimi
    from ..utils.files import MIMI_FOLDER, TOKENIZER_NAME
    from ..serving.stream_recording import stream_user_audio

    _existing_path(args.model)
    user_audio = _existing_path(args.user_audio)  # before the model load: a typo fails at once
    model = _load_model(args.model, dtype=args.dtype, device=args.device)
    mimi_path = args.mimi or Path(args.model) / MIMI_FOLDER
    if args.mimi is None and not Path(mimi_path).is_dir():
        raise ValueError(f"{args.model} has no mimi/ folder: pass --mimi (a transformers Mimi folder or kyutai/mimi)")
    tokenizer = args.tokenizer
    if tokenizer is None and (Path(args.model) / TOKENIZER_NAME).is_file():
        tokenizer = Path(args.model) / TOKENIZER_NAME
    sampling = {"do_sample": False, "audio_do_sample": False} if args.greedy else {}
    result = stream_user_audio(model, user_audio, args.out, mimi=load_mimi(mimi_path, args.device),
                               tokenizer=tokenizer, speculate_top_k=args.speculate_top_k, realtime=args.realtime,
                               seed=args.seed, max_frames=args.max_frames, channel=args.channel,
                               progress=not args.quiet, **sampling)
    print(result.describe())


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    result = run_demo(args.out, steps=args.steps, speculate_top_k=args.speculate_top_k, progress=not args.quiet)
    print("\n" + result.describe())


DEMO_MODEL = Path("outputs/demo/model")  # where `demo` (the README's main job) saves its model


def _serve(args: argparse.Namespace) -> None:
    import functools

    import torch

    from ..serving.engine_process import EngineProcess
    from ..serving.engine import RealtimeEngine
    from ..serving.server import MoshiServer, run_server

    if args.max_sessions < 1:
        raise ValueError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.max_message_bytes < 1024:
        raise ValueError(f"--max-message-bytes must be at least 1024, got {args.max_message_bytes}")
    _check_device(args.device)
    model_dir = args.model
    if model_dir is None:
        model_dir = DEMO_MODEL
        if not (DEMO_MODEL / "config.json").is_file():
            from .demo import run_demo

            logging.getLogger(__name__).info("no model given and no demo model in %s: training it once (the demo)",
                                             DEMO_MODEL)
            run_demo(DEMO_MODEL.parent, progress=not args.quiet)
    _existing_path(str(model_dir))
    torch.set_num_threads(args.threads)
    sampling = {"do_sample": False, "audio_do_sample": False} if args.greedy else {}
    if args.no_predict_user:
        sampling["predict_user"] = False  # also turns speculation off
    build = functools.partial(RealtimeEngine.from_pretrained, str(model_dir), dtype=_dtype(args.dtype),
                              device=args.device, max_sessions=args.max_sessions,
                              speculate_top_k=args.speculate_top_k, gap_fill_threshold=args.gap_fill_threshold,
                              seed=args.seed, threads=args.threads, **sampling)
    engine = build() if args.in_process else EngineProcess(build)
    server = MoshiServer(engine, idle_timeout_s=args.idle_timeout, max_message_bytes=args.max_message_bytes)
    run_server(server, host=args.host, port=args.port)


def _push(args: argparse.Namespace) -> None:
    from ..utils.files import read_json_object
    from ..hub.push import push_to_hub

    training = read_json_object(args.training, "training record") if args.training else None
    metrics = read_json_object(args.metrics, "metrics file") if args.metrics else None
    result = push_to_hub(args.model, args.repo_id, token=args.token, private=args.private, revision=args.revision,
                         commit_message=args.commit_message, base_model=args.base_model or None,
                         datasets=args.dataset, license=args.license, tags=args.tag, training=training,
                         metrics=metrics)
    print(f"pushed {len(result.files)} files to {result.repo_id}: {', '.join(result.files)}")
    if result.commit_url:
        print(result.commit_url)


# ------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=_Formatter,
                     epilog="Run `hf-moshi-userpred COMMAND --help` for a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str, run: Callable, help: str, description: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)
        sub.set_defaults(run=run)
        return sub

    sub = command("demo", _demo,
                  "the whole pipeline on the shipped dialogue sample, offline (the README's run command)",
                  "Encode the shipped dialogue sample with its small Mimi, train a tiny model with the user-loss "
                  "curriculum, evaluate user prediction against the baselines, stream a held-out dialogue with "
                  "speculation, save and reload through trust_remote_code, and write a report with plots.")
    sub.add_argument("--out", default="outputs/demo", help="output directory (encoded data, model, report)")
    sub.add_argument("--steps", type=int, default=900, help="training steps")
    sub.add_argument("--speculate-top-k", type=int, default=4, help="speculation candidates per frame")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")

    sub = command("convert", _convert, "a kyutai Moshi checkpoint directory -> a model directory of this package",
                  "Convert a kyutai Moshi checkpoint (a local directory with moshi's model.safetensors, an optional "
                  "config.json, the tokenizer and Mimi files) into a Hugging Face model directory with the user "
                  "branch initialised; with --to-moshi, export a model directory back to kyutai's layout.")
    sub.add_argument("source", help="kyutai checkpoint directory (or, with --to-moshi, a model directory)")
    sub.add_argument("output", help="directory to write (must not exist or be empty, unless --overwrite)")
    sub.add_argument("--user-init", choices=("copy_system", "random"), default="copy_system",
                     help="initialise the user Depformer from the system one, or randomly")
    sub.add_argument("--user-dep-q", type=int, default=None, help="user codebooks to predict (default: all)")
    sub.add_argument("--config", default=None, help="kyutai config json (default: SOURCE/config.json, else moshiko)")
    sub.add_argument("--dtype", choices=DTYPES, default=None, help="parameter dtype (default: the checkpoint's)")
    sub.add_argument("--to-moshi", action="store_true", help="export SOURCE (a model directory) to kyutai's layout")
    sub.add_argument("--quantize", choices=("int8", "int4"), default=None,
                     help="write torchao weight-only quantized weights (needs the `quant` extra); SOURCE may also be "
                          "a model directory of this package (default: not quantized)")
    sub.add_argument("--device", default="cpu",
                     help="device that quantizes (int4 is packed two weights per byte only on cuda)")
    sub.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")

    sub = command("encode", _encode, "a moshi-finetune dataset (stereo audio + alignments) -> encoded codes",
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

    # `train` hands its arguments to the Trainer entry point, whose parser owns --help.
    sub = commands.add_parser("train", help="fine-tune with the Trainer from a YAML file or flags (`train --help`)",
                              add_help=False, prefix_chars="\0")
    sub.add_argument("train_args", nargs=argparse.REMAINDER)
    sub.set_defaults(run=None)

    sub = command("evaluate", _evaluate, "user-prediction metrics and plots for a model on encoded dialogues",
                  "Accuracy (delay-0 forecast and delayed codebooks), top-k, per codebook, calibration, against "
                  "repeat-last-frame and unigram baselines; writes user_prediction_metrics.json and plots.")
    sub.add_argument("model", help="model directory")
    sub.add_argument("data", help="encoded dialogues (an `encode` output directory)")
    sub.add_argument("--reference", default=None, help="encoded training dialogues for the unigram baseline")
    sub.add_argument("--out", default="outputs/evaluate", help="where the metrics and plots go")
    sub.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    sub.add_argument("--window", type=int, default=None, help="frames per window (default: the model's context)")
    sub.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracies")
    sub.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    sub.add_argument("--device", default="cpu", help="device for the model")
    sub.add_argument("--turn-taking", action="store_true",
                     help="also evaluate the turn-taking signal (shift/hold, anticipation, backchannels) on DATA's "
                          "word alignments against silence timers, and the system's dialogue behaviour (takeovers, "
                          "response and stop latency) streaming DATA without and with the turn hold; writes "
                          "turn_taking_metrics.json and turn_taking_report.md")
    sub.add_argument("--calibrate", action="store_true",
                     help="fit the user branch's temperature scaling on DATA (held-out dialogues) and write it into "
                          "MODEL/config.json; the metrics are then the calibrated model's")
    sub.add_argument("--threshold", type=float, default=0.5,
                     help="turn-taking: P(turn end) threshold, also the turn hold of the dialogue-behaviour run")
    sub.add_argument("--seed", type=int, default=0, help="turn-taking: sampling seed of the dialogue-behaviour runs")
    sub.add_argument("--horizon", type=int, default=None,
                     help="turn-taking: frames the signal looks ahead, its second half the turn-end window "
                          "(default: the saved statistics', else 10)")

    sub = command("stream", _stream, "stream a user recording through the model frame by frame, with speculation",
                  "Encode a user recording (mono, any sample rate) with Mimi and run the real-time streaming step "
                  "frame by frame: writes the system's audio (system.wav, and dialogue.wav with both speakers), "
                  "its text, and a per-frame log of the user prediction, its confidence and speculation hits.")
    sub.add_argument("model", help="model directory")
    sub.add_argument("user_audio", help="the user's audio file (mono; any rate, resampled to Mimi's)")
    sub.add_argument("--out", default="outputs/stream", help="output directory")
    sub.add_argument("--mimi", default=None, help="transformers Mimi folder or Hub id (default: MODEL/mimi)")
    sub.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: MODEL/tokenizer.model)")
    sub.add_argument("--channel", type=int, default=None, help="channel to take from a multi-channel file")
    sub.add_argument("--speculate-top-k", type=int, default=4, help="candidates precomputed per frame (0: off)")
    sub.add_argument("--realtime", action="store_true", help="deliver frames at 12.5 Hz, like a live microphone")
    sub.add_argument("--greedy", action="store_true", help="greedy text and audio instead of the generation config")
    sub.add_argument("--seed", type=int, default=0, help="sampling seed")
    sub.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    sub.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: as saved)")
    sub.add_argument("--device", default="cpu", help="device for the model and Mimi")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")

    sub = command("serve", _serve, "talk to the model live: a real-time server speaking moshi's WebSocket protocol",
                  "Serve live full-duplex conversations over kyutai's moshi protocol at ws://HOST:PORT/api/chat "
                  "(kyutai's clients connect unchanged) and the web page at http://HOST:PORT/, several at once in "
                  "one batched streaming session ticking every 80 ms. Without MODEL it serves the demo's model "
                  f"({DEMO_MODEL}), training it once with the demo if it is not there. Ctrl-C stops it cleanly.")
    sub.add_argument("model", nargs="?", default=None, help=f"model directory (default: {DEMO_MODEL})")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sub.add_argument("--port", type=int, default=8998, help="port to listen on")
    sub.add_argument("--max-sessions", type=int, default=8, help="conversations served at once (slots)")
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

    sub = command("push", _push, "upload a model directory to the Hugging Face Hub with a model card",
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
    return parser


def _one_line(error: BaseException) -> str:
    """A multi-line message (e.g. every mismatched checkpoint key) as its first two lines and a count."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return " ".join(lines[:2]) + more


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the message (tests and callers swap it)."""

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
    # torchao (the `quant` extra, imported by Transformers' quantizers) warns at import that its CUDA-only extensions
    # do not load on a CPU build, and torch that torchao registers its enums needlessly: lines on every command's
    # stderr that say nothing about the command.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _show_progress_messages(getattr(args, "quiet", False))
    if args.command == "train":
        from ..training.train import main as train_main

        return train_main(args.train_args, prog=f"{PROG} train")
    from ..hub.conversion import progress_bars

    try:
        with progress_bars(not getattr(args, "quiet", False)):  # Transformers' loading and saving bars too
            args.run(args)
    except (ValueError, ImportError, OSError) as error:  # user mistakes, missing files and extras
        print(f"{PROG} {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


__all__ = ["build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
