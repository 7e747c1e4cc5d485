"""Lossless speculative streaming: committed speculations change nothing but the critical-path time.

After call `o` the session precomputes call `o + 1` for the top-k candidate delay-0 user tokens; when frame
`o + 1` arrives, a matching candidate's KV entries and tokens are committed instead of running the step.
These tests check that a session with speculation produces exactly what the same session without it
produces (greedy and sampled), that a committed sampled token is a valid sample of the right distribution,
and the bookkeeping around it (stats, reset, gap filling).

Frames are made *adaptively* from a speculation-off reference session (the delay-0 user token of frame
`o + 1` is picked from the reference's user logits after call `o`), recorded, and replayed into sessions
with speculation on: since speculation is lossless, those sessions see the same user logits, hence the same
candidates, so the designed hit / miss pattern carries over.
"""

from __future__ import annotations

import pytest
import torch

from helpers import GREEDY, PARITY_CONFIGS, tiny_model
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration

pytestmark = pytest.mark.usefixtures("one_thread")
STATUSES = ("hit", "miss", "not_tried")
UNGENERATED = -2


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _candidates(stream, k: int) -> torch.Tensor:
    """The delay-0 user tokens the session speculates on after its last call, `[B, k]`, computed like it."""
    return torch.softmax(stream.last_user_logits[:, 0].float(), dim=-1).topk(k, dim=-1).indices


def _make_frame(stream, t: int, predictor: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """User frame `t` `[B, n_q - dep_q, 1]` and the rank of its delay-0 token among the candidates `[B]`.

    Random codes; after call 0 the delay-0 row is chosen by `predictor`:
    "right": rank 0 of the candidates 65% of the time, rank 1..3 25%, random 10% (rank reported as -1);
    "wrong": the least likely token, never among the top-k candidates (rank -1).
    Every draw is made unconditionally, so the frames are a function of the generator and the logits only.
    """
    c = stream.model.config
    B = stream.batch_size
    frame = torch.randint(0, c.card, (B, c.n_q - c.dep_q, 1), generator=generator)
    u = torch.rand(B, generator=generator)
    rank = torch.randint(1, 4, (B,), generator=generator)
    unranked = torch.full((B,), -1)
    if t == 0:
        return frame, unranked
    if predictor == "right":
        rank = torch.where(u < 0.65, torch.zeros_like(rank), rank)
        chosen = _candidates(stream, 4).gather(1, rank[:, None])[:, 0]
        frame[:, 0, 0] = torch.where(u < 0.9, chosen, frame[:, 0, 0])
        return frame, torch.where(u < 0.9, rank, unranked)
    if predictor == "wrong":
        frame[:, 0, 0] = torch.softmax(stream.last_user_logits[:, 0].float(), dim=-1).argmin(dim=-1)
        return frame, unranked
    raise ValueError(predictor)


def _state(stream) -> dict:
    return {
        "keys": stream.kv.keys.clone(),
        "values": stream.kv.values.clone(),
        "positions": stream.kv.positions.clone(),
        "tokens": stream.tokens.clone(),
        "offsets": stream.offsets.clone(),
        "text_history": stream.text_history.clone(),
        "user_prediction": stream.user_prediction.clone(),
    }


def _record(stream, out, record: dict) -> None:
    record["tokens"].append(None if out.tokens is None else out.tokens.clone())
    record["user_prediction"].append(out.user_prediction.clone())
    record["user_probs"].append(out.user_probs.clone())
    record["speculative"].append(list(out.speculative))


def _new_record() -> dict:
    return {"tokens": [], "user_prediction": [], "user_probs": [], "speculative": []}


def reference_run(model, batch: int, steps: int, predictor: str, frame_seed: int, **gen_kwargs) -> dict:
    """Speculation off; frames made adaptively from this session's user logits."""
    generator = torch.Generator().manual_seed(frame_seed)
    record = _new_record()
    record["frames"], record["ranks"] = [], []
    with model.streaming(batch, **gen_kwargs) as stream:
        for t in range(steps):
            frame, rank = _make_frame(stream, t, predictor, generator)
            record["frames"].append(frame)
            record["ranks"].append(rank)
            _record(stream, stream.step(frame), record)
        record["state"], record["stats"] = _state(stream), stream.stats
    return record


def replay(model, frames: list, **gen_kwargs) -> dict:
    record = _new_record()
    with model.streaming(frames[0].shape[0], **gen_kwargs) as stream:
        for frame in frames:
            _record(stream, stream.step(frame), record)
        record["state"], record["stats"] = _state(stream), stream.stats
    return record


def assert_same_outputs(spec: dict, ref: dict, exact_floats: bool) -> None:
    assert len(spec["tokens"]) == len(ref["tokens"])
    for t, (a, b) in enumerate(zip(spec["tokens"], ref["tokens"])):
        assert (a is None) == (b is None), f"step {t}: tokens None in one session only"
        if a is not None:
            assert torch.equal(a, b), f"step {t}: tokens differ\n{a[..., 0]}\n{b[..., 0]}"
    for t, (a, b) in enumerate(zip(spec["user_prediction"], ref["user_prediction"])):
        assert torch.equal(a, b), f"step {t}: user_prediction differs"
    tol = 0.0 if exact_floats else 1e-5
    for t, (a, b) in enumerate(zip(spec["user_probs"], ref["user_probs"])):
        torch.testing.assert_close(a, b, rtol=0, atol=tol, equal_nan=True, msg=lambda m, t=t: f"step {t}: {m}")


def assert_same_state(spec: dict, ref: dict, k: int) -> None:
    for name in ("positions", "tokens", "offsets", "text_history", "user_prediction"):
        assert torch.equal(spec[name], ref[name]), f"{name} differs"
    for name in ("keys", "values"):
        if k == 1:
            assert torch.equal(spec[name], ref[name]), f"KV {name} differ with k=1"
        else:
            # With k > 1 the speculative forward runs B*k rows through the same Linear layers as the normal
            # step's B rows; CPU GEMM kernels block and accumulate differently depending on the number of rows,
            # so committed entries can differ in the last bits (~1e-6). Tokens and positions stay exact.
            torch.testing.assert_close(spec[name], ref[name], rtol=0, atol=1e-5)


def status_counts(record: dict) -> dict:
    flat = [s for step in record["speculative"] for s in step]
    return {name: flat.count(name) for name in STATUSES}


# ------------------------------------------------------------------------------------------ shared runs
STEPS, BATCH = 200, 2


@pytest.fixture(scope="module")
def greedy_runs(model):
    """Memoised greedy runs: `get(predictor, 0)` the speculation-off reference, `get(predictor, k)` its replay."""
    cache = {}

    def get(predictor: str, k: int) -> dict:
        if (predictor, k) not in cache:
            if k == 0:
                cache[predictor, k] = reference_run(model, BATCH, STEPS, predictor, frame_seed=1, **GREEDY)
            else:
                cache[predictor, k] = replay(model, get(predictor, 0)["frames"], speculate_top_k=k, **GREEDY)
        return cache[predictor, k]

    return get


# ------------------------------------------------------------------------------------------ 1. greedy
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("predictor", ["right", "wrong"])
def test_greedy_speculation_is_lossless(greedy_runs, predictor, k):
    """>= 200 greedy steps: with speculation, every output and the whole session state match the replay
    without it, whether the guesses are mostly right (hits committed) or always wrong (all misses)."""
    ref, spec = greedy_runs(predictor, 0), greedy_runs(predictor, k)
    stats = spec["stats"]
    assert len(spec["tokens"]) == STEPS >= 200
    if predictor == "right":
        assert stats.hit_rate > 0.5, stats.to_dict()
        assert stats.hit_steps > 0, stats.to_dict()
        ranks = torch.stack(ref["ranks"])  # [T, B]
        hit = torch.tensor([[s == "hit" for s in step] for step in spec["speculative"]])
        # every frame that followed a candidate of rank < k was committed from the speculation ...
        assert bool(hit[(ranks >= 0) & (ranks < k)].all())
        if k > 1:  # ... including candidates other than the first one (choice > 0)
            assert int(hit[(ranks > 0) & (ranks < k)].sum()) > 10
    else:
        assert stats.hits == 0 and stats.misses > 0, stats.to_dict()
        assert status_counts(spec)["hit"] == 0
    assert ref["tokens"][0] is None and all(t is not None for t in ref["tokens"][1:])
    assert_same_outputs(spec, ref, exact_floats=(k == 1))
    assert_same_state(spec["state"], ref["state"], k)


# ------------------------------------------------------------------------------------------ 2. sampling
@pytest.fixture(scope="module")
def sampled_reference(model):
    return reference_run(model, BATCH, 100, "right", frame_seed=2, seed=7)


@pytest.mark.parametrize("k", [1, 3])
def test_sampled_speculation_is_lossless(model, sampled_reference, k):
    """Default sampling (text and audio sampled), same seed: identical tokens with and without speculation,
    because a committed branch used the very noise the normal step would have drawn."""
    ref = sampled_reference
    assert model.generation_config.do_sample and model.generation_config.audio_do_sample
    spec = replay(model, ref["frames"], speculate_top_k=k, seed=7)
    counts = status_counts(spec)
    assert counts["hit"] > 50 and counts["miss"] > 0, counts
    assert spec["stats"].hit_steps > 0
    assert_same_outputs(spec, ref, exact_floats=(k == 1))
    assert_same_state(spec["state"], ref["state"], k)
    # A different seed does change the sampled tokens (the comparison above is not vacuous).
    other = replay(model, ref["frames"][:10], speculate_top_k=k, seed=8)
    assert any(not torch.equal(a, b) for a, b in zip(other["tokens"][1:], ref["tokens"][1:10]))


# ------------------------------------------------------------------------------------------ 3. distribution
def _capture_text_scores(stream) -> list:
    """Wrap the session's text processors to record the processed scores each forward samples from."""
    captured, processors = [], stream.processors["text"]

    def wrapped(input_ids, scores):
        scores = processors(input_ids, scores)
        captured.append(scores.clone())
        return scores

    stream.processors["text"] = wrapped
    return captured


def test_committed_sample_follows_the_reference_distribution():
    """12000 streams, k=2, every stream hits at call 1 (half on the first candidate, half on the second).

    Call 0 is sampled, so each stream `s` has its own history and its own reference distribution `p_s` of
    the call-1 text token (the processed scores a speculation-off session samples from). If the committed
    tokens `x_s` are valid samples, the count of each token `v` is a sum of independent Bernoulli(p_s(v)):
    mean sum_s p_s(v), variance sum_s p_s(v)(1 - p_s(v)). Checked: total variation of the empirical against
    the average reference, a z-score per token, and the z-score of #{x_s == call-0 token}, which catches a
    sample that reuses the previous call's noise (checked below to be sensitive to exactly that)."""
    kw = dict(PARITY_CONFIGS["moshiko_small"], dim=32, num_heads=2, num_layers=1, depformer_dim=16,
              depformer_dim_feedforward=32, depformer_num_heads=1, depformer_num_layers=1)
    torch.manual_seed(0)
    model = MoshiUserPredForConditionalGeneration(MoshiUserPredConfig.from_moshi_lm_kwargs(kw)).eval()
    with torch.no_grad():  # away from init: peakier, history-dependent text distributions
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    B, k, seed, V = 12000, 2, 11, model.config.text_card_out
    generator = torch.Generator().manual_seed(5)
    frames = [torch.randint(0, model.config.card, (B, 8, 1), generator=generator) for _ in range(2)]
    choice = torch.arange(B) % 2

    with model.streaming(B, speculate_top_k=k, seed=seed) as stream:
        spec_scores = _capture_text_scores(stream)
        stream.step(frames[0])
        frames[1][:, 0, 0] = _candidates(stream, k)[torch.arange(B), choice]
        out = stream.step(frames[1])
        assert out.speculative == ["hit"] * B
        spec_history, spec_ring = stream.text_history[:, -2:].clone(), stream.tokens.clone()
    with model.streaming(B, seed=seed) as stream:
        ref_scores = _capture_text_scores(stream)
        for frame in frames:
            out = stream.step(frame)
        assert out.speculative == ["not_tried"] * B
        ref_history, ref_ring = stream.text_history[:, -2:].clone(), stream.tokens.clone()

    # Same seed: the committed tokens are the spec-off session's tokens, text and audio.
    assert torch.equal(spec_history, ref_history) and torch.equal(spec_ring, ref_ring)
    # The committed branch sampled from the reference's distribution (up to GEMM rounding, see above).
    assert [s.shape for s in spec_scores[:2]] == [(B, V), (B * k, V)]
    committed_scores = spec_scores[1].view(B, k, V)[torch.arange(B), choice]
    p = torch.softmax(ref_scores[1].double(), dim=-1)  # [B, V]
    torch.testing.assert_close(torch.softmax(committed_scores.double(), dim=-1), p, rtol=0, atol=1e-5)

    first, text = spec_history[:, 0], spec_history[:, 1]
    assert len(set(first.tolist())) > 5, "call 0 should give the streams different histories"

    def frequency_z(tokens: torch.Tensor) -> torch.Tensor:
        counts = torch.bincount(tokens, minlength=V).double()
        mean, var = p.sum(0), (p * (1 - p)).sum(0)
        return (counts - mean) / var.clamp_min(1e-12).sqrt()

    def repeat_z(tokens: torch.Tensor) -> float:
        q = p.gather(1, first[:, None])[:, 0]
        return float(((tokens == first).sum() - q.sum()) / (q * (1 - q)).sum().sqrt())

    empirical = torch.bincount(text, minlength=V).double() / B
    tv = 0.5 * float((empirical - p.mean(0)).abs().sum())
    assert tv < 0.05, tv
    assert float(frequency_z(text).abs().max()) < 5.0
    assert abs(repeat_z(text)) < 5.0
    assert not bool((text[:, None] == torch.arange(V)).logical_and(p == 0).any()), "sampled a masked token"

    # Power: sampling call 1 with call 0's noise (simulated with one fresh Exp(1) draw used for both calls)
    # or greedily would fail these checks.
    noise = torch.empty(B, V).exponential_(generator=torch.Generator().manual_seed(0))
    p0 = torch.softmax(ref_scores[0].double(), dim=-1)
    first_reused, text_reused = (p0 / noise).argmax(-1), (p / noise).argmax(-1)
    q = p.gather(1, first_reused[:, None])[:, 0]
    assert float(((text_reused == first_reused).sum() - q.sum()) / (q * (1 - q)).sum().sqrt()) > 5.0
    assert 0.5 * float((torch.bincount(p.argmax(-1), minlength=V) / B - p.mean(0)).abs().sum()) > 0.05


# ------------------------------------------------------------------------------------------ 4. stats
@pytest.mark.parametrize("k", [1, 4])
def test_speculation_stats(greedy_runs, k):
    ref, right, wrong = greedy_runs("right", 0), greedy_runs("right", k), greedy_runs("wrong", k)
    for record in (right, wrong):
        stats, counts = record["stats"], status_counts(record)
        assert stats.top_k == k
        assert all(s in STATUSES for step in record["speculative"] for s in step)
        assert all(len(step) == BATCH for step in record["speculative"])
        assert (stats.hits, stats.misses, stats.not_tried) == (counts["hit"], counts["miss"], counts["not_tried"])
        assert stats.hits + stats.misses + stats.not_tried == STEPS * BATCH
        assert record["speculative"][0] == ["not_tried"] * BATCH  # nothing to commit at call 0
        assert stats.not_tried == BATCH
        assert 0.0 <= stats.hit_rate <= 1.0
        assert stats.hit_rate == stats.hits / (stats.hits + stats.misses)
        all_hit = sum(step == ["hit"] * BATCH for step in record["speculative"])
        assert (stats.hit_steps, stats.normal_steps) == (all_hit, STEPS - all_hit)
        assert stats.speculate_s > 0 and stats.critical_normal_s > 0
        assert stats.to_dict()["hit_rate"] == stats.hit_rate
    assert wrong["stats"].hits == 0 and wrong["stats"].hit_steps == 0 and wrong["stats"].critical_hit_s == 0
    stats = right["stats"]
    assert stats.hit_rate > 0.5 and stats.hit_steps >= 20
    # A hit step skips the main transformer and the Depformer: far cheaper. Only the order is asserted
    # (timings on a shared machine are noisy); typically the ratio is > 10.
    hit_mean, normal_mean = stats.critical_hit_s / stats.hit_steps, stats.critical_normal_s / stats.normal_steps
    assert 0 < hit_mean < normal_mean, stats.to_dict()
    assert stats.saved_s > 0
    # Speculation off: nothing tried, nothing timed for speculation.
    off = ref["stats"]
    assert (off.top_k, off.hits, off.misses, off.not_tried, off.hit_steps) == (0, 0, 0, STEPS * BATCH, 0)
    assert off.speculate_s == 0.0 and off.hit_rate == 0.0


# ------------------------------------------------------------------------------------------ 5. reset
def test_reset_invalidates_speculation(model):
    """A reset stream's pending speculation (computed for its old conversation) is never committed: its next
    step is "not_tried" and it continues exactly like a fresh session; the other stream is untouched."""
    k, before, after = 2, 8, 12
    generator = torch.Generator().manual_seed(3)
    frames, outs = [], []
    with model.streaming(2, speculate_top_k=k, **GREEDY) as stream:
        for t in range(before + after):
            if t == before:
                assert stream.speculation is not None and bool(stream.speculation.valid.all())
                stream.reset(torch.tensor([True, False]))
            frame, _ = _make_frame(stream, t, "right", generator)
            frames.append(frame)
            outs.append(stream.step(frame))
    assert outs[before].speculative[0] == "not_tried"
    assert outs[before].speculative[1] in ("hit", "miss")
    assert sum(o.speculative[0] == "hit" for o in outs[before + 1:]) > 0  # speculation resumes afterwards

    # Stream 0 after the reset == a fresh one-stream session fed the same frames.
    with model.streaming(1, speculate_top_k=k, **GREEDY) as solo:
        for t in range(before, before + after):
            fresh = solo.step(frames[t][:1])
            got = outs[t].tokens
            if fresh.tokens is None:
                assert got is not None and bool((got[0] == UNGENERATED).all())
            else:
                assert torch.equal(got[:1], fresh.tokens), f"step {t}"
            assert torch.equal(outs[t].user_prediction[:1], fresh.user_prediction), f"step {t}"
            assert fresh.speculative[0] == outs[t].speculative[0], f"step {t}"
    # The whole session (both streams) == the same calls and reset without speculation.
    with model.streaming(2, **GREEDY) as plain:
        for t, frame in enumerate(frames):
            if t == before:
                plain.reset(torch.tensor([True, False]))
            out = plain.step(frame)
            assert (out.tokens is None) == (outs[t].tokens is None)
            assert out.tokens is None or torch.equal(out.tokens, outs[t].tokens), f"step {t}"
            assert torch.equal(out.user_prediction, outs[t].user_prediction), f"step {t}"


# ------------------------------------------------------------------------------------------ 6. gap filling
def test_gap_filling_commits_the_speculated_prediction(model):
    """gap_fill_threshold=0: a missing frame's delay-0 token is the top-1 prediction, which is exactly the
    speculated candidate, so `step(None)` commits the speculation; same outputs as without speculation."""
    generator = torch.Generator().manual_seed(4)
    missing = {2, 3, 6, 9, 10, 11, 15}
    gap = dict(gap_fill_threshold=0.0, seed=5)
    frames = [None if t in missing else torch.randint(0, model.config.card, (2, 8, 1), generator=generator)
              for t in range(18)]
    runs = []
    for k in (1, 0):
        record = _new_record()
        with model.streaming(2, speculate_top_k=k, **gap) as stream:
            previous = None
            for t, frame in enumerate(frames):
                slot = stream.offsets % stream.ring
                out = stream.step(frame)
                _record(stream, out, record)
                if frame is None:
                    assert bool(out.gap_filled.all()), "threshold 0: every user row is filled"
                    # the substituted delay-0 token is the prediction made at the previous call
                    fed = stream.tokens[torch.arange(2), stream.user_offset, slot]
                    assert torch.equal(fed, previous.user_prediction[:, 0, 0])
                    assert out.speculative == (["hit", "hit"] if k else ["not_tried", "not_tried"])
                else:
                    assert out.gap_filled is None
                previous = out
            record["state"] = _state(stream)
        runs.append(record)
    spec, ref = runs
    assert status_counts(spec)["hit"] >= 2 * len(missing)
    assert_same_outputs(spec, ref, exact_floats=True)
    assert_same_state(spec["state"], ref["state"], k=1)
