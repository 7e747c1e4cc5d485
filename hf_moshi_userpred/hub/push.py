"""Publishing a saved model to the Hugging Face Hub, with a model card.

[`push_to_hub`] uploads, in one commit, exactly what `AutoModel.from_pretrained(repo_id, trust_remote_code=True)` and
the streaming command read from a folder written by `save_pretrained`: the config, the generation config, the
safetensors weights, the remote-code Python files, the optional Mimi codec and text tokenizer, and a `README.md`
rendered by [`build_model_card`] from the `model_card.md` template shipped with this package. Training leftovers
(checkpoints, optimizer states, pickled arguments, `.bin` weights) never leave the machine.

    result = push_to_hub("outputs/run1", "me/moshi-userpred", datasets=["me/dialogues"])
    print(result.commit_url, result.files)

The card's hyper-parameters and metrics come from two JSON files next to the weights when they exist:
`training_config.json` (written by the training entry point) and `user_prediction_metrics.json` (written by the
`evaluate` command).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import validate_repo_id
from transformers.dynamic_module_utils import get_relative_imports

from ..models.configuration_moshi_userpred import MoshiUserPredConfig
from ..utils.errors import error_summary
from ..utils.files import METRICS_NAME, MIMI_FOLDER, TOKENIZER_NAME, TRAINING_CONFIG_NAME, read_json_object

MODEL_CARD_TEMPLATE = Path(__file__).with_name("model_card.md")

DEFAULT_TAGS = ("moshi", "speech", "full-duplex", "user-prediction", "hf_moshi_userpred", "custom_code")
TRAINING_SECTIONS = ("model", "data", "training", "results")  # the keys of training_config.json
# Optional files the streaming command reads from the model folder, uploaded when present.
MIMI_FILES = (f"{MIMI_FOLDER}/config.json", f"{MIMI_FOLDER}/model.safetensors")
# Weights in formats this package does not publish: their presence without safetensors gets a specific error.
NON_SAFETENSORS_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# Eval results put in the card's model-index: the delay-0 (forecast) accuracy of the model and of its baselines.
EVAL_RESULT_KEYS = {
    "user/delay0_accuracy": "delay-0 user-token accuracy (model)",
    "repeat_last/delay0_accuracy": "delay-0 user-token accuracy (repeat-last baseline)",
    "unigram/delay0_accuracy": "delay-0 user-token accuracy (unigram baseline)",
}


@dataclass
class PushResult:
    """What [`push_to_hub`] uploaded.

    Args:
        repo_id: the repository, with the namespace the Hub resolved (e.g. `"me/moshi-userpred"`).
        commit_url: URL of the commit that holds the upload.
        files: paths in the repository of every uploaded file, sorted.
    """

    repo_id: str
    commit_url: str
    files: list[str]


def build_model_card(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = "kyutai/moshiko-pytorch-bf16",
    datasets: Sequence[str] = (),
    license: str = "cc-by-4.0",
    tags: Sequence[str] = (),
    training: dict | None = None,
    metrics: dict | None = None,
) -> ModelCard:
    """Renders the model card (the repository's `README.md`) of a saved model from `model_card.md`.

    The architecture facts come from `model_dir/config.json` (the weights are not read).

    Args:
        model_dir: a folder written by `save_pretrained`.
        repo_id: the Hub repository the card is for (shown in the loading code).
        base_model: Hub id of the Moshi checkpoint the model was fine-tuned from (card metadata), or None.
        datasets: Hub ids of the training datasets (card metadata).
        license: license id of the model (card metadata).
        tags: tags added to the package's own (`moshi`, `speech`, `full-duplex`, ...).
        training: the content of a `training_config.json` (sections `model`, `data`, `training`, `results`, each a
            dict); default: that file in `model_dir`, if any.
        metrics: the content of a `user_prediction_metrics.json` (`{"metrics": UserPredictionReport.to_dict(),
            "markdown": UserPredictionReport.to_markdown(), "dataset": name}`); default: that file in `model_dir`,
            if any. The delay-0 accuracies of the model and its baselines go into the card's model-index.

    Returns:
        `huggingface_hub.ModelCard`.

    Raises:
        ValueError: `repo_id` is not a valid repository id, `model_dir` has no readable config.json of this model,
            or `training`/`metrics` (or their files) are malformed.
    """
    validate_repo_id(repo_id)
    model_dir = Path(model_dir)
    config = MoshiUserPredConfig.from_dict(_read_config(model_dir))
    if training is None:
        training_file = model_dir / TRAINING_CONFIG_NAME
        training = read_json_object(training_file, "training record") if training_file.is_file() else {}
    if metrics is None:
        metrics_file = model_dir / METRICS_NAME
        metrics = read_json_object(metrics_file, "metrics file") if metrics_file.is_file() else {}
    hyperparameters, training_results = _training_rows(training)
    report, metrics_markdown, metrics_dataset = _metrics_parts(metrics)

    model_name = repo_id.split("/")[-1]
    eval_results = [
        EvalResult(task_type="audio-to-audio", task_name="User audio-token prediction", dataset_type=metrics_dataset,
                   dataset_name=metrics_dataset, metric_type="accuracy", metric_name=name, metric_value=report[key])
        for key, name in EVAL_RESULT_KEYS.items() if key in report
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="audio-to-audio",
        license=license,
        base_model=base_model,
        datasets=list(datasets) or None,
        tags=[*DEFAULT_TAGS, *tags],
        eval_results=eval_results or None,
        model_name=model_name if eval_results else None,  # the model-index needs a name; alone it is noise
    )
    user_start = 1 + config.dep_q
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id,
        base_model=base_model,
        license=license,
        num_layers=config.num_layers,
        dim=config.dim,
        num_heads=config.num_heads,
        context="unbounded" if config.context is None else f"{config.context} frames",
        dep_q=config.dep_q,
        depformer_num_layers=config.depformer_num_layers,
        depformer_dim=config.depformer_dim,
        predict_user_audio=config.predict_user_audio,
        user_dep_q=config.user_dep_q,
        user_rows=config.n_q - config.dep_q,
        num_delay0=sum(d == 0 for d in config.delays[user_start:user_start + config.user_dep_q]),
        lookahead=config.user_prediction_lookahead,
        user_depformer_num_layers=config.user_depformer_num_layers,
        user_depformer_dim=config.user_depformer_dim,
        user_init=config.user_init,
        voice_activity_horizon=config.voice_activity_horizon,
        text_card=config.text_card,
        card=config.card,
        has_mimi=all((model_dir / name).is_file() for name in MIMI_FILES),
        has_tokenizer=(model_dir / TOKENIZER_NAME).is_file(),
        hyperparameters=hyperparameters,
        training_results=training_results,
        metrics_markdown=metrics_markdown,
        metrics_dataset=metrics_dataset,
    )


def push_to_hub(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    api: HfApi | None = None,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload Moshi user-prediction model",
    card: ModelCard | None = None,
    **card_kwargs: Any,
) -> PushResult:
    """Uploads a saved model to the Hub in one commit, with a model card as `README.md`.

    Uploaded from `model_dir` (and nothing else): `config.json`; `generation_config.json` if present; the safetensors
    weights (`model.safetensors`, or `model.safetensors.index.json` and the shards it lists); the remote-code files
    (the modules `config.json`'s `auto_map` names and everything they import relatively); `tokenizer.model` and
    `mimi/config.json` + `mimi/model.safetensors` if present; `README.md` rendered from `card`. Files are read in
    place and `model_dir` is not modified.

    Args:
        model_dir: a folder written by `save_pretrained` after importing `hf_moshi_userpred`.
        repo_id: the Hub repository, created if needed (`"name"` goes to the token's user namespace).
        api: the `huggingface_hub.HfApi` to call (default: a new one).
        token: Hub token (default: the logged-in one).
        private: create the repository private (an existing repository keeps its visibility).
        revision: branch to commit to, created from the main branch if needed (default: the main branch).
        commit_message: message of the commit.
        card: the model card to upload; default: [`build_model_card`]`(model_dir, repo_id, **card_kwargs)`.
        **card_kwargs: keyword arguments of [`build_model_card`] (`base_model`, `datasets`, `license`, `tags`,
            `training`, `metrics`); only without `card`.

    Returns:
        [`PushResult`].

    Raises:
        ValueError: `repo_id` is invalid, `model_dir` or its config.json is missing, the weights are not
            safetensors or incomplete, a remote-code file is missing, `card` comes with `card_kwargs`, there is no
            token (with the default `api`), or the Hub cannot be reached or refuses the push.
    """
    validate_repo_id(repo_id)
    if card is not None and card_kwargs:
        raise ValueError(f"pass either card or build_model_card arguments, not both (got {sorted(card_kwargs)})")
    model_dir = Path(model_dir)
    files = _files_to_upload(model_dir)
    if card is None:
        card = build_model_card(model_dir, repo_id, **card_kwargs)
    contents: dict[str, str | bytes] = {name: str(path) for name, path in files.items()}  # local paths: no copies
    contents["README.md"] = str(card).encode("utf-8")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=contents[name]) for name in sorted(contents)]

    if api is None:
        if token is None and get_token() is None:
            raise ValueError(f"no Hub token to push {repo_id!r} with: pass --token, set HF_TOKEN or run "
                             "`hf auth login`")
        api = HfApi()
    try:
        repo_id = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True, token=token).repo_id
        if revision is not None and not revision.startswith("refs/pr/"):  # a commit to a missing branch fails
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True, token=token)
        commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision,
                                   token=token)
    except Exception as error:
        if not _is_hub_failure(error):
            raise
        raise ValueError(f"push to {repo_id!r} failed ({type(error).__name__}: {error_summary(error)}); check the network, "
                         "HF_HUB_OFFLINE and that the token may write to the repository") from error
    return PushResult(repo_id=repo_id, commit_url=commit.commit_url, files=sorted(contents))


def _is_hub_failure(error: Exception) -> bool:
    """An HTTP answer, a refused or failed connection, offline mode: what a push meets outside this machine."""
    if isinstance(error, (HfHubHTTPError, OSError)):
        return True
    # The HTTP client's transport errors (httpx or its fork) are not OSErrors.
    return any(cls.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
               for cls in type(error).__mro__)


def _files_to_upload(model_dir: Path) -> dict[str, Path]:
    """Path in the repository -> local file, for everything [`push_to_hub`] uploads except the card."""
    config = _read_config(model_dir)
    names = ["config.json", *_weight_files(model_dir), *_remote_code_files(model_dir, config)]
    if (model_dir / "generation_config.json").is_file():
        names.append("generation_config.json")
    if (model_dir / TOKENIZER_NAME).is_file():
        names.append(TOKENIZER_NAME)
    mimi = [name for name in MIMI_FILES if (model_dir / name).is_file()]
    if mimi and len(mimi) < len(MIMI_FILES):  # half a codec would only fail later, at streaming time
        raise ValueError(f"{model_dir / 'mimi'} is incomplete: it needs {' and '.join(MIMI_FILES)}, has {mimi}")
    return {name: model_dir / name for name in sorted([*names, *mimi])}


def _weight_files(model_dir: Path) -> list[str]:
    """The safetensors files `from_pretrained` reads: the single file, or the index and the shards it lists."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "weight index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (model_dir / shard).is_file()]
        if missing:
            raise ValueError(f"{index} lists shards missing from {model_dir}: {missing}")
        return [index.name, *shards]
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    other = [name for name in NON_SAFETENSORS_WEIGHTS if (model_dir / name).is_file()]
    if other:
        raise ValueError(f"{model_dir} holds {other} but no model.safetensors: safetensors only are uploaded; load "
                         "the model and save it again with save_pretrained, which writes safetensors")
    if (model_dir / "adapter_model.safetensors").is_file():
        raise ValueError(f"{model_dir} holds a LoRA adapter, not a model: push the merged model instead (train with "
                         "--merge_lora and push OUTPUT_DIR/merged)")
    raise ValueError(f"{model_dir} has no model weights (model.safetensors or model.safetensors.index.json)")


def _remote_code_files(model_dir: Path, config: dict) -> list[str]:
    """The modules `config.json`'s `auto_map` names, and the modules they import relatively, recursively."""
    advice = "save the model again with save_pretrained after importing hf_moshi_userpred, which copies its code"
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        raise ValueError(f"{model_dir / 'config.json'} has no auto_map, so the model cannot load with "
                         f"trust_remote_code: {advice}")
    pending = []
    for references in auto_map.values():  # "module.Class", or a list of them (tokenizers)
        for reference in references if isinstance(references, list) else [references]:
            if reference and "--" not in reference:  # "other/repo--module.Class" lives in another repository
                pending.append(reference.rsplit(".", 1)[0].replace(".", "/") + ".py")
    found: set[str] = set()
    while pending:
        name = pending.pop()
        if name in found:
            continue
        if not (model_dir / name).is_file():
            raise ValueError(f"{model_dir} lacks {name}, remote code its config.json's auto_map needs: {advice}")
        found.add(name)
        folder = Path(name).parent  # relative imports resolve from the importing module's folder
        pending += [(folder / module.replace(".", "/")).as_posix() + ".py"
                    for module in get_relative_imports(model_dir / name)]
    return sorted(found)


def _read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise ValueError(f"model directory {str(model_dir)!r} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{str(model_dir)!r} has no config.json: is it a folder written by save_pretrained?")
    config = read_json_object(path, "model config")
    if config.get("model_type") != MoshiUserPredConfig.model_type:
        raise ValueError(f"{path} has model_type {config.get('model_type')!r}, not "
                         f"{MoshiUserPredConfig.model_type!r}: not a Moshi user-prediction model")
    return config


def _training_rows(training: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(hyper-parameter rows: the model, data and training sections in that order; result rows), as table cells."""
    unknown = sorted(set(training) - set(TRAINING_SECTIONS))
    if unknown:
        raise ValueError(f"training has unknown sections {unknown}: expected some of {TRAINING_SECTIONS}")
    for section, values in training.items():
        if not isinstance(values, dict):
            raise ValueError(f"training[{section!r}] is a {type(values).__name__}, expected a dict")
    hyperparameters = [(name, _cell(value)) for section in TRAINING_SECTIONS[:3]
                       for name, value in training.get(section, {}).items()]
    return hyperparameters, [(name, _cell(value)) for name, value in training.get("results", {}).items()]


def _metrics_parts(metrics: dict) -> tuple[dict, str | None, str]:
    """(the flat metrics, the markdown table or None, the evaluation dataset's name) of a metrics record."""
    if not metrics:
        return {}, None, "unspecified"
    if not isinstance(metrics.get("metrics"), dict) or not isinstance(metrics.get("markdown"), str):
        raise ValueError(f"metrics must hold 'metrics' (UserPredictionReport.to_dict()) and 'markdown' "
                         f"(UserPredictionReport.to_markdown()), got keys {sorted(metrics)}")
    return metrics["metrics"], metrics["markdown"], str(metrics.get("dataset") or "unspecified")


def _cell(value: Any) -> str:
    """A JSON value as the text of a markdown table cell."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


__all__ = ["PushResult", "build_model_card", "push_to_hub"]
