"""CUDA-only checks: the CUDA-graphed streaming step equals the eager one. Skipped where there is no GPU."""

from __future__ import annotations

import pytest
import torch

from helpers import PARITY_CONFIGS
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _stream(model, frames, **kwargs):
    tokens, predictions = [], []
    with model.streaming(frames.shape[0], do_sample=False, audio_do_sample=False, **kwargs) as stream:
        for t in range(frames.shape[2]):
            out = stream.step(frames[:, :, t : t + 1])
            tokens.append(out.tokens)
            predictions.append(out.user_prediction)
        stats = stream.stats
    return tokens, predictions, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [0, 2])
def test_cuda_graphs_equal_eager(dtype, top_k):
    torch.manual_seed(0)
    config = MoshiUserPredConfig.from_moshi_lm_kwargs(PARITY_CONFIGS["moshiko_small"])
    model = MoshiUserPredForConditionalGeneration(config).to("cuda", dtype).eval()
    generator = torch.Generator().manual_seed(1)
    frames = torch.randint(0, config.card, (3, config.n_q - config.dep_q, 120), generator=generator).cuda()
    graphed = _stream(model, frames, cuda_graphs=True, speculate_top_k=top_k)
    eager = _stream(model, frames, cuda_graphs=False, speculate_top_k=top_k)
    for a, b in zip(graphed[0], eager[0]):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(graphed[1], eager[1]):
        assert torch.equal(a, b)
    assert graphed[2].hits == eager[2].hits


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_streaming_with_cuda_graphs(scheme, tmp_path):
    """torchao's CUDA weight-only layouts (int4: tinygemm, two weights per byte, bfloat16) stream with CUDA graphs,
    equal to the eager quantized step, with logits close to the unquantized model's."""
    from hf_moshi_userpred.hub.conversion import quantization_config

    torch.manual_seed(0)
    config = MoshiUserPredConfig.from_moshi_lm_kwargs(PARITY_CONFIGS["moshiko_small"], hidden_scale=3,
                                                      depformer_dim_feedforward=96, user_depformer_dim_feedforward=96)
    MoshiUserPredForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmp_path)
    plain = MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path, device_map="cuda").eval()
    quantized = MoshiUserPredForConditionalGeneration.from_pretrained(
        tmp_path, device_map="cuda", quantization_config=quantization_config(scheme, config, "cuda")).eval()
    weight = quantized.transformer.layers[0].self_attn.in_projs[0].weight
    assert type(weight).__name__ == {"int8": "Int8Tensor", "int4": "Int4TilePackedTo4dTensor"}[scheme]
    frames = torch.randint(0, config.card, (2, config.n_q - config.dep_q, 60),
                           generator=torch.Generator().manual_seed(1)).cuda()
    graphed = _stream(quantized, frames, cuda_graphs=True)
    eager = _stream(quantized, frames, cuda_graphs=False)
    for a, b in zip(graphed[0], eager[0]):
        assert (a is None and b is None) or torch.equal(a, b)
    codes = torch.cat([torch.randint(0, config.text_card, (2, 1, 20)),
                       torch.randint(0, config.card, (2, config.n_q, 20))], dim=1).cuda()
    with torch.no_grad():
        expected = plain(codes).audio_logits.float().nan_to_num()
        got = quantized(codes).audio_logits.float().nan_to_num()
    error = ((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()
    assert 0 < error <= {"int8": 0.05, "int4": 0.35}[scheme], error  # as on CPU (test_quantization.py), in bfloat16
