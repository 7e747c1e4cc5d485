"""Shared fixtures: the moshi oracle, the parity configs, random codes."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# moshi compiles some kernels lazily with torch.compile; on CPU that only costs minutes.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

MOSHIKO_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]

# The three configs the parity bar names, as moshi LMModel kwargs.
PARITY_CONFIGS = {
    # moshiko-shaped, small: rope, rms_norm_f32, silu gating, context window, Depformer weights_per_step
    # + multi_linear + pos_emb none, moshiko's 17 delays.
    "moshiko_small": dict(
        dim=64, text_card=50, existing_text_padding_id=3, n_q=16, dep_q=8, card=40, num_heads=4, num_layers=2,
        hidden_scale=4.125, causal=True, layer_scale=None, context=5, max_period=10000, gating="silu",
        norm="rms_norm_f32", positional_embedding="rope", depformer_dim=32,
        depformer_dim_feedforward=int(4.125 * 32), depformer_num_heads=2, depformer_num_layers=2,
        depformer_layer_scale=None, depformer_multi_linear=True, depformer_context=8, depformer_max_period=10000,
        depformer_gating="silu", depformer_pos_emb="none", depformer_weights_per_step=True, delays=MOSHIKO_DELAYS,
    ),
    # sin positions, layer_norm, GELU MLP in the main transformer, low-rank normed Depformer embeddings,
    # a weights_per_step_schedule with per-set feed-forward widths, context 4, uneven delays, biased heads.
    "sin_lowrank_schedule": dict(
        dim=48, text_card=30, n_q=8, dep_q=4, card=24, num_heads=4, num_layers=2, hidden_scale=2,
        norm="layer_norm", positional_embedding="sin", gating="none", context=4, norm_emb=True, bias_proj=True,
        depformer_dim=32, depformer_num_heads=4, depformer_num_layers=2, depformer_gating="gelu",
        depformer_low_rank_embeddings=8, depformer_weights_per_step=True,
        depformer_weights_per_step_schedule=[0, 0, 1, 1], depformer_dim_feedforward=[40, 56],
        depformer_multi_linear=True, depformer_pos_emb="sin", depformer_norm="layer_norm",
        delays=[0, 0, 2, 1, 3, 1, 0, 2, 1],
    ),
    # grouped-query attention (kv_repeat 2), layer scale, sin_rope, float32 layer norm, unbounded context,
    # a separate text head size, extra heads, a GELU-MLP Depformer with rope_concat and f32 output norms.
    "gqa_layerscale": dict(
        dim=64, text_card=40, text_card_out=44, n_q=6, dep_q=3, card=32, num_heads=8, num_layers=2,
        hidden_scale=3, norm="layer_norm_f32", positional_embedding="sin_rope", gating="silu", kv_repeat=2,
        layer_scale=0.01, context=None, extra_heads_num_heads=2, extra_heads_dim=5, depformer_dim=32,
        depformer_num_heads=4, depformer_num_layers=1, depformer_gating="none", depformer_pos_emb="rope_concat",
        depformer_layer_scale=0.1, depformer_norm="layer_norm_f32", delays=[0, 0, 1, 2, 0, 1, 1],
    ),
}


GREEDY = dict(do_sample=False, audio_do_sample=False)  # greedy text and audio for a streaming session


@pytest.fixture(scope="module")
def one_thread():
    """Streaming tiny models is hundreds of small ops per step: intra-op threads only add synchronisation
    (a step is >10x slower with 2 threads on a loaded 2-core machine). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def moshi_lm():
    """moshi's `LMModel` class: the oracle. Its absence fails the run (CI installs it; see scripts/setup.sh)."""
    try:
        return importlib.import_module("moshi.models.lm").LMModel
    except ImportError as error:  # never a skip: parity tests must run wherever the suite runs
        pytest.fail(f"the moshi oracle is not installed ({error}); run `bash scripts/setup.sh test`")


def make_reference(LMModel, lm_kwargs: dict, seed: int = 0):
    """A moshi LMModel with every parameter perturbed, so norms, scales and biases are not at their init."""
    torch.manual_seed(seed)
    model = LMModel(**lm_kwargs).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def random_codes(config, batch: int = 2, frames: int = 12, seed: int = 0, zero_fraction: float = 0.05):
    """Valid codes `[B, 1 + n_q, T]` with a sprinkling of zero tokens (-1)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.card, (batch, 1 + config.n_q, frames), generator=generator)
    codes[:, 0] = torch.randint(0, config.text_card, (batch, frames), generator=generator)
    zeros = torch.rand(codes.shape, generator=generator) < zero_fraction
    return codes.masked_fill(zeros, -1)
