"""Persona prompts (PersonaPlex's procedure): the prefix's frames, its one-call prefill against feeding it frame by
frame and against the teacher-forced forward, the prompt cache, slot isolation and the errors."""

from __future__ import annotations

import pytest
import torch

from helpers import GREEDY, tiny_model
from hf_moshi_userpred.models import generation_moshi_streaming
from hf_moshi_userpred.models.generation_moshi_persona import (
    PROMPT_SILENCE_FRAMES,
    MoshiPersonaPrompt,
    prefill_persona_prompt,
    role_text,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4, context=None)  # the 3000-frame window of an unbounded-context model


def persona(config, voice_frames: int = 5, role: tuple = (7, 8, 9, 10), seed: int = 0) -> MoshiPersonaPrompt:
    generator = torch.Generator().manual_seed(seed)
    codes = lambda *shape: torch.randint(0, config.card, shape, generator=generator)  # noqa: E731
    return MoshiPersonaPrompt.build(config, silence_codes=codes(config.dep_q), user_codes=codes(config.n_q - config.dep_q),
                                   role_tokens=list(role), voice_codes=codes(config.dep_q, voice_frames))


def user_frames(config, frames: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.card, (2, config.n_q - config.dep_q, frames), generator=generator)


def test_the_prefix_is_voice_silence_role_silence(model):
    c = model.config
    silence, sine = torch.arange(c.dep_q), torch.arange(c.n_q - c.dep_q) + 20
    voice = torch.full((c.dep_q, 3), 5)
    prompt = MoshiPersonaPrompt.build(c, silence_codes=silence, user_codes=sine, role_tokens=[11, 12],
                                      voice_codes=voice)
    S = PROMPT_SILENCE_FRAMES
    assert prompt.num_frames == 3 + S + 2 + S
    padding = c.existing_text_padding_id
    assert prompt.codes[0].tolist() == [padding] * (3 + S) + [11, 12] + [padding] * S
    assert torch.equal(prompt.codes[1 : 1 + c.dep_q, :3], voice)
    assert (prompt.codes[1 : 1 + c.dep_q, 3:] == silence[:, None]).all()
    assert (prompt.codes[1 + c.dep_q :] == sine[:, None]).all()  # the user's rows: the sine tone throughout
    assert role_text(" a helpful pirate ") == "<system> a helpful pirate <system>"
    text_only = MoshiPersonaPrompt.build(c, silence_codes=silence, user_codes=sine, role_tokens=[11])
    assert text_only.num_frames == 2 * S + 1


@pytest.mark.parametrize(("part", "value", "message"), [
    ("role_tokens", [c := 10**6], "role token 1000000 is outside the text vocabulary"),
    ("voice_codes", torch.zeros(3, 4, dtype=torch.long), r"voice_codes has shape \(3, 4\)"),
    ("voice_codes", torch.full((8, 2), 40), "voice_codes holds a code outside 0..39"),
    ("silence_codes", torch.zeros(7, dtype=torch.long), r"silence_codes must be an integer tensor of shape \[8\]"),
    ("user_codes", torch.zeros(8), r"user_codes must be an integer tensor"),
])
def test_bad_prompt_parts_name_the_problem(model, part, value, message):
    c = model.config
    parts = dict(silence_codes=torch.zeros(c.dep_q, dtype=torch.long),
                 user_codes=torch.zeros(c.n_q - c.dep_q, dtype=torch.long), role_tokens=[1])
    parts[part] = value
    with pytest.raises(ValueError, match=message):
        MoshiPersonaPrompt.build(c, **parts)


def test_prefill_equals_feeding_the_prompt_frame_by_frame(model):
    """The keys and values of the one-call prefill are those of the main transformer fed one position at a time."""
    prompt = persona(model.config)
    state = prefill_persona_prompt(model, prompt, ring_size=3, history=4)
    P = prompt.num_frames
    codes, c = prompt.codes, model.config
    delays = torch.tensor(c.delays)
    source = torch.arange(P)[None] - 1 - delays[:, None]
    inputs = torch.where(source >= 0, codes.gather(1, source.clamp(min=0)), torch.tensor(model.initial_tokens())[:, None])
    cache = model.transformer.make_cache(1, c.streaming_window)
    with torch.no_grad():
        for position in range(P):
            model.transformer(model.embed(inputs[None, :, position : position + 1]), torch.tensor([[position]]),
                              cache=cache)
            cache.commit(cache.take_pending(), torch.tensor([position]))
    for layer, (keys, values) in enumerate(state.kv):
        torch.testing.assert_close(keys[0], cache.keys[layer, 0, :, :P], rtol=0, atol=1e-5)
        torch.testing.assert_close(values[0], cache.values[layer, 0, :, :P], rtol=0, atol=1e-5)
    assert state.text_history.tolist() == codes[0, -4:].tolist()


def test_a_prompted_stream_is_the_teacher_forced_argmax_after_the_prompt(model):
    """Greedy tokens after the prompt are the argmax of `forward` over [prompt frames, generated frames]: the prefilled
    cache, ring and offsets are what the model would hold had it read the prompt."""
    c = model.config
    generator = torch.Generator().manual_seed(6)
    codes = torch.randint(0, c.card, (1 + c.n_q, 20), generator=generator)  # every frame differs: any misalignment shows
    codes[0] = torch.randint(0, c.text_card, (20,), generator=generator)
    prompt = MoshiPersonaPrompt(codes)
    P, T = prompt.num_frames, 12
    user = user_frames(c, T, seed=1)
    with model.streaming(2, **GREEDY) as stream:
        assert stream.prompt(prompt) == P
        outs = [stream.step(user[:, :, t : t + 1]).tokens for t in range(T)]
    assert max(c.delays) == 1
    generated = torch.cat(outs, dim=2)  # frames P - 1 .. P + T - 2
    system = torch.cat([prompt.codes[None, : 1 + c.dep_q, : P - 1].expand(2, -1, -1), generated], dim=2)
    users = torch.cat([prompt.codes[None, 1 + c.dep_q :, : P - 1].expand(2, -1, -1), user], dim=2)
    codes = torch.cat([system, users], dim=1)  # [2, 1 + n_q, P - 1 + T]
    # the last prompt frame's undelayed rows are the prompt's; its delayed rows are the model's first tokens
    undelayed = [k for k, d in enumerate(c.delays[: 1 + c.dep_q]) if d == 0]
    assert torch.equal(generated[:, undelayed, 0], prompt.codes[None, undelayed, P - 1].expand(2, -1))
    with torch.no_grad():
        tf = model(codes)
    end = codes.shape[2] - 1  # the last frame's delayed rows are not generated yet
    assert torch.equal(tf.text_logits[:, 0, P:end].argmax(-1), codes[:, 0, P:end])
    for k in range(c.dep_q):
        first = P if c.delays[1 + k] == 0 else P - 1
        assert torch.equal(tf.audio_logits[:, k, first:end].argmax(-1), codes[:, 1 + k, first:end]), f"codebook {k}"


def test_a_cached_prompt_equals_a_fresh_one_and_stays_in_its_slot(model, monkeypatch):
    c = model.config
    prompt, other = persona(c), persona(c, role=(3, 4), seed=5)
    user = user_frames(c, 10, seed=2)
    prefills = []
    original = generation_moshi_streaming.prefill_persona_prompt
    monkeypatch.setattr(generation_moshi_streaming, "prefill_persona_prompt",
                        lambda *args: prefills.append(1) or original(*args))

    def run(setup) -> torch.Tensor:
        with model.streaming(2, **GREEDY) as stream:
            setup(stream)
            return torch.cat([stream.step(user[:, :, t : t + 1]).tokens for t in range(10)], dim=2)

    def both_fresh(stream):  # slot 0: the prompt, slot 1: another
        stream.prompt(prompt, mask=torch.tensor([True, False]))
        stream.prompt(other, mask=torch.tensor([False, True]))

    fresh = run(both_fresh)
    assert len(prefills) == 2

    def cached(stream):  # slot 1 runs a conversation with the prompt, then slot 0 starts from the cached prefill
        stream.prompt(prompt, mask=torch.tensor([False, True]))
        stream.step(user[:, :, :1])
        stream.prompt(other, mask=torch.tensor([False, True]))
        stream.prompt(prompt, mask=torch.tensor([True, False]))

    prefills.clear()
    cached_run = run(cached)
    assert len(prefills) == 2  # `prompt` prefilled once for both of its starts, `other` once
    assert torch.equal(cached_run, fresh)

    def alone(stream):  # slot 1 without any prompt: slot 0's never reaches it
        stream.prompt(prompt, mask=torch.tensor([True, False]))

    with model.streaming(1, **GREEDY) as solo:
        plain = [solo.step(user[1:, :, t : t + 1]).tokens for t in range(10)]
    mixed = run(alone)
    assert plain[0] is None and (mixed[1, :, 0] == -2).all()  # the unprompted slot warms up as a solo run does
    assert torch.equal(mixed[1:, :, 1:], torch.cat(plain[1:], dim=2))
    assert torch.equal(mixed[:1], fresh[:1])


def test_prompt_errors(model):
    c = model.config
    with model.streaming(1) as stream:
        with pytest.raises(ValueError, match="leaves no room in the model's context of 3000 frames"):
            stream.prompt(MoshiPersonaPrompt(torch.zeros(1 + c.n_q, 3000, dtype=torch.long)))
        bad = persona(c).codes.clone()
        bad[0, 2] = c.text_card
        with pytest.raises(ValueError, match=r"prompt.codes\[0, 2\]"):
            stream.prompt(MoshiPersonaPrompt(bad))
