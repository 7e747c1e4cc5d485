"""Bad input gets a ValueError that names the problem: codes, configs, checkpoints."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import PARITY_CONFIGS, make_reference, random_codes
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = MoshiUserPredConfig.from_moshi_lm_kwargs(PARITY_CONFIGS["moshiko_small"])
    return MoshiUserPredForConditionalGeneration(config).eval()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda c: torch.zeros(2, 16, 5, dtype=torch.long), r"shape \[B, 1 \+ n_q = 17, T\], got \(2, 16, 5\)"),
        (lambda c: torch.zeros(17, 5, dtype=torch.long), r"got \(17, 5\)"),
        (lambda c: torch.zeros(2, 17, 0, dtype=torch.long), r"at least one sequence and one frame.*\(2, 17, 0\)"),
        (lambda c: torch.zeros(2, 17, 5), r"integer tensor, got dtype torch.float32"),
        (lambda c: torch.zeros(2, 17, 5, dtype=torch.bool), r"integer tensor, got dtype torch.bool"),
        (lambda c: [[0]], r"integer tensor \[B, 1 \+ n_q = 17, T\], got list"),
        (lambda c: torch.zeros(2, 17, 5, dtype=torch.long, device="meta"), r"on meta but the model is on cpu"),
    ],
)
def test_malformed_codes(model, make, message):
    with pytest.raises(ValueError, match=message):
        model(make(model.config))


@pytest.mark.parametrize(
    "row, t, value, name",
    [
        (0, 3, 50, r"row 0 \(text\)"),  # text_card = 50
        (0, 0, -2, r"row 0 \(text\)"),  # ungenerated is not an input
        (2, 7, 40, r"row 2 \(system audio codebook 1\)"),  # card = 40: the initial token is not an input
        (12, 4, 1000, r"row 12 \(user audio codebook 3\)"),
    ],
)
def test_out_of_range_codes_name_row_time_and_value(model, row, t, value, name):
    codes = random_codes(model.config, frames=9)
    codes[1, row, t] = value
    valid = "0..49" if row == 0 else "0..39"
    pattern = rf"codes\[1, {row}, {t}\] = {value} is out of range for {name} at time step {t}: .*-1 .* or {valid}"
    with pytest.raises(ValueError, match=pattern):
        model(codes)


def test_other_integer_dtypes_are_accepted(model):
    codes = random_codes(model.config, frames=4)
    with torch.no_grad():
        a, b = model(codes), model(codes.to(torch.int32))
    assert torch.equal(a.audio_logits.nan_to_num(), b.audio_logits.nan_to_num())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(delays=[0, 1, 1]), r"delays=\[0, 1, 1\]: needs 1 \+ n_q = 17 entries"),
        (dict(user_dep_q=9), r"user_dep_q=9: must be in 1..n_q - dep_q = 8"),
        (dict(user_dep_q=0), r"user_dep_q=0"),
        (dict(depformer_weights_per_step_schedule=[0, 1]),
         r"depformer_weights_per_step_schedule=\[0, 1\]: needs one entry per Depformer step \(8\)"),
        (dict(depformer_weights_per_step=False, depformer_weights_per_step_schedule=[0] * 8),
         r"needs depformer_weights_per_step=True"),
        (dict(user_prediction_lookahead=0), r"user_prediction_lookahead=0: must be >= 1"),
        (dict(norm="batch_norm"), r"norm='batch_norm': must be one of"),
        (dict(num_heads=5), r"num_heads=5: must divide dim=64"),
        (dict(kv_repeat=3), r"kv_repeat=3: must divide the number of heads \(num_heads=4\)"),
        (dict(depformer_kv_repeat=2, user_depformer_num_heads=1, user_depformer_dim=16),
         r"depformer_kv_repeat=2: must divide the number of heads \(user_depformer_num_heads=1\)"),
        (dict(dep_q=16, delays=[0] * 17), r"predict_user_audio=True: the model has no user rows"),
        (dict(user_init="zeros"), r"user_init='zeros'"),
        (dict(dim="64"), r"dim='64': must be int, not str"),  # a hand-edited config.json
        (dict(num_layers=2.5), r"num_layers=2.5: must be int, not float"),
        (dict(context="3000"), r"context='3000': must be int or None, not str"),
        (dict(predict_user_audio="yes"), r"predict_user_audio='yes': must be bool, not str"),
        (dict(user_logit_temperature=["1"] * 8), r"user_logit_temperature=\['1'.*: must be list\[float\] or None"),
    ],
)
def test_config_validation_names_the_field(overrides, message):
    kwargs = {**PARITY_CONFIGS["moshiko_small"]}
    with pytest.raises(ValueError, match=message):
        MoshiUserPredConfig.from_moshi_lm_kwargs(kwargs, **overrides)


@pytest.mark.parametrize(
    "option, value",
    [("conditioners", {"description": {}}), ("fuser", {"sum": ["x"]}), ("cross_attention", True),
     ("demux_second_text_stream", True), ("quantize", True), ("lora", True), ("causal", False)],
)
def test_unsupported_moshi_options_are_named(option, value):
    with pytest.raises(ValueError, match=rf"moshi option {option}=.* is not supported"):
        MoshiUserPredConfig.from_moshi_lm_kwargs({**PARITY_CONFIGS["moshiko_small"], option: value})


def test_unknown_and_missing_moshi_kwargs():
    with pytest.raises(ValueError, match=r"unknown moshi lm_kwargs \['depformer_flux'\]"):
        MoshiUserPredConfig.from_moshi_lm_kwargs({**PARITY_CONFIGS["moshiko_small"], "depformer_flux": 1})
    kwargs = dict(PARITY_CONFIGS["moshiko_small"])
    del kwargs["num_layers"]
    with pytest.raises(ValueError, match="must give `num_layers`"):
        MoshiUserPredConfig.from_moshi_lm_kwargs(kwargs)


def test_kyutai_config_json_metadata_is_dropped():
    raw = {**PARITY_CONFIGS["moshiko_small"], "moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors",
           "tokenizer_name": "tok.model", "model_type": "moshi", "lm_gen_config": {"temp": 0.8}, "model_id": {}}
    config = MoshiUserPredConfig.from_moshi_lm_kwargs(raw)
    assert config.model_type == "moshi_userpred" and config.dim == 64


def test_checkpoint_mismatch_lists_every_bad_key(moshi_lm):
    lm_kwargs = PARITY_CONFIGS["moshiko_small"]
    state_dict = dict(make_reference(moshi_lm, lm_kwargs).state_dict())
    del state_dict["text_emb.weight"]
    del state_dict["depformer.layers.1.gating.3.linear_in.weight"]
    state_dict["transformer.layers.0.norm1.alpha"] = torch.ones(1, 1, 65)
    state_dict["linears.2.weight"] = torch.zeros(40, 31)
    state_dict["extra_thing.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as error:
        MoshiUserPredForConditionalGeneration.from_moshi(state_dict, lm_kwargs=lm_kwargs)
    text = str(error.value)
    assert "2 missing, 1 unexpected, 2 mis-shaped" in text
    for line in ("missing: text_emb.weight", "missing: depformer.layers.1.gating.3.linear_in.weight",
                 "unexpected: extra_thing.weight",
                 "mis-shaped: transformer.layers.0.norm1.alpha: checkpoint (1, 1, 65) vs model (1, 1, 64)",
                 "mis-shaped: linears.2.weight: checkpoint (40, 31) vs model (40, 32)"):
        assert line in text


def test_config_inconsistent_with_checkpoint(moshi_lm):
    lm_kwargs = PARITY_CONFIGS["moshiko_small"]
    state_dict = make_reference(moshi_lm, lm_kwargs).state_dict()
    with pytest.raises(ValueError, match=r"mis-shaped: text_emb.weight: checkpoint \(51, 64\) vs model \(61, 64\)"):
        MoshiUserPredForConditionalGeneration.from_moshi(state_dict, lm_kwargs=lm_kwargs, text_card=60)
    with pytest.raises(ValueError, match=r"missing: transformer.layers.2.norm1.alpha"):
        MoshiUserPredForConditionalGeneration.from_moshi(state_dict, lm_kwargs={**lm_kwargs, "num_layers": 3})
    fused = {"transformer.layers.0.self_attn.in_proj_weight": torch.zeros(10, 64)}
    with pytest.raises(ValueError, match=re.escape("self_attn.in_proj_weight: checkpoint (10, 64) vs model (192, 64)")):
        MoshiUserPredForConditionalGeneration.from_moshi({**state_dict, **fused}, lm_kwargs=lm_kwargs)


def test_bad_checkpoint_paths_and_user_init(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        MoshiUserPredForConditionalGeneration.from_moshi(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        MoshiUserPredForConditionalGeneration.from_moshi(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"user_init='copy'"):
        MoshiUserPredForConditionalGeneration.from_moshi({}, user_init="copy")


# ---------------------------------------------------------------------------- loading a folder that is not a model
@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """A saved tiny model, its kyutai export, the export's weights alone, the model's weights under an edited
    config, a LoRA adapter folder and the sample's Mimi."""
    import json
    import shutil

    from hf_moshi_userpred.hub.conversion import export_to_moshi
    from hf_moshi_userpred.sample import SAMPLE_MIMI

    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    MoshiUserPredForConditionalGeneration(MoshiUserPredConfig.from_moshi_lm_kwargs(
        PARITY_CONFIGS["moshiko_small"])).save_pretrained(root / "model")
    export_to_moshi(root / "model", root / "kyutai", progress=False)
    (root / "weights_only").mkdir()
    shutil.copyfile(root / "kyutai" / "model.safetensors", root / "weights_only" / "model.safetensors")
    shutil.copytree(root / "kyutai", root / "kyutai_with_our_config")
    shutil.copyfile(root / "model" / "config.json", root / "kyutai_with_our_config" / "config.json")
    shutil.copytree(root / "model", root / "reshaped")
    config = json.loads((root / "reshaped" / "config.json").read_text())
    (root / "reshaped" / "config.json").write_text(json.dumps({**config, "text_card": 60}))
    shutil.copytree(root / "model", root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text("{}")
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return {"root": root, "mimi": SAMPLE_MIMI}


@pytest.mark.parametrize(
    "folder, message",
    [
        ("kyutai", r"kyutai's moshi layout .* run `hf-moshi-userpred convert`"),
        ("weights_only", r"no config.json, and model.safetensors is a moshi checkpoint \(kyutai layout\)"),
        ("kyutai_with_our_config", r"do not match its config \(\d+ missing, \d+ unexpected .*kyutai layout"),
        ("reshaped", r"3 mismatched tensors, e.g. .*text_emb.weight: checkpoint \(51, 64\) vs config \(61, 64\)"),
        ("truncated", r"truncated or corrupt"),
        ("adapter", r"LoRA adapter"),
        ("mimi", r"holds a Mimi codec \(model_type 'mimi'\)"),
        ("missing/model", r"model directory '.*missing/model' does not exist"),
    ],
)
def test_from_pretrained_refuses_what_is_not_a_complete_model(saved_folders, folder, message):
    path = saved_folders["mimi"] if folder == "mimi" else saved_folders["root"] / folder
    with pytest.raises(ValueError, match=message) as error:
        MoshiUserPredForConditionalGeneration.from_pretrained(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_from_pretrained_still_loads_a_model_and_reports_clean_loading_info(saved_folders):
    model, info = MoshiUserPredForConditionalGeneration.from_pretrained(saved_folders["root"] / "model",
                                                                        output_loading_info=True)
    assert isinstance(model, MoshiUserPredForConditionalGeneration)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # Opting in to Transformers' re-initialisation of mis-shaped tensors still works.
    model = MoshiUserPredForConditionalGeneration.from_pretrained(saved_folders["root"] / "reshaped",
                                                                  ignore_mismatched_sizes=True)
    assert model.text_emb.weight.shape == (61, 64)


@pytest.mark.parametrize(
    "folder, message",
    [
        ("model", r"is not a Mimi codec folder: it is a hf_moshi_userpred model directory"),
        ("kyutai", r"kyutai moshi checkpoint"),
        ("weights_only", r"no config.json"),
        ("missing/mimi", r"does not exist"),
    ],
)
def test_load_mimi_refuses_other_folders(saved_folders, folder, message):
    from hf_moshi_userpred.data.audio import load_mimi

    with pytest.raises(ValueError, match=message):
        load_mimi(saved_folders["root"] / folder)
    assert load_mimi(saved_folders["mimi"]).config.model_type == "mimi"


def test_load_mimi_refuses_weights_that_do_not_match(saved_folders, tmp_path):
    import json
    import shutil

    from hf_moshi_userpred.data.audio import load_mimi

    shutil.copytree(saved_folders["mimi"], tmp_path / "mimi")
    config = json.loads((tmp_path / "mimi" / "config.json").read_text())
    (tmp_path / "mimi" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 9}))
    with pytest.raises(ValueError, match=r"Mimi weights in .* do not match its config \(\d+ missing"):
        load_mimi(tmp_path / "mimi")
