"""The demo's recipe on any moshi-finetune folder (`hf-moshi-userpred demo --data DIR`): a `synthesize` corpus, or a
real two-channel corpus with word alignments converted to the format (docs/corpus.md).

1. encode `DIR/train.jsonl` and `DIR/eval.jsonl` with the folder's Mimi and tokenizer (or the ones given); the last
   tenth of the training dialogues is kept apart for validation;
2. train a model sized to the data ([`RecipeScale`]) with the user-loss curriculum and, jointly, its voice-activity
   head (its loss reaching the transformer) over a 2 s horizon: the turn ends when the user is silent over its last
   second, so a pause inside a turn, up to 2 s on the corpus, is no turn end;
3. calibrate on the validation dialogues: the user branch's temperatures, and the P(turn end) threshold of each
   turn-taking signal (the one that best separates shifts from holds there);
4. evaluate user prediction and turn taking (`evaluate --turn-taking`: the signals against silence timers, the
   system's dialogue behaviour with and without user prediction) on the held-out dialogues, never tuned on them;
5. save the model folder (tokenizer, Mimi, turn-taking statistics, calibration) and write `report.md`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import sentencepiece
import torch
from transformers import PrinterCallback
from transformers.utils import logging

from ..data.audio import load_mimi
from ..data.encoding import EncodedDialogues, encode_dataset
from ..data.voice_activity import (
    DialoguesWithVoiceActivity,
    TurnTakingStatistics,
    dialogue_alignments,
    fit_turn_taking_statistics,
)
from ..evaluation.reports import write_turn_taking_report, write_user_prediction_report
from ..evaluation.turn_taking import evaluate_turn_taking
from ..evaluation.turn_taking_metrics import balanced_accuracy
from ..evaluation.turn_taking_tradeoff import SWEEP
from ..evaluation.user_prediction import calibrate_user_prediction
from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration
from ..sample import sample_model_config, sample_training_arguments
from ..training.train import write_training_config
from ..training.trainer import MoshiUserPredTrainer
from ..utils.cpu_threads import set_torch_threads
from ..utils.files import MIMI_FOLDER, TOKENIZER_NAME, atomic_directory, atomic_write, write_json

VALIDATION_SHARE = 0.1  # of the training dialogues, for the calibration (never the held-out ones)
# The turn-taking signals' window (head and token table): 25 frames (2 s, VAP's projection window), the turn over
# when the user is silent over the last 12 (about 1 s). With the demo's 800 ms window a pause over 800 ms inside a
# turn looks like a turn end, and a third of the corpus' pauses are longer.
HORIZON, TURN_END_FRAMES = 25, 12
logger = logging.get_logger(__name__)
THRESHOLDS = SWEEP  # the P(turn end) thresholds calibration tries: the trade-off curves' sweep


@dataclass(frozen=True)
class RecipeScale:
    """The model and the training length for a corpus: the sample's shape (4 layers), widened and trained longer as
    the data grows."""

    dim: int
    num_layers: int
    steps: int

    @classmethod
    def for_hours(cls, train_hours: float) -> RecipeScale:
        """96 wide and 900 steps (the shipped demo) up to 10 minutes of training dialogue; above, 128 wide and 2000
        steps per hour (some 17 passes over the data at 6 segments of 64 frames a step; the recipe keeps the
        checkpoint of the lowest validation loss, as a small corpus is learnt by heart within that), at most
        20000."""
        if train_hours <= 1 / 6:
            return cls(dim=96, num_layers=4, steps=900)
        return cls(dim=128, num_layers=4, steps=min(max(900, round(2000 * train_hours)), 20000))


@dataclass
class CorpusRecipeResult:
    """What [`run_corpus_recipe`] wrote (under `output_dir`: `encoded/`, `model/`, `evaluation/`, `report.md`) and
    its headline figures (`summary`, also `summary.json`)."""

    output_dir: Path
    summary: dict

    def describe(self) -> str:
        rows = "\n".join(f"| {name} | {value} |" for name, value in self.summary.items())
        return (f"| figure | value |\n|---|---:|\n{rows}\n\nreport: {self.output_dir / 'report.md'}  "
                f"model: {self.output_dir / 'model'}")


def run_corpus_recipe(
    data: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    mimi: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    num_codebooks: int = 4,
    scale: RecipeScale | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> CorpusRecipeResult:
    """Run the recipe (module docstring) on the moshi-finetune folder `data`.

    Args:
        data: holds `train.jsonl` and `eval.jsonl`; and `mimi/` and `tokenizer.model` unless given.
        output_dir: created if needed; encoded shards are reused (the encode is resumable), the rest replaced.
        mimi, tokenizer: the codec and the text tokenizer (default: the folder's).
        num_codebooks: Mimi codebooks per speaker the model reads and writes.
        scale: the model and the steps (default: [`RecipeScale.for_hours`] of the training dialogues).
        steps: overrides the scale's training steps.

    Raises:
        ValueError: `steps` < 1, a manifest, the Mimi or the tokenizer is missing, too few training dialogues to
            keep some for validation, or `num_codebooks` exceeds the Mimi's.
    """
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    start = time.perf_counter()
    data, out = Path(data), Path(output_dir)
    manifests = {split: data / f"{split}.jsonl" for split in ("train", "eval")}
    for manifest in manifests.values():
        if not manifest.is_file():
            raise ValueError(f"{data} is not a moshi-finetune folder for the recipe: {manifest.name} is missing")
    mimi_path = Path(mimi) if mimi is not None else data / MIMI_FOLDER
    tokenizer_path = Path(tokenizer) if tokenizer is not None else data / TOKENIZER_NAME
    if not tokenizer_path.is_file():
        raise ValueError(f"no text tokenizer at {tokenizer_path}: pass --tokenizer (a sentencepiece .model)")
    codec = load_mimi(mimi_path)
    if not 1 <= num_codebooks <= codec.config.num_quantizers:
        raise ValueError(f"num_codebooks must be within 1..{codec.config.num_quantizers} (the Mimi's), "
                         f"got {num_codebooks}")
    text_card = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()

    rows = [line for line in manifests["train"].read_text().splitlines() if line.strip()]
    held_apart = max(1, round(VALIDATION_SHARE * len(rows)))
    if len(rows) - held_apart < 1:
        raise ValueError(f"{manifests['train']} lists {len(rows)} dialogue(s): the recipe needs at least 2 "
                         f"(one kept apart for calibration)")
    out.mkdir(parents=True, exist_ok=True)
    split_manifests = {"train": rows[:-held_apart], "validation": rows[-held_apart:]}
    for split, lines in split_manifests.items():  # absolute paths: the manifests live in `out`, the audio in `data`
        text = "".join(json.dumps({**row, "path": str((data / row["path"]).resolve())}) + "\n"
                       for row in map(json.loads, lines))
        atomic_write(out / f"{split}.jsonl", lambda path, text=text: path.write_text(text))
    sources = {"train": out / "train.jsonl", "validation": out / "validation.jsonl", "eval": manifests["eval"]}

    _say("1/5 encoding the training, validation and held-out dialogues")
    encoded = {}
    for split, manifest in sources.items():
        encode_dataset(manifest, out / "encoded" / split, mimi=codec, tokenizer=tokenizer_path,
                       num_codebooks=num_codebooks, progress=progress)
        encoded[split] = EncodedDialogues(out / "encoded" / split)
    alignments = {split: dialogue_alignments(out / "encoded" / split) for split in encoded}
    hours = {split: sum(d["codes"].shape[-1] for d in dataset) / 12.5 / 3600 for split, dataset in encoded.items()}

    scale = scale or RecipeScale.for_hours(hours["train"])
    if steps is not None:
        scale = replace(scale, steps=steps)
    torch.manual_seed(seed)
    config = sample_model_config(scale.dim, scale.num_layers, text_card=text_card, card=codec.config.codebook_size,
                                 num_codebooks=num_codebooks)
    model = MoshiUserPredForConditionalGeneration(config)
    set_torch_threads(model.num_parameters())
    model.config.voice_activity_trains_transformer = True
    model.add_voice_activity_head(HORIZON, TURN_END_FRAMES)
    _say(f"2/5 training a {model.num_parameters() / 1e6:.1f} M-parameter model with its turn-taking head for "
         f"{scale.steps} steps on {hours['train']:.2f} h")
    args = sample_training_arguments(out / "training", scale.steps, seed, progress, keep_best=True)
    trainer = MoshiUserPredTrainer(
        model=model, args=args, train_dataset=DialoguesWithVoiceActivity(encoded["train"], alignments["train"]),
        eval_dataset=DialoguesWithVoiceActivity(encoded["validation"], alignments["validation"]))
    if not progress:
        trainer.remove_callback(PrinterCallback)
    train_started = time.perf_counter()
    train_metrics = trainer.train().metrics
    train_s = time.perf_counter() - train_started
    model.eval()

    _say("3/5 calibrating on the validation dialogues")
    calibration = calibrate_user_prediction(model, encoded["validation"])
    model.config.user_logit_temperature = calibration.temperature
    statistics = fit_turn_taking_statistics(encoded["train"], alignments["train"], model.config, horizon=HORIZON,
                                            turn_end_frames=TURN_END_FRAMES)
    thresholds = calibrate_thresholds(model, encoded["validation"], alignments["validation"], statistics)

    _say("4/5 evaluating user prediction and turn taking on the held-out dialogues")
    evaluation = out / "evaluation"
    prediction = write_user_prediction_report(model, encoded["eval"], evaluation, data_name=str(manifests["eval"]),
                                              reference=encoded["train"], calibration=calibration)
    hold_threshold = thresholds.get("vap_head", thresholds["model"])  # the turn hold reads the head when there is one
    signal, behaviour = write_turn_taking_report(model, encoded["eval"], out / "encoded" / "eval", statistics,
                                                 evaluation, threshold=hold_threshold, signal_thresholds=thresholds,
                                                 seed=seed)

    _say("5/5 saving the model and writing the report")
    with atomic_directory(out / "model", overwrite=True) as staging:
        model.save_pretrained(staging)
        shutil.copy(tokenizer_path, staging / TOKENIZER_NAME)
        codec.save_pretrained(staging / MIMI_FOLDER)
        statistics.save(staging)
        write_training_config(staging, args, train_metrics, model={"init": "random", "scale": asdict(scale)},
                              data={"train_data": str(sources["train"]), "eval_data": str(sources["validation"])})
        write_json(staging / "turn_taking_thresholds.json", thresholds)

    shift_hold = {name: p.shift_hold.balanced_accuracy for name, p in signal.predictors.items()}
    summary = {
        "data": str(data), "train_hours": round(hours["train"], 3), "held_out_hours": round(hours["eval"], 3),
        "parameters_M": round(model.num_parameters() / 1e6, 2), "steps": scale.steps,
        "held_out_shifts": signal.num_shifts, "held_out_holds": signal.num_holds,
        "user_delay0_accuracy": round(prediction.model.accuracy, 3),
        **{f"shift_hold_balanced_accuracy/{name}": None if value is None else round(value, 3)
           for name, value in shift_hold.items()},
        "thresholds": thresholds, "train_seconds": round(train_s), "total_seconds": round(time.perf_counter() - start),
    }
    write_json(out / "summary.json", summary)
    report = (f"# The recipe on {data}\n\n{hours['train']:.2f} h of training dialogue, {hours['eval']:.2f} h held "
              f"out; a {summary['parameters_M']} M-parameter model, {scale.steps} steps ({train_s:.0f} s); "
              f"thresholds calibrated on {held_apart} validation dialogue(s): {thresholds}.\n\n"
              f"## User prediction\n\n{prediction.to_markdown()}\n\n## Turn taking\n\n"
              f"See [evaluation/turn_taking_report.md](evaluation/turn_taking_report.md).\n\n{signal.to_markdown()}\n\n"
              f"{behaviour.to_markdown()}\n")
    atomic_write(out / "report.md", lambda path: path.write_text(report, encoding="utf-8"))
    return CorpusRecipeResult(out, summary)


def calibrate_thresholds(model: MoshiUserPredForConditionalGeneration, dialogues: Sequence, alignments: Sequence,
                         statistics: TurnTakingStatistics) -> dict[str, float]:
    """Per turn-taking signal (`model`: the token table, `vap_head` when the model has the head), the P(turn end)
    threshold among `THRESHOLDS` with the best shift/hold balanced accuracy on `dialogues` (validation) at the
    user's last speech frame; 0.5 for a signal the validation pauses cannot calibrate (one kind only)."""
    report = evaluate_turn_taking(model, dialogues, alignments, statistics)
    scores = report.timeline["scores"]
    thresholds = {}
    for name in ("model", "vap_head"):
        if name not in scores:
            continue
        pairs = list(zip(scores[name], scores["labels"]))
        accuracies = {t: balanced_accuracy(pairs, t) for t in THRESHOLDS}
        known = {t: a for t, a in accuracies.items() if a is not None}
        thresholds[name] = max(known, key=known.get) if known else 0.5
    return thresholds


def _say(message: str) -> None:
    logger.info(message)


__all__ = ["CorpusRecipeResult", "RecipeScale", "calibrate_thresholds", "run_corpus_recipe"]
