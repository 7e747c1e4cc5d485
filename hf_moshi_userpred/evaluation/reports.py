"""A model's evaluation written to disk: what `hf-moshi-userpred evaluate` produces, callable without the CLI.

    report = write_user_prediction_report(model, EncodedDialogues("encoded/eval"), "outputs/evaluate")
    statistics = turn_taking_statistics("model", model.config, reference="encoded/train")
    signal, behaviour = write_turn_taking_report(model, dataset, "encoded/eval", statistics, "outputs/evaluate")
    save_user_logit_temperature("model", calibration.temperature)  # only once everything else has succeeded

Files, in `out`: `user_prediction_metrics.json` (the metrics, their Markdown, the calibration if any),
`turn_taking_metrics.json` and `turn_taking_report.md` (the signal's shift/hold metrics and the dialogue behaviour
without and with the turn hold), `plots/*.png`. Every file is replaced atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..data.encoding import EncodedDialogues
from ..data.voice_activity import STATISTICS_NAME, TurnTakingStatistics, dialogue_alignments, fit_turn_taking_statistics
from ..models.configuration_moshi_userpred import MoshiUserPredConfig
from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration
from ..utils.files import METRICS_NAME, atomic_write, read_json_object, write_json
from .dialogue_behaviour import DialogueBehaviourReport, evaluate_dialogue_behaviour
from .turn_taking import evaluate_turn_taking
from .turn_taking_metrics import TurnTakingReport
from .user_prediction import CalibrationReport, UserPredictionReport, evaluate_user_prediction

TURN_TAKING_METRICS_NAME = "turn_taking_metrics.json"
TURN_TAKING_REPORT_NAME = "turn_taking_report.md"
BEHAVIOUR_TIMERS_MS = (200, 500, 700, 1000)  # the silence-timer agents the model's behaviour is compared with


def write_user_prediction_report(
    model: MoshiUserPredForConditionalGeneration,
    dataset: Sequence,
    out: str | os.PathLike,
    *,
    data_name: str,
    reference: Sequence | None = None,
    batch_size: int = 8,
    window: int | None = None,
    top_k: int = 5,
    plots: bool = True,
    calibration: CalibrationReport | None = None,
) -> UserPredictionReport:
    """[`evaluate_user_prediction`] of `model` on `dataset`, written to `out/user_prediction_metrics.json` with
    its Markdown, `data_name` (where the dialogues came from) and `calibration`'s fit if given; plots in
    `out/plots/` unless `plots` is False."""
    out = Path(out)
    report = evaluate_user_prediction(model, dataset, batch_size=batch_size, window=window, top_k=top_k,
                                      reference=reference, plot_dir=out / "plots" if plots else None)
    record = {"metrics": report.to_dict(), "markdown": report.to_markdown(), "dataset": data_name}
    if calibration is not None:
        record["calibration"] = calibration.to_dict()
    write_json(out / METRICS_NAME, record)
    return report


def turn_taking_statistics(
    model_dir: str | os.PathLike, config: MoshiUserPredConfig, *, reference: str | os.PathLike | None = None,
    horizon: int | None = None,
) -> TurnTakingStatistics:
    """The turn-taking signal's statistics: the model folder's `turn_taking_statistics.json` (saved by `train`),
    else fitted on `reference` (encoded training dialogues with alignments) with `horizon` frames of look-ahead
    (its second half the turn-end window; default 10). A `horizon` given explicitly always refits.

    Raises:
        ValueError: neither a saved file (or `horizon` is given) nor `reference` to fit on.
    """
    saved = Path(model_dir) / STATISTICS_NAME
    if saved.is_file() and horizon is None:
        return TurnTakingStatistics.load(saved)
    if reference is None:
        raise ValueError(f"--turn-taking needs --reference (encoded training dialogues with alignments) to fit the "
                         f"signal's statistics, or {saved}")
    window = {} if horizon is None else {"horizon": horizon, "turn_end_frames": max(horizon // 2, 1)}
    return fit_turn_taking_statistics(EncodedDialogues(reference), dialogue_alignments(reference), config, **window)


def write_turn_taking_report(
    model: MoshiUserPredForConditionalGeneration,
    dataset: Sequence,
    data: str | os.PathLike,
    statistics: TurnTakingStatistics,
    out: str | os.PathLike,
    *,
    threshold: float = 0.5,
    signal_thresholds: Mapping[str, float] | None = None,
    seed: int = 0,
    window: int | None = None,
    plots: bool = True,
) -> tuple[TurnTakingReport, DialogueBehaviourReport]:
    """The turn-taking signal's shift/hold, anticipation and backchannel metrics on the alignments of `data` (the
    encoded folder `dataset` was read from), and the system's dialogue behaviour streaming `dataset` without and
    with the turn hold at `threshold`, next to silence-timer agents (`signal_thresholds`: per-signal overrides for the signal's metrics); written to `out/turn_taking_metrics.json` and `out/turn_taking_report.md`
    (plots in `out/plots/` unless `plots` is False)."""
    out = Path(out)
    alignments = dialogue_alignments(data)
    plot_dir = out / "plots" if plots else None
    signal = evaluate_turn_taking(model, dataset, alignments, statistics, threshold=threshold,
                                  signal_thresholds=signal_thresholds, window=window, plot_dir=plot_dir)
    behaviour = evaluate_dialogue_behaviour(model, dataset, alignments, statistics, hold_thresholds=(None, threshold),
                                            timers_ms=BEHAVIOUR_TIMERS_MS, seed=seed, plot_dir=plot_dir)
    tradeoff = {name: [vars(point) for point in points] for name, points in signal.tradeoff.items()}
    write_json(out / TURN_TAKING_METRICS_NAME, {
        "metrics": {**signal.to_dict(), **behaviour.to_dict()}, "tradeoff": tradeoff, "markdown": signal.to_markdown(),
        "dialogue_behaviour_markdown": behaviour.to_markdown(), "dataset": str(data)})
    images = "\n".join(f"![{name}](plots/{Path(plot).name})" for name, plot in {**signal.plots,
                                                                                **behaviour.plots}.items())
    markdown = (f"# Turn taking on {data}\n\n## The signal: shift vs hold, backchannel vs barge-in\n\n"
                f"{signal.to_markdown()}\n\n## The system's dialogue behaviour, without and with the turn hold\n\n"
                f"{behaviour.to_markdown()}\n\n{images}\n")
    atomic_write(out / TURN_TAKING_REPORT_NAME, lambda target: target.write_text(markdown, encoding="utf-8"))
    return signal, behaviour


def save_user_logit_temperature(model_dir: str | os.PathLike, temperature: list[float]) -> Path:
    """Write `temperature` (a calibration's fit) as `user_logit_temperature` into `model_dir/config.json`, that key
    only, the file replaced atomically. Returns the config's path."""
    path = Path(model_dir) / "config.json"
    config = read_json_object(path, "model config")
    config["user_logit_temperature"] = temperature
    write_json(path, config)
    return path


__all__ = [
    "TURN_TAKING_METRICS_NAME",
    "TURN_TAKING_REPORT_NAME",
    "save_user_logit_temperature",
    "turn_taking_statistics",
    "write_turn_taking_report",
    "write_user_prediction_report",
]
