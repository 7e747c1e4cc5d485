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
