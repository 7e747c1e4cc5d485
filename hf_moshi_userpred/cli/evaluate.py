"""`hf-moshi-userpred evaluate`: user-prediction metrics, calibration and turn taking on encoded dialogues."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .arguments import add_command, load_model


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = add_command(commands, "evaluate", run, "user-prediction metrics and plots for a model on encoded dialogues",
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


def run(args: argparse.Namespace) -> None:
    from ..data.encoding import EncodedDialogues
    from ..evaluation.user_prediction import evaluate_user_prediction
    from ..utils.files import METRICS_NAME, write_json

    dataset = EncodedDialogues(args.data)
    reference = EncodedDialogues(args.reference) if args.reference else None
    model = load_model(args.model, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calibration = calibrate(args, model, dataset) if args.calibrate else None
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
        evaluate_turn_taking(args, model, dataset, out)


def calibrate(args: argparse.Namespace, model, dataset):
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


def evaluate_turn_taking(args: argparse.Namespace, model, dataset, out: Path) -> None:
    """`evaluate --turn-taking`: the turn-taking signal's statistics from MODEL/turn_taking_statistics.json, else
    fitted on --reference; shift/hold, anticipation and backchannel metrics on DATA's alignments; the system's
    dialogue behaviour streaming DATA without and with the turn hold at --threshold; turn_taking_report.md."""
    from ..data.encoding import EncodedDialogues
    from ..data.voice_activity import (
        STATISTICS_NAME,
        TurnTakingStatistics,
        dialogue_alignments,
        fit_turn_taking_statistics,
    )
    from ..evaluation.dialogue_behaviour import evaluate_dialogue_behaviour
    from ..evaluation.turn_taking import evaluate_turn_taking
    from ..utils.files import atomic_write, write_json

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
