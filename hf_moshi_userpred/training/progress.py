"""What a training run shows and keeps: one progress bar with the key figures, and every log dict in a file.

Transformers' `ProgressCallback` prints each log dict (a dozen losses and accuracies) between its bars every
`logging_steps`, and opens a second bar for every evaluation: a newcomer sees a wall of dicts. [`TrainingProgress`]
keeps one bar per run with the latest loss, user loss, held-out loss and user-loss weight in its postfix;
[`TrainingLog`] appends each dict, with its step, to `output_dir/training_log.jsonl`, where the figures are read
back (e.g. `pandas.read_json(path, lines=True)`).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.trainer_callback import ProgressCallback, TrainerCallback

TRAINING_LOG_NAME = "training_log.jsonl"
# log key -> its name in the bar's postfix: what says whether a run is going well
POSTFIX_KEYS = {"loss": "loss", "loss/user": "user", "eval_loss": "eval", "user_weight": "user weight"}


class TrainingProgress(ProgressCallback):
    """`ProgressCallback` without the printed dicts and the evaluation bar: the figures of [`POSTFIX_KEYS`] go to the
    training bar's postfix as they are logged."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(Path(args.output_dir).name)  # which run, when one follows another
        self.postfix: dict[str, str] = {}

    def on_prediction_step(self, args, state, control, **kwargs):
        pass  # an evaluation takes seconds here: a second bar would only push the first one up the screen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None:
            return
        self.postfix.update({name: f"{logs[key]:.3g}" for key, name in POSTFIX_KEYS.items()
                             if isinstance(logs.get(key), (int, float))})
        self.training_bar.set_postfix(self.postfix, refresh=False)


class TrainingLog(TrainerCallback):
    """Appends every log dict of a `train()` run, as `{"step": global_step, **logs}`, to
    `output_dir/training_log.jsonl` (one JSON line each, the file started afresh by each run; a lone `evaluate()`
    writes nothing)."""

    path: Path | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path = Path(args.output_dir) / TRAINING_LOG_NAME
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.path is not None and logs:
            with self.path.open("a", encoding="utf-8") as log:
                log.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        self.path = None


__all__ = ["POSTFIX_KEYS", "TRAINING_LOG_NAME", "TrainingLog", "TrainingProgress"]
