"""Kyutai Moshi checkpoint directories -> model directories of this package, and back.

A kyutai checkpoint directory (the files of a repo such as `kyutai/moshiko-pytorch-bf16`, read by moshi's
`CheckpointInfo.from_hf_repo`) holds:

    model.safetensors          LM weights in moshi's key layout (config.json's `moshi_name`; also `.sft`, `.sfts`)
    config.json (optional)     moshi `LMModel` kwargs + metadata (`moshi_name`, `mimi_name`, `tokenizer_name`, ...);
                               without it moshi assumes moshiko
    tokenizer_spm_32k_3.model  sentencepiece text tokenizer (`tokenizer_name`)
    tokenizer-e351c8d8-checkpoint125.safetensors
                               Mimi in moshi's own format (`mimi_name`)

[`convert_kyutai_checkpoint`] turns it into a directory that `from_pretrained` loads (weights, config, remote code,
`tokenizer.model`, and `mimi/` when the source holds a transformers Mimi folder). Transformers ships no converter for
Mimi's moshi format, so that file is left where it is (streaming then takes a transformers Mimi, e.g. `kyutai/mimi`).
[`export_to_moshi`] writes a model directory back as `model.safetensors` + `config.json` in kyutai's released layout,
without the user branch, which moshi's loaders read. With `quantize="int8"` or `"int4"`, [`convert_kyutai_checkpoint`]
and [`quantize_model_directory`] write torchao weight-only quantized weights ([`quantization_config`]): safetensors
that `from_pretrained` (and `AutoModel` with `trust_remote_code`) load back quantized, with the scheme in
`config.json`'s `quantization_config`.

Both write through [`atomic_directory`]: a staging directory next to the output, renamed into place once complete, so
a failure leaves no partial output and an existing output is replaced only by a complete new one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import TorchAoConfig
from transformers.utils import logging

from ..models.configuration_moshi_userpred import USER_INITS, MoshiUserPredConfig
from ..models.modeling_moshi_loading import describe_model_folder
from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration
from ..utils.files import (
    MIMI_FOLDER,
    TOKENIZER_NAME,
    atomic_directory,
    check_output_dir,
    copy_codec_files,
    read_json_object,
)

# moshi's defaults for a checkpoint directory (moshi.models.loaders: MOSHI_NAME, MIMI_NAME, TEXT_TOKENIZER_NAME).
KYUTAI_WEIGHTS_NAME = "model.safetensors"
KYUTAI_WEIGHTS_NAMES = (KYUTAI_WEIGHTS_NAME, "model.sft")  # looked for, in order, when the config names none
KYUTAI_MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
KYUTAI_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
WEIGHTS_SUFFIXES = (".safetensors", ".sft", ".sfts")  # what moshi reads as safetensors
QUANTIZATION_SCHEMES = ("int8", "int4")  # `convert --quantize`
INT4_GROUP_SIZES = (128, 64, 32, 16)  # tried in order: the first that divides every linear layer's input size
TINYGEMM_GROUP_SIZES = (128, 64, 32)  # the same on CUDA, within what torchao's int4 kernel accepts (16 is not)


@dataclass
class ConversionResult:
    """What [`convert_kyutai_checkpoint`] or [`export_to_moshi`] wrote.

    Args:
        output_dir (`Path`): the directory written.
        num_tensors (`int`): tensors in the written weights.
        num_parameters (`int`): their total number of elements.
        files (`list[str]`): every file written, relative to `output_dir`, sorted (`/`-separated).
        notes (`list[str]`): lines for the user: how the user branch was initialised, what happened to Mimi and the
            tokenizer.
    """

    output_dir: Path
    num_tensors: int
    num_parameters: int
    files: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class KyutaiCheckpoint:
    """The files of a kyutai checkpoint directory, as moshi's `CheckpointInfo` resolves them.

    Args:
        weights (`Path`): the LM weights (`.safetensors`, `.sft` or `.sfts`).
        lm_kwargs (`dict`, *optional*): the config json (LM kwargs and metadata); None: moshiko's.
        tokenizer (`Path`, *optional*): the sentencepiece model, when present.
        mimi (`Path`, *optional*): Mimi in moshi's format, when present.
        mimi_folder (`Path`, *optional*): a transformers Mimi folder (`mimi/`), when present.
    """

    weights: Path
    lm_kwargs: dict[str, Any] | None
    tokenizer: Path | None = None
    mimi: Path | None = None
    mimi_folder: Path | None = None

    def config(self, **overrides: Any) -> MoshiUserPredConfig:
        """The config `from_moshi` builds for these LM kwargs and `overrides` (moshiko's without a config json).

        Raises:
            ValueError: an unsupported or unknown moshi option, or an invalid override.
        """
        if self.lm_kwargs is None:
            return MoshiUserPredConfig(**overrides)
        return MoshiUserPredConfig.from_moshi_lm_kwargs(self.lm_kwargs, **overrides)


def find_kyutai_checkpoint(
    source_dir: str | os.PathLike, config_path: str | os.PathLike | None = None
) -> KyutaiCheckpoint:
    """Resolves the files of a kyutai checkpoint directory from its `config.json` (or `config_path`) metadata.

    Args:
        source_dir: the checkpoint directory.
        config_path: a kyutai config json to use instead of `source_dir/config.json`.

    Returns:
        [`KyutaiCheckpoint`]; `lm_kwargs` is None when there is no config json (moshi then assumes moshiko).

    Raises:
        ValueError: `source_dir` is not a directory, the config json is missing, unreadable, not a JSON object or a
            config of this package, or there is no weights file (the message lists the files found).
    """
    source = Path(source_dir)
    if not source.is_dir():
        raise ValueError(f"kyutai checkpoint directory {str(source_dir)!r} does not exist or is not a directory")
    if config_path is None and (source / "config.json").is_file():
        config_path = source / "config.json"
    lm_kwargs = None if config_path is None else _read_kyutai_config(Path(config_path))
    metadata = lm_kwargs or {}
    found = sorted(path.name for path in source.iterdir())

    if "moshi_name" in metadata:
        weights = source / metadata["moshi_name"]
        if not weights.is_file():
            raise ValueError(f"the config names moshi_name={metadata['moshi_name']!r}, which is not in {source} "
                             f"(found: {found})")
    else:
        weights = next((source / name for name in KYUTAI_WEIGHTS_NAMES if (source / name).is_file()), None)
        if weights is None:
            raise ValueError(f"no moshi weights file in {source}: expected one of {list(KYUTAI_WEIGHTS_NAMES)} or "
                             f"config.json's moshi_name (found: {found})")
    if weights.suffix not in WEIGHTS_SUFFIXES:
        raise ValueError(f"moshi weights {weights.name!r}: only safetensors files ({', '.join(WEIGHTS_SUFFIXES)}) "
                         f"are read")
    tokenizer = source / metadata.get("tokenizer_name", KYUTAI_TOKENIZER_NAME)
    mimi = source / metadata.get("mimi_name", KYUTAI_MIMI_NAME)
    mimi_folder = source / MIMI_FOLDER
    return KyutaiCheckpoint(
        weights=weights,
        lm_kwargs=lm_kwargs,
        tokenizer=tokenizer if tokenizer.is_file() else None,
        mimi=mimi if mimi.is_file() else None,
        mimi_folder=mimi_folder if (mimi_folder / "config.json").is_file() else None,
    )


def convert_kyutai_checkpoint(
    source_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    user_init: str = "copy_system",
    config_path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
    quantize: str | None = None,
    device: str | torch.device = "cpu",
    **config_overrides: Any,
) -> ConversionResult:
    """Converts a kyutai Moshi checkpoint directory into a model directory of this package.

    The weights are read tensor by tensor (cast to `dtype` on the way), assigned to a model built on the meta device
    ([`MoshiUserPredForConditionalGeneration.from_moshi`]), and the user Depformer is initialised by `user_init`.
    The output holds what `save_pretrained` writes, `tokenizer.model` when the source has the text tokenizer, and
    `mimi/` when the source has a transformers Mimi folder.

    Args:
        source_dir: the kyutai checkpoint directory (see the module docstring).
        output_dir: the directory to write; it must not exist or be empty unless `overwrite`.
        user_init (`str`): `"copy_system"` (the user Depformer starts as the system one where shapes match) or
            `"random"`.
        config_path: a kyutai config json to use instead of `source_dir/config.json`.
        dtype (`torch.dtype`, *optional*): parameter dtype (default: the checkpoint's).
        overwrite (`bool`): replace a non-empty `output_dir`.
        progress (`bool`): show progress bars.
        quantize (`str`, *optional*): `"int8"` or `"int4"`: write torchao weight-only quantized weights
            (see [`quantization_config`]).
        device: where the weights are quantized (`"cuda"` for int4 packed two weights per byte).
        **config_overrides: fields of [`MoshiUserPredConfig`] (e.g. `user_dep_q=1`).

    Returns:
        [`ConversionResult`].

    Raises:
        ValueError: bad `user_init` or `quantize`, a missing source or weights file, a config json that is not JSON
            or sets an unsupported option, weights that do not match the config (every bad key is listed), or an
            output that exists and is not empty without `overwrite`.
    """
    if user_init not in USER_INITS:
        raise ValueError(f"user_init={user_init!r}: must be one of {USER_INITS}")
    checkpoint = find_kyutai_checkpoint(source_dir, config_path)
    output = check_output_dir(output_dir, overwrite, source=Path(source_dir))
    # Fail on a bad config (or a scheme it cannot take) before reading gigabytes of weights (from_moshi then builds
    # the same config).
    config = checkpoint.config(user_init=user_init, **config_overrides)
    if quantize is not None:
        quantization_config(quantize, config, device)

    with progress_bars(progress):
        state_dict = _read_weights(checkpoint.weights, dtype, progress)
        model = MoshiUserPredForConditionalGeneration.from_moshi(
            state_dict, checkpoint.lm_kwargs, user_init, dtype=dtype, **config_overrides)
        held_user_steps = f"linears.{model.config.dep_q}.weight" in state_dict  # a multistream checkpoint
        del state_dict  # the model holds the tensors now
        notes = _user_branch_notes(model, user_init, loaded=held_user_steps and model.user_depformer is None)

        with atomic_directory(output, overwrite=overwrite) as staging:
            if quantize is None:
                model.save_pretrained(staging)
            else:
                # Transformers quantizes while loading: the plain weights pass through the staging directory once.
                plain = staging / ".unquantized"
                model.save_pretrained(plain)
                del model
                _save_quantized(plain, staging, quantize, device)
                shutil.rmtree(plain)
            if checkpoint.tokenizer is not None:
                shutil.copyfile(checkpoint.tokenizer, staging / TOKENIZER_NAME)
            if checkpoint.mimi_folder is not None:
                shutil.copytree(checkpoint.mimi_folder, staging / MIMI_FOLDER)

    if checkpoint.tokenizer is None:
        notes.append(f"no text tokenizer in {checkpoint.weights.parent} (expected the config's tokenizer_name or "
                     f"{KYUTAI_TOKENIZER_NAME}): pass --tokenizer when encoding data")
    if checkpoint.mimi_folder is not None:
        notes.append(f"copied the transformers Mimi folder {checkpoint.mimi_folder} to {output / MIMI_FOLDER}")
    elif checkpoint.mimi is not None:
        notes.append(f"Mimi left in moshi format ({checkpoint.mimi}): transformers ships no converter for it; "
                     f"pass --mimi kyutai/mimi to stream")
    else:
        notes.append("no Mimi in the source: pass --mimi kyutai/mimi (or a transformers Mimi folder) to stream")
    if quantize is not None:
        notes.append(_quantization_note(output, quantize))
    return ConversionResult(output, *_count_weights(output), _files(output), notes)


def quantization_config(scheme: str, config: MoshiUserPredConfig, device: str | torch.device = "cpu") -> TorchAoConfig:
    """The torchao weight-only scheme `scheme` for a model of `config`, as the `TorchAoConfig` that
    `from_pretrained(..., quantization_config=...)` takes.

    Every `nn.Linear` weight is quantized except the one Transformers keeps for the model's last parameter (the last
    user head); embeddings, norms and biases keep the model's dtype, and activations stay floating point.

    - `"int8"`: `Int8WeightOnlyConfig()`, one int8 per weight and one scale per output channel.
    - `"int4"`: groups of `g` input weights share a scale and a zero point, `g` the first of `INT4_GROUP_SIZES`
      (`TINYGEMM_GROUP_SIZES` on CUDA) that divides every linear layer's input size (128 for moshiko). On CUDA, `Int4WeightOnlyConfig` in torchao's
      tinygemm layout (two weights per byte; the model must be bfloat16). On CPU, where torchao 0.18 has no int4
      kernel, `IntxWeightOnlyConfig(torch.int4, PerGroup(g))` with the same asymmetric grid, each int4 value held in
      one byte: int4's accuracy at int8's size.

    Raises:
        ValueError: an unknown `scheme`, torchao missing, or no group size that fits the model's layers.
    """
    if scheme not in QUANTIZATION_SCHEMES:
        raise ValueError(f"quantize={scheme!r}: must be one of {', '.join(QUANTIZATION_SCHEMES)}")
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType
        from torchao.quantization.granularity import PerGroup
    except ImportError as error:
        raise ValueError(f"quantize={scheme!r} needs torchao: pip install 'hf_moshi_userpred[quant]' "
                         f"({error})") from error
    if scheme == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    with torch.device("meta"):
        sizes = {module.in_features for module in MoshiUserPredForConditionalGeneration(config).modules()
                 if isinstance(module, nn.Linear)}
    on_cuda = torch.device(device).type == "cuda"
    candidates = TINYGEMM_GROUP_SIZES if on_cuda else INT4_GROUP_SIZES
    group_size = next((size for size in candidates if all(n % size == 0 for n in sizes)), None)
    if group_size is None:
        raise ValueError(f"quantize='int4': the linear layers' input sizes {sorted(sizes)} share no group size of "
                         f"{', '.join(map(str, candidates))} on {device}; use quantize='int8'")
    if on_cuda:
        return TorchAoConfig(Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d"))
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                              mapping_type=MappingType.ASYMMETRIC))


def quantize_model_directory(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    scheme: str,
    *,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Writes a torchao weight-only quantized copy of a model directory of this package ([`quantization_config`]).

    The output holds what `save_pretrained` writes (quantized safetensors, `config.json` with its
    `quantization_config`, the remote code), plus everything else the source holds beside its weights (`tokenizer.model`,
    `mimi/`, the turn-taking statistics, the training and metrics records) but its model card, which describes the
    unquantized weights. The source is only read.

    Args:
        model_dir: a directory written by `save_pretrained` (or [`convert_kyutai_checkpoint`]), not quantized.
        output_dir: the directory to write; it must not exist or be empty unless `overwrite`.
        scheme (`str`): `"int8"` or `"int4"`.
        device: where the weights are quantized (`"cuda"` for int4 packed two weights per byte).
        overwrite (`bool`): replace a non-empty `output_dir`.
        progress (`bool`): show progress bars.

    Raises:
        ValueError: `model_dir` is not a model directory of this package or is quantized already, a bad `scheme`, or
            an output that exists and is not empty without `overwrite`.
    """
    source = Path(model_dir)
    problem = describe_model_folder(source)
    if problem is not None:
        raise ValueError(f"{str(model_dir)!r} is not a model directory of hf_moshi_userpred: {problem}")
    config = MoshiUserPredConfig.from_pretrained(source)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{str(model_dir)!r} is quantized already ({config.quantization_config.get('quant_method')}):"
                         " quantize the unquantized model")
    quantization_config(scheme, config, device)
    output = check_output_dir(output_dir, overwrite, source=source)
    with progress_bars(progress), atomic_directory(output, overwrite=overwrite) as staging:
        _save_quantized(source, staging, scheme, device)
        copy_codec_files(source, staging)
        for entry in sorted(source.iterdir()):  # the loose files; not checkpoints or other folders (a training run's)
            if entry.is_file() and not (staging / entry.name).exists() and entry.name != "README.md" \
                    and entry.suffix not in _WEIGHT_SUFFIXES and not entry.name.endswith(".safetensors.index.json"):
                shutil.copyfile(entry, staging / entry.name)
    return ConversionResult(output, *_count_weights(output), _files(output), [_quantization_note(output, scheme)])


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".sft")  # weights stay behind: the quantized ones are written


def _save_quantized(source: Path, staging: Path, scheme: str, device: str | torch.device) -> None:
    """Loads the model directory `source` quantized by `scheme` on `device` and saves it into `staging`."""
    config = MoshiUserPredConfig.from_pretrained(source)
    # torchao's CUDA int4 kernel takes bfloat16 only.
    dtype = torch.bfloat16 if scheme == "int4" and torch.device(device).type == "cuda" else None
    model = MoshiUserPredForConditionalGeneration.from_pretrained(
        source, quantization_config=quantization_config(scheme, config, device), device_map=str(device),
        **({} if dtype is None else {"dtype": dtype}))
    model.save_pretrained(staging)


def _count_weights(folder: Path) -> tuple[int, int]:
    """Tensors and their elements in the safetensors files of `folder` (a quantized tensor counts as its parts)."""
    shapes = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            shapes += [weights.get_slice(key).get_shape() for key in weights.keys()]
    return len(shapes), sum(math.prod(shape) for shape in shapes)


def _quantization_note(folder: Path, scheme: str) -> str:
    quant_type = json.loads((folder / "config.json").read_text())["quantization_config"]["quant_type"]["default"]
    size = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    return (f"weights quantized {scheme} with torchao {quant_type['_type']} ({size / 1e6:.1f} MB); "
            "from_pretrained loads them quantized (torchao needed)")


def export_to_moshi(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Exports a model directory of this package to kyutai's checkpoint layout (without the user branch).

    Writes `model.safetensors` (the released fused layout of [`MoshiUserPredForConditionalGeneration.moshi_state_dict`])
    and `config.json` (moshi `LMModel` kwargs with `moshi_name`, and `tokenizer_name` when the model directory has a
    `tokenizer.model`, which is copied). moshi's `CheckpointInfo` reads the result; Mimi is not part of it.

    Args:
        model_dir: a directory written by `save_pretrained` (or [`convert_kyutai_checkpoint`]).
        output_dir: the directory to write; it must not exist or be empty unless `overwrite`.
        dtype (`torch.dtype`, *optional*): dtype of the exported weights (default: the saved model's).
        overwrite (`bool`): replace a non-empty `output_dir`.
        progress (`bool`): show progress bars.

    Returns:
        [`ConversionResult`].

    Raises:
        ValueError: `model_dir` is not a model directory of this package, or the output exists and is not empty
            without `overwrite`.
    """
    source = Path(model_dir)
    config_file = source / "config.json"
    try:
        saved_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{str(model_dir)!r} is not a model directory of hf_moshi_userpred "
                         f"(cannot read {config_file}: {error})") from error
    model_type = saved_config.get("model_type") if isinstance(saved_config, dict) else None
    if model_type != MoshiUserPredConfig.model_type:
        raise ValueError(f"{str(model_dir)!r} is not a model directory of hf_moshi_userpred: its config.json has "
                         f"model_type={model_type!r}, expected {MoshiUserPredConfig.model_type!r}")
    output = check_output_dir(output_dir, overwrite, source=source)

    with progress_bars(progress):
        try:
            model = MoshiUserPredForConditionalGeneration.from_pretrained(
                source, **({} if dtype is None else {"dtype": dtype}))
        except OSError as error:  # e.g. no weights file beside the config
            raise ValueError(f"cannot load the model in {str(model_dir)!r}: {error}") from error
        state_dict = {name: tensor.contiguous() for name, tensor in model.moshi_state_dict().items()}
        config = {**model.config.to_moshi_lm_kwargs(), "moshi_name": KYUTAI_WEIGHTS_NAME}
        shared = model.config.predict_user_audio and model.config.user_depformer == "shared"
        del model  # only the exported tensors are needed from here
        tokenizer = source / TOKENIZER_NAME if (source / TOKENIZER_NAME).is_file() else None
        if tokenizer is not None:
            config["tokenizer_name"] = TOKENIZER_NAME

        with atomic_directory(output, overwrite=overwrite) as staging:
            save_file(state_dict, staging / KYUTAI_WEIGHTS_NAME, metadata={"format": "pt"})
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if tokenizer is not None:
                shutil.copyfile(tokenizer, staging / TOKENIZER_NAME)

    notes = [] if tokenizer is not None else [f"no {TOKENIZER_NAME} in {source}: config.json names no tokenizer, so "
                                              f"moshi looks for {KYUTAI_TOKENIZER_NAME} beside the weights"]
    if shared:
        notes.append(f"the shared user branch is part of moshi's layout (dep_q={config['dep_q']}); Mimi is not "
                     f"exported (moshi reads it in its own format: put kyutai's {KYUTAI_MIMI_NAME} beside the weights)")
    else:
        notes.append(f"the user branch is not part of moshi's layout and was left out; Mimi is not exported (moshi "
                     f"reads it in its own format: put kyutai's {KYUTAI_MIMI_NAME} beside the weights)")
    num_parameters = sum(t.numel() for t in state_dict.values())
    return ConversionResult(output, len(state_dict), num_parameters, _files(output), notes)


def _read_kyutai_config(path: Path) -> dict[str, Any]:
    """A kyutai config json as a dict, refusing configs of this package (those are model directories already)."""
    config = read_json_object(path, "kyutai config")
    if config.get("model_type") == MoshiUserPredConfig.model_type:
        raise ValueError(f"{str(path)!r} is the config of a hf_moshi_userpred model directory, not a kyutai "
                         "checkpoint: load it with from_pretrained, or export it with export_to_moshi")
    return config


def _read_weights(path: Path, dtype: torch.dtype | None, progress: bool) -> dict[str, torch.Tensor]:
    """Reads a safetensors file tensor by tensor, casting floating tensors to `dtype` as they come (one copy at most
    of a tensor in flight, never of the whole checkpoint)."""
    state_dict = {}
    try:
        with safe_open(path, "pt") as weights:
            for key in logging.tqdm(list(weights.keys()), desc="Reading moshi weights", unit="tensor",
                                    disable=not progress):
                tensor = weights.get_tensor(key)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state_dict[key] = tensor
    except (OSError, SafetensorError) as error:
        raise ValueError(f"cannot read moshi weights {str(path)!r} as safetensors: {error}") from error
    return state_dict


def shared_user_steps_report(model: MoshiUserPredForConditionalGeneration) -> str:
    """Whether a shared user branch's steps (PersonaPlex's 8-15) are copies of the system's (0-7): a user stream that
    a loader initialised by copying and no training touched predicts the system's voice, not the user's. One line.

    Raises:
        ValueError: the model has no shared user branch.
    """
    c = model.config
    if not (c.predict_user_audio and c.user_depformer == "shared"):
        raise ValueError("shared_user_steps_report: the model has no shared user branch (user_depformer='shared')")
    params = dict(model.named_parameters())
    copies = []
    for step in range(c.dep_q, c.depformer_steps):
        pairs = [(param, params.get(model.system_counterpart(name))) for name, param in params.items()
                 if name.startswith(model.depformer_step_prefixes(step))]
        if all(source is None or (source.shape == param.shape and torch.equal(source, param))
               for param, source in pairs):
            copies.append(step)
    steps = f"user steps {c.dep_q}-{c.depformer_steps - 1} (shared Depformer)"
    if not copies:
        return f"{steps}: trained (none is a copy of its system step, 0-{c.user_dep_q - 1})"
    verdict = ("the user stream was initialised by copying and, unless trained since, predicts the system's voice: "
               "fine-tune the user branch (train --training_mode user_branch) before relying on its predictions")
    if len(copies) == c.user_dep_q:
        return f"{steps}: copies of steps 0-{c.user_dep_q - 1} ({len(copies)} of {c.user_dep_q}): {verdict}"
    return f"{steps}: {len(copies)} of {c.user_dep_q} are copies of their system step (steps {copies}): {verdict}"


def _user_branch_notes(model: MoshiUserPredForConditionalGeneration, user_init: str, loaded: bool) -> list[str]:
    """Describes the user branch: the diagnostic of a shared branch the checkpoint held (`loaded`), or the user
    Depformer's initialisation. `from_moshi` does not return `init_user_branch`'s list of tensors left random, so
    the (cheap) initialisation is run once more for it."""
    if not model.config.predict_user_audio:
        return ["no user branch (predict_user_audio=False)"]
    if loaded:
        return [shared_user_steps_report(model)]
    if model.user_depformer is None:  # a shared branch initialised from a single-stream checkpoint
        random_init = model.init_user_branch(user_init)
        return [f"shared user steps {model.config.dep_q}-{model.config.depformer_steps - 1}: initialised by "
                f"{user_init}" + (f" ({len(random_init)} tensors random)" if user_init == "copy_system" else ""),
                shared_user_steps_report(model)]
    total = sum(1 for _ in model.user_depformer.parameters())
    random_init = model.init_user_branch(user_init)
    if user_init == "random":
        return [f"user Depformer: randomly initialised ({total} tensors)"]
    if not random_init:
        return [f"user Depformer: all {total} tensors copied from the system Depformer"]
    return [f"user Depformer: {total - len(random_init)} of {total} tensors copied from the system Depformer; "
            f"{len(random_init)} kept their random init (no system counterpart of the same shape): "
            + ", ".join(random_init)]


def _files(folder: Path) -> list[str]:
    """Every file under `folder`, relative to it, `/`-separated, sorted."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Turns Transformers' own progress bars (loading, writing shards) off while `enabled` is False."""
    was_enabled = logging.is_progress_bar_enabled()
    if not enabled:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


__all__ = ["INT4_GROUP_SIZES", "QUANTIZATION_SCHEMES", "TINYGEMM_GROUP_SIZES", "ConversionResult", "KyutaiCheckpoint",
           "convert_kyutai_checkpoint", "export_to_moshi", "find_kyutai_checkpoint", "progress_bars",
           "quantization_config", "quantize_model_directory", "shared_user_steps_report"]
