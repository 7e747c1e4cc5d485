"""A saved model loads through `trust_remote_code` in a process where hf_moshi_userpred cannot be imported."""

from __future__ import annotations

import json

import pytest

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
                 "modeling_moshi_codes.py", "generation_moshi_userpred.py", "generation_moshi_config.py",
                 "generation_moshi_streaming.py", "generation_config.json"):
        assert (folder / name).is_file(), name
    codes = random_codes(model.config, frames=10)
    stdout, remote = load_without_package(folder, codes, tmp_path)
    assert "MoshiUserPredConfig MoshiUserPredForConditionalGeneration MoshiUserPredGenerationConfig 7" in stdout
    assert_same_outputs(model, codes, remote)
