"""Fine-tune a Moshi user-prediction model on encoded dialogues: the training entry point.

    python -m hf_moshi_userpred.training.train --model_name_or_path MODEL --train_data ENCODED --output_dir OUT [flags]
    python -m hf_moshi_userpred.training.train config.yaml            # the same fields in YAML (or JSON)
    accelerate launch --num_processes 2 -m hf_moshi_userpred.training.train ...

Flags are the fields of [`MoshiUserPredModelArguments`], [`MoshiUserPredDataArguments`] and
[`MoshiUserPredTrainingArguments`] (every `transformers.TrainingArguments` field included), parsed by
`transformers.HfArgumentParser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

from ..data.encoding import EncodedDialogues
from ..data.voice_activity import STATISTICS_NAME, DialoguesWithVoiceActivity, dialogue_alignments
from ..models.configuration_moshi_userpred import MoshiUserPredConfig
from ..models.modeling_moshi_codes import check_codes
from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration
from ..utils.cpu_threads import set_torch_threads
from ..utils.errors import error_summary
from ..utils.files import METRICS_NAME, TRAINING_CONFIG_NAME, check_output_dir, copy_codec_files, write_json
from .modes import LORA_PARTS, TRAINING_MODES, prepare_model_for_training
from .trainer import MoshiUserPredTrainer, MoshiUserPredTrainingArguments

logger = logging.get_logger(__name__)

# What the model card reports of a run (the full set stays in the Trainer's training_args.bin).
CARD_HYPERPARAMETERS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "max_grad_norm",
    "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size",
    "segment_frames", "user_loss_stages", "user_loss_stage_unit", "bf16", "fp16", "gradient_checkpointing", "seed",
)
# Files beside a model's weights that describe those weights (its evaluation, turn-taking table, run record, model
# card): `--overwrite_model` removes them with the weights they were measured on.
DERIVED_FILES = (METRICS_NAME, STATISTICS_NAME, TRAINING_CONFIG_NAME, "README.md")


@dataclass
class MoshiUserPredModelArguments:
    """The model to fine-tune and what of it is trained."""

    model_name_or_path: str = field(metadata={"help": "model directory or Hub repo id in this package's format"})
    training_mode: str = field(default="full", metadata={"help": f"one of {TRAINING_MODES}"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (training_mode=lora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (training_mode=lora)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (training_mode=lora)"})
    lora_parts: str = field(
        default="transformer", metadata={"help": f"comma-separated modules given LoRA adapters, among {LORA_PARTS}"}
    )
    merge_lora: bool = field(default=False, metadata={"help": "also save the merged model in OUTPUT_DIR/merged"})
    voice_activity_horizon: int = field(
        default=0, metadata={"help": "add a new voice-activity (turn-taking) head forecasting this many frames before "
                                     "training (0: keep the model's; a model with a head trains it on the data's word "
                                     "alignments)"})
    voice_activity_turn_end_frames: int = field(
        default=5, metadata={"help": "frames at the end of the new head's horizon that must be silent for a turn end"})
    voice_activity_trains_transformer: bool = field(
        default=False, metadata={"help": "the new head's loss also trains the transformer (jointly, as VAP models are; "
                                         "default: the head reads it with the gradient stopped)"})
    overwrite_model: bool = field(
        default=False, metadata={"help": "let output_dir be model_name_or_path: the trained model replaces it, and "
                                         f"the files describing the old weights ({', '.join(DERIVED_FILES)}) are "
                                         "removed"})

    def __post_init__(self):
        if self.training_mode not in TRAINING_MODES:
            raise ValueError(f"training_mode {self.training_mode!r} must be one of {TRAINING_MODES}")
        if self.merge_lora and self.training_mode != "lora":
            raise ValueError(f"merge_lora needs training_mode='lora', got {self.training_mode!r}")
        if self.overwrite_model and self.training_mode == "lora":
            raise ValueError("overwrite_model needs a training mode that saves the whole model, not 'lora' (its "
                             "adapter would be saved beside the base weights it adapts)")


@dataclass
class MoshiUserPredDataArguments:
    """Where the encoded dialogues are (directories written by `encode_dataset`)."""

    train_data: str = field(metadata={"help": "directory of encoded training dialogues"})
    eval_data: str | None = field(default=None, metadata={"help": "directory of encoded evaluation dialogues"})


class _OneLineErrorParser(HfArgumentParser):
    """argparse's own mistakes (unknown flag, bad value) as one stderr line and exit code 2, like ours."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_arguments(
    argv: Sequence[str] | None = None, prog: str | None = None
) -> tuple[MoshiUserPredModelArguments, MoshiUserPredDataArguments, MoshiUserPredTrainingArguments]:
    """Flags, or a single `.yaml`/`.yml`/`.json` file holding the same fields."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _OneLineErrorParser(
        (MoshiUserPredModelArguments, MoshiUserPredDataArguments, MoshiUserPredTrainingArguments), prog=prog,
        description="Fine-tune a Moshi user-prediction model on encoded dialogues. Give the flags below, or one "
                    "YAML/JSON file holding the same fields (e.g. `train config.yaml`).",
    )
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        return _parse_config_file(parser, argv[0])
    return parser.parse_args_into_dataclasses(argv)


def _parse_config_file(parser: HfArgumentParser, path: str) -> tuple:
    """The dataclasses of a YAML or JSON training config.

    Raises:
        ValueError: naming the file when it is missing, not YAML/JSON, not a mapping, or has unknown or mistyped
            fields.
    """
    import yaml

    if not Path(path).is_file():
        raise ValueError(f"training config {path!r} does not exist" + (" (it is a directory)" if Path(path).exists()
                                                                        else ""))
    try:
        text = Path(path).read_text(encoding="utf-8")
        content = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the training config {path!r}: {error}") from error
    except (ValueError, yaml.YAMLError) as error:
        kind = "JSON" if path.endswith(".json") else "YAML"
        where = " ".join(str(error).split())
        raise ValueError(f"the training config {path!r} is not valid {kind}: {where}") from error
    if not isinstance(content, dict):
        raise ValueError(f"the training config {path!r} must hold a mapping of field: value, got "
                         f"{type(content).__name__}")
    # every value through its flag's conversion (argparse's own, private `_get_values`), so that `max_steps: ten`
    # is refused as `--max_steps ten` is and `learning_rate: 1e-3` (a string to YAML) is read as the flag's float
    flags = {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}
    for key, value in content.items():
        action = flags.get(key)
        if action is None or action.type is None or value is None or isinstance(value, dict):
            continue  # an unknown key is named below; null and mappings go to the dataclass as they are
        strings = [str(v) for v in value] if isinstance(value, list) and action.nargs in ("+", "*") else [str(value)]
        try:
            content[key] = parser._get_values(action, strings)
        except argparse.ArgumentError as error:
            raise ValueError(f"the training config {path!r}: {error}") from error
    try:
        return parser.parse_dict(content, allow_extra_keys=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the training config {path!r}: {error}") from error


def train(
    model_args: MoshiUserPredModelArguments,
    data_args: MoshiUserPredDataArguments,
    training_args: MoshiUserPredTrainingArguments,
) -> dict[str, float]:
    """Fine-tune, save to `training_args.output_dir`, evaluate when there is eval data; returns the metrics."""
    set_seed(training_args.seed)
    train_dataset = EncodedDialogues(data_args.train_data)  # data first: its mistakes show before a long model load
    eval_dataset = EncodedDialogues(data_args.eval_data) if data_args.eval_data else None
    encoded = {"train_data": (data_args.train_data, train_dataset), "eval_data": (data_args.eval_data, eval_dataset)}
    replaces_model = _check_output_dir(model_args, training_args.output_dir)
    model = MoshiUserPredForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
    if model_args.voice_activity_horizon:
        model.config.voice_activity_trains_transformer = model_args.voice_activity_trains_transformer
        model.add_voice_activity_head(model_args.voice_activity_horizon, model_args.voice_activity_turn_end_frames)
    if model.voice_activity_head is not None:  # its targets: the user's voice activity from the word alignments
        train_dataset = DialoguesWithVoiceActivity(train_dataset, dialogue_alignments(data_args.train_data))
        if eval_dataset is not None:
            eval_dataset = DialoguesWithVoiceActivity(eval_dataset, dialogue_alignments(data_args.eval_data))
    lora = {}
    if model_args.training_mode == "lora":
        lora = dict(r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout,
                    parts=tuple(part.strip() for part in model_args.lora_parts.split(",")))
    model = prepare_model_for_training(model, model_args.training_mode, **lora)
    # after the model's own set-up errors, before the Trainer allocates anything or a step runs
    check_data_fits_model(model.config, training_args.segment_frames, **encoded)
    if training_args.device.type == "cpu":  # once the set-up's mistakes have been reported
        set_torch_threads(model.num_parameters())

    trainer = MoshiUserPredTrainer(model=model, args=training_args, train_dataset=train_dataset,
                                   eval_dataset=eval_dataset)
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir)
        if resume is None:
            raise ValueError(f"resume_from_checkpoint='last': no checkpoint in {training_args.output_dir}")
    result = trainer.train(resume_from_checkpoint=resume)
    if replaces_model and trainer.is_world_process_zero():
        for name in DERIVED_FILES:
            (Path(training_args.output_dir) / name).unlink(missing_ok=True)
    trainer.save_model()
    trainer.save_state()
    metrics = dict(result.metrics)
    trainer.save_metrics("train", metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    if trainer.is_world_process_zero():
        record = (training_args, metrics, asdict(model_args), asdict(data_args))
        write_training_config(training_args.output_dir, *record)
        # the base model's tokenizer and Mimi: the trained folder then streams, serves and is pushed without flags
        copy_codec_files(model_args.model_name_or_path, training_args.output_dir)
        if model_args.merge_lora:
            merged = Path(training_args.output_dir) / "merged"
            trainer.model.merge_and_unload().save_pretrained(merged)
            write_training_config(merged, *record)
            copy_codec_files(model_args.model_name_or_path, merged)
    print(f"[rank {training_args.process_index}] finished: {trainer.state.global_step} steps, "
          f"train_loss {metrics.get('train_loss', float('nan')):.4f}", flush=True)
    return metrics


def _check_output_dir(model_args: MoshiUserPredModelArguments, output_dir: str) -> bool:
    """Checks `output_dir` before any work (the Trainer creates it once the model has loaded: a failed set-up
    leaves no empty folder); returns whether it is the model's own folder, which only `overwrite_model` allows.

    Raises:
        ValueError: `output_dir` is unusable, is the model's folder without `overwrite_model`, or lies inside it or
            around it.
    """
    model_dir = Path(model_args.model_name_or_path)
    local = model_dir.is_dir()  # else a Hub repository id: nothing local to protect
    replaces = local and Path(output_dir).resolve() == model_dir.resolve()
    if replaces and not model_args.overwrite_model:
        raise ValueError(f"output_dir {output_dir!r} is the model being trained ({str(model_dir)!r}): give another "
                         "output_dir, or --overwrite_model to replace the model (its evaluation, model card and "
                         "turn-taking statistics are then removed)")
    check_output_dir(output_dir, overwrite=True, source=model_dir if local and not replaces else None)
    return replaces


def check_data_fits_model(
    config: MoshiUserPredConfig,
    segment_frames: int,
    train_data: tuple[str, EncodedDialogues],
    eval_data: tuple[str | None, EncodedDialogues | None],
) -> None:
    """Refuses, before a run, data the model cannot read (another number of codebooks, ids outside its
    vocabularies in the first dialogue) and segments longer than both the model's context and the longest training
    dialogue (all padding past them, and a batch whose attention grows with the square of its length).

    Args:
        config: the model's config.
        segment_frames: the training segments' length.
        train_data, eval_data: `(directory, dataset)` of the training and evaluation data (`(None, None)`: none).

    Raises:
        ValueError: naming the data (or the segment length) and what the model expects.
    """
    for flag, (path, dataset) in (("train_data", train_data), ("eval_data", eval_data)):
        if dataset is None:
            continue
        if dataset.num_rows != config.num_codebooks:
            hint = f": encode it with --num-codebooks {config.n_q // 2}" if config.n_q % 2 == 0 else ""
            raise ValueError(f"{flag} {path!r} has {dataset.num_rows} rows per dialogue (text + audio codebooks) but "
                             f"the model reads 1 + n_q = {config.num_codebooks}{hint}")
        first = dataset[0]
        check_codes(first["codes"], config, name=f"{flag} {path!r}: {first['name']} codes", batched=False)
    window, longest = config.streaming_window, max(train_data[1].num_frames)
    if segment_frames > max(window, longest):
        raise ValueError(f"segment_frames={segment_frames} is longer than both the model's context ({window} frames) "
                         f"and the longest dialogue of train_data ({longest} frames): give at most "
                         f"{max(window, longest)}")


def write_training_config(
    output_dir: str | Path,
    training_args: MoshiUserPredTrainingArguments,
    results: dict[str, float],
    model: dict,
    data: dict,
) -> Path:
    """Writes `output_dir/training_config.json`: the run's model and data arguments, the hyper-parameters the model
    card shows and the results, which `push` renders into the card."""
    record = {
        "model": model,
        "data": data,
        "training": {name: getattr(training_args, name) for name in CARD_HYPERPARAMETERS},
        "results": results,
    }
    path = Path(output_dir) / TRAINING_CONFIG_NAME
    write_json(path, record)
    return path


def main(argv: Sequence[str] | None = None, prog: str = "hf_moshi_userpred.training.train") -> int:
    try:
        train(*parse_arguments(argv, prog=prog))
    except (ValueError, ImportError, OSError) as error:  # user mistakes, missing files and extras: one line
        print(f"{prog}: error: {error_summary(error, max_lines=2)}", file=sys.stderr)
        return 2
    return 0


__all__ = ["DERIVED_FILES", "MoshiUserPredDataArguments", "MoshiUserPredModelArguments", "check_data_fits_model",
           "main", "parse_arguments", "train", "write_training_config"]


if __name__ == "__main__":
    sys.exit(main())
