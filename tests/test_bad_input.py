"""Every subcommand fed bad input: one stderr line naming the problem, exit code 2, nothing that existed changed.

The CLI runs in-process (`cli.main([...])`) on a tiny model of the sample's shapes, its kyutai export, a few
encoded shards and a user recording; each case lists the argv and a fragment the error line must contain.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import soundfile
import torch
from safetensors.torch import save_file

from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.cli.main import main
from hf_moshi_userpred.sample import SAMPLE_DIR, SAMPLE_MIMI, SAMPLE_TOKENIZER, sample_model_config

PROG = "hf-moshi-userpred"
PROGRESS_BAR = re.compile(r"\d+%\|")  # tqdm's loading bars share stderr with the error line


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder of good and bad inputs: `model/` (with mimi/ and tokenizer.model), `kyutai/` (its export), bad
    copies of the model, `encoded/` (two shards), `user.wav`, a manifest, training configs."""
    root = tmp_path_factory.mktemp("world")
    torch.manual_seed(0)
    model = MoshiUserPredForConditionalGeneration(sample_model_config(dim=32, num_layers=1)).eval()
    model.save_pretrained(root / "model")
    shutil.copyfile(SAMPLE_TOKENIZER, root / "model" / "tokenizer.model")
    shutil.copytree(SAMPLE_MIMI, root / "model" / "mimi")
    assert main(["convert", str(root / "model"), str(root / "kyutai"), "--to-moshi", "--quiet"]) == 0

    shutil.copytree(root / "model", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "model", root / "reshaped")  # config.json edited: dim 32 -> 48
    config = json.loads((root / "reshaped" / "config.json").read_text())
    (root / "reshaped" / "config.json").write_text(json.dumps({**config, "dim": 48}))
    shutil.copytree(root / "model", root / "mistyped")  # config.json edited by hand: dim "32"
    (root / "mistyped" / "config.json").write_text(json.dumps({**config, "dim": "32"}))
    shutil.copytree(root / "kyutai", root / "kyutai_renamed")  # kyutai weights under our config.json
    shutil.copyfile(root / "model" / "config.json", root / "kyutai_renamed" / "config.json")
    (root / "weights_only").mkdir()
    shutil.copyfile(root / "kyutai" / "model.safetensors", root / "weights_only" / "model.safetensors")
    (root / "not_json").mkdir()
    (root / "not_json" / "config.json").write_text("{not json")
    (root / "not_json" / "model.safetensors").write_bytes(b"")
    (root / "empty").mkdir()

    encoded = root / "encoded" / "codes"
    encoded.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards = []
    for i in range(2):
        codes = torch.randint(0, 64, (9, 40), generator=generator, dtype=torch.int32)
        codes[0] = torch.randint(0, 200, (40,), generator=generator, dtype=torch.int32)
        save_file({"codes": codes}, encoded / f"d{i}.safetensors", metadata={"source": f"d{i}.wav"})
        shards.append({"source": f"d{i}.wav", "file": f"codes/d{i}.safetensors", "num_frames": 40})
    (root / "encoded" / "index.json").write_text(json.dumps({"shards": shards}))
    (root / "no_shards").mkdir()
    (root / "no_shards" / "index.json").write_text(json.dumps({"num_codebooks": 4}))
    (root / "bad_index").mkdir()
    (root / "bad_index" / "index.json").write_text("[1, 2")
    (root / "bad_shard" / "codes").mkdir(parents=True)
    (root / "bad_shard" / "codes" / "x.safetensors").write_bytes(b"garbage")

    soundfile.write(root / "user.wav", 0.1 * torch.randn(24000).numpy(), 24000)
    (root / "empty.wav").write_bytes(b"")
    (root / "text.wav").write_text("not audio")
    (root / "a_file").write_text("I am a file\n")
    shutil.copyfile(SAMPLE_DIR / "eval.jsonl", root / "eval.jsonl")
    (root / "bad.yaml").write_text("model_name_or_path: [unclosed\n  output_dir: x\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "unknown.yaml").write_text(f"model_name_or_path: {root / 'model'}\ntrain_data: {root / 'encoded'}\n"
                                       "output_dir: out\nlearnign_rate: 1e-3\n")
    (root / "missing_field.yaml").write_text("output_dir: out\n")
    (root / "mistyped.yaml").write_text(f"model_name_or_path: {root / 'model'}\ntrain_data: {root / 'encoded'}\n"
                                        "output_dir: out\nmax_steps: ten\n")
    for name, codes in (("encoded_1d", torch.zeros(40, dtype=torch.int32)), ("encoded_float", 60 * torch.rand(9, 40)),
                        ("encoded_5_rows", torch.zeros(5, 40, dtype=torch.int32))):  # shards `encode` never writes
        (root / name / "codes").mkdir(parents=True)
        save_file({"codes": codes}, root / name / "codes" / "d0.safetensors", metadata={"source": "d0.wav"})
    (root / "sample.jsonl").write_text(json.dumps({"path": str(SAMPLE_DIR / "dialogues" / "023.flac")}) + "\n")
    for name, value, start in (("nan", float("nan"), 24000), ("inf", float("inf"), 12000)):
        audio = 0.1 * torch.randn(48000).numpy()
        audio[start : start + 144] = value  # 6 ms from 1 s / 0.5 s on
        soundfile.write(root / f"{name}.wav", audio, 24000, subtype="FLOAT")
    return root


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under `root`: its type, size, mode and modification time."""
    snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            snapshot[str(path.relative_to(root))] = (stat.st_mode, stat.st_size, stat.st_mtime_ns)
    return snapshot


def _read_only_dir(tmp_path: Path) -> str:
    """A directory nothing can be created in: a 0555 folder, or for root (who ignores modes) a path under /sys."""
    if os.geteuid() == 0:
        return "/sys/hf_moshi_userpred_test_output"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return str(locked / "out")


W, T = "{world}", "{tmp}"  # placeholders: the shared input folder, a fresh temporary folder per case
MODEL, KYUTAI, ENCODED = f"{W}/model", f"{W}/kyutai", f"{W}/encoded"
ENCODE = ["--mimi", f"{W}/model/mimi", "--tokenizer", f"{W}/model/tokenizer.model", "--num-codebooks", "4"]
TRAIN = ["--train_data", ENCODED, "--max_steps", "1", "--report_to", "none", "--use_cpu", "true"]

CASES = {
    # --- convert
    "convert: missing source": (["convert", f"{W}/nope", f"{T}/out"], "nope"),
    "convert: source is a file": (["convert", f"{W}/a_file", f"{T}/out"], "a_file"),
    "convert: empty source": (["convert", f"{W}/empty", f"{T}/out"], "empty"),
    "convert: model dir as kyutai source": (["convert", MODEL, f"{T}/out"], "model"),
    "convert: existing output": (["convert", KYUTAI, f"{W}/encoded"], "not empty"),
    "convert: output is a file": (["convert", KYUTAI, f"{W}/a_file"], "not a directory"),
    "convert: read-only output": (["convert", KYUTAI, "{readonly}"], "hf_moshi_userpred_test_output|out"),
    "convert: bogus quantize": (["convert", MODEL, f"{T}/out", "--quantize", "bogus"], "bogus"),
    "convert: quantize with --to-moshi": (["convert", MODEL, f"{T}/out", "--quantize", "int8", "--to-moshi"],
                                          "--to-moshi"),
    "convert: int4 of a model it cannot group": (["convert", MODEL, f"{T}/out", "--quantize", "int4"], "int4"),
    "convert: quantize on a missing GPU": (["convert", MODEL, f"{T}/out", "--quantize", "int4", "--device", "cuda"],
                                           "cuda"),
    "convert --to-moshi: truncated weights": (["convert", f"{W}/truncated", f"{T}/out", "--to-moshi"],
                                              "truncated or corrupt"),
    "convert --to-moshi: kyutai source": (["convert", KYUTAI, f"{T}/out", "--to-moshi"], "kyutai"),
    "convert --to-moshi: existing output": (["convert", MODEL, f"{W}/encoded", "--to-moshi"], "not empty"),
    # --- encode
    "encode: missing manifest": (["encode", f"{W}/nope.jsonl", f"{T}/out", *ENCODE], "nope.jsonl"),
    "encode: manifest is a folder": (["encode", f"{W}/empty", f"{T}/out", *ENCODE], "empty"),
    "encode: mimi is our model": (["encode", f"{W}/eval.jsonl", f"{T}/out", "--mimi", MODEL, "--tokenizer",
                                   f"{W}/model/tokenizer.model", "--num-codebooks", "4"], "not a Mimi codec"),
    "encode: mimi is a kyutai dir": (["encode", f"{W}/eval.jsonl", f"{T}/out", "--mimi", KYUTAI, "--tokenizer",
                                      f"{W}/model/tokenizer.model", "--num-codebooks", "4"], "kyutai"),
    "encode: mimi missing": (["encode", f"{W}/eval.jsonl", f"{T}/out", "--mimi", f"{W}/nope", "--tokenizer",
                              f"{W}/model/tokenizer.model", "--num-codebooks", "4"], "does not exist"),
    "encode: tokenizer not sentencepiece": (["encode", f"{W}/eval.jsonl", f"{T}/out", "--mimi", f"{W}/model/mimi",
                                             "--tokenizer", f"{W}/a_file", "--num-codebooks", "4"], "a_file"),
    "encode: output is a file": (["encode", f"{W}/eval.jsonl", f"{W}/a_file", *ENCODE], "a_file"),
    "encode: bad device": (["encode", f"{W}/eval.jsonl", f"{T}/out", *ENCODE, "--device", "cdua"], "cdua"),
    "encode: wrong type": (["encode", f"{W}/eval.jsonl", f"{T}/out", *ENCODE[:4], "--num-codebooks", "four"],
                           "four"),
    "encode: mistyped --main-speaker": (["encode", f"{W}/sample.jsonl", f"{T}/out", *ENCODE, "--main-speaker",
                                         "SPEAKER_MIAN"], "'SPEAKER_MIAN' (--main-speaker); its speakers are "
                                                          "SPEAKER_MAIN, SPEAKER_USER"),
    # --- evaluate
    "evaluate: --calibrate with a bad --threshold": (["evaluate", MODEL, ENCODED, "--out", f"{T}/out", "--calibrate",
                                                      "--turn-taking", "--threshold", "2"], "--threshold"),
    "evaluate: --calibrate, turn taking without statistics": (["evaluate", MODEL, ENCODED, "--out", f"{T}/out",
                                                               "--calibrate", "--turn-taking", "--no-plots"],
                                                              "--reference"),
    "evaluate: zero batch size": (["evaluate", MODEL, ENCODED, "--out", f"{T}/out", "--batch-size", "0"],
                                  "--batch-size"),
    "evaluate: zero horizon": (["evaluate", MODEL, ENCODED, "--out", f"{T}/out", "--turn-taking", "--horizon", "0"],
                               "--horizon"),
    "evaluate: missing model": (["evaluate", f"{W}/nope", ENCODED, "--out", f"{T}/out"], "nope"),
    "evaluate: kyutai model": (["evaluate", KYUTAI, ENCODED, "--out", f"{T}/out"], "convert"),
    "evaluate: mimi as model": (["evaluate", f"{W}/model/mimi", ENCODED, "--out", f"{T}/out"], "Mimi"),
    "evaluate: weights without config": (["evaluate", f"{W}/weights_only", ENCODED, "--out", f"{T}/out"],
                                         "no config.json"),
    "evaluate: config not json": (["evaluate", f"{W}/not_json", ENCODED, "--out", f"{T}/out"], "JSON"),
    "evaluate: truncated weights": (["evaluate", f"{W}/truncated", ENCODED, "--out", f"{T}/out"],
                                    "truncated or corrupt"),
    "evaluate: shapes differ from config": (["evaluate", f"{W}/reshaped", ENCODED, "--out", f"{T}/out"],
                                            "mismatched"),
    "evaluate: a config value of the wrong type": (["evaluate", f"{W}/mistyped", ENCODED, "--out", f"{T}/out"],
                                                   "dim='32': must be int"),
    "evaluate: kyutai weights renamed": (["evaluate", f"{W}/kyutai_renamed", ENCODED, "--out", f"{T}/out"],
                                         "kyutai layout"),
    "evaluate: index without shards": (["evaluate", MODEL, f"{W}/no_shards", "--out", f"{T}/out"], "index.json"),
    "evaluate: index not json": (["evaluate", MODEL, f"{W}/bad_index", "--out", f"{T}/out"], "index.json"),
    "evaluate: corrupt shard": (["evaluate", MODEL, f"{W}/bad_shard", "--out", f"{T}/out"], "x.safetensors"),
    "evaluate: data missing": (["evaluate", MODEL, f"{W}/nope", "--out", f"{T}/out"], "nope"),
    "evaluate: data is a file": (["evaluate", MODEL, f"{W}/a_file", "--out", f"{T}/out"], "a_file"),
    "evaluate: cuda on cpu torch": (["evaluate", MODEL, ENCODED, "--out", f"{T}/out", "--device", "cuda"], "cuda"),
    "evaluate: misspelled device": (["evaluate", MODEL, ENCODED, "--out", f"{T}/out", "--device", "cpux"], "cpux"),
    "evaluate: out is a file": (["evaluate", MODEL, ENCODED, "--out", f"{W}/a_file", "--no-plots"], "a_file"),
    "evaluate: read-only out": (["evaluate", MODEL, ENCODED, "--out", "{readonly}", "--no-plots"],
                                "hf_moshi_userpred_test_output|out"),
    # --- evaluate: shard contents
    "evaluate: 1-D codes": (["evaluate", MODEL, f"{W}/encoded_1d", "--out", f"{T}/out"], "shape [40]"),
    "evaluate: float codes": (["evaluate", MODEL, f"{W}/encoded_float", "--out", f"{T}/out"], "dtype F32"),
    # --- stream
    "stream: missing audio": (["stream", MODEL, f"{W}/nope.wav", "--out", f"{T}/out"], "nope.wav"),
    "stream: empty audio": (["stream", MODEL, f"{W}/empty.wav", "--out", f"{T}/out"], "empty.wav"),
    "stream: text as audio": (["stream", MODEL, f"{W}/text.wav", "--out", f"{T}/out"], "text.wav"),
    "stream: kyutai model": (["stream", KYUTAI, f"{W}/user.wav", "--out", f"{T}/out"], "convert"),
    "stream: truncated weights": (["stream", f"{W}/truncated", f"{W}/user.wav", "--out", f"{T}/out"],
                                  "truncated or corrupt"),
    "stream: mimi is the model": (["stream", MODEL, f"{W}/user.wav", "--out", f"{T}/out", "--mimi", MODEL],
                                  "not a Mimi codec"),
    "stream: cuda on cpu torch": (["stream", MODEL, f"{W}/user.wav", "--out", f"{T}/out", "--device", "cuda"],
                                  "cuda"),
    "stream: out is a file": (["stream", MODEL, f"{W}/user.wav", "--out", f"{W}/a_file", "--max-frames", "3"],
                              "a_file"),
    "stream: NaN in the audio": (["stream", MODEL, f"{W}/nan.wav", "--out", f"{T}/out"], "(NaN) at 1.000 s"),
    "stream: infinity in the audio": (["stream", MODEL, f"{W}/inf.wav", "--out", f"{T}/out"], "(+inf) at 0.500 s"),
    "stream: folder as audio": (["stream", MODEL, f"{W}/empty", "--out", f"{T}/out"], "empty: it is a directory"),
    "stream: /dev/null as audio": (["stream", MODEL, "/dev/null", "--out", f"{T}/out"],
                                   "/dev/null: it is not a regular file"),
    # --- train (its own parser, same rules)
    "train: mistyped model path": (["train", "--model_name_or_path", f"{W}/modle", *TRAIN, "--output_dir",
                                    f"{T}/out"], "does not exist"),
    "train: kyutai model": (["train", "--model_name_or_path", KYUTAI, *TRAIN, "--output_dir", f"{T}/out"],
                            "convert"),
    "train: weights without config": (["train", "--model_name_or_path", f"{W}/weights_only", *TRAIN,
                                       "--output_dir", f"{T}/out"], "no config.json"),
    "train: truncated weights": (["train", "--model_name_or_path", f"{W}/truncated", *TRAIN, "--output_dir",
                                  f"{T}/out"], "truncated or corrupt"),
    "train: output_dir is a file": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir",
                                     f"{W}/a_file"], "a_file"),
    "train: read-only output_dir": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir",
                                     "{readonly}"], "output_dir"),
    "train: index without shards": (["train", "--model_name_or_path", MODEL, "--train_data", f"{W}/no_shards",
                                     "--output_dir", f"{T}/out"], "index.json"),
    "train: malformed yaml": (["train", f"{W}/bad.yaml"], "bad.yaml"),
    "train: yaml of a list": (["train", f"{W}/list.yaml"], "list.yaml"),
    "train: yaml with a typo": (["train", f"{W}/unknown.yaml"], "learnign_rate"),
    "train: yaml missing a field": (["train", f"{W}/missing_field.yaml"], "missing_field.yaml"),
    "train: missing yaml": (["train", f"{W}/nope.yaml"], "nope.yaml"),
    "train: wrong type": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir", f"{T}/out",
                           "--learning_rate", "fast"], "fast"),
    "train: head mode without a head": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir", f"{T}/out",
                                         "--training_mode", "voice_activity_head"],
                                        "needs a model with a voice-activity head"),
    "train: a head without alignments": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir",
                                          f"{T}/out", "--voice_activity_horizon", "10"], "records no manifest"),
    "train: a head too short": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir", f"{T}/out",
                                 "--voice_activity_horizon", "2"], "voice_activity_turn_end_frames=5"),
    "train: zero batch size": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir", f"{T}/out",
                                "--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1"),
    "train: zero accumulation": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir", f"{T}/out",
                                  "--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1"),
    "train: zero steps": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir", f"{T}/out", "--max_steps",
                           "0"], "max_steps=0"),
    "train: no steps and no epochs": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir", f"{T}/out",
                                       "--max_steps", "-5", "--num_train_epochs", "0"], "num_train_epochs=0"),
    "train: yaml with a mistyped value": (["train", f"{W}/mistyped.yaml"], "invalid int value: 'ten'"),
    "train: segment longer than context and data": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir",
                                                     f"{T}/out", "--segment_frames", "100000"],
                                                    "context (100 frames) and the longest dialogue of train_data (40"),
    "train: output_dir is the model": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir", MODEL],
                                       "--overwrite_model"),
    "train: output_dir inside the model": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir",
                                            f"{MODEL}/out"], "overlaps the source"),
    "train: overwrite_model of a lora run": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir", MODEL,
                                              "--overwrite_model", "--training_mode", "lora"],
                                             "saves the whole model"),
    "train: eval_data of other codebooks": (["train", "--model_name_or_path", MODEL, *TRAIN, "--output_dir",
                                             f"{T}/out", "--eval_data", f"{W}/encoded_5_rows"],
                                            "has 5 rows per dialogue"),
    "train: float codes": (["train", "--model_name_or_path", MODEL, *TRAIN[2:], "--train_data", f"{W}/encoded_float",
                            "--output_dir", f"{T}/out"], "dtype F32"),
    # --- serve (each refused before the model loads)
    "serve: missing model": (["serve", f"{W}/nope"], "nope"),
    "serve: model without mimi/": (["serve", f"{W}/weights_only"], "has no mimi"),
    "serve: port out of range": (["serve", MODEL, "--port", "70000"], "--port must be in 1..65535, got 70000"),
    "serve: zero idle timeout": (["serve", MODEL, "--idle-timeout", "0"], "--idle-timeout must be a positive"),
    "serve: infinite send timeout": (["serve", MODEL, "--send-timeout", "inf"], "--send-timeout must be a positive"),
    "serve: gap-fill threshold over 1": (["serve", MODEL, "--gap-fill-threshold", "1.5"], "got 1.5"),
    "serve: negative top-k": (["serve", MODEL, "--speculate-top-k", "-1"], "--speculate-top-k must be at least 0"),
    "serve: negative seed": (["serve", MODEL, "--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
    "serve: an address of another machine": (["serve", MODEL, "--host", "192.0.2.1"], "cannot listen on 192.0.2.1"),
    # --- push (no network in tests: offline mode)
    "push: missing model": (["push", f"{W}/nope", "me/model", "--token", "hf_x"], "nope"),
    "push: bad repo id": (["push", MODEL, "me/my/model", "--token", "hf_x"], "me/my/model"),
    "push: offline": (["push", MODEL, "me/model", "--token", "hf_x"], "push to 'me/model' failed"),
    "push: malformed metrics": (["push", MODEL, "me/model", "--token", "hf_x", "--metrics", f"{W}/a_file"],
                                "a_file"),
}


def _run(argv: list[str]) -> int:
    """`main(argv)`'s exit code, also when argparse exits (a malformed flag value)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, world, tmp_path, capsys, monkeypatch):
    argv, fragment = CASES[case]
    readonly = _read_only_dir(tmp_path)
    argv = [arg.replace(W, str(world)).replace(T, str(tmp_path)).replace("{readonly}", readonly) for arg in argv]
    monkeypatch.chdir(tmp_path)  # anything written to a relative default lands in the case's own folder
    before = _snapshot(world)
    capsys.readouterr()
    code = _run(argv)
    err = capsys.readouterr().err.strip()
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip() and not PROGRESS_BAR.search(line)]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"{PROG} {argv[0]}: error: "), lines[0]
    assert any(part in lines[0] for part in fragment.split("|")), lines[0]
    assert _snapshot(world) == before


def test_unreachable_hub_fails_fast_with_one_line(world, capsys, monkeypatch):
    """Online mode against an endpoint nothing listens on: a one-line error, not an HTTP client traceback."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert main(["push", str(world / "model"), "me/model", "--token", "hf_x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "push to 'me/model' failed" in err[0], err


def test_push_without_token_says_how_to_get_one(world, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("hf_moshi_userpred.hub.push.get_token", lambda: None)
    assert main(["push", str(world / "model"), "me/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no Hub token" in err[0] and "--token" in err[0], err


# ------------------------------------------------------------------------------------------ help and start-up
def test_help_states_each_default_once():
    from hf_moshi_userpred.cli.main import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    checked = 0
    for name, sub in commands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.help:
                continue
            text = formatter._get_help_string(action)
            assert text.count("default:") <= 1, (name, text)
            checked += "default:" in action.help
        assert "(default: all) (default" not in " ".join(sub.format_help().split()), name
    assert checked >= 5


@pytest.mark.slow
def test_help_and_argument_errors_start_in_under_a_second_without_torch(tmp_path):
    """`--help` and an argument mistake import neither torch nor transformers (they took 10-20 s); the auto classes
    still find the model after a bare `import hf_moshi_userpred`."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    probe = ("import sys, hf_moshi_userpred.cli.main as cli\n"
             "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "heavy: []" in result.stdout, result.stdout[-500:] + result.stderr[-2000:]
    for argv in (["--help"], ["stream"]):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "hf_moshi_userpred", *argv], capture_output=True, env=env, timeout=120)
        assert time.perf_counter() - start < 1.5, argv  # the interpreter's own start included

    torch.manual_seed(0)
    MoshiUserPredForConditionalGeneration(sample_model_config(dim=32, num_layers=1)).save_pretrained(tmp_path / "m")
    probe = ("import sys, hf_moshi_userpred\nfrom transformers import AutoConfig, AutoModel\n"
             f"model = AutoModel.from_pretrained({str(tmp_path / 'm')!r})\n"
             f"config = AutoConfig.from_pretrained({str(tmp_path / 'm')!r})\n"
             "print(type(model).__name__, type(config).__name__)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MoshiUserPredForConditionalGeneration MoshiUserPredConfig" in result.stdout
