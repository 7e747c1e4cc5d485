"""The training console: one bar with the key figures in its postfix, no printed log dicts, every dict in
`training_log.jsonl`."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_model
from hf_moshi_userpred.training.progress import TRAINING_LOG_NAME, TrainingLog, TrainingProgress
from hf_moshi_userpred.training.trainer import MoshiUserPredTrainer, MoshiUserPredTrainingArguments

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(tmp_path, disable_tqdm: bool) -> MoshiUserPredTrainer:
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        codes = torch.randint(0, 16, (5, 40), generator=generator)
        codes[0] = torch.randint(0, 30, (40,), generator=generator)
        data.append({"codes": codes})
    model = tiny_model(dim=32, text_card=30, card=16, n_q=4, dep_q=2, user_dep_q=2, num_heads=2, num_layers=1,
                       context=32, delays=[0, 0, 1, 0, 1])
    args = MoshiUserPredTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2, logging_steps=1,
        eval_strategy="steps", eval_steps=2, segment_frames=16, report_to="none", use_cpu=True, save_strategy="no",
        seed=0, disable_tqdm=disable_tqdm, user_loss_stages="0:1.0", user_loss_stage_unit="step")
    return MoshiUserPredTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:2])


def test_the_bar_carries_the_figures_and_the_dicts_go_to_the_log_file(tmp_path, capsys):
    trainer = _trainer(tmp_path, disable_tqdm=False)
    callbacks = trainer.callback_handler.callbacks
    assert sum(isinstance(c, TrainingProgress) for c in callbacks) == 1
    assert sum(isinstance(c, TrainingLog) for c in callbacks) == 1
    trainer.train()
    captured = capsys.readouterr()
    assert "{'loss'" not in captured.out + captured.err  # transformers' ProgressCallback prints these
    last_bar = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert "4/4" in last_bar and "loss=" in last_bar and "user=" in last_bar and "eval=" in last_bar, last_bar
    assert last_bar.startswith("run:")
    lines = [json.loads(line) for line in (tmp_path / "run" / TRAINING_LOG_NAME).read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]
    assert [line["step"] for line in lines if "eval_loss" in line] == [2, 4]
    history = [{k: v for k, v in entry.items() if k != "step"} for entry in trainer.state.log_history]
    assert [{k: v for k, v in line.items() if k != "step"} for line in lines] == history


def test_without_a_bar_the_log_file_is_still_written_and_evaluate_alone_writes_none(tmp_path):
    trainer = _trainer(tmp_path, disable_tqdm=True)
    assert not any(isinstance(c, TrainingProgress) for c in trainer.callback_handler.callbacks)
    trainer.evaluate()
    assert not (tmp_path / "run" / TRAINING_LOG_NAME).exists()
    trainer.train()
    assert len((tmp_path / "run" / TRAINING_LOG_NAME).read_text().splitlines()) == len(trainer.state.log_history)
