"""`convert`: kyutai checkpoint directories -> model directories of this package and back, checked against moshi."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from helpers import PARITY_CONFIGS, assert_same_as_moshi, make_reference, random_codes
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.audio import load_mimi
from hf_moshi_userpred.hub.conversion import (
    KYUTAI_MIMI_NAME,
    KYUTAI_TOKENIZER_NAME,
    convert_kyutai_checkpoint,
    export_to_moshi,
    find_kyutai_checkpoint,
)

LM_KWARGS = PARITY_CONFIGS["moshiko_small"]
SAMPLE = Path(__file__).parents[1] / "hf_moshi_userpred" / "sample"
# kyutai metadata beside the LM kwargs in a checkpoint's config.json (moshi's CheckpointInfo pops these)
METADATA = {"moshi_name": "model.safetensors", "tokenizer_name": KYUTAI_TOKENIZER_NAME, "mimi_name": KYUTAI_MIMI_NAME,
            "model_type": "moshi", "lm_gen_config": {"temp": 0.7, "temp_text": 0.7}}
MOSHI_METADATA = ("moshi_name", "mimi_name", "tokenizer_name", "model_type", "lm_gen_config")
SAVED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model"}  # besides remote code


@pytest.fixture(scope="module")
def reference(moshi_lm):
    return make_reference(moshi_lm, LM_KWARGS)


def released_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moshi's module state dict -> the layout of kyutai's released files: attention projections fused over weight
    sets (`self_attn.in_proj_weight`, `self_attn.out_proj.weight`), which moshi's load hook splits again."""
    out, fused = {}, {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight", key)
        if match is None:
            out[key] = value
        else:
            name = f"{match[1]}.in_proj_weight" if match[2] == "in" else f"{match[1]}.out_proj.weight"
            fused.setdefault(name, []).append((int(match[3]), value))
    out.update({name: torch.cat([value for _, value in sorted(parts)]) for name, parts in fused.items()})
    return out


def test_released_layout_is_what_moshi_loads(reference):
    fresh = type(reference)(**LM_KWARGS)
    fresh.load_state_dict(released_layout(reference.state_dict()), strict=True)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in fresh.state_dict().items())


def write_kyutai_dir(folder: Path, reference, config: dict | None = None, weights_name: str = "model.safetensors",
                     mimi_folder: bool = False, released: bool = True) -> Path:
    """A kyutai checkpoint directory: moshi's weights (kyutai's released layout, or moshi-finetune's unfused one),
    config.json (unless `config` is None), the tokenizer under kyutai's name, and Mimi as a stand-in moshi-format file
    or (`mimi_folder`) a transformers Mimi folder."""
    folder.mkdir(parents=True)
    weights = released_layout(reference.state_dict()) if released else reference.state_dict()
    save_file({key: value.contiguous() for key, value in weights.items()}, str(folder / weights_name))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(SAMPLE / "tokenizer.model", folder / KYUTAI_TOKENIZER_NAME)
    if mimi_folder:
        shutil.copytree(SAMPLE / "mimi", folder / "mimi")
    else:
        save_file({"not.converted": torch.zeros(1)}, str(folder / KYUTAI_MIMI_NAME))
    return folder


@pytest.fixture(scope="module")
def kyutai_dir(reference, tmp_path_factory):
    return write_kyutai_dir(tmp_path_factory.mktemp("kyutai") / "moshiko", reference, {**LM_KWARGS, **METADATA})


@pytest.fixture(scope="module")
def converted(kyutai_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "model"
    return convert_kyutai_checkpoint(kyutai_dir, output, progress=False)


def listing(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


def test_converted_directory_loads_and_matches_moshi(reference, kyutai_dir, converted):
    source_before = {name: (kyutai_dir / name).read_bytes() for name in listing(kyutai_dir)}
    output = converted.output_dir
    assert converted.files == listing(output)
    assert {name for name in converted.files if not name.endswith(".py")} == SAVED_FILES
    assert {"configuration_moshi_userpred.py", "modeling_moshi_userpred.py"} <= set(converted.files)  # remote code
    assert (output / "tokenizer.model").read_bytes() == (SAMPLE / "tokenizer.model").read_bytes()
    assert any(note.startswith(f"Mimi left in moshi format ({kyutai_dir / KYUTAI_MIMI_NAME})")
               for note in converted.notes)

    model = MoshiUserPredForConditionalGeneration.from_pretrained(output).eval()
    state = model.state_dict()
    assert (converted.num_tensors, converted.num_parameters) == (len(state), sum(t.numel() for t in state.values()))
    assert model.config.to_moshi_lm_kwargs() == MoshiUserPredConfig.from_moshi_lm_kwargs(LM_KWARGS).to_moshi_lm_kwargs()
    assert not hasattr(model.config, "lm_gen_config")  # kyutai metadata is not carried into the config
    codes = random_codes(model.config, frames=14)
    with torch.no_grad():
        assert_same_as_moshi(model(codes), reference(codes))
    assert {name: (kyutai_dir / name).read_bytes() for name in listing(kyutai_dir)} == source_before


@pytest.mark.parametrize("user_init", ["copy_system", "random"])
def test_user_init_copies_or_randomises_the_user_depformer(kyutai_dir, tmp_path, user_init):
    result = convert_kyutai_checkpoint(kyutai_dir, tmp_path / "model", user_init=user_init, progress=False)
    model = MoshiUserPredForConditionalGeneration.from_pretrained(result.output_dir)
    params = dict(model.named_parameters())
    user = {name: param for name, param in params.items() if name.startswith("user_depformer.")}
    pairs = {name: params[model.system_counterpart(name)] for name in user}
    assert all(user[name].shape == counterpart.shape for name, counterpart in pairs.items())  # all have one
    equal = {name for name, counterpart in pairs.items() if torch.equal(user[name], counterpart)}
    if user_init == "copy_system":
        assert equal == set(user)
        assert result.notes[0] == f"user Depformer: all {len(user)} tensors copied from the system Depformer"
    else:
        assert not equal
        assert result.notes[0] == f"user Depformer: randomly initialised ({len(user)} tensors)"


def test_copy_system_names_the_tensors_that_kept_their_random_init(kyutai_dir, tmp_path):
    # a third user layer has no system counterpart (the system Depformer has two)
    result = convert_kyutai_checkpoint(kyutai_dir, tmp_path / "model", user_depformer_num_layers=3, progress=False)
    model = MoshiUserPredForConditionalGeneration.from_pretrained(result.output_dir)
    user = [name for name, _ in model.named_parameters() if name.startswith("user_depformer.")]
    random_init = [name for name in user if name.startswith("user_depformer.transformer.layers.2.")]
    assert random_init
    assert result.notes[0] == (
        f"user Depformer: {len(user) - len(random_init)} of {len(user)} tensors copied from the system Depformer; "
        f"{len(random_init)} kept their random init (no system counterpart of the same shape): "
        + ", ".join(random_init))


@pytest.mark.parametrize(("weights_name", "named_in_config"),
                         [("model.sft", True), ("model.sft", False), ("consolidated.sfts", True)])
def test_sft_weights_are_read(reference, tmp_path, weights_name, named_in_config):
    config = {**LM_KWARGS, **METADATA, "moshi_name": weights_name} if named_in_config else dict(LM_KWARGS)
    # moshi-finetune's unfused layout this time
    source = write_kyutai_dir(tmp_path / "kyutai", reference, config, weights_name=weights_name, released=False)
    result = convert_kyutai_checkpoint(source, tmp_path / "model", predict_user_audio=False, progress=False)
    model = MoshiUserPredForConditionalGeneration.from_pretrained(result.output_dir)
    fresh = type(reference)(**LM_KWARGS)
    fresh.load_state_dict(model.moshi_state_dict(), strict=True)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in fresh.state_dict().items())
    assert result.notes[0] == "no user branch (predict_user_audio=False)"


def test_without_config_json_the_config_is_moshikos(reference, tmp_path):
    source = write_kyutai_dir(tmp_path / "kyutai", reference, config=None)
    checkpoint = find_kyutai_checkpoint(source)
    assert checkpoint.lm_kwargs is None
    assert (checkpoint.weights, checkpoint.tokenizer) == (source / "model.safetensors", source / KYUTAI_TOKENIZER_NAME)
    assert checkpoint.config().to_dict() == MoshiUserPredConfig().to_dict()
    assert checkpoint.config(user_dep_q=2).user_dep_q == 2
    # the small weights do not fit moshiko: the conversion says so, shape by shape (moshiko is built on meta only)
    moshiko_shape = r"mis-shaped: text_emb\.weight: checkpoint \(51, 64\) vs model \(32001, 4096\)"
    with pytest.raises(ValueError, match=moshiko_shape):
        convert_kyutai_checkpoint(source, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()
    # a config json given explicitly is used instead
    config_path = tmp_path / "small.json"
    config_path.write_text(json.dumps(LM_KWARGS))
    result = convert_kyutai_checkpoint(source, tmp_path / "model", config_path=config_path, progress=False)
    assert MoshiUserPredConfig.from_pretrained(result.output_dir).dim == LM_KWARGS["dim"]


def test_dtype_casts_the_weights(reference, kyutai_dir, tmp_path):
    result = convert_kyutai_checkpoint(kyutai_dir, tmp_path / "model", dtype=torch.bfloat16, progress=False)
    model = MoshiUserPredForConditionalGeneration.from_pretrained(result.output_dir)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    expected = released_layout(reference.state_dict())
    assert all(torch.equal(value, expected[key].to(torch.bfloat16)) for key, value in model.moshi_state_dict().items())


def test_progress_bars_can_be_turned_off(kyutai_dir, tmp_path, capfd):
    enabled = logging.is_progress_bar_enabled()
    convert_kyutai_checkpoint(kyutai_dir, tmp_path / "quiet", progress=False)
    export_to_moshi(tmp_path / "quiet", tmp_path / "quiet_moshi", progress=False)
    assert capfd.readouterr().err == ""
    assert logging.is_progress_bar_enabled() == enabled  # the global setting is restored
    logging.enable_progress_bar()
    try:
        convert_kyutai_checkpoint(kyutai_dir, tmp_path / "verbose")
    finally:
        if not enabled:
            logging.disable_progress_bar()
    assert "Reading moshi weights" in capfd.readouterr().err


def test_transformers_mimi_folder_is_copied(reference, tmp_path):
    source = write_kyutai_dir(tmp_path / "kyutai", reference, dict(LM_KWARGS), mimi_folder=True)
    result = convert_kyutai_checkpoint(source, tmp_path / "model", progress=False)
    assert {name for name in result.files if name.startswith("mimi/")} == {"mimi/config.json", "mimi/model.safetensors"}
    assert f"copied the transformers Mimi folder {source / 'mimi'} to {result.output_dir / 'mimi'}" in result.notes
    mimi, original = load_mimi(result.output_dir / "mimi"), load_mimi(SAMPLE / "mimi")
    assert mimi.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(value, original.state_dict()[key]) for key, value in mimi.state_dict().items())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_export_to_moshi_round_trips_through_moshis_loader(reference, converted, tmp_path, dtype):
    from moshi.models.loaders import CheckpointInfo

    result = export_to_moshi(converted.output_dir, tmp_path / "moshi", dtype=dtype, progress=False)
    out = result.output_dir
    assert result.files == listing(out) == ["config.json", "model.safetensors", "tokenizer.model"]
    config = json.loads((out / "config.json").read_text())
    assert (config["moshi_name"], config["tokenizer_name"]) == ("model.safetensors", "tokenizer.model")
    assert (out / "tokenizer.model").read_bytes() == (SAMPLE / "tokenizer.model").read_bytes()

    weights = load_file(str(out / "model.safetensors"))
    expected = released_layout(reference.state_dict())
    assert weights.keys() == expected.keys()  # kyutai's released layout, no user branch
    assert (result.num_tensors, result.num_parameters) == (len(expected), sum(t.numel() for t in expected.values()))
    want = torch.float32 if dtype is None else dtype
    assert all(torch.equal(weights[key], expected[key].to(want)) for key in expected)
    fresh = type(reference)(**{key: value for key, value in config.items() if key not in MOSHI_METADATA})
    fresh.load_state_dict(weights, strict=True)
    assert all(torch.equal(value, reference.state_dict()[key].to(want)) for key, value in fresh.state_dict().items())
    # moshi's own loader reads the directory (local paths: nothing is downloaded)
    info = CheckpointInfo.from_hf_repo("local", moshi_weights=out / "model.safetensors", mimi_weights=out / "absent",
                                       tokenizer=out / config["tokenizer_name"], config_path=out / "config.json")
    loaded = info.get_moshi(device="cpu", dtype=want).eval()
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in loaded.state_dict().items())
    assert info.get_text_tokenizer().vocab_size() > 0


def test_an_export_converts_back_to_the_same_model(reference, converted, tmp_path):
    exported = export_to_moshi(converted.output_dir, tmp_path / "moshi", progress=False).output_dir
    result = convert_kyutai_checkpoint(exported, tmp_path / "again", progress=False)
    assert (result.output_dir / "tokenizer.model").read_bytes() == (SAMPLE / "tokenizer.model").read_bytes()
    model = MoshiUserPredForConditionalGeneration.from_pretrained(result.output_dir).eval()
    codes = random_codes(model.config, frames=10, seed=4)
    with torch.no_grad():
        assert_same_as_moshi(model(codes), reference(codes))


def test_a_failed_write_leaves_no_output_and_keeps_the_old_one(kyutai_dir, tmp_path, monkeypatch):
    def fail_midway(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(MoshiUserPredForConditionalGeneration, "save_pretrained", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_kyutai_checkpoint(kyutai_dir, tmp_path / "model", progress=False)
    assert listing(tmp_path) == []  # neither the output nor a temporary directory
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.txt").write_text("previous conversion")
    with pytest.raises(RuntimeError, match="disk full"):
        convert_kyutai_checkpoint(kyutai_dir, tmp_path / "model", overwrite=True, progress=False)
    assert listing(tmp_path) == ["model", "model/old.txt"]


def test_overwrite(kyutai_dir, tmp_path):
    output = tmp_path / "model"
    output.mkdir()  # an empty directory is fine
    convert_kyutai_checkpoint(kyutai_dir, output, progress=False)
    (output / "stale.txt").write_text("from before")
    with pytest.raises(ValueError, match=f"output directory '{output}' exists and is not empty"):
        convert_kyutai_checkpoint(kyutai_dir, output, progress=False)
    result = convert_kyutai_checkpoint(kyutai_dir, output, user_init="random", overwrite=True, progress=False)
    assert "stale.txt" not in listing(output)
    assert result.files == listing(output)
    assert listing(tmp_path) == ["model", *(f"model/{name}" for name in result.files)]  # nothing left beside it


def _edit_config(source: Path, **changes) -> None:
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **changes}))


# (how to spoil a kyutai directory, convert kwargs, expected message)
CONVERT_ERRORS = {
    "missing_source": (lambda source: shutil.rmtree(source), {}, "does not exist or is not a directory"),
    "no_weights": (lambda source: ((source / "config.json").write_text(json.dumps(LM_KWARGS)),
                                   (source / "model.safetensors").unlink()), {},
                   r"no moshi weights file in .*: expected one of \['model.safetensors', 'model.sft'\] or "
                   r"config.json's moshi_name \(found: "
                   rf"\['config.json', '{KYUTAI_MIMI_NAME}', '{KYUTAI_TOKENIZER_NAME}'\]\)"),
    "moshi_name_absent": (lambda source: _edit_config(source, moshi_name="other.safetensors"), {},
                          r"the config names moshi_name='other.safetensors', which is not in"),
    "torch_weights": (lambda source: (_edit_config(source, moshi_name="model.pt"),
                                      (source / "model.pt").write_bytes(b"")), {},
                      r"moshi weights 'model.pt': only safetensors files \(.safetensors, .sft, .sfts\) are read"),
    "corrupt_weights": (lambda source: (source / "model.safetensors").write_bytes(b"not safetensors"), {},
                        "cannot read moshi weights .*model.safetensors' as safetensors"),
    "weights_do_not_match": (lambda source: _edit_config(source, num_layers=3), {},
                             r"does not match the config \(6 missing, 0 unexpected, 0 mis-shaped keys\):\n"
                             r"  missing: transformer\.layers\.2\."),
    "config_not_json": (lambda source: (source / "config.json").write_text("{dim: 64"), {}, "is not valid JSON"),
    "config_not_object": (lambda source: (source / "config.json").write_text("[1, 2]"), {},
                          "must hold a JSON object, got list"),
    "unsupported_option": (lambda source: _edit_config(source, cross_attention=True), {},
                           "moshi option cross_attention=True is not supported"),
    "unknown_option": (lambda source: _edit_config(source, dimension=64), {},
                       r"unknown moshi lm_kwargs \['dimension'\]"),
    "bad_user_init": (lambda source: None, {"user_init": "mirror"},
                      r"user_init='mirror': must be one of \('random', 'copy_system'\)"),
    "bad_override": (lambda source: None, {"user_dep_q": 9}, r"user_dep_q=9: must be in 1..n_q - dep_q = 8"),
}


@pytest.mark.parametrize("case", list(CONVERT_ERRORS))
def test_convert_errors_name_the_offending_value(reference, tmp_path, case):
    spoil, kwargs, message = CONVERT_ERRORS[case]
    source = write_kyutai_dir(tmp_path / "kyutai", reference, {**LM_KWARGS, **METADATA})
    spoil(source)
    with pytest.raises(ValueError, match=message):
        convert_kyutai_checkpoint(source, tmp_path / "model", progress=False, **kwargs)
    assert not (tmp_path / "model").exists()


def test_outputs_never_replace_or_enter_the_source(kyutai_dir, converted, tmp_path):
    with pytest.raises(ValueError, match="overlaps the source"):
        convert_kyutai_checkpoint(kyutai_dir, kyutai_dir, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="overlaps the source"):
        convert_kyutai_checkpoint(kyutai_dir, kyutai_dir / "hf", progress=False)
    with pytest.raises(ValueError, match="overlaps the source"):
        export_to_moshi(converted.output_dir, converted.output_dir.parent, overwrite=True, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        convert_kyutai_checkpoint(kyutai_dir, tmp_path / "file", overwrite=True, progress=False)


def test_a_model_directory_is_not_a_kyutai_checkpoint_and_vice_versa(kyutai_dir, converted, tmp_path):
    with pytest.raises(ValueError, match="is the config of a hf_moshi_userpred model directory"):
        convert_kyutai_checkpoint(converted.output_dir, tmp_path / "model", progress=False)
    with pytest.raises(ValueError, match=r"its config.json has model_type='moshi', expected 'moshi_userpred'"):
        export_to_moshi(kyutai_dir, tmp_path / "moshi", progress=False)
    with pytest.raises(ValueError, match=r"is not a model directory of hf_moshi_userpred \(cannot read"):
        export_to_moshi(tmp_path / "absent", tmp_path / "moshi", progress=False)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copyfile(converted.output_dir / "config.json", no_weights / "config.json")
    with pytest.raises(ValueError, match="no weights beside its config.json"):
        export_to_moshi(no_weights, tmp_path / "moshi", progress=False)
    assert not (tmp_path / "moshi").exists()
