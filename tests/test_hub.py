"""push_to_hub against a local stand-in for the Hub: the exact uploaded file set, the rendered model card (metadata,
hyper-parameters, metrics, model-index), loading the uploaded folder without the package, and input errors."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from helpers import LocalHub, assert_same_outputs, load_without_package, random_codes, tiny_remote_model
import hf_moshi_userpred
from hf_moshi_userpred import EncodedDialogues
from hf_moshi_userpred.evaluation.user_prediction import evaluate_user_prediction
from hf_moshi_userpred.hub.push import (
    DEFAULT_TAGS,
    METRICS_NAME,
    TRAINING_CONFIG_NAME,
    PushResult,
    build_model_card,
    push_to_hub,
)

REPO_ID = "me/tiny-userpred"
SAMPLE = Path(__file__).parents[1] / "hf_moshi_userpred" / "sample"
# the remote code is the models/ room, whole and alone
REMOTE_CODE = {path.name for path in (Path(hf_moshi_userpred.__file__).parent / "models").glob("*.py")} - {"__init__.py"}
TRAINING = {
    "model": {"model_name_or_path": "kyutai/moshiko-pytorch-bf16", "training_mode": "full"},
    "data": {"train_data": "encoded/train", "eval_data": None},
    "training": {"learning_rate": 0.0001, "max_steps": 200, "per_device_train_batch_size": 4,
                 "user_loss_stages": [0.0, 0.1], "lr_scheduler_type": "cosine", "bf16": True, "seed": 42},
    "results": {"train_loss": 3.25, "global_step": 200},
}


def tree(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model saved like a training run's output dir: records for the card, Mimi and tokenizer for streaming,
    and Trainer leftovers that must stay local."""
    model = tiny_remote_model()
    folder = tmp_path_factory.mktemp("run") / "output"
    model.save_pretrained(folder)
    data = EncodedDialogues.from_codes([random_codes(model.config, batch=1, frames=n, seed=n)[0] for n in (9, 14)])
    report = evaluate_user_prediction(model, data, top_k=3)
    record = {"metrics": report.to_dict(), "markdown": report.to_markdown(), "dataset": "me/dialogues-eval"}
    (folder / METRICS_NAME).write_text(json.dumps(record))
    (folder / TRAINING_CONFIG_NAME).write_text(json.dumps(TRAINING))
    shutil.copytree(SAMPLE / "mimi", folder / "mimi")
    shutil.copy(SAMPLE / "tokenizer.model", folder)
    for junk in ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                 "README.md", "checkpoint-1/model.safetensors", "checkpoint-1/optimizer.pt", "notes.py"):
        (folder / junk).parent.mkdir(exist_ok=True)
        (folder / junk).write_bytes(b"must not be uploaded")
    return model, folder, record


@pytest.fixture(scope="module")
def pushed(trained, tmp_path_factory):
    _, folder, _ = trained
    before = tree(folder)
    hub = LocalHub(tmp_path_factory.mktemp("hub"))
    result = push_to_hub(folder, REPO_ID, api=hub, token="hf_test", private=True, revision="dev",
                         datasets=["me/dialogues"], tags=["my-tag"])
    assert tree(folder) == before  # the source folder is only read
    return hub, result


def test_push_uploads_exactly_the_model_files(trained, pushed):
    _, folder, _ = trained
    hub, result = pushed
    expected = sorted({"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                       "mimi/config.json", "mimi/model.safetensors", "README.md", *REMOTE_CODE})
    commit_url = result.commit_url
    assert result == PushResult(repo_id=REPO_ID, commit_url=commit_url, files=expected)
    assert commit_url.startswith(f"https://huggingface.co/{REPO_ID}/commit/")
    assert hub.calls == [
        ("create_repo", REPO_ID, dict(repo_type="model", private=True, exist_ok=True, token="hf_test")),
        ("create_branch", REPO_ID, dict(branch="dev", repo_type="model", exist_ok=True, token="hf_test")),
        ("create_commit", REPO_ID, dict(commit_message="Upload Moshi user-prediction model", revision="dev",
                                        token="hf_test", paths=expected)),
    ]
    uploaded = tree(hub.root / REPO_ID)
    assert sorted(uploaded) == expected
    with pytest.raises(AssertionError, match="HfApi.upload_folder"):  # the stand-in really blocks the rest
        hub.upload_folder
    source = tree(folder)
    assert all(uploaded[name] == source[name] for name in expected if name != "README.md")
    assert uploaded["README.md"] != source["README.md"]


def test_sharded_weights_upload_the_index_and_its_shards(trained, tmp_path):
    model, _, _ = trained
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()
    save_file({"stale": torch.zeros(1)}, folder / "model-00099-of-00099.safetensors")  # left by an older save
    result = push_to_hub(folder, REPO_ID, api=LocalHub(tmp_path / "hub"))
    assert len(set(shards)) > 1
    assert result.files == sorted({"config.json", "generation_config.json", "README.md", "model.safetensors.index.json",
                                   *shards, *REMOTE_CODE})


def test_model_card_metadata_hyperparameters_and_metrics(trained, pushed):
    _, _, record = trained
    hub, _ = pushed
    card = ModelCard.load(hub.root / REPO_ID / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "audio-to-audio", "cc-by-4.0")
    assert (data.base_model, data.datasets) == ("kyutai/moshiko-pytorch-bf16", ["me/dialogues"])
    assert data.tags == [*DEFAULT_TAGS, "my-tag"]
    assert data.model_name == "tiny-userpred"
    results = {result.metric_name: result for result in data.eval_results}
    metrics = record["metrics"]
    assert {name: result.metric_value for name, result in results.items()} == {
        "delay-0 user-token accuracy (model)": metrics["user/delay0_accuracy"],
        "delay-0 user-token accuracy (repeat-last baseline)": metrics["repeat_last/delay0_accuracy"],
        "delay-0 user-token accuracy (unigram baseline)": metrics["unigram/delay0_accuracy"],
    }
    assert {(r.task_type, r.dataset_type, r.metric_type) for r in results.values()} == {
        ("audio-to-audio", "me/dialogues-eval", "accuracy")}

    text = card.text
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "with model.streaming(1, speculate_top_k=4) as s:\n" in text
    assert "out = s.step(user_frame)" in text
    assert f'MimiModel.from_pretrained("{REPO_ID}", subfolder="mimi")' in text
    # lookahead 2, user_dep_q 3 of 3 user rows, of which 1 (row delays 0, 1, 1) is a forecast
    assert "predicts 3 of the user's 3 codebooks (1 with delay 0), 2 frame(s) ahead" in text
    for row in ("| `model_name_or_path` | kyutai/moshiko-pytorch-bf16 |", "| `training_mode` | full |",
                "| `eval_data` | null |", "| `learning_rate` | 0.0001 |", "| `max_steps` | 200 |",
                "| `user_loss_stages` | [0.0, 0.1] |", "| `bf16` | true |", "| `train_loss` | 3.25 |"):
        assert row + "\n" in text, row
    assert record["markdown"] in text
    assert "| | model | repeat_last | unigram |" in text and "`me/dialogues-eval`" in text
    assert "Not recorded" not in text
    assert "CC-BY 4.0" in text


def test_model_card_without_records(trained, tmp_path):
    model, _, record = trained
    folder = tmp_path / "bare"
    model.save_pretrained(folder)
    card = build_model_card(folder, "tiny", base_model=None, license="apache-2.0")
    assert card.text.count("Not recorded") == 2
    assert card.data.eval_results is None and card.data.base_model is None and card.data.license == "apache-2.0"
    assert "model-index" not in str(card) and "subfolder=\"mimi\"" not in card.text
    # explicit records take the place of files
    card = build_model_card(folder, "tiny", training={"results": {"train_loss": 1.5}}, metrics=record)
    assert "| `train_loss` | 1.5 |" in card.text and record["markdown"] in card.text
    assert len(card.data.eval_results) == 3
    assert "voice-activity head" not in card.text
    with_head = copy.deepcopy(model)  # the fixture's model stays as it is
    with_head.add_voice_activity_head(6, 3)
    with_head.save_pretrained(tmp_path / "with_head")
    card = build_model_card(tmp_path / "with_head", "tiny")
    assert "| voice-activity head | P(the user is silent in each of the next 6 frames)" in card.text


def break_folder(folder, how: str):
    if how == "bin_only":
        torch.save({"weight": torch.zeros(1)}, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    elif how == "missing_import":
        (folder / "modeling_moshi_cache.py").unlink()
    elif how == "missing_auto_map_module":
        (folder / "configuration_moshi_userpred.py").unlink()
    elif how == "no_auto_map":
        config = json.loads((folder / "config.json").read_text())
        del config["auto_map"]
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "no_config":
        (folder / "config.json").unlink()
    elif how == "missing_shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    elif how == "half_mimi":
        (folder / "mimi" / "model.safetensors").unlink()
    elif how == "bad_metrics":
        (folder / METRICS_NAME).write_text(json.dumps({"accuracy": 0.5}))
    elif how == "bad_training":
        (folder / TRAINING_CONFIG_NAME).write_text(json.dumps({"hyperparameters": {}}))


@pytest.mark.parametrize("how, message", [
    ("bin_only", r"holds \['pytorch_model.bin'\] but no model.safetensors: safetensors only"),
    ("missing_import", r"lacks modeling_moshi_cache.py, remote code .* save_pretrained after importing"),
    ("missing_auto_map_module", r"lacks configuration_moshi_userpred.py"),
    ("no_auto_map", r"config.json has no auto_map"),
    ("no_config", r"has no config.json"),
    ("missing_shard", r"lists shards missing from .*\['model-1.safetensors'\]"),
    ("half_mimi", r"mimi is incomplete"),
    ("bad_metrics", r"metrics must hold 'metrics' .* got keys \['accuracy'\]"),
    ("bad_training", r"unknown sections \['hyperparameters'\]"),
])
def test_push_errors_name_the_problem(trained, tmp_path, how, message):
    folder = tmp_path / "model"
    shutil.copytree(trained[1], folder)
    break_folder(folder, how)
    hub = LocalHub(tmp_path / "hub")
    with pytest.raises(ValueError, match=message):
        push_to_hub(folder, REPO_ID, api=hub)
    assert hub.calls == []


def test_push_argument_errors(trained, tmp_path):
    hub = LocalHub(tmp_path / "hub")
    with pytest.raises(ValueError, match=r"model directory '.*nowhere' does not exist"):
        push_to_hub(tmp_path / "nowhere", REPO_ID, api=hub)
    with pytest.raises(ValueError, match="not a/valid/repo"):  # HFValidationError
        push_to_hub(trained[1], "not a/valid/repo", api=hub)
    with pytest.raises(ValueError, match=r"either card or build_model_card arguments.*\['tags'\]"):
        push_to_hub(trained[1], REPO_ID, api=hub, card=ModelCard("---\n---\n"), tags=["x"])
    assert hub.calls == []


@pytest.mark.slow  # a subprocess without the package
def test_uploaded_folder_loads_without_the_package(trained, pushed, tmp_path):
    model, _, _ = trained
    hub, _ = pushed
    uploaded = tmp_path / "downloaded"
    shutil.copytree(hub.root / REPO_ID, uploaded)
    codes = random_codes(model.config, frames=10)
    stdout, remote = load_without_package(uploaded, codes, tmp_path)
    assert "MoshiUserPredConfig MoshiUserPredForConditionalGeneration MoshiUserPredGenerationConfig 7" in stdout
    assert_same_outputs(model, codes, remote)
