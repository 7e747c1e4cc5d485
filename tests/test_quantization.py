"""Quantized weights: torch.ao dynamic int8 and torchao weight-only int8 / int4 (through `TorchAoConfig` on
`from_pretrained`) stream; `convert --quantize` writes a folder that loads back, also through `trust_remote_code`.

torchao 0.18 has no CPU kernel for `Int4WeightOnlyConfig` (its layouts need CUDA or mslk): on CPU the int4 scheme is
`IntxWeightOnlyConfig(torch.int4)` (the same grid, one value per byte); the packed CUDA layout is in test_cuda.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import GREEDY, assert_same_outputs, load_without_package, random_codes, tiny_model
from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.cli.main import main
from hf_moshi_userpred.hub.conversion import quantization_config
from hf_moshi_userpred.sample import SAMPLE_MIMI, SAMPLE_TOKENIZER

# RMS logit error of a quantized random tiny model, relative to the RMS of the unquantized logits (measured: int8
# 1.5-1.7 %, int4 21-24 %: random weights are the least compressible, and int4 groups of 16 have 16 levels).
LOGIT_TOLERANCE = {"int8": 0.03, "int4": 0.35}


def _relative_rms_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.nan_to_num(), expected.nan_to_num()
    return ((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


def _int4_sized_model():
    """A tiny random model whose linear layers all take multiples of 16 inputs (int4 groups)."""
    return tiny_model(hidden_scale=3, depformer_dim_feedforward=96, user_depformer_dim_feedforward=96)


def _greedy_agreement(model, reference, user_codes) -> float:
    """Fraction of streaming steps whose text and audio tokens are identical in both models (greedy)."""
    ours = model.generate(user_codes, progress=False, **GREEDY)
    theirs = reference.generate(user_codes, progress=False, **GREEDY)
    same = (ours.text_tokens == theirs.text_tokens).all(0) & (ours.audio_codes == theirs.audio_codes).all(1).all(0)
    return same.float().mean().item()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    model = _int4_sized_model()
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_torchao_weights_shrink_and_keep_the_logits(scheme, saved_model, tmp_path, one_thread):
    model, folder = saved_model
    quantized = MoshiUserPredForConditionalGeneration.from_pretrained(
        folder, quantization_config=quantization_config(scheme, model.config))
    assert type(quantized.transformer.layers[0].self_attn.in_projs[0].weight).__module__.startswith("torchao.")
    codes = random_codes(model.config, frames=10)
    with torch.no_grad():
        expected, got = model(codes), quantized(codes)
    for name in ("text_logits", "audio_logits", "user_logits"):
        error = _relative_rms_error(getattr(got, name), getattr(expected, name))
        assert 0 < error <= LOGIT_TOLERANCE[scheme], (name, error)
    # Streaming runs on the quantized weights (the cache set-up used to read a Linear's weight dtype).
    streamed = quantized.generate(codes[:, 1 + model.config.dep_q:], progress=False, **GREEDY)
    assert streamed.text_tokens.shape == (2, 9)
    quantized.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    # int8 storage for both on CPU (int4 values one per byte), plus scales: well under fp32's 4 bytes a weight.
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < 0.5 * (folder / "model.safetensors").stat().st_size
    reloaded = MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(reloaded(codes).audio_logits.nan_to_num(), got.audio_logits.nan_to_num())


@pytest.mark.slow  # the session's demo model trains for about 40 s when no other test has asked for it
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_trained_model_streams_the_same_greedy_tokens(scheme, demo_model_dir, one_thread):
    """On a trained model (the sample demo's) greedy streaming agrees with the unquantized model on most steps."""
    model = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir)
    quantized = MoshiUserPredForConditionalGeneration.from_pretrained(
        demo_model_dir, quantization_config=quantization_config(scheme, model.config))
    user = torch.randint(0, model.config.card, (1, model.config.n_q - model.config.dep_q, 40),
                         generator=torch.Generator().manual_seed(0))
    assert _greedy_agreement(quantized, model, user) >= 0.9


def test_dynamic_int8_quantization_streams(one_thread):
    """`torch.ao.quantization.quantize_dynamic` replaces Linear weights by a method: streaming used to fail reading
    `weight.dtype` while building its caches."""
    model = _int4_sized_model()
    dynamic = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert callable(dynamic.transformer.layers[0].self_attn.in_projs[0].weight)
    codes = random_codes(model.config, frames=8)
    with torch.no_grad():
        expected, got = model(codes), dynamic(codes)
    assert 0 < _relative_rms_error(got.text_logits, expected.text_logits) <= 0.1  # activations too: 4 % measured
    with dynamic.streaming(2, do_sample=False, audio_do_sample=False, speculate_top_k=2) as stream:
        for t in range(8):
            out = stream.step(codes[:, 1 + model.config.dep_q:, t : t + 1])
    assert out.tokens.shape == (2, 1 + model.config.dep_q, 1) and out.user_prediction.shape[0] == 2


def test_quantization_config_refuses_what_it_cannot_do():
    config = tiny_model().config  # feed-forward widths of 88: no int4 group size divides them
    with pytest.raises(ValueError, match="'bogus'"):
        quantization_config("bogus", config)
    with pytest.raises(ValueError, match=r"int4.*88"):
        quantization_config("int4", config)


def test_a_torchao_layout_without_a_cpu_kernel_is_one_clear_error(saved_model):
    """torchao 0.18's `Int4WeightOnlyConfig` has no CPU layout (its default needs the mslk kernels, tinygemm CUDA): the
    cause, not Transformers' pointer to a load report that `from_pretrained` keeps to itself."""
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import TorchAoConfig

    _, folder = saved_model
    with pytest.raises(ValueError, match=r"with Int4WeightOnlyConfig: ImportError: .*mslk"):
        MoshiUserPredForConditionalGeneration.from_pretrained(
            folder, quantization_config=TorchAoConfig(Int4WeightOnlyConfig(group_size=32)))


@pytest.mark.slow
def test_convert_quantize_int8_round_trip_through_remote_code(saved_model, tmp_path, capsys, one_thread):
    model, folder = saved_model
    source = tmp_path / "source"
    shutil.copytree(folder, source)
    shutil.copyfile(SAMPLE_TOKENIZER, source / "tokenizer.model")
    shutil.copytree(SAMPLE_MIMI, source / "mimi")
    (source / "turn_taking_statistics.json").write_text('{"horizon": 10}')  # what serve reads beside the weights
    (source / "README.md").write_text("card of the unquantized model")
    (source / "checkpoint-10").mkdir()  # a training run's folder: not copied
    before = {path.name: path.stat().st_mtime_ns for path in source.iterdir()}
    assert main(["convert", str(source), str(tmp_path / "int8"), "--quantize", "int8", "--quiet"]) == 0
    assert "quantized int8 with torchao Int8WeightOnlyConfig" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in source.iterdir()} == before  # the source is only read
    out = tmp_path / "int8"
    assert (out / "tokenizer.model").is_file() and (out / "mimi" / "config.json").is_file()
    assert (out / "turn_taking_statistics.json").read_text() == '{"horizon": 10}'
    assert not (out / "README.md").exists() and not (out / "checkpoint-10").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_type"]["default"]["_type"] \
        == "Int8WeightOnlyConfig"
    local = MoshiUserPredForConditionalGeneration.from_pretrained(out)
    codes = random_codes(model.config, batch=1, frames=6)
    stdout, remote = load_without_package(out, codes, tmp_path)
    assert "MoshiUserPredForConditionalGeneration" in stdout
    assert_same_outputs(local, codes, remote)


def test_convert_quantizes_a_kyutai_checkpoint(saved_model, tmp_path, capsys, one_thread):
    _, folder = saved_model
    assert main(["convert", str(folder), str(tmp_path / "kyutai"), "--to-moshi", "--quiet"]) == 0
    assert main(["convert", str(tmp_path / "kyutai"), str(tmp_path / "int8"), "--quantize", "int8", "--quiet"]) == 0
    assert "quantized int8" in capsys.readouterr().out
    assert not any(path.name.startswith(".") for path in (tmp_path / "int8").iterdir())  # no plain copy left over
    model = MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path / "int8")
    assert type(model.depformer.heads[0].weight).__name__ == "Int8Tensor"
    assert model.config.to_dict()["quantization_config"]["quant_method"] == "torchao"
