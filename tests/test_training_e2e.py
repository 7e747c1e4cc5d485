"""End to end on the shipped dialogue sample: encode, learn (the learning bar), the entry point, two processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.encoding import EncodedDialogues, encode_dataset
from hf_moshi_userpred.evaluation.user_prediction import evaluate_user_prediction
from hf_moshi_userpred.sample import SAMPLE_DIR as SAMPLE
from hf_moshi_userpred.sample import SAMPLE_NUM_CODEBOOKS as NUM_CODEBOOKS
from hf_moshi_userpred.sample import sample_model_config as sample_config
from hf_moshi_userpred.sample import sample_training_arguments
from hf_moshi_userpred.training.train import main as train_main
from hf_moshi_userpred.training.trainer import MoshiUserPredTrainer

pytestmark = pytest.mark.slow  # subprocesses / end-to-end runs

REPO = SAMPLE.parent.parent


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, Path]:
    """The shipped sample encoded with its small Mimi and tokenizer, train and eval split."""
    root = tmp_path_factory.mktemp("encoded")
    for split in ("train", "eval"):
        summary = encode_dataset(SAMPLE / f"{split}.jsonl", root / split, mimi=SAMPLE / "mimi",
                                 tokenizer=SAMPLE / "tokenizer.model", num_codebooks=NUM_CODEBOOKS, progress=False)
        assert not summary.failed and summary.encoded
    return {"train": root / "train", "eval": root / "eval"}


def test_the_shipped_sample_encodes_completely(encoded):
    train, held_out = EncodedDialogues(encoded["train"]), EncodedDialogues(encoded["eval"])
    assert (len(train), len(held_out)) == (23, 5)
    assert not set(train._names) & set(held_out._names)
    for dataset in (train, held_out):
        for i in range(len(dataset)):
            codes = dataset[i]["codes"]
            assert codes.shape[0] == 1 + 2 * NUM_CODEBOOKS
            words = (codes[0] != 3) & (codes[0] != 0)  # neither padding nor end of padding
            assert words.sum() > 5  # the system's words are on the text row
            assert codes[1:].min() >= 0 and codes[1:].max() < 64


def test_learning_bar_beats_both_baselines_on_held_out_delay0(encoded, tmp_path):
    """A tiny model trained for about a minute on 2 CPU threads forecasts the held-out user's next semantic token
    better than repeating the last frame and better than the most frequent token (counted on the training set)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = MoshiUserPredForConditionalGeneration(sample_config())
        train, held_out = EncodedDialogues(encoded["train"]), EncodedDialogues(encoded["eval"])
        args = sample_training_arguments(tmp_path / "out", steps=900, seed=0, progress=False)  # the demo's recipe
        MoshiUserPredTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out).train()
        report = evaluate_user_prediction(model, held_out, reference=train)
    finally:
        torch.set_num_threads(threads)
    print("\n" + report.to_markdown())
    accuracy = report.model.delay0_accuracy
    assert accuracy > report.repeat_last.delay0_accuracy + 0.02, report.to_markdown()
    assert accuracy > report.unigram.delay0_accuracy + 0.02, report.to_markdown()


def _save_tiny_model(path: Path) -> None:
    torch.manual_seed(0)
    MoshiUserPredForConditionalGeneration(sample_config(dim=32, num_layers=1)).save_pretrained(path)


def test_entry_point_from_a_yaml_config(encoded, tmp_path, capsys):
    _save_tiny_model(tmp_path / "model")
    shutil.copy(SAMPLE / "tokenizer.model", tmp_path / "model" / "tokenizer.model")
    shutil.copytree(SAMPLE / "mimi", tmp_path / "model" / "mimi")
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model_name_or_path: {tmp_path / 'model'}\ntrain_data: {encoded['train']}\neval_data: {encoded['eval']}\n"
        f"output_dir: {tmp_path / 'out'}\nmax_steps: 2\nsegment_frames: 32\nper_device_train_batch_size: 2\n"
        "use_cpu: true\nreport_to: none\nuser_loss_stages: '0:0.1'\ndisable_tqdm: true\n"
    )
    assert train_main([str(config)]) == 0
    assert "[rank 0] finished: 2 steps" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert 0 <= metrics["eval_user_delay0_accuracy"] <= 1 and metrics["eval_loss"] > 0
    reloaded = MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_codebooks == 1 + 2 * NUM_CODEBOOKS
    # the trained folder carries the base model's tokenizer and Mimi: it streams and serves as it is
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (SAMPLE / "tokenizer.model").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out" / "mimi").iterdir()) == sorted(
        p.name for p in (SAMPLE / "mimi").iterdir())
    # ... and runs as it is: `stream` finds them without flags
    from hf_moshi_userpred.cli.main import main

    assert main(["stream", str(tmp_path / "out"), str(SAMPLE / "dialogues" / "023.flac"), "--out",
                 str(tmp_path / "stream"), "--max-frames", "5", "--channel", "1", "--quiet"]) == 0
    assert (tmp_path / "stream" / "system.wav").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train_data", "nowhere"], "no encoded dialogues in nowhere"),
        (["--training_mode", "half"], "training_mode 'half' must be one of"),
        (["--user_loss_stages", "1:0.1"], "the first stage must start at 0"),
    ],
)
def test_entry_point_errors_are_one_line_with_exit_code_2(encoded, tmp_path, capsys, flags, message):
    _save_tiny_model(tmp_path / "model")
    base = {"--model_name_or_path": str(tmp_path / "model"), "--train_data": str(encoded["train"]),
            "--output_dir": str(tmp_path / "out"), "--use_cpu": "true"}
    base.update(dict(zip(flags[::2], flags[1::2])))
    capsys.readouterr()
    assert train_main([x for pair in base.items() for x in pair]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("hf_moshi_userpred.training.train: error:")


def test_accelerate_launch_two_processes(encoded, tmp_path):
    """`accelerate launch -m hf_moshi_userpred train` with 2 processes on CPU (gloo): both ranks train, the saved
    model loads."""
    _save_tiny_model(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "hf_moshi_userpred", "train", "--model_name_or_path", str(tmp_path / "model"),
        "--train_data", str(encoded["train"]), "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
        "--segment_frames", "32", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none",
        "--disable_tqdm", "true", "--save_strategy", "no",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"[rank {rank}] finished: 3 steps" in result.stdout, result.stdout[-3000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    model = MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path / "out")
    codes = EncodedDialogues(encoded["eval"])[0]["codes"][None, :, :32]
    with torch.no_grad():
        assert torch.isfinite(model(codes, return_loss=True).loss)
