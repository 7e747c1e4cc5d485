"""`Trainer` for Moshi with a user-audio Depformer: the combined loss, a user-loss curriculum and its metrics.

    loss = text CE + system-audio CE + w_user * user-audio CE        (masked means, moshi-finetune's weights)
           + voice_activity_loss_weight * voice-activity BCE          (only with a voice-activity head and
                                                                       `user_activity` in the batch)

`w_user` follows [`UserLossCurriculum`] (by default 0, then half, then all of the model config's `user_loss_weight`,
by epoch): the user branch starts once the shared model has adapted to the data, so early, noisy user gradients do
not disturb it; while the weight is 0 the branch is not run. When only the user branch trains the default is all of
the weight from the start, and a run whose weight would stay 0 throughout is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState, ProgressCallback
from transformers.utils import logging

from ..data.collator import DialogueSegments, MoshiSegmentCollator
from ..models.modeling_moshi_userpred import MoshiUserPredOutput
from .progress import TrainingLog, TrainingProgress

logger = logging.get_logger(__name__)

CURRICULUM_UNITS = ("step", "epoch")


def default_stages(user_loss_weight: float, user_branch_only: bool = False) -> str:
    """The default curriculum, in epochs.

    With the shared model training too: no user loss in the first epoch (the shared model adapts to the data
    first; the user branch is not even run), half of `user_loss_weight` in the second, then all of it. When only the
    user branch trains (`training_mode="user_branch"`) nothing else would learn in a zero stage: all of
    `user_loss_weight` from the start.
    """
    if user_branch_only:
        return f"0:{user_loss_weight:g}"
    return f"0:0.0,1:{user_loss_weight / 2:g},2:{user_loss_weight:g}"


def trains_only_the_user_branch(model: nn.Module) -> bool:
    """True when every trainable parameter of `model` (a PEFT wrapper included) belongs to the user branch
    (`user_branch_prefixes`: the user Depformer or a shared Depformer's user steps, the voice-activity head).

    Raises:
        ValueError: `model` has no trainable parameter at all.
    """
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter: nothing would train (see training_mode)")
    prefixes = model.user_branch_prefixes  # a PEFT wrapper forwards it to the model, and prefixes every name
    return all(any(part in name for part in prefixes) for name in trainable)


def parse_stages(spec: str | Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """`"0:0.0,1:0.05,2:0.1"` (or `[(0, 0.0), (1, 0.05), ...]`) -> `[(start, weight), ...]`, validated.

    Raises:
        ValueError: a malformed stage, a first stage not starting at 0, starts not increasing, a negative weight.
    """
    if isinstance(spec, str):
        stages = []
        for part in spec.split(","):
            start, _, weight = part.partition(":")
            try:
                stages.append((float(start), float(weight)))
            except ValueError:
                raise ValueError(f"user loss stage {part.strip()!r} in {spec!r}: expected start:weight, e.g. 1:0.05")
    else:
        stages = [(float(start), float(weight)) for start, weight in spec]
    if not stages or stages[0][0] != 0:
        raise ValueError(f"user loss stages {spec!r}: the first stage must start at 0")
    for (a, _), (b, _) in zip(stages, stages[1:]):
        if not b > a:
            raise ValueError(f"user loss stages {spec!r}: starts must increase, got {a:g} then {b:g}")
    for start, weight in stages:
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"user loss stages {spec!r}: weight {weight} at {start:g} must be finite and >= 0")
    return stages


class UserLossCurriculum(TrainerCallback, ExportableState):
    """Weight of the user-audio loss by training stage.

    Args:
        stages: `(start, weight)` pairs, starts increasing from 0, in `unit`s: stage i holds from its start until the
            next one's.
        unit: `"step"` (optimizer steps done) or `"epoch"` (epochs done, fractional).

    The stage is a function of the `TrainerState` (`global_step`, `epoch`), re-read before every step, so a run
    resumed from a checkpoint is in the stage the uninterrupted run was in.
    """

    def __init__(self, stages: str | Sequence[Sequence[float]] = default_stages(0.1), unit: str = "epoch"):
        if unit not in CURRICULUM_UNITS:
            raise ValueError(f"curriculum unit {unit!r} must be one of {CURRICULUM_UNITS}")
        self.stages = parse_stages(stages)
        self.unit = unit
        self.stage = 0

    @property
    def weight(self) -> float:
        """The user-loss weight of the current stage."""
        return self.stages[self.stage][1]

    def stage_at(self, state: TrainerState) -> int:
        """Index of the stage a step taken in `state` belongs to."""
        position = state.global_step if self.unit == "step" else (state.epoch or 0.0)
        # The epoch counter is a float sum of per-step fractions: allow for its rounding at stage boundaries.
        return max(i for i, (start, _) in enumerate(self.stages) if position + 1e-6 >= start)

    def _update(self, state: TrainerState) -> None:
        stage = self.stage_at(state)
        if stage != self.stage:
            logger.info(f"user loss curriculum: stage {stage}, weight {self.stages[stage][1]} "
                        f"from {self.unit} {state.global_step if self.unit == 'step' else state.epoch}")
        self.stage = stage

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._update(state)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._update(state)

    def state(self) -> dict[str, Any]:
        return {"args": {"stages": [list(s) for s in self.stages], "unit": self.unit},
                "attributes": {"stage": self.stage}}


@dataclass
class MoshiUserPredTrainingArguments(TrainingArguments):
    """[`TrainingArguments`] plus what the Moshi user-prediction fine-tuning adds.

    Args:
        segment_frames: frames per training segment (12.5 per second); evaluation covers every frame in segments of
            this length.
        user_loss_stages: the curriculum of the user-loss weight as `start:weight` pairs (see [`UserLossCurriculum`]);
            None: [`default_stages`] of the model config's `user_loss_weight` (the Trainer fills it in).
        user_loss_stage_unit: `"epoch"` or `"step"`.
    """

    segment_frames: int = field(default=125, metadata={"help": "frames per training segment (12.5 per second)"})
    user_loss_stages: str | None = field(
        default=None, metadata={"help": "user-loss weight curriculum as start:weight pairs (default: 0, then half, "
                                        "then all of the model config's user_loss_weight, by epoch)"}
    )
    user_loss_stage_unit: str = field(default="epoch", metadata={"help": "unit of the stage starts: epoch or step"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kept False: batches are built by the collator"})

    def __post_init__(self):
        # before Transformers' own set-up: a batch of 0 fails later as a ZeroDivisionError, a run of 0 steps saves an
        # untrained model as a trained one
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "segment_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # Transformers trains max_steps when it is > 0 and num_train_epochs when it is < 0 (-1, the default)
        if self.max_steps == 0:
            raise ValueError("max_steps=0 trains nothing: give a number of steps >= 1, or -1 (the default) to train "
                             "num_train_epochs")
        if self.max_steps < 0 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs={self.num_train_epochs:g} trains nothing (max_steps={self.max_steps} "
                             "leaves the length of the run to it): give epochs > 0 or max_steps >= 1")
        super().__post_init__()
        if self.user_loss_stages is not None:
            UserLossCurriculum(self.user_loss_stages, self.user_loss_stage_unit)  # validates both
        elif self.user_loss_stage_unit not in CURRICULUM_UNITS:
            raise ValueError(f"curriculum unit {self.user_loss_stage_unit!r} must be one of {CURRICULUM_UNITS}")


# Running sums recorded by `compute_loss`; means and accuracies are taken when logged.
_STATS = ("batches", "text", "audio", "user", "user_correct", "user_count", "delay0_correct", "delay0_count",
          "user_batches", "voice_activity", "voice_activity_batches")


class MoshiUserPredTrainer(Trainer):
    """[`Trainer`] with the combined text + system-audio + weighted user-audio loss and the user-loss curriculum.

    Batches are `{"codes": LongTensor [B, 1 + n_q, segment_frames]}`: by default the training dataset's dialogues
    (items `{"codes": [1 + n_q, T]}`, e.g. `EncodedDialogues`) are cut at random offsets by [`MoshiSegmentCollator`],
    and the evaluation dataset is covered by consecutive segments ([`DialogueSegments`]).

    Logged while training: `loss/text`, `loss/audio`, `loss/user` (unweighted masked means), `user_weight`,
    `user_accuracy` and `user_delay0_accuracy` (argmax accuracy over all predicted user codebooks, and over the
    delay-0 ones: the real forecast), and `loss/voice_activity` for a model with a voice-activity head trained on
    dialogues that carry `"user_activity"` (the extra loss, `config.voice_activity_loss_weight`; see
    `voice_activity.DialoguesWithVoiceActivity`). `evaluate()` returns the same under `eval_` next to `eval_loss`.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: MoshiUserPredTrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        **kwargs,
    ):
        if args is None:
            args = MoshiUserPredTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, MoshiUserPredTrainingArguments):
            raise ValueError(f"args must be MoshiUserPredTrainingArguments, got {type(args).__name__}")
        self._user_branch_only = trains_only_the_user_branch(model)
        if args.user_loss_stages is None:  # recorded as it is used (training_config.json, the model card)
            args.user_loss_stages = default_stages(model.config.user_loss_weight, self._user_branch_only)
        if data_collator is None:
            data_collator = MoshiSegmentCollator(args.segment_frames, config=model.config)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, UserLossCurriculum) for c in callbacks):
            callbacks.append(UserLossCurriculum(args.user_loss_stages, args.user_loss_stage_unit))
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:  # one bar with the key figures, no printed dicts
            self.add_callback(TrainingProgress)
        self.add_callback(TrainingLog)
        self.loss_is_scaled_for_ga = False  # compute_loss returns per-micro-batch means
        self._user_rows = self.model.user_rows  # a PEFT wrapper forwards attributes to the model
        self._delay0 = torch.tensor(self.model.config.delays[self._user_rows]) == 0
        self._stats: dict[str, torch.Tensor | None] = {"train": None, "eval": None}

    @property
    def curriculum(self) -> UserLossCurriculum:
        """The curriculum callback in use."""
        return next(c for c in self.callback_handler.callbacks if isinstance(c, UserLossCurriculum))

    def train(self, *args, **kwargs):
        """`Trainer.train`, refusing a run in which the user-loss weight never leaves 0 while only the user branch
        trains (nothing would learn), and warning when the user branch never trains in a run that trains more.

        A calibration temperature (`config.user_logit_temperature`) is dropped first: it was fitted to the weights
        before this training, and the user loss must see the raw logits. Calibrate again afterwards
        (`evaluate --calibrate`)."""
        self._check_the_user_branch_trains()
        config = self.model.config
        if config.user_logit_temperature is not None:
            logger.warning(f"dropping the user branch's calibration temperature {config.user_logit_temperature}: "
                           "it does not hold for the trained weights (run `evaluate --calibrate` after training)")
            config.user_logit_temperature = None
        return super().train(*args, **kwargs)

    def _check_the_user_branch_trains(self) -> None:
        if self.train_dataset is None or self.model.config.predict_user_audio is False:
            return
        a = self.args
        per_step = a.train_batch_size * max(a.world_size, 1)
        steps_per_epoch = max(math.ceil(len(self.train_dataset) / per_step) // max(a.gradient_accumulation_steps, 1),
                              1)
        total = a.max_steps if a.max_steps > 0 else math.ceil(a.num_train_epochs * steps_per_epoch)
        curriculum = self.curriculum
        # Where the last step of the run starts, in the curriculum's unit.
        last = (total - 1) if curriculum.unit == "step" else (total - 1) / steps_per_epoch
        if any(weight > 0 and start <= last + 1e-6 for start, weight in curriculum.stages):
            return
        problem = (f"the user-loss weight is 0 for all {total} steps of this run (user_loss_stages "
                   f"{a.user_loss_stages!r} in {curriculum.unit}s, {steps_per_epoch} steps per epoch)")
        if self._user_branch_only:
            raise ValueError(f"{problem} and only the user branch is trainable (training_mode='user_branch'): nothing "
                             "would train. Give the user loss a weight from the start (e.g. --user_loss_stages 0:0.1) "
                             "or train for longer")
        logger.warning(f"{problem}: the user branch will not train in this run")

    # ------------------------------------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, MoshiUserPredOutput]:
        codes = inputs["codes"]
        weight = self.curriculum.weight
        # A zero-weight user loss trains nothing: in training the user branch is then not run at all (evaluation
        # still measures it).
        outputs = model(codes=codes, return_loss=True, user_loss_weight=weight,
                        predict_user=not (model.training and weight == 0), user_activity=inputs.get("user_activity"),
                        prompt_frames=inputs.get("prompt_frames"))
        self._record("train" if model.training else "eval", outputs, codes)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    @torch.no_grad()
    def _record(self, split: str, outputs: MoshiUserPredOutput, codes: torch.Tensor) -> None:
        stats = torch.zeros(len(_STATS), device=codes.device)
        stats[0] = 1
        stats[1] = outputs.text_loss
        stats[2] = outputs.audio_loss
        if outputs.user_logits is not None:
            stats[3] = outputs.user_loss
            mask = outputs.user_mask
            correct = (outputs.user_logits.argmax(-1) == codes[:, self._user_rows]) & mask
            delay0 = self._delay0.to(codes.device)[None, :, None]
            stats[4:8] = torch.stack([correct.sum(), mask.sum(), (correct & delay0).sum(), (mask & delay0).sum()])
            stats[8] = 1
        if outputs.voice_activity_loss is not None:
            stats[9], stats[10] = outputs.voice_activity_loss, 1
        previous = self._stats[split]
        self._stats[split] = stats if previous is None else previous + stats

    def _summarise(self, split: str) -> dict[str, float]:
        """Means of the recorded stats since the last summary, summed over processes; resets them."""
        stats = self._stats[split]
        self._stats[split] = None
        if stats is None:
            return {}
        stats = dict(zip(_STATS, self.accelerator.reduce(stats, reduction="sum").tolist()))
        batches = max(stats["batches"], 1)
        summary = {"loss/text": stats["text"] / batches, "loss/audio": stats["audio"] / batches}
        if self._user_rows.stop > self._user_rows.start:
            summary["user_weight"] = self.curriculum.weight
        if stats["user_batches"]:  # the user branch ran (it does not while its training weight is 0)
            summary["loss/user"] = stats["user"] / stats["user_batches"]
            summary["user_accuracy"] = stats["user_correct"] / max(stats["user_count"], 1)
            if stats["delay0_count"]:
                summary["user_delay0_accuracy"] = stats["delay0_correct"] / stats["delay0_count"]
        if stats["voice_activity_batches"]:
            summary["loss/voice_activity"] = stats["voice_activity"] / stats["voice_activity_batches"]
        return summary

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the loss parts since the last one
            logs.update(self._summarise("train"))
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------- evaluation
    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None) -> DataLoader:
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is None:
            eval_dataset = self.eval_dataset
        if eval_dataset is None:
            raise ValueError("evaluation needs an eval_dataset")
        if not isinstance(eval_dataset, DialogueSegments):
            # Segments no longer than the collator's never take a random offset: evaluation is deterministic.
            eval_dataset = DialogueSegments(eval_dataset, self.args.segment_frames)
        return super().get_eval_dataloader(eval_dataset)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        # Logits of every stream over a whole eval set would be gathered to the host; the metrics are kept as
        # running sums by compute_loss instead.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader: DataLoader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        self._stats["eval"] = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._summarise("eval").items()})
        return output


__all__ = [
    "MoshiUserPredTrainer",
    "MoshiUserPredTrainingArguments",
    "UserLossCurriculum",
    "default_stages",
    "parse_stages",
    "trains_only_the_user_branch",
]
