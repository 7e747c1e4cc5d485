"""A saved model loads through `trust_remote_code` in a process where hf_moshi_userpred cannot be imported."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_same_outputs, load_without_package, random_codes, tiny_remote_model

pytestmark = pytest.mark.slow  # subprocesses / end-to-end runs


def test_trust_remote_code_reproduces_logits_and_streaming(tmp_path):
    model = tiny_remote_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["auto_map"] == {"AutoConfig": "configuration_moshi_userpred.MoshiUserPredConfig",
                                 "AutoModel": "modeling_moshi_userpred.MoshiUserPredForConditionalGeneration"}
    for name in ("configuration_moshi_userpred.py", "modeling_moshi_userpred.py", "modeling_moshi_transformer.py",
                 "modeling_moshi_depformer.py", "modeling_moshi_checkpoint.py", "modeling_moshi_cache.py",
                 "modeling_moshi_codes.py", "modeling_moshi_loading.py", "modeling_moshi_streaming_step.py",
                 "generation_moshi_userpred.py", "generation_moshi_config.py", "generation_moshi_streaming.py",
                 "generation_moshi_cuda_graphs.py", "generation_config.json"):
        assert (folder / name).is_file(), name
    codes = random_codes(model.config, frames=10)
    stdout, remote = load_without_package(folder, codes, tmp_path)
    assert "MoshiUserPredConfig MoshiUserPredForConditionalGeneration MoshiUserPredGenerationConfig 7" in stdout
    assert_same_outputs(model, codes, remote)


def assert_close_to_saved(got, expected, name: str) -> None:
    """Integer outputs (tokens) identical, float ones (logits, losses) within float32 rounding."""
    if expected.is_floating_point():
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, equal_nan=True, msg=name)
    else:
        assert torch.equal(got, expected), name


def test_a_model_saved_before_the_layout_move_still_loads_both_ways(tmp_path):
    """`tests/fixtures/model_saved_before_layout` was saved by the flat package (commit fac5d90), with its outputs:
    it loads through its own remote code where the package is absent, and through the package's auto classes."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoModel

    import hf_moshi_userpred  # noqa: F401  (registers the auto classes)

    folder = tmp_path / "old_model"
    shutil.copytree(Path(__file__).parent / "fixtures" / "model_saved_before_layout", folder)
    codes, expected = torch.load(folder / "codes.pt"), torch.load(folder / "expected_outputs.pt")
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"] == \
        "modeling_moshi_userpred.MoshiUserPredForConditionalGeneration"

    # Float outputs equal to rounding: they were saved by older transformers and torch builds, whose kernels may
    # round differently (1e-6 apart with transformers 5.25); the greedy tokens must be identical.
    _, remote = load_without_package(folder, codes, tmp_path)
    for name, value in expected.items():
        assert_close_to_saved(remote[name], value, name)

    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__module__ == "hf_moshi_userpred.models.modeling_moshi_userpred"
    with torch.no_grad():
        out = model(codes, return_loss=True)
    streamed = model.generate(codes[:, 1 + model.config.dep_q:], progress=False, do_sample=False, audio_do_sample=False)
    for name, value in expected.items():
        assert_close_to_saved(getattr(out if hasattr(out, name) else streamed, name), value, name)
