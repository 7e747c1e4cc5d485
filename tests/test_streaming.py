"""Streaming generation: parity with moshi's `LMGen`, sampling, batching, memory, speculation, gap filling."""

from __future__ import annotations

import sys

import pytest
import torch

from helpers import GREEDY, PARITY_CONFIGS, greedy_stream_is_teacher_forced_argmax, make_reference
from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.models.generation_moshi_config import (
    MoshiUserPredGenerationConfig,
    build_logits_processor,
    sample_from_scores,
)
from hf_moshi_userpred.models.generation_moshi_step_output import SpeculationStats
from hf_moshi_userpred.models.generation_moshi_userpred import MoshiGenerateOutput

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def lm_gen(moshi_lm):
    """moshi's `LMGen`: the streaming oracle."""
    return sys.modules[moshi_lm.__module__].LMGen


def streaming_kwargs(name: str) -> dict:
    """The parity config made streamable by moshi's `LMGen`.

    moshi's streaming attention sizes its KV cache from `context`, or else from `weights_per_step` (which moshi
    only supports with gating): without a context, neither the main transformer nor the Depformer of
    `gqa_layerscale` can stream ("Cannot create a streaming KVCache without a context"). Its text head is also
    wider than the text vocabulary (`text_card_out` 44 > `text_card` 40), so sampled text tokens could not be
    fed back (our `streaming` refuses it). Only that config is adapted; the others stream as they are.
    """
    kwargs = dict(PARITY_CONFIGS[name])
    if kwargs.get("context") is None:
        kwargs.update(context=7, depformer_weights_per_step=True, depformer_gating="silu", text_card_out=None)
    return kwargs


_REFERENCES: dict[str, torch.nn.Module] = {}
_MOSHI_OUTPUTS: dict[str, tuple[torch.Tensor, list]] = {}


def reference(moshi_lm, name: str):
    if name not in _REFERENCES:
        _REFERENCES[name] = make_reference(moshi_lm, streaming_kwargs(name))
    return _REFERENCES[name]


def load(moshi_lm, name: str, **overrides) -> MoshiUserPredForConditionalGeneration:
    return MoshiUserPredForConditionalGeneration.from_moshi(
        reference(moshi_lm, name).state_dict(), streaming_kwargs(name), user_init="copy_system",
        dtype=torch.float32, **overrides,
    )


def user_stream(config, batch: int, frames: int, seed: int, zero_fraction: float = 0.05) -> torch.Tensor:
    """User codes `[B, n_q - dep_q, T]`, with a sprinkling of zero tokens (-1)."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.card, (batch, config.n_q - config.dep_q, frames), generator=generator)
    zeros = torch.rand(codes.shape, generator=generator) < zero_fraction
    return codes.masked_fill(zeros, -1)


def run_moshi(LMGen, ref, user: torch.Tensor) -> list:
    gen = LMGen(ref, use_sampling=False)
    outs = []
    with gen.streaming(user.shape[0]):
        for t in range(user.shape[2]):
            out = gen.step(user[:, :, t : t + 1])
            outs.append(None if out is None else out.clone())
    return outs


def run_ours(model, user: torch.Tensor, **overrides) -> list:
    with model.streaming(user.shape[0], **overrides) as stream:
        return [stream.step(user[:, :, t : t + 1]) for t in range(user.shape[2])]


def assert_same_tokens(ours: list, expected: list) -> None:
    assert len(ours) == len(expected)
    for call, (a, b) in enumerate(zip(ours, expected)):
        assert (a is None) == (b is None), f"call {call}: ours {a}, expected {b}"
        if a is not None:
            assert torch.equal(a, b), f"call {call}: ours {a[..., 0].tolist()}, expected {b[..., 0].tolist()}"


# --------------------------------------------------------------------------------------- 1. greedy parity
@pytest.mark.parametrize("user_branch", [True, False], ids=["user_on", "user_off"])
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_greedy_streaming_matches_moshi_lmgen(moshi_lm, lm_gen, name, user_branch):
    model = load(moshi_lm, name, predict_user_audio=user_branch)
    assert (model.user_depformer is not None) == user_branch
    if name not in _MOSHI_OUTPUTS:  # the oracle does not depend on the user branch: run it once per config
        user = user_stream(model.config, batch=2, frames=100, seed=11)
        _MOSHI_OUTPUTS[name] = user, run_moshi(lm_gen, reference(moshi_lm, name), user)
    user, expected = _MOSHI_OUTPUTS[name]
    outs = run_ours(model, user, **GREEDY)
    assert_same_tokens([o.tokens for o in outs], expected)
    max_delay = max(model.config.delays)
    assert sum(e is None for e in expected) == max_delay
    assert all(e is not None and (e >= 0).all() for e in expected[max_delay:])  # real tokens, no warm-up marks
    assert all((o.user_prediction is None) != user_branch for o in outs)


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_predict_user_false_switches_the_branch_off_and_matches_moshi_lmgen(moshi_lm, lm_gen, name):
    """`predict_user=False` in the generation config: a model with a user branch streams moshi's `LMGen` tokens
    without ever running the user Depformer or speculating, even with speculate_top_k and gap filling set."""
    model = load(moshi_lm, name)
    if name not in _MOSHI_OUTPUTS:
        user = user_stream(model.config, batch=2, frames=100, seed=11)
        _MOSHI_OUTPUTS[name] = user, run_moshi(lm_gen, reference(moshi_lm, name), user)
    user, expected = _MOSHI_OUTPUTS[name]
    calls = []
    hook = model.user_depformer.register_forward_pre_hook(lambda *_: calls.append(1))
    original_user_step = model.user_step
    model.user_step = lambda *args, **kwargs: calls.append(2) or original_user_step(*args, **kwargs)
    try:
        outs = run_ours(model, user, predict_user=False, speculate_top_k=2, **GREEDY)
        with model.streaming(2, predict_user=False, speculate_top_k=2, **GREEDY) as stream:
            stats = stream.stats
            assert stream.caches.speculative_depformer is None  # no speculation scratch space either
    finally:
        hook.remove()
        del model.user_step
    assert calls == []  # no user-branch work in any step
    assert_same_tokens([o.tokens for o in outs], expected)
    assert all(o.user_prediction is None and o.speculative in (None, ["not_tried"] * 2) for o in outs)
    assert stats.top_k == 0 and stats.hits == stats.misses == 0
    generated = model.generate(user, progress=False, predict_user=False, **GREEDY)
    assert generated.user_prediction is None
    assert torch.equal(generated.text_tokens, torch.stack([e[:, 0, 0] for e in expected if e is not None], 1))
    with pytest.raises(ValueError, match=r"predict_user='no': must be True or False"):
        model.generation_config.__class__(predict_user="no").validate()


def test_greedy_speculative_streaming_matches_moshi_lmgen(moshi_lm, lm_gen):
    """Speculation on: stream 0's user repeats the model's own prediction (every speculation hits), stream 1's
    user is random (speculation mostly misses): a mix of committed, partial and normal steps."""
    model = load(moshi_lm, "moshiko_small")
    random_user = user_stream(model.config, batch=2, frames=100, seed=12)
    frames, statuses = [], []
    with model.streaming(2, speculate_top_k=2, **GREEDY) as stream:
        tokens, frame = [], random_user[:, :, :1].clone()
        for t in range(100):
            if t:
                frame = random_user[:, :, t : t + 1].clone()
                frame[0, 0, 0] = out.user_prediction[0, 0, 0]  # the delay-0 row: what the model predicted
            frames.append(frame)
            out = stream.step(frame)
            tokens.append(out.tokens)
            statuses.append(out.speculative)
        stats = stream.stats
    assert statuses[0] == ["not_tried", "not_tried"]
    assert all(s[0] == "hit" for s in statuses[1:])
    misses = sum(s[1] == "miss" for s in statuses[1:])
    assert misses > 50
    assert (stats.hits, stats.misses, stats.not_tried) == (99 + 99 - misses, misses, 2)
    assert_same_tokens(tokens, run_moshi(lm_gen, reference(moshi_lm, "moshiko_small"), torch.cat(frames, dim=2)))


# -------------------------------------------------------------------------------- 2. sampling distribution
def moshi_distribution(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """What moshi's `sample_token` draws from: softmax(logits / temp), restricted to the top-k, renormalised."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_k:
        top = probs.topk(top_k, dim=-1)
        probs = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
    return probs / probs.sum(-1, keepdim=True)


@pytest.mark.parametrize(
    ("stream", "fields", "temperature", "top_k"),
    [
        ("audio", dict(audio_temperature=0.8, audio_top_k=5), 0.8, 5),
        ("text", dict(temperature=0.7, top_k=25), 0.7, 25),
        ("user", dict(user_do_sample=True, user_temperature=1.3, user_top_k=3), 1.3, 3),
        ("audio", dict(audio_temperature=1.0, audio_top_k=0), 1.0, 0),
    ],
)
def test_sampling_distribution_matches_moshi_sample_token(moshi_lm, stream, fields, temperature, top_k):
    from moshi.utils.sampling import sample_token

    generator = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(4, 40, generator=generator)
    processors = build_logits_processor(MoshiUserPredGenerationConfig(**fields), stream)
    scores = processors(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    probs = torch.softmax(scores, dim=-1)
    expected = moshi_distribution(logits, temperature, top_k)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)

    n = 20000
    noise = torch.empty(n, 4, 40).exponential_(generator=generator)
    ours = sample_from_scores(scores.expand(n, 4, 40), noise)  # [n, 4]
    torch.manual_seed(4)  # moshi samples with the global generator
    theirs = sample_token(logits.expand(n, 4, 40), use_sampling=True, temp=temperature, top_k=top_k)
    for drawn in (ours, theirs):
        counts = torch.zeros(4, 40).scatter_add_(1, drawn.T, torch.ones(4, n))
        assert (counts / n - expected).abs().max() < 0.02
        if top_k:
            assert (counts[expected == 0] == 0).all()  # never outside the top-k
    # greedy: no warpers, argmax
    greedy = build_logits_processor(MoshiUserPredGenerationConfig(**GREEDY), stream)
    assert len(greedy) == 0
    assert torch.equal(sample_from_scores(logits, None), logits.argmax(-1))


# ---------------------------------------------------------------------- 3. streaming == teacher forcing
def test_greedy_streaming_equals_teacher_forced_argmax(moshi_lm):
    """Rebuild the training-layout codes of a greedy stream and check `forward` scores them as its argmax.

    With delays `d`, out.tokens at call `o` holds frame `o - max(d)` of every generated row, and the streaming
    user frame `f` plays training frame `f - 1` (frame 0 is never read: moshi feeds initial tokens there).
    At call `o` the user Depformer predicts the delay-0 user row of training frame `o` (position `o`).
    """
    model = load(moshi_lm, "moshiko_small")
    c = model.config
    outs, codes, tf = greedy_stream_is_teacher_forced_argmax(model, user_stream(c, batch=2, frames=30, seed=21))
    frames = codes.shape[2]
    assert c.delays[1 + c.dep_q] == 0 and c.user_prediction_lookahead == 1
    predicted = torch.stack([o.user_prediction[:, 0, 0] for o in outs[:frames]], dim=1)
    probs = torch.stack([o.user_probs[:, 0, 0] for o in outs[:frames]], dim=1)
    user_logits = tf.user_logits[:, 0]  # [B, frames, card]
    assert torch.equal(user_logits.argmax(-1), predicted)
    expected_probs = torch.softmax(user_logits, -1).gather(-1, predicted[..., None])[..., 0]
    torch.testing.assert_close(probs, expected_probs, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- 4. batched sessions
@pytest.mark.parametrize("top_k", [0, 2], ids=["plain", "speculative"])
def test_batched_sessions_join_pause_and_leave_like_solo_runs(moshi_lm, top_k):
    """Conversations run in 3 slots, joining (reset), pausing and leaving (exec mask) at different times; each
    one's outputs equal a plain solo run. A and E's user repeats the model's predicted next token (row 0), so
    that with speculation on their speculations hit, across pauses and next to slots that miss."""
    model = load(moshi_lm, "moshiko_small")
    c, steps = model.config, 40
    # conversation -> (slot, steps it runs); it is reset into its slot on its first step
    schedule = {
        "A": (0, [*range(0, 15), *range(20, 30)]),  # pauses 15-19, leaves at 30
        "B": (1, list(range(5, 25))),  # slot 1 idle until 5
        "C": (1, list(range(25, 40))),  # replaces B without a pause
        "D": (2, list(range(0, 10))),
        "E": (2, [*range(18, 28), *range(31, 40)]),  # joins an idle slot, pauses 28-30
    }
    follows_prediction = {"A", "E"}
    streams = {name: user_stream(c, 1, len(active), seed=30 + i) for i, (name, (_, active)) in
               enumerate(schedule.items())}
    garbage = user_stream(c, 3, steps, seed=40)
    got = {name: [] for name in schedule}
    hits = {name: 0 for name in schedule}
    with model.streaming(3, speculate_top_k=top_k, **GREEDY) as stream:
        for t in range(steps):
            running = {slot: name for name, (slot, active) in schedule.items() if t in active}
            exec_mask = torch.tensor([slot in running for slot in range(3)])
            stream.set_exec_mask(exec_mask)
            starts = torch.tensor([slot in running and schedule[running[slot]][1][0] == t for slot in range(3)])
            if starts.any():
                stream.reset(starts)
            frame = garbage[:, :, t : t + 1].clone()  # paused slots get frames that must be ignored
            for slot, name in running.items():
                call, user = len(got[name]), streams[name]
                if name in follows_prediction and call:
                    user[0, 0, call] = got[name][-1][1][0, 0, 0]
                    if t - 1 not in schedule[name][1] and stream.speculation is not None:
                        # resuming: even a frame its candidates guessed must not commit what the slot
                        # speculated while paused
                        user[0, 0, call] = stream.speculation.candidates[slot, 0]
                frame[slot] = user[0, :, call : call + 1]
            before = stream.user_prediction.clone()
            out = stream.step(frame)
            if out.tokens is not None:
                assert (out.tokens[~exec_mask] == -2).all()
            assert torch.equal(out.user_prediction[~exec_mask], before[~exec_mask])  # paused: state kept
            assert all(out.speculative[slot] == "not_tried" for slot in range(3) if slot not in running)
            for slot, name in running.items():
                got[name].append((None if out.tokens is None else out.tokens[slot : slot + 1],
                                  out.user_prediction[slot : slot + 1]))
                hits[name] += out.speculative[slot] == "hit"
                # the slot's cache holds the current conversation's last `context` positions, nothing older
                held = sorted(p for p in stream.kv.positions[slot].tolist() if p >= 0)
                assert held == list(range(max(0, len(got[name]) - c.context), len(got[name]))), f"{name} {t}"
    if top_k:  # every call but the first and the first after a pause
        assert hits["A"] == len(schedule["A"][1]) - 2 and hits["E"] == len(schedule["E"][1]) - 2
    else:
        assert not any(hits.values())
    for name, user in streams.items():
        solo = run_ours(model, user, **GREEDY)
        assert len(solo) == len(got[name])
        for call, (expected, (tokens, prediction)) in enumerate(zip(solo, got[name])):
            if expected.tokens is None:  # warming up: None, or -2 when other slots are past their warm-up
                assert tokens is None or (tokens == -2).all(), f"{name} call {call}"
            else:
                assert torch.equal(tokens, expected.tokens), f"{name} call {call}"
            assert torch.equal(prediction, expected.user_prediction), f"{name} call {call}"


# ------------------------------------------------------------------------------------- 5. bounded memory
@pytest.mark.parametrize("top_k", [0, 2], ids=["plain", "speculative"])
def test_memory_is_bounded_by_the_context(moshi_lm, top_k):
    model = load(moshi_lm, "moshiko_small")
    context = model.config.context
    assert context == 5
    user = user_stream(model.config, batch=2, frames=12 * context, seed=50)
    with model.streaming(2, speculate_top_k=top_k, **GREEDY) as stream:
        kv = stream.kv
        pointers = [kv.keys.data_ptr(), kv.values.data_ptr(), kv.positions.data_ptr()]
        nbytes = stream.nbytes()
        assert kv.keys.shape[3] == context
        for t in range(user.shape[2]):
            stream.step(user[:, :, t : t + 1])
            assert stream.nbytes() == nbytes
            assert [kv.keys.data_ptr(), kv.values.data_ptr(), kv.positions.data_ptr()] == pointers
            assert stream.kv is kv
            for b in range(2):
                held = sorted(p for p in kv.positions[b].tolist() if p >= 0)
                assert held == list(range(max(0, t + 1 - context), t + 1)), f"call {t}, stream {b}"


# ---------------------------------------------------------------------------------------------- 6. generate
def test_generate_equals_a_streaming_loop(moshi_lm):
    model = load(moshi_lm, "moshiko_small")
    c = model.config
    B, T, max_delay = 2, 20, max(c.delays)
    user = user_stream(c, B, T, seed=60)
    for overrides in (dict(GREEDY), dict(seed=7), dict(GREEDY, speculate_top_k=2)):
        result = model.generate(user, progress=False, **overrides)
        assert isinstance(result, MoshiGenerateOutput)
        assert result.text_tokens.shape == (B, T - max_delay)
        assert result.audio_codes.shape == (B, c.dep_q, T - max_delay)
        for field in ("user_prediction", "user_probs", "user_entropy"):
            assert getattr(result, field).shape == (B, c.user_dep_q, T)
        seed = overrides.pop("seed", None)
        outs = run_ours(model, user, seed=seed, **overrides)
        tokens = torch.cat([o.tokens for o in outs[max_delay:]], dim=2)
        assert torch.equal(result.text_tokens, tokens[:, 0])
        assert torch.equal(result.audio_codes, tokens[:, 1:])
        assert torch.equal(result.user_prediction, torch.cat([o.user_prediction for o in outs], dim=2))
        torch.testing.assert_close(result.user_probs, torch.cat([o.user_probs for o in outs], dim=2))
        torch.testing.assert_close(result.user_entropy, torch.cat([o.user_entropy for o in outs], dim=2))
        stats = result.speculation
        assert isinstance(stats, SpeculationStats)
        assert stats.top_k == overrides.get("speculate_top_k", 0)
        assert stats.hits + stats.misses + stats.not_tried == B * T
        assert stats.hit_steps + stats.normal_steps == T
        assert (stats.hits + stats.misses > 0) == bool(stats.top_k)
    sampled = model.generate(user, progress=False, seed=7)
    assert not torch.equal(sampled.text_tokens, model.generate(user, progress=False, **GREEDY).text_tokens)
    assert not torch.equal(sampled.audio_codes, model.generate(user, progress=False, seed=8).audio_codes)
    no_user = load(moshi_lm, "moshiko_small", predict_user_audio=False).generate(user, progress=False, **GREEDY)
    assert no_user.user_prediction is None and no_user.text_tokens.shape == (B, T - max_delay)


def test_speculation_is_lossless_under_sampling(moshi_lm):
    """A committed speculation reuses the noise the normal step would have drawn: seeded sampled streams are
    identical with and without speculation."""
    model = load(moshi_lm, "moshiko_small")
    random_user = user_stream(model.config, batch=2, frames=40, seed=70)
    frames, spec_outs = [], []
    with model.streaming(2, seed=5, speculate_top_k=3) as stream:
        for t in range(40):
            frame = random_user[:, :, t : t + 1].clone()
            if t:
                frame[0, 0, 0] = spec_outs[-1].user_prediction[0, 0, 0]
            frames.append(frame)
            spec_outs.append(stream.step(frame))
    assert all(o.speculative[0] == "hit" for o in spec_outs[1:])
    assert any(o.speculative[1] == "miss" for o in spec_outs[1:])
    plain_outs = run_ours(model, torch.cat(frames, dim=2), seed=5)
    assert_same_tokens([o.tokens for o in spec_outs], [o.tokens for o in plain_outs])
    for a, b in zip(spec_outs, plain_outs):
        assert torch.equal(a.user_prediction, b.user_prediction)
    assert not torch.equal(  # and sampling is on: a greedy run differs
        torch.cat([o.tokens for o in plain_outs[1:]], 2),
        torch.cat([o.tokens for o in run_ours(model, torch.cat(frames, dim=2), **GREEDY)[1:]], 2),
    )


# --------------------------------------------------------------------------------------- 7. critical path
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_user_depformer_runs_after_the_system_tokens(moshi_lm, monkeypatch, sampling):
    model = load(moshi_lm, "moshiko_small")
    system_only = load(moshi_lm, "moshiko_small", predict_user_audio=False)
    c = model.config
    user = user_stream(c, 2, 25, seed=80)
    overrides = dict(seed=9) if sampling else dict(GREEDY)
    log, session = [], {}
    system_frame, user_frame = model.depformer.generate_frame, model.user_depformer.generate_frame

    def record_system(hidden, text, cache, sample, **options):
        audio, logits = system_frame(hidden, text, cache, sample, **options)
        log.append(("system", hidden.clone(), text.clone(), audio.clone()))
        return audio, logits

    def record_user(hidden, text, cache, sample, **options):
        stream = session["stream"]
        slot = (stream.offsets % stream.ring)[:, None, None].expand(-1, 1 + c.dep_q, 1)
        log.append(("user", hidden.clone(), text.clone(), stream.tokens[:, : 1 + c.dep_q].gather(-1, slot)[..., 0]))
        return user_frame(hidden, text, cache, sample, **options)

    monkeypatch.setattr(model.depformer, "generate_frame", record_system)
    monkeypatch.setattr(model.user_depformer, "generate_frame", record_user)
    with_user = []
    with model.streaming(2, **overrides) as stream:
        session["stream"] = stream
        for t in range(user.shape[2]):
            log.clear()
            with_user.append(stream.step(user[:, :, t : t + 1]).tokens)
            assert [entry[0] for entry in log] == ["system", "user"], f"call {t}"
            (_, hidden, text, audio), (_, user_hidden, user_text, committed) = log
            assert torch.equal(user_hidden, hidden) and torch.equal(user_text, text)
            # the call's text and audio are already in the token ring when the user Depformer starts
            assert torch.equal(committed, torch.cat([text[:, None], audio], dim=1))
    without_user = run_ours(system_only, user, **overrides)
    assert_same_tokens(with_user, [o.tokens for o in without_user])


# ------------------------------------------------------------------------------------------ 8. gap filling
@pytest.mark.parametrize("threshold", [0.0, 0.1, 1.0])
def test_gap_filling_equals_the_filled_frame_given_explicitly(moshi_lm, threshold):
    """`step(None)` at call `m` plays the frame whose delay-0 row is the prediction of call `m - 1` and whose
    delay-1 rows are the predictions of call `m` (they are read at `m + 1`), each where its probability reaches
    the threshold, else the fallback token -1."""
    model = load(moshi_lm, "moshiko_small")
    c = model.config
    user_delays = c.delays[1 + c.dep_q :]
    assert user_delays == [0] + [1] * 7 and c.user_dep_q == 8
    user = user_stream(c, 2, 16, seed=90)
    gaps = {0, 5, 6, 11}
    with model.streaming(2, gap_fill_threshold=threshold, **GREEDY) as stream:
        gapped = [stream.step(None if t in gaps else user[:, :, t : t + 1]) for t in range(16)]
    explicit = user.clone()
    for m in sorted(gaps):
        if m:
            early_ok = gapped[m - 1].user_probs[:, 0, 0] >= threshold
            early = torch.where(early_ok, gapped[m - 1].user_prediction[:, 0, 0], -1)
        else:  # no prediction yet
            early_ok, early = torch.zeros(2, dtype=torch.bool), torch.full((2,), -1)
        late_ok = gapped[m].user_probs[:, 1:, 0] >= threshold
        late = torch.where(late_ok, gapped[m].user_prediction[:, 1:, 0], -1)
        explicit[:, 0, m], explicit[:, 1:, m] = early, late
        filled = gapped[m].gap_filled
        assert filled.shape == (2, 8) and torch.equal(filled, torch.cat([early_ok[:, None], late_ok], dim=1))
        if threshold == 0.0:
            assert filled[:, 1:].all() and filled[:, 0].all() == (m > 0)
        if threshold == 1.0:
            assert not filled.any()
    if threshold == 0.1:
        flags = torch.stack([gapped[m].gap_filled for m in gaps])
        assert flags.any() and not flags.all()
    assert all(gapped[t].gap_filled is None for t in range(16) if t not in gaps)
    given = run_ours(model, explicit, **GREEDY)
    assert_same_tokens([o.tokens for o in gapped], [o.tokens for o in given])
    for a, b in zip(gapped, given):
        assert torch.equal(a.user_prediction, b.user_prediction)
    if threshold == 1.0:  # nothing confident: the missing frames are frames of zero tokens
        assert (explicit[..., sorted(gaps)] == -1).all()


def test_per_slot_missing_frames_equal_solo_gap_filling(moshi_lm):
    """`step(codes, missing=mask)` gap-fills only the masked slots (a server whose client is late): each slot
    equals a solo session that got `step(None)` exactly where it was missing."""
    model = load(moshi_lm, "moshiko_small")
    user = user_stream(model.config, 2, 12, seed=91)
    gaps = {0: {3, 4}, 1: {7}}  # slot -> calls where its frame is missing
    with model.streaming(2, gap_fill_threshold=0.05, **GREEDY) as stream:
        both = []
        for t in range(12):
            missing = torch.tensor([t in gaps[0], t in gaps[1]])
            frame = user[:, :, t : t + 1].masked_fill(missing[:, None, None], -1)
            both.append(stream.step(frame, missing=missing if missing.any() else None))
    for slot in range(2):
        with model.streaming(1, gap_fill_threshold=0.05, **GREEDY) as stream:
            solo = [stream.step(None if t in gaps[slot] else user[slot : slot + 1, :, t : t + 1]) for t in range(12)]
        for t, (a, b) in enumerate(zip(both, solo)):
            assert (a.tokens is None) == (b.tokens is None)
            if a.tokens is not None:
                assert torch.equal(a.tokens[slot : slot + 1], b.tokens)
            assert torch.equal(a.user_prediction[slot : slot + 1], b.user_prediction)
            if t in gaps[slot]:
                assert torch.equal(a.gap_filled[slot : slot + 1], b.gap_filled)
            elif a.gap_filled is not None:
                assert not a.gap_filled[slot].any()


@pytest.mark.parametrize("top_k", [0, 2])
def test_deferred_look_ahead_equals_the_whole_step(moshi_lm, top_k):
    """`step(..., look_ahead=False)` then `look_ahead()` (a server's idle-time split) gives the same tokens,
    predictions and speculation as `step`; a pending look-ahead runs before the next step or a reset."""
    model = load(moshi_lm, "moshiko_small")
    user = user_stream(model.config, 2, 10, seed=92)
    with model.streaming(2, speculate_top_k=top_k, **GREEDY) as stream:
        whole = [stream.step(user[:, :, t : t + 1]) for t in range(10)]
        whole_stats = stream.stats.to_dict()
    with model.streaming(2, speculate_top_k=top_k, **GREEDY) as stream:
        with pytest.raises(RuntimeError, match="there is none pending"):
            stream.look_ahead()
        for t in range(10):
            out = stream.step(user[:, :, t : t + 1], look_ahead=False)
            assert out.user_prediction is None and out.speculate_s is None
            assert (out.tokens is None) == (whole[t].tokens is None)
            if out.tokens is not None:
                assert torch.equal(out.tokens, whole[t].tokens)
            assert out.speculative == whole[t].speculative
            if t % 3 == 0:  # left pending: the next step runs it
                continue
            ahead = stream.look_ahead()
            assert torch.equal(ahead.user_prediction, whole[t].user_prediction)
            assert torch.equal(ahead.user_probs, whole[t].user_probs)
            assert (ahead.speculate_s > 0) == (top_k > 0)
        deferred_stats = stream.stats.to_dict()
    for key in ("hits", "misses", "not_tried"):
        assert deferred_stats[key] == whole_stats[key]
    if top_k:
        assert whole_stats["hits"] + whole_stats["misses"] > 0


def test_missing_frame_without_gap_filling_raises(moshi_lm):
    model = load(moshi_lm, "moshiko_small")
    with model.streaming(1, **GREEDY) as stream:
        with pytest.raises(ValueError, match="gap filling is off"):
            stream.step(None)


# ------------------------------------------------------------------------------------------- 9. bad input
def test_bad_streaming_input_raises(moshi_lm):
    model = load(moshi_lm, "moshiko_small")
    c = model.config
    good = torch.zeros(2, c.n_q - c.dep_q, 1, dtype=torch.long)
    with model.streaming(2, **GREEDY) as stream:
        with pytest.raises(ValueError, match=r"shape \[B, n_q - dep_q = 8, 1\]"):
            stream.step(torch.zeros(2, 8, 2, dtype=torch.long))
        with pytest.raises(ValueError, match=r"shape \[B, n_q - dep_q = 8, 1\]"):
            stream.step(torch.zeros(2, 7, 1, dtype=torch.long))
        with pytest.raises(ValueError, match="integer tensor, got dtype torch.float32"):
            stream.step(good.float())
        for value in (c.card, -2):
            bad = good.clone()
            bad[1, 3, 0] = value
            with pytest.raises(ValueError, match=rf"user_codes\[1, 3, 0\] = {value} is out of range"):
                stream.step(bad)
        with pytest.raises(ValueError, match="batch size 3 but the session was opened with batch_size=2"):
            stream.step(torch.zeros(3, 8, 1, dtype=torch.long))
        with pytest.raises(ValueError, match=r"mask must be a BoolTensor of shape \[2\]"):
            stream.reset(torch.ones(3, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"mask must be a BoolTensor of shape \[2\]"):
            stream.set_exec_mask(torch.ones(2, dtype=torch.long))
        assert stream.step(good).tokens is None  # the rejected calls changed nothing
        assert stream.step(good).tokens is not None
    with pytest.raises(RuntimeError, match="model.streaming"):
        stream.step(good)
    with pytest.raises(RuntimeError, match="model.streaming"):
        stream.reset()
    with pytest.raises(ValueError, match="foo_bar"):
        MoshiUserPredGenerationConfig(foo_bar=1)
    with pytest.raises(ValueError, match="foo_bar"):
        with model.streaming(1, foo_bar=1):
            pass
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        with model.streaming(0):
            pass
    with pytest.raises(ValueError, match=r"user_codes must have shape \[B, n_q - dep_q = 8, T\], got \(8, 4\)"):
        model.generate(torch.zeros(8, 4, dtype=torch.long), progress=False)
    no_user = load(moshi_lm, "moshiko_small", predict_user_audio=False)
    with pytest.raises(ValueError, match="speculate_top_k=2 needs a user branch"):
        with no_user.streaming(1, speculate_top_k=2):
            pass
    sin = load(moshi_lm, "sin_lowrank_schedule")  # first user delay is 1: nothing to speculate on
    with pytest.raises(ValueError, match="speculation needs exactly one delay-0 user codebook"):
        with sin.streaming(1, speculate_top_k=2):
            pass
