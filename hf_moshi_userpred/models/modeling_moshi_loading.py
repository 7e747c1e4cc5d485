"""Model folders and checkpoint files: what the model's loading and saving read and write around the weights.

`from_pretrained` of this package returns a complete model or refuses in one line: a folder is sniffed before any
model is built (`describe_model_folder`: `config.json`'s `model_type`, the file names, the tensor names of a
safetensors header), and the load report is checked after (`load_complete_model`). A kyutai checkpoint, a Mimi codec,
a LoRA adapter or a truncated file is then named as such instead of yielding a randomly initialised model. Nothing
here knows the model's modules: the model file keeps the model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Callable, Mapping

import torch
from transformers.modeling_utils import load_state_dict
from transformers.utils import logging as hf_logging

from .configuration_moshi_userpred import MoshiUserPredConfig

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_KYUTAI_ONLY_KEYS = re.compile(r"^(linears\.\d+\.|depformer_in\.|depformer_emb\.|depformer_text_emb\.|"
                               r"depformer_norms\.|depformer\.layers\.|.*\.self_attn\.(in_proj_weight|out_proj\.))")


def _is_kyutai_key(key: str) -> bool:
    """A tensor name only kyutai's moshi layout uses (ours groups the system Depformer under `depformer.`)."""
    return bool(_KYUTAI_ONLY_KEYS.match(key))


def _looks_like_a_path(name: str) -> bool:
    """True when `name` cannot be a Hub repo id (`name` or `namespace/name`) and so must be a local path."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or name.endswith("/") or "/" in name and os.path.isdir(name.split("/")[0]))


def _first_line(error: BaseException) -> str:
    """The first non-blank line of `error`'s message (Transformers' errors run over several lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _safetensors_keys(path: str) -> list[str] | None:
    """The tensor names in a safetensors file's header (standard library only), None if it is not readable."""
    try:
        with open(path, "rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(file.read(size))
    except (OSError, ValueError, struct.error):
        return None
    return [key for key in header if key != "__metadata__"] if isinstance(header, dict) else None


def describe_model_folder(folder: str | os.PathLike, check_config: bool = True) -> str | None:
    """None when `folder` looks like a model directory of this package, else what it holds instead (one phrase).

    Only `config.json`'s `model_type` and the file names (plus, for a folder without config, the tensor names in
    the safetensors header) are read: cheap, and before any model is built.
    """
    folder = os.fspath(folder)
    config_file = os.path.join(folder, "config.json")
    files = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    if not os.path.isfile(config_file):
        if "adapter_config.json" in files:
            return ("it holds a LoRA adapter (adapter_config.json) without its base model: load the base model and "
                    "the adapter with peft, or train with merge_lora")
        weights = [name for name in sorted(files) if name.endswith(".safetensors")]
        if weights:
            keys = _safetensors_keys(os.path.join(folder, weights[0])) or []
            if any(_is_kyutai_key(key) for key in keys) or "text_emb.weight" in keys:
                return (f"no config.json, and {weights[0]} is a moshi checkpoint (kyutai layout): run "
                        "`hf-moshi-userpred convert` on it first")
            return f"no config.json beside its weights ({', '.join(weights)}); it cannot be loaded without one"
        return "no config.json in it (convert a kyutai checkpoint or train a model first)"
    if check_config:
        try:
            with open(config_file, encoding="utf-8") as file:
                config = json.load(file)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            return f"its config.json cannot be read as JSON ({error})"
        if not isinstance(config, dict):
            return f"its config.json holds a {type(config).__name__}, not a JSON object"
        model_type = config.get("model_type")
        if model_type != MoshiUserPredConfig.model_type:
            if model_type is None and ("moshi_name" in config or {"dep_q", "n_q", "card"} <= set(config)):
                return ("it is in kyutai's moshi layout (config.json of moshi LM kwargs, as `convert --to-moshi` "
                        "writes): run `hf-moshi-userpred convert` on it first")
            if model_type == "mimi":
                return "it holds a Mimi codec (model_type 'mimi'), not a Moshi model"
            return (f"its config.json has model_type={model_type!r}, expected {MoshiUserPredConfig.model_type!r}")
    if not files & set(_WEIGHT_FILES):
        return f"no weights beside its config.json (expected one of {', '.join(_WEIGHT_FILES)})"
    return None


class _DropLoadReport(logging.Filter):
    """Drops Transformers' multi-line weight-loading report (`from_pretrained` raises one line instead), keeping it in
    `dropped` for that line."""

    def __init__(self):
        super().__init__()
        self.dropped: list[str] = []

    def filter(self, record) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.dropped.append(str(record.msg))
            return False
        return True


def load_complete_model(load: Callable, pretrained_model_name_or_path: str | os.PathLike | None, *model_args,
                        **kwargs):
    """`load(pretrained_model_name_or_path, *model_args, **kwargs)` (`PreTrainedModel.from_pretrained`), checked before
    and after as the model's `from_pretrained` documents.

    Raises:
        ValueError: naming the folder (or repo id) and what it holds instead.
    """
    name = None if pretrained_model_name_or_path is None else os.fspath(pretrained_model_name_or_path)
    if name is None or kwargs.get("state_dict") is not None or kwargs.get("gguf_file") is not None:
        return load(pretrained_model_name_or_path, *model_args, **kwargs)
    local = os.path.isdir(name)
    if local:
        problem = describe_model_folder(os.path.join(name, kwargs.get("subfolder") or ""),
                                        check_config=kwargs.get("config") is None)
        if problem is not None:
            raise ValueError(f"{name!r} is not a model directory of hf_moshi_userpred: {problem}")
    elif os.path.exists(name):
        raise ValueError(f"{name!r} is a file, not a model directory (a folder with config.json and "
                         "model.safetensors)")
    elif _looks_like_a_path(name):
        raise ValueError(f"model directory {name!r} does not exist")
    want_info = kwargs.pop("output_loading_info", False)
    ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
    where = f"{name!r}" if local else f"the Hub repository {name!r}"
    # Mis-shaped tensors are let through and reported below with their shapes; Transformers' multi-line load
    # report is dropped (every case it reports is refused here, in one line).
    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)
    try:
        model, info = load(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                           ignore_mismatched_sizes=True, **kwargs)
    except OSError as error:
        if local:
            raise ValueError(f"cannot load the model in {name!r}: {_first_line(error)}") from error
        raise ValueError(f"{name!r} is neither a local model directory nor a Hub repository that can be "
                         f"loaded: {_first_line(error)}") from error
    except RuntimeError as error:
        if "size mismatch" in str(error) or "ignore_mismatched_sizes" in str(error):
            raise ValueError(f"the weights in {where} do not have the shapes its config.json describes (was "
                             f"config.json edited or copied from another model?): {_first_line(error)}") from error
        if "automatic conversion of the weights" in str(error):  # e.g. a torchao layout with no kernel here
            # The cause is in the load report dropped above: its first exception line.
            cause = re.search(r"^\w+(?:Error|Exception): .+$", "\n".join(report_filter.dropped), re.MULTILINE)
            quantization = kwargs.get("quantization_config")
            scheme = getattr(quantization, "quant_type", quantization)
            how = "" if quantization is None else f" with {type(scheme).__name__}"
            raise ValueError(f"cannot convert the weights in {where}{how}: "
                             f"{cause[0] if cause else _first_line(error)}") from error
        raise
    except Exception as error:  # safetensors' own error type (not importable from remote code)
        if type(error).__name__ == "SafetensorError":
            raise ValueError(f"the weights in {where} are truncated or corrupt ({error}): re-download or "
                             "re-save the model") from error
        raise
    finally:
        report_logger.removeFilter(report_filter)
    bad = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if ignore_mismatched:
        bad["mismatched_keys"] = []
    if any(bad.values()):
        counts = ", ".join(f"{len(keys)} {kind.split('_')[0]}" for kind, keys in bad.items() if keys)
        examples = ", ".join(key if isinstance(key, str) else f"{key[0]}: checkpoint {tuple(key[1])} vs config {tuple(key[2])}"
                             for keys in bad.values() for key in keys[:2])
        hint = (" (kyutai layout: run `hf-moshi-userpred convert` on it first)"
                if any(_is_kyutai_key(str(key)) for key in bad["unexpected_keys"]) else "")
        raise ValueError(f"the weights in {where} do not match its config ({counts} tensors, e.g. {examples})"
                         f"{hint}: refusing to run a partly random model")
    return (model, info) if want_info else model


def make_weights_readable(save_directory: str | os.PathLike) -> None:
    """Give the weight files in `save_directory` the permissions the umask gives new files: safetensors writes them
    0600, unlike config.json, and a saved model should be as readable as the rest of its folder."""
    mask = os.umask(0)
    os.umask(mask)
    if os.path.isdir(save_directory):
        for name in os.listdir(save_directory):
            path = os.path.join(save_directory, name)
            if name.endswith((".safetensors", ".bin")) and os.path.isfile(path) and not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def read_moshi_checkpoint(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The state dict of a moshi-format `.safetensors` file (a mapping is returned as it is).

    Raises:
        ValueError: not a `.safetensors` path, or no such file.
    """
    if isinstance(checkpoint, Mapping):
        return checkpoint
    path = os.fspath(checkpoint)
    if not path.endswith(".safetensors"):
        raise ValueError(f"moshi checkpoint {path!r}: expected a .safetensors file or a state dict")
    if not os.path.isfile(path):
        raise ValueError(f"moshi checkpoint {path!r} does not exist")
    return load_state_dict(path)


__all__ = ["describe_model_folder", "load_complete_model", "make_weights_readable", "read_moshi_checkpoint"]
