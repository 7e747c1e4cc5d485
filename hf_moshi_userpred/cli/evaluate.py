"""`hf-moshi-userpred evaluate`: user-prediction metrics, calibration and turn taking on encoded dialogues."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .arguments import add_command, load_model, positive_int, probability


def add_parser(commands: argparse._SubParsersAction) -> None:
    sub = add_command(commands, "evaluate", run, "user-prediction metrics and plots for a model on encoded dialogues",
                      "Accuracy (delay-0 forecast and delayed codebooks), top-k, per codebook, calibration, against "
                      "repeat-last-frame and unigram baselines; writes user_prediction_metrics.json and plots.")
    sub.add_argument("model", help="model directory")
    sub.add_argument("data", help="encoded dialogues (an `encode` output directory)")
    sub.add_argument("--reference", default=None, help="encoded training dialogues for the unigram baseline")
    sub.add_argument("--out", default="outputs/evaluate", help="where the metrics and plots go")
    sub.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward")
    sub.add_argument("--window", type=positive_int, default=None,
                     help="frames per window (default: the model's context)")
    sub.add_argument("--top-k", type=positive_int, default=5, help="k of the top-k accuracies")
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
    sub.add_argument("--threshold", type=probability, default=0.5,
                     help="turn-taking: P(turn end) threshold, also the turn hold of the dialogue-behaviour run")
    sub.add_argument("--seed", type=int, default=0, help="turn-taking: sampling seed of the dialogue-behaviour runs")
    sub.add_argument("--horizon", type=positive_int, default=None,
                     help="turn-taking: frames the signal looks ahead, its second half the turn-end window "
                          "(default: the saved statistics', else 10)")


def run(args: argparse.Namespace) -> None:
    from ..data.encoding import EncodedDialogues
    from ..evaluation.reports import (
        TURN_TAKING_METRICS_NAME,
        TURN_TAKING_REPORT_NAME,
        save_user_logit_temperature,
        turn_taking_statistics,
        write_turn_taking_report,
        write_user_prediction_report,
    )
    from ..evaluation.user_prediction import calibrate_user_prediction
    from ..utils.files import METRICS_NAME

    config_path = Path(args.model) / "config.json"
    if args.calibrate and config_path.is_file() and not os.access(config_path, os.W_OK):
        raise ValueError(f"--calibrate writes into {config_path}, which is not writable")
    dataset = EncodedDialogues(args.data)
    reference = EncodedDialogues(args.reference) if args.reference else None
    model = load_model(args.model, device=args.device)
    statistics = turn_taking_statistics(args.model, model.config, reference=args.reference,
                                        horizon=args.horizon) if args.turn_taking else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calibration = None
    if args.calibrate:  # applied in memory now, saved into the model folder only once everything has succeeded
        calibration = calibrate_user_prediction(model, dataset, batch_size=args.batch_size, window=args.window)
        model.config.user_logit_temperature = calibration.temperature
        print(calibration.to_markdown() + "\n")
    report = write_user_prediction_report(model, dataset, out, data_name=str(args.data), reference=reference,
                                          batch_size=args.batch_size, window=args.window, top_k=args.top_k,
                                          plots=not args.no_plots, calibration=calibration)
    print(report.to_markdown())
    written = [out / METRICS_NAME, *report.plots.values()]
    if statistics is not None:
        signal, behaviour = write_turn_taking_report(model, dataset, args.data, statistics, out,
                                                     threshold=args.threshold, seed=args.seed, window=args.window,
                                                     plots=not args.no_plots)
        print("\n" + signal.to_markdown() + "\n\n" + behaviour.to_markdown())
        written += [out / TURN_TAKING_METRICS_NAME, out / TURN_TAKING_REPORT_NAME, *signal.plots.values(),
                    *behaviour.plots.values()]
    if calibration is not None:
        save_user_logit_temperature(args.model, calibration.temperature)
        logging.getLogger(__name__).info(f"wrote user_logit_temperature="
                                         f"{[round(t, 3) for t in calibration.temperature]} into {config_path}")
    print("\nwrote " + ", ".join(str(path) for path in written))
