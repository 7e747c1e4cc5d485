"""Multistream checkpoints (NVIDIA's PersonaPlex, moshi's `dep_q = n_q`): the user codebooks of the system Depformer as
the user branch (`user_depformer="shared"`). Parity with the `moshi` oracle at `dep_q = 16`, the checkpoint layout
both ways, the streaming rule (user steps after the system's, the microphone's tokens read where known), speculation
and the copied-steps diagnostic."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_same_as_moshi, greedy_stream_is_teacher_forced_argmax, make_reference, random_codes
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.hub.conversion import convert_kyutai_checkpoint, export_to_moshi, shared_user_steps_report
from hf_moshi_userpred.models.modeling_moshi_cache import MoshiKVCache
from hf_moshi_userpred.models.modeling_moshi_userpred import shift_time
from hf_moshi_userpred.sample import moshiko_shaped_lm_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")

# PersonaPlex's shape scaled down: moshiko's layout with a Depformer over all 16 audio rows.
PERSONAPLEX_SMALL = {**moshiko_shaped_lm_kwargs(dim=64, num_layers=2, num_heads=4, card=40, text_card=50, context=6,
                                                depformer_dim=32, depformer_num_heads=2), "dep_q": 16}


def personaplex_small(moshi_lm, seed: int = 0):
    reference = make_reference(moshi_lm, PERSONAPLEX_SMALL, seed=seed)
    model = MoshiUserPredForConditionalGeneration.from_moshi(reference.state_dict(), PERSONAPLEX_SMALL,
                                                            dtype=torch.float32)
    return reference, model


def test_a_dep_q_16_checkpoint_becomes_a_shared_user_branch():
    config = MoshiUserPredConfig.from_moshi_lm_kwargs(PERSONAPLEX_SMALL)
    assert (config.dep_q, config.user_dep_q, config.user_depformer, config.depformer_steps) == (8, 8, "shared", 16)
    assert config.to_moshi_lm_kwargs()["dep_q"] == 16
    # asked for a separate branch, the dep_q = 16 checkpoint is taken as it is: no user rows are left
    with pytest.raises(ValueError, match="predict_user_audio"):
        MoshiUserPredConfig.from_moshi_lm_kwargs(PERSONAPLEX_SMALL, user_depformer="separate")
    with pytest.raises(ValueError, match="user_prediction_lookahead"):
        MoshiUserPredConfig.from_moshi_lm_kwargs(PERSONAPLEX_SMALL, user_prediction_lookahead=2)
    with pytest.raises(ValueError, match=r"user_depformer_dim=.*leave it unset"):
        MoshiUserPredConfig.from_moshi_lm_kwargs(PERSONAPLEX_SMALL, user_depformer_dim=64)
    with pytest.raises(ValueError, match=r"user_depformer='joint'"):
        MoshiUserPredConfig(user_depformer="joint")


def test_all_16_steps_match_the_moshi_oracle(moshi_lm):
    reference, model = personaplex_small(moshi_lm)
    assert model.user_depformer is None
    codes = random_codes(model.config, batch=2, frames=15)
    with torch.no_grad():
        expected, output = reference(codes), model(codes)
        system_only = model(codes, predict_user=False)
    assert_same_as_moshi(output, type(expected)(expected.logits[:, :8], expected.mask[:, :8], expected.text_logits,
                                                expected.text_mask))
    assert torch.equal(output.user_mask, expected.mask[:, 8:])
    torch.testing.assert_close(output.user_logits, expected.logits[:, 8:], rtol=0, atol=1e-5, equal_nan=True)
    # without the user steps the system's are unchanged (the Depformer is causal over its steps)
    assert system_only.user_logits is None
    torch.testing.assert_close(system_only.audio_logits, output.audio_logits, rtol=0, atol=1e-5, equal_nan=True)
    with torch.no_grad():
        loss = model(codes, return_loss=True)
    assert torch.isfinite(loss.user_loss) and loss.user_loss > 0


def test_full_size_personaplex_has_moshis_parameter_count(moshi_lm):
    from moshi.models.loaders import _lm_kwargs

    personaplex = {**_lm_kwargs, "dep_q": 16}
    reference = moshi_lm(device="meta", **personaplex)
    config = MoshiUserPredConfig.from_moshi_lm_kwargs(personaplex)
    with torch.device("meta"):
        model = MoshiUserPredForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    fused = model.depformer.transformer.layers[0].self_attn.in_projs
    assert len(fused) == 16 and sum(p.weight.shape[0] for p in fused) == 16 * 3 * 1024  # `in_proj_weight` [49152, 1024]


def test_conversion_round_trips_through_kyutais_layout(moshi_lm, tmp_path):
    from safetensors.torch import save_file

    reference, _ = personaplex_small(moshi_lm, seed=1)
    source = tmp_path / "personaplex"
    source.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(source / "model.safetensors"))
    (source / "config.json").write_text(__import__("json").dumps(PERSONAPLEX_SMALL))
    result = convert_kyutai_checkpoint(source, tmp_path / "model", progress=False)
    assert any("user steps 8-15 (shared Depformer): trained" in note for note in result.notes), result.notes
    exported = export_to_moshi(result.output_dir, tmp_path / "back", progress=False)
    assert "left out" not in " ".join(exported.notes)
    back = __import__("json").loads((tmp_path / "back" / "config.json").read_text())
    assert back["dep_q"] == 16
    fresh = moshi_lm(**{k: v for k, v in back.items() if k != "moshi_name"}).eval()
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(str(tmp_path / "back" / "model.safetensors")), strict=True)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in fresh.state_dict().items())


def test_copied_user_steps_are_reported(moshi_lm):
    """A moshiko checkpoint loaded into the shared layout with `copy_system` (what PersonaPlex's loader can do for a
    stream it never trained): the diagnostic says the user steps are copies."""
    moshiko = {**PERSONAPLEX_SMALL, "dep_q": 8}
    reference = make_reference(moshi_lm, moshiko)
    copied = MoshiUserPredForConditionalGeneration.from_moshi(reference.state_dict(), moshiko, dtype=torch.float32,
                                                              user_depformer="shared")
    assert copied.config.depformer_steps == 16
    assert copied.system_counterpart("depformer.heads.9.weight") == "depformer.heads.1.weight"
    assert torch.equal(copied.depformer.heads[9].weight, copied.depformer.heads[1].weight)
    report = shared_user_steps_report(copied)
    assert report.startswith("user steps 8-15 (shared Depformer): copies of steps 0-7 (8 of 8)"), report
    _, trained = personaplex_small(moshi_lm)
    assert shared_user_steps_report(trained).startswith("user steps 8-15 (shared Depformer): trained")
    random_copy = MoshiUserPredForConditionalGeneration.from_moshi(reference.state_dict(), moshiko, "random",
                                                                   dtype=torch.float32, user_depformer="shared")
    assert not torch.equal(random_copy.depformer.heads[9].weight, random_copy.depformer.heads[1].weight)


def rule_reference(model, codes: torch.Tensor, position: int, hidden: torch.Tensor) -> torch.Tensor:
    """The user steps of one position, step by step, by PersonaPlex's rule, from the teacher-forced Depformer: step 8
    (the delay-0 row, not received yet) is its own argmax, and the later steps read the received (delayed) rows.

    Args:
        codes: teacher-forced delayed codes `[B, 1 + n_q, S]` (moshi's layout, initial tokens first).
        position: the position whose user rows are predicted (its input row is `position - 1`).
        hidden: `[B, dim]` the main transformer's output there.
    """
    c = model.config
    prev = codes[:, 1 : c.depformer_steps, position].clone()[..., None]  # [B, 15, 1]: system rows 0..7, user 0..6
    text = codes[:, 0, position][:, None]
    with torch.no_grad():
        first = model.depformer(hidden[:, None], text, prev)[:, c.dep_q, 0].argmax(-1)
        prev[:, c.dep_q] = first[:, None]  # the delay-0 row: the prediction, as no frame is there yet
        rest = model.depformer(hidden[:, None], text, prev)[:, c.dep_q + 1 :, 0].argmax(-1)
    return torch.cat([first[:, None], rest], dim=1)


def test_greedy_streaming_follows_the_step_by_step_rule(moshi_lm):
    _, model = personaplex_small(moshi_lm)
    c = model.config
    user = torch.randint(0, c.card, (2, c.n_q - c.dep_q, 24), generator=torch.Generator().manual_seed(3))
    # the system's greedy tokens are the argmax of the teacher-forced logits: the user steps never reach them
    outs, codes, tf = greedy_stream_is_teacher_forced_argmax(model, user)
    # the user steps of every call, against the rule computed from the teacher-forced Depformer
    frames = codes.shape[2]
    delayed, _ = shift_time(codes, [-1 - d for d in c.delays], frames + 1, model.initial_tokens())
    for call in range(max(c.delays), frames - 1):
        expected = rule_reference(model, delayed, call + 1, tf.last_hidden_state[:, call])
        assert torch.equal(outs[call].user_prediction[..., -1], expected), f"call {call}"


def test_speculation_stays_lossless_with_a_shared_branch(moshi_lm):
    _, model = personaplex_small(moshi_lm)
    user = torch.randint(0, model.config.card, (2, 8, 30), generator=torch.Generator().manual_seed(4))
    with model.streaming(2, seed=5, speculate_top_k=3) as stream:
        frames, spec = [], []
        for t in range(30):
            frame = user[:, :, t : t + 1].clone()
            if t:
                frame[0, 0, 0] = spec[-1].user_prediction[0, 0, 0]  # slot 0 says what was predicted: a hit
            frames.append(frame)
            spec.append(stream.step(frame))
    assert all(o.speculative[0] == "hit" for o in spec[1:])
    with model.streaming(2, seed=5) as stream:
        plain = [stream.step(frame) for frame in frames]
    for a, b in zip(spec, plain):
        assert (a.tokens is None and b.tokens is None) or torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.user_prediction, b.user_prediction)


def test_user_step_of_a_shared_branch_needs_the_system_codebooks(moshi_lm):
    _, model = personaplex_small(moshi_lm)
    caches = model.make_streaming_caches(1)
    with pytest.raises(ValueError, match="pass `audio`"):
        model.user_step(torch.zeros(1, model.config.dim), torch.zeros(1, dtype=torch.long), caches,
                        lambda step, logits, sequence: logits.argmax(-1))


def test_user_branch_training_mode_trains_only_the_user_steps(moshi_lm):
    from hf_moshi_userpred.training.modes import prepare_model_for_training

    _, model = personaplex_small(moshi_lm)
    prepare_model_for_training(model, "user_branch")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert "depformer.heads.8.weight" in trainable and "depformer.heads.7.weight" not in trainable
    assert "depformer.emb.7.weight" in trainable and "depformer.emb.6.weight" not in trainable
    assert "depformer.transformer.layers.0.gating.15.linear_in.weight" in trainable
    assert not any(name.startswith(("transformer.", "text_linear", "depformer.transformer.layers.0.norm"))
                   for name in trainable)
    codes = random_codes(model.config, batch=1, frames=8)
    model.train()
    model(codes, return_loss=True).loss.backward()
    assert all(param.grad is None for name, param in model.named_parameters() if name not in trainable)
    assert model.depformer.heads[8].weight.grad.abs().sum() > 0


def test_prefill_equals_feeding_step_by_step():
    """The cache's sequential prefill gives the keys, values and outputs of feeding the positions one at a time,
    across the ring's wrap and the attention window."""
    from hf_moshi_userpred.models.modeling_moshi_transformer import MoshiTransformer

    torch.manual_seed(0)
    transformer = MoshiTransformer(32, 4, 2, 64, "rms_norm_f32", "silu", "rope", 10000.0, context=5).eval()
    x = torch.randn(2, 9, 32)
    positions = torch.arange(9)[None].expand(2, -1)
    stepwise_cache = transformer.make_cache(2, 5)
    with torch.no_grad():
        stepwise = []
        for t in range(9):
            stepwise.append(transformer(x[:, t : t + 1], positions[:, t : t + 1], cache=stepwise_cache))
            stepwise_cache.commit(stepwise_cache.take_pending(), positions[:, t])
        cache = transformer.make_cache(2, 5)
        head = transformer(x[:, :3], positions[:, :3], cache=cache, prefill=True)
        cache.commit_sequence(cache.take_pending(), positions[:, :3])
        tail = transformer(x[:, 3:], positions[:, 3:], cache=cache, prefill=True)
        cache.commit_sequence(cache.take_pending(), positions[:, 3:])
    torch.testing.assert_close(torch.cat([head, tail], 1), torch.cat(stepwise, 1), rtol=0, atol=1e-5)
    assert isinstance(cache, MoshiKVCache) and torch.equal(cache.positions, stepwise_cache.positions)
    torch.testing.assert_close(cache.keys, stepwise_cache.keys, rtol=0, atol=1e-5)
