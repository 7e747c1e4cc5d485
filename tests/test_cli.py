"""The `hf-moshi-userpred` command line: the demo end to end, then every command on its outputs, help and errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch

from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.audio import load_stereo
from hf_moshi_userpred.cli.main import build_parser, main
from hf_moshi_userpred.models.modeling_moshi_codes import check_codes
from hf_moshi_userpred.sample import SAMPLE_DIR

pytestmark = pytest.mark.slow  # subprocesses / end-to-end runs

REPO = SAMPLE_DIR.parent.parent
DEMO_STEPS = 30


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """`hf-moshi-userpred demo` with a short training run (the default is 900 steps), given a relative `--out` like
    the default's."""
    root = tmp_path_factory.mktemp("run")
    torch.set_num_threads(2)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["demo", "--out", "demo", "--steps", str(DEMO_STEPS), "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    return root / "demo"


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"hf-moshi-userpred {command}: error: "), err[0]
    return err[0]


def test_demo_runs_the_whole_pipeline_and_writes_its_report(demo, capsys):
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["training_steps"] == DEMO_STEPS
    assert summary["tokens_identical_to_plain_streaming"] is True
    assert summary["trust_remote_code_reload_identical"] is True
    assert 0 <= summary["speculation_hit_rate"] <= 1 and summary["stream_frames"] > 50
    for key in ("held_out_delay0_accuracy", "repeat_last_delay0_accuracy", "unigram_delay0_accuracy"):
        assert 0 < summary[key] < 1
    report = (demo / "report.md").read_text()
    images = re.findall(r"!\[[^]]*\]\((plots/[^)]+\.png)\)", report)
    assert sorted(Path(image).stem for image in images) == [
        "dialogue_behaviour_timeline", "loss_curves", "per_codebook_accuracy", "reliability", "speculation",
        "turn_taking_roc", "turn_taking_timeline"]
    assert "| vap_head |" in report and 0 <= summary["turn_signal_frame_auc"] <= 1
    for image in images:
        assert (demo / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model_dir = demo / "model"
    for name in ("config.json", "model.safetensors", "README.md", "tokenizer.model", "mimi/model.safetensors",
                 "training_config.json", "user_prediction_metrics.json", "modeling_moshi_userpred.py",
                 "modeling_moshi_voice_activity.py"):
        assert (model_dir / name).is_file(), name
    for name in ("system.wav", "dialogue.wav", "text.txt", "frames.jsonl", "summary.json"):
        assert (demo / "stream" / name).is_file(), name


def test_evaluate_command_reproduces_the_demo_metrics(demo, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", str(demo / "model"), str(demo / "encoded" / "eval"), "--reference",
                 str(demo / "encoded" / "train"), "--out", str(out)]) == 0
    record = json.loads((out / "user_prediction_metrics.json").read_text())
    summary = json.loads((demo / "summary.json").read_text())
    assert record["metrics"]["user/delay0_accuracy"] == pytest.approx(summary["held_out_delay0_accuracy"], abs=1e-6)
    assert (out / "plots" / "reliability.png").is_file()
    assert "| delay-0 accuracy (forecast) |" in capsys.readouterr().out


def test_stream_command_on_a_mono_recording_at_another_rate(demo, tmp_path):
    dialogue = sorted((SAMPLE_DIR / "dialogues").glob("*.flac"))[-1]
    user = load_stereo(dialogue, 8000)[1, : 8000 * 3]
    soundfile.write(tmp_path / "user.wav", user.numpy(), 8000)
    out = tmp_path / "stream"
    assert main(["stream", str(demo / "model"), str(tmp_path / "user.wav"), "--out", str(out), "--greedy",
                 "--max-frames", "20", "--quiet"]) == 0
    frames = (out / "frames.jsonl").read_text().splitlines()
    assert len(frames) == 20
    assert {json.loads(line)["speculative"] for line in frames} <= {"hit", "miss", "not_tried"}
    audio, rate = soundfile.read(out / "dialogue.wav")
    assert audio.ndim == 2 and audio.shape[1] == 2 and rate == 24000


def test_convert_to_moshi_and_back_keeps_the_shared_logits(demo, tmp_path, capsys):
    kyutai = tmp_path / "kyutai"
    assert main(["convert", str(demo / "model"), str(kyutai), "--to-moshi", "--quiet"]) == 0
    assert main(["convert", str(kyutai), str(tmp_path / "hf"), "--user-init", "random", "--quiet"]) == 0
    original = MoshiUserPredForConditionalGeneration.from_pretrained(demo / "model").eval()
    converted = MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    window = check_codes(_eval_window(demo), original.config)
    with torch.no_grad():
        a, b = original(window), converted(window)
    for name in ("text_logits", "audio_logits"):
        assert torch.equal(getattr(a, name).nan_to_num(), getattr(b, name).nan_to_num()), name


def _eval_window(demo: Path) -> torch.Tensor:
    from hf_moshi_userpred.data.encoding import EncodedDialogues

    return EncodedDialogues(demo / "encoded" / "eval")[0]["codes"][None, :, :50]


def test_push_command_uploads_to_a_stand_in_hub(demo, tmp_path, monkeypatch, capsys):
    import hf_moshi_userpred.hub.push as hub
    from helpers import LocalHub

    monkeypatch.setattr(hub, "HfApi", lambda *args, **kwargs: LocalHub(tmp_path / "hub"))
    assert main(["push", str(demo / "model"), "you/moshi-userpred-demo", "--dataset", "espeak-dialogues",
                 "--token", "hf_stand_in"]) == 0
    repo = tmp_path / "hub" / "you" / "moshi-userpred-demo"
    uploaded = sorted(str(path.relative_to(repo)) for path in repo.rglob("*") if path.is_file())
    assert "README.md" in uploaded and "model.safetensors" in uploaded and "mimi/model.safetensors" in uploaded
    assert not any(name.endswith((".bin", ".pt")) for name in uploaded)
    card = (repo / "README.md").read_text()
    assert "espeak-dialogues" in card and "delay-0" in card
    assert "pushed" in capsys.readouterr().out


def test_every_command_documents_every_option():
    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    assert set(commands) == {"demo", "convert", "encode", "train", "evaluate", "stream", "serve", "push",
                             "synthesize"}
    for name, sub in commands.items():
        if name == "train":
            continue
        text = sub.format_help()
        for action in sub._actions:
            for option in action.option_strings:
                assert option in text, (name, option)
            assert action.help, (name, action.dest)


def test_train_help_lists_the_trainer_fields(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--train_data", "--training_mode", "--user_loss_stages", "--learning_rate"):
        assert flag in out


@pytest.mark.parametrize(
    "argv, command, message",
    [
        (["stream", "no/such/model", "user.wav"], "stream", "'no/such/model' does not exist"),
        (["evaluate", "{model}", "no/such/data"], "evaluate", "no encoded dialogues in no/such/data"),
        (["demo", "--steps", "0", "--out", "{tmp}"], "demo", "steps must be at least 1, got 0"),
        (["push", "{model}", "not a repo id"], "push", "not a repo id"),
        (["convert", "no/such/checkpoint", "{tmp}/out"], "convert", "no/such/checkpoint"),
        (["stream", "{model}", "{tmp}/missing.wav"], "stream", "missing.wav"),
        (["encode", "{tmp}/missing.jsonl", "{tmp}/out", "--mimi", str(SAMPLE_DIR / "mimi"), "--tokenizer",
          str(SAMPLE_DIR / "tokenizer.model"), "--num-codebooks", "4"], "encode", "missing.jsonl"),
    ],
)
def test_user_mistakes_are_one_line_with_exit_code_2(demo, tmp_path, capsys, argv, command, message):
    argv = [arg.format(model=demo / "model", tmp=tmp_path) for arg in argv]
    capsys.readouterr()
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in _one_error_line(capsys, command)


@pytest.mark.parametrize("argv, command", [(["frobnicate"], ""), (["stream"], "stream"),
                                           (["convert", "a", "b", "--user-init", "zeros"], "convert"),
                                           (["train", "--bogus_flag", "1"], "train")])
def test_argument_mistakes_are_one_line_with_exit_code_2(capsys, argv, command):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], err


def test_console_script_and_module_entry_point():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[project.scripts]\nhf-moshi-userpred = "hf_moshi_userpred.cli.main:main"' in pyproject
    result = subprocess.run([sys.executable, "-m", "hf_moshi_userpred", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0 and "convert" in result.stdout and "stream" in result.stdout
