"""Numerical parity with kyutai's moshi (the oracle): logits, masks, losses, checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from helpers import PARITY_CONFIGS, make_reference, random_codes
from hf_moshi_userpred import MoshiUserPredForConditionalGeneration


def load_from(reference, lm_kwargs, **overrides):
    return MoshiUserPredForConditionalGeneration.from_moshi(
        reference.state_dict(), lm_kwargs=lm_kwargs, dtype=torch.float32, **overrides
    )


def assert_same_as_moshi(output, expected):
    assert torch.equal(output.text_mask, expected.text_mask)
    assert torch.equal(output.audio_mask, expected.mask)
    torch.testing.assert_close(output.text_logits, expected.text_logits, rtol=0, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(output.audio_logits, expected.logits, rtol=0, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("user_branch", [False, True], ids=["user_off", "user_on"])
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_and_masks_match_moshi(moshi_lm, name, user_branch):
    lm_kwargs = PARITY_CONFIGS[name]
    reference = make_reference(moshi_lm, lm_kwargs)
    model = load_from(reference, lm_kwargs, predict_user_audio=user_branch)
    codes = random_codes(model.config, frames=14)
    with torch.no_grad():
        expected, output = reference(codes), model(codes)
    assert_same_as_moshi(output, expected)
    # the masks are not trivial: delay tails and zero-token targets are excluded
    assert not expected.mask.all() or not any(lm_kwargs["delays"])
    assert (output.user_logits is not None) == user_branch
    if user_branch:
        config = model.config
        assert output.user_logits.shape == (2, config.user_dep_q, 14, config.card)
        assert output.user_mask.shape == (2, config.user_dep_q, 14)


def test_parity_holds_across_batch_and_length(moshi_lm):
    lm_kwargs = PARITY_CONFIGS["moshiko_small"]  # context 5 < T: the sliding window binds
    reference = make_reference(moshi_lm, lm_kwargs, seed=3)
    model = load_from(reference, lm_kwargs)
    codes = random_codes(model.config, batch=3, frames=40, seed=5)
    with torch.no_grad():
        assert_same_as_moshi(model(codes), reference(codes))


def moshi_finetune_loss(logits, target, mask, mode, first_codebook_weight_multiplier=1.0,
                        text_padding_weight=1.0, text_padding_ids=()):
    """moshi-finetune's `compute_loss_with_mask`, written out from its definition."""
    target = torch.where(mask, target, torch.zeros_like(target))
    weights = mask.float()
    if mode == "audio":
        weights[:, 0] *= first_codebook_weight_multiplier
    else:
        for token in text_padding_ids:
            weights[target == token] *= text_padding_weight
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
    ce = torch.where(mask.reshape(-1), ce, torch.zeros_like(ce))
    return (ce * weights.reshape(-1)).sum() / weights.sum()


@pytest.mark.parametrize("name", ["moshiko_small", "sin_lowrank_schedule"])
def test_losses_equal_cross_entropy_from_moshi_outputs(moshi_lm, name):
    lm_kwargs = PARITY_CONFIGS[name]
    reference = make_reference(moshi_lm, lm_kwargs)
    model = load_from(reference, lm_kwargs, first_codebook_weight_multiplier=2.5, text_padding_weight=0.3,
                      user_loss_weight=0.7)
    codes = random_codes(model.config, frames=16, seed=1)
    codes[:, 0, ::3] = 3  # padding
    codes[:, 0, 1::5] = 0  # end of padding
    with torch.no_grad():
        expected = reference(codes)
        output = model(codes, return_loss=True)
    text = moshi_finetune_loss(expected.text_logits, codes[:, :1], expected.text_mask, "text",
                               text_padding_weight=0.3, text_padding_ids={3, 0})
    audio = moshi_finetune_loss(expected.logits, codes[:, 1:1 + model.config.dep_q], expected.mask, "audio",
                                first_codebook_weight_multiplier=2.5)
    torch.testing.assert_close(output.text_loss, text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.audio_loss, audio, rtol=1e-5, atol=1e-6)
    user = moshi_finetune_loss(output.user_logits, codes[:, model.user_rows], output.user_mask, "audio",
                               first_codebook_weight_multiplier=2.5)
    torch.testing.assert_close(output.user_loss, user, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss, text + audio + 0.7 * user, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_export_loads_strictly_into_moshi_and_round_trips(moshi_lm, name, tmp_path):
    lm_kwargs = PARITY_CONFIGS[name]
    reference = make_reference(moshi_lm, lm_kwargs)
    model = load_from(reference, lm_kwargs)
    exported = model.moshi_state_dict()
    assert not any(key.startswith("user_depformer") for key in exported)
    assert any(key.endswith("self_attn.in_proj_weight") for key in exported)  # kyutai's released (fused) layout
    fresh = moshi_lm(**lm_kwargs).eval()
    fresh.load_state_dict(exported, strict=True)
    # the released layout, read back from a .safetensors file, gives the same model again
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in exported.items()}, str(path))
    reloaded = MoshiUserPredForConditionalGeneration.from_moshi(path, lm_kwargs=lm_kwargs, predict_user_audio=False)
    codes = random_codes(model.config, seed=2)
    with torch.no_grad():
        expected = reference(codes)
        assert_same_as_moshi(reloaded(codes), expected)
        assert_same_as_moshi(model(codes), fresh(codes))


def test_default_config_is_moshiko():
    """`from_moshi(checkpoint)` without lm_kwargs relies on the config defaults being moshiko's `_lm_kwargs`."""
    from moshi.models.loaders import _lm_kwargs

    from hf_moshi_userpred import MoshiUserPredConfig

    default = MoshiUserPredConfig()
    assert default.to_moshi_lm_kwargs() == MoshiUserPredConfig.from_moshi_lm_kwargs(_lm_kwargs).to_moshi_lm_kwargs()
    assert (default.user_dep_q, default.user_depformer_dim, default.user_prediction_lookahead) == (8, 1024, 1)


def test_moshiko_instantiates_on_meta_with_moshi_parameter_count(moshi_lm):
    from moshi.models.loaders import _lm_kwargs

    from hf_moshi_userpred import MoshiUserPredConfig

    reference = moshi_lm(device="meta", **_lm_kwargs)
    moshi_count = sum(p.numel() for p in reference.parameters())
    config = MoshiUserPredConfig.from_moshi_lm_kwargs(_lm_kwargs)
    with torch.device("meta"):
        model = MoshiUserPredForConditionalGeneration(config)
    assert all(p.is_meta for p in model.parameters())
    user_count = sum(p.numel() for p in model.user_depformer.parameters())
    system_count = sum(p.numel() for p in model.depformer.parameters())
    assert user_count == system_count  # default user branch: the system Depformer's shape
    assert sum(p.numel() for p in model.parameters()) == moshi_count + user_count
    assert moshi_count > 7.6e9
    # every moshi tensor has its place, with the same shape
    expected = {key: tensor.shape for key, tensor in reference.state_dict().items()}
    moshi_weights = model.moshi_state_dict()
    exported = {key: tensor.shape for key, tensor in moshi_weights.items()}
    fresh = moshi_lm(device="meta", **_lm_kwargs)
    fresh.load_state_dict(moshi_weights, strict=True, assign=True)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == expected
    assert len(exported) <= len(expected)
