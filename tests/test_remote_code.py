"""A saved model loads through `trust_remote_code` in a process where hf_moshi_userpred cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from conftest import random_codes
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration

LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys
    sys.modules["hf_moshi_userpred"] = None  # any import of the package now fails
    import torch
    from transformers import AutoConfig, AutoModel

    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    codes = torch.load(folder + "/codes.pt")
    with torch.no_grad():
        out = model(codes, return_loss=True)
        streamed = model.generate(codes[:, 1 + config.dep_q:], progress=False, do_sample=False,
                                  audio_do_sample=False)
    results = {name: getattr(out, name) for name in ("text_logits", "audio_logits", "user_logits", "loss")}
    results.update(text_tokens=streamed.text_tokens, audio_codes=streamed.audio_codes,
                   user_prediction=streamed.user_prediction)
    torch.save(results, folder + "/remote_out.pt")
    print(type(config).__name__, type(model).__name__, type(model.generation_config).__name__,
          model.generation_config.audio_top_k)
    """
)


def load_without_package(folder, codes: torch.Tensor, tmp_path) -> tuple[str, dict]:
    """Runs LOAD_WITHOUT_PACKAGE on `folder` (writing `codes.pt` into it) with an empty HF cache, offline; returns
    the script's stdout and the outputs it saved."""
    torch.save(codes, folder / "codes.pt")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, torch.load(folder / "remote_out.pt")


def assert_same_outputs(model, codes: torch.Tensor, remote: dict):
    """The outputs LOAD_WITHOUT_PACKAGE saved equal the local model's, NaN positions included."""
    with torch.no_grad():
        local = model(codes, return_loss=True)
    streamed = model.generate(codes[:, 1 + model.config.dep_q:], progress=False, do_sample=False,
                              audio_do_sample=False)
    for name, value in remote.items():
        expected = getattr(local if hasattr(local, name) else streamed, name)
        assert torch.equal(value.nan_to_num(), expected.nan_to_num()), name


def tiny_remote_model() -> MoshiUserPredForConditionalGeneration:
    torch.manual_seed(0)
    config = MoshiUserPredConfig(dim=32, num_heads=2, num_layers=2, depformer_dim=16, depformer_num_heads=2,
                                 depformer_num_layers=1, depformer_dim_feedforward=32, card=20, text_card=24, n_q=6,
                                 dep_q=3, context=6, delays=[0, 0, 1, 1, 0, 1, 1], user_prediction_lookahead=2)
    model = MoshiUserPredForConditionalGeneration(config).eval()
    model.generation_config.audio_top_k = 7  # travels in generation_config.json
    return model


def test_trust_remote_code_reproduces_logits_and_streaming(tmp_path):
    model = tiny_remote_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["auto_map"] == {"AutoConfig": "configuration_moshi_userpred.MoshiUserPredConfig",
                                 "AutoModel": "modeling_moshi_userpred.MoshiUserPredForConditionalGeneration"}
    for name in ("configuration_moshi_userpred.py", "modeling_moshi_userpred.py", "modeling_moshi_transformer.py",
                 "modeling_moshi_depformer.py", "modeling_moshi_checkpoint.py", "modeling_moshi_cache.py",
                 "generation_moshi_userpred.py", "generation_config.json"):
        assert (folder / name).is_file(), name
    codes = random_codes(model.config, frames=10)
    stdout, remote = load_without_package(folder, codes, tmp_path)
    assert "MoshiUserPredConfig MoshiUserPredForConditionalGeneration MoshiUserPredGenerationConfig 7" in stdout
    assert_same_outputs(model, codes, remote)
