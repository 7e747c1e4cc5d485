"""Behaviour of the model: causality, user-branch alignment and init, training switches, dtypes, HF round trip."""

from __future__ import annotations

import pytest
import torch

from helpers import PARITY_CONFIGS, make_reference, random_codes, tiny_model
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration


def unaffected_targets(model, t: int, frames: int) -> dict[str, torch.Tensor]:
    """Per head, `[rows, frames]`: the logits that must not change when codes at times >= t change.

    A logit scoring target time t' of a row with shift `sh` is computed at streaming step s = t' + sh (the
    delay; for the user head, the delay minus L - 1). It may read steps <= s and, like moshi's Depformer,
    the ground truth of the lower codebooks of its own target frame (delayed position s + L, teacher forcing
    along the codebook axis). For L = 1 that frame is s + 1, so the condition is just s < t.
    """
    c = model.config
    lookahead = c.user_prediction_lookahead
    user_delays = c.delays[model.user_rows]
    heads = {"text": (c.delays[:1], [], 1), "audio": (c.delays[1:1 + c.dep_q], c.delays[1:1 + c.dep_q], 1),
             "user": ([d - (lookahead - 1) for d in user_delays], user_delays, lookahead)}
    out = {}
    for head, (shifts, row_delays, ahead) in heads.items():
        rows = []
        for k, shift in enumerate(shifts):
            steps = [tp + shift for tp in range(frames)]
            rows.append([s < t and all(s + ahead - 1 - row_delays[j] < t for j in range(k)) for s in steps])
        out[head] = torch.tensor(rows)
    return out


@pytest.mark.parametrize("lookahead", [1, 2, 3])
def test_no_leak_from_the_future(lookahead):
    """Perturbing codes at times >= t leaves every logit computed before streaming step t unchanged."""
    model = tiny_model(user_prediction_lookahead=lookahead, context=None)
    codes = random_codes(model.config, frames=16, zero_fraction=0.0)
    with torch.no_grad():
        base = model(codes)
        for t in (3, 8, 13):
            perturbed = codes.clone()
            perturbed[:, :, t:] = random_codes(model.config, frames=16 - t, seed=t, zero_fraction=0.0)
            out = model(perturbed)
            for head, keep in unaffected_targets(model, t, 16).items():
                a, b = getattr(base, f"{head}_logits"), getattr(out, f"{head}_logits")
                torch.testing.assert_close(a[:, keep], b[:, keep], rtol=0, atol=0, equal_nan=True)
                if head == "user" and lookahead == 1:
                    assert keep.sum() == sum(max(0, t - sh) for sh in model.config.delays[model.user_rows])
                # the perturbation does reach the later steps
                assert not torch.equal(a[:, ~keep].nan_to_num(), b[:, ~keep].nan_to_num())


@pytest.mark.slow  # one forward per perturbed position: about 30 s
@pytest.mark.parametrize("lookahead", [1, 2])
def test_no_logit_sees_its_own_target(lookahead):
    """Changing one target token never changes the logits that score it (text, system audio and user heads)."""
    model = tiny_model(user_prediction_lookahead=lookahead)
    config = model.config
    codes = random_codes(config, batch=1, frames=10, zero_fraction=0.0)
    heads = {"text": range(0, 1), "audio": range(1, 1 + config.dep_q),
             "user": range(model.user_rows.start, model.user_rows.stop)}
    with torch.no_grad():
        base = model(codes)
        for head, rows in heads.items():
            for index, row in enumerate(rows):
                for t in (0, 4, 9):
                    perturbed = codes.clone()
                    perturbed[0, row, t] = (codes[0, row, t] + 1) % (config.text_card if row == 0 else config.card)
                    a = getattr(base, f"{head}_logits")[0, index, t]
                    b = getattr(model(perturbed), f"{head}_logits")[0, index, t]
                    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_user_targets_follow_the_streaming_alignment():
    """L = 1: the delay-0 user row at step s is the next frame; L = 2 shifts one frame further, masking the head."""
    for lookahead in (1, 2):
        model = tiny_model(user_prediction_lookahead=lookahead)
        codes = random_codes(model.config, frames=9, zero_fraction=0.0)
        with torch.no_grad():
            out = model(codes)
        mask = out.user_mask[0]
        for row, delay in enumerate(model.config.delays[model.user_rows]):
            shift = delay - (lookahead - 1)
            expected = torch.tensor([0 <= t + shift < 9 for t in range(9)])
            assert torch.equal(mask[row], expected), (row, delay, lookahead)
            assert out.user_logits[0, row, ~expected].isnan().all()
            assert not out.user_logits[0, row, expected].isnan().any()


def test_zero_token_targets_are_masked_and_embed_to_zero():
    model = tiny_model()
    codes = random_codes(model.config, frames=8, zero_fraction=0.0)
    codes[0, 10, 3] = -1  # a user codebook
    codes[1, 2, 5] = -1  # a system codebook
    with torch.no_grad():
        out = model(codes)
    assert not out.user_mask[0, 10 - model.user_rows.start, 3]
    assert not out.audio_mask[1, 1, 5]
    embedding = model.emb[0](torch.tensor([[-1, 3]]))
    assert torch.equal(embedding[0, 0], torch.zeros(model.config.dim))
    assert embedding[0, 1].abs().sum() > 0


def test_user_branch_does_not_change_text_and_audio_logits():
    with_user, without_user = tiny_model(seed=1), tiny_model(seed=1, predict_user_audio=False)
    without_user.load_state_dict(with_user.state_dict(), strict=False)
    codes = random_codes(with_user.config)
    with torch.no_grad():
        a, b = with_user(codes), without_user(codes)
    assert torch.equal(a.text_logits.nan_to_num(), b.text_logits.nan_to_num())
    assert torch.equal(a.audio_logits.nan_to_num(), b.audio_logits.nan_to_num())
    assert b.user_logits is None and b.user_mask is None


@pytest.mark.parametrize("name", ["moshiko_small", "sin_lowrank_schedule"])
def test_copy_system_init_makes_the_user_depformer_a_copy_of_the_system_one(moshi_lm, name):
    lm_kwargs = PARITY_CONFIGS[name]
    reference = make_reference(moshi_lm, lm_kwargs)
    model = MoshiUserPredForConditionalGeneration.from_moshi(reference.state_dict(), lm_kwargs=lm_kwargs,
                                                             user_init="copy_system")
    # same inputs through both Depformers -> the same logits, step for step
    config = model.config
    steps = config.user_dep_q
    hidden = torch.randn(2, 5, config.dim)
    text = torch.randint(0, config.text_card, (2, 5))
    prev = torch.randint(0, config.card, (2, config.dep_q - 1, 5))
    with torch.no_grad():
        system = model.depformer(hidden, text, prev)
        user = model.user_depformer(hidden, text, prev[:, :steps - 1])
    torch.testing.assert_close(user, system[:, :steps], rtol=0, atol=0)
    assert model.init_user_branch("copy_system") == []
    not_copied = model.init_user_branch("random")
    assert len(not_copied) == len(list(model.user_depformer.parameters()))
    with torch.no_grad():
        assert not torch.allclose(model.user_depformer(hidden, text, prev[:, :steps - 1]), system[:, :steps])


def test_copy_system_with_fewer_user_codebooks_and_single_weight_set():
    model = tiny_model(user_dep_q=3, user_depformer_weights_per_step=False, user_depformer_multi_linear=False)
    not_copied = model.init_user_branch("copy_system")
    assert not_copied == []
    layer_user, layer_system = model.user_depformer.transformer.layers[0], model.depformer.transformer.layers[0]
    assert torch.equal(layer_user.gating.linear_in.weight, layer_system.gating[0].linear_in.weight)
    assert torch.equal(model.user_depformer.heads[2].weight, model.depformer.heads[2].weight)


def test_copy_system_leaves_mismatched_shapes_random():
    model = tiny_model(user_depformer_dim=16, user_depformer_num_heads=2)
    not_copied = model.init_user_branch("copy_system")
    assert "user_depformer.heads.0.weight" in not_copied and "user_depformer.in_projs.0.weight" in not_copied


def test_random_user_init_uses_moshis_scheme():
    model = tiny_model(user_dep_q=8)
    model.init_user_branch("random")
    head = model.user_depformer.heads[0].weight
    emb = model.user_depformer.emb[0].weight
    for weight, fan_in in ((head, head.shape[1]), (emb, emb.shape[1])):
        std = 1 / fan_in**0.5
        assert weight.abs().max() <= 3 * std + 1e-6  # truncated normal at 3 std
        assert 0.6 * std < weight.std() < 1.1 * std


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    codes = random_codes(model.config, frames=10)
    model(codes, return_loss=True).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()  # what TrainingArguments(gradient_checkpointing=True) calls
    assert all(layer.gradient_checkpointing for layer in model.transformer.layers)
    model(codes, return_loss=True).loss.backward()
    for name, grad in reference.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    assert model.user_depformer.heads[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_track_float32(dtype):
    model = tiny_model()
    codes = random_codes(model.config, frames=8)
    with torch.no_grad():
        full = model(codes, return_loss=True)
        half = model.to(dtype)(codes, return_loss=True)
    assert half.audio_logits.dtype == dtype
    assert torch.isfinite(half.loss)
    assert abs(half.loss.item() - full.loss.item()) < 0.05 * full.loss.item()
    agree = (half.audio_logits.argmax(-1) == full.audio_logits.argmax(-1))[full.audio_mask].float().mean()
    assert agree > 0.9


def test_save_pretrained_round_trip_and_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel

    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MoshiUserPredConfig) and config.delays == model.config.delays
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, MoshiUserPredForConditionalGeneration)
    codes = random_codes(model.config)
    with torch.no_grad():
        a, b = model(codes), loaded(codes)
    for name in ("text_logits", "audio_logits", "user_logits"):
        assert torch.equal(getattr(a, name).nan_to_num(), getattr(b, name).nan_to_num()), name


def test_from_moshi_assigns_checkpoint_tensors_without_copying(moshi_lm):
    lm_kwargs = PARITY_CONFIGS["moshiko_small"]
    state_dict = make_reference(moshi_lm, lm_kwargs).state_dict()
    model = MoshiUserPredForConditionalGeneration.from_moshi(state_dict, lm_kwargs=lm_kwargs)
    assert model.text_emb.weight.data_ptr() == state_dict["text_emb.weight"].data_ptr()
    assert model.depformer.heads[0].weight.data_ptr() == state_dict["linears.0.weight"].data_ptr()
    assert not any(p.is_meta for p in model.parameters())
    assert not model.training
