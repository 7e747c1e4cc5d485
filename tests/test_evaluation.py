"""evaluate_user_prediction: metrics against a direct computation from model(codes), exact baselines on hand-made
codes, windowing and batching, plots, errors."""

from __future__ import annotations

import copy
import json
import math
import sys
from collections import Counter

import pytest
import torch

from helpers import random_codes, tiny_model
from hf_moshi_userpred.evaluation.user_prediction import UserPredictionReport, evaluate_user_prediction, plot_user_prediction

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dialogues(model, lengths, zero_fraction=0.1, seed=0) -> list[torch.Tensor]:
    return [random_codes(model.config, batch=1, frames=n, seed=seed + i, zero_fraction=zero_fraction)[0]
            for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def direct_evaluation(model, data, top_k, num_bins, reference=None) -> dict:
    """The spec, position by position: each dialogue in one forward pass, baselines and ECE by hand."""
    card, rows, L = model.config.card, model.user_rows, model.config.user_prediction_lookahead
    K = model.config.user_dep_q
    counts = [Counter() for _ in range(K)]
    for codes in data if reference is None else reference:
        for k in range(K):
            counts[k].update(tok for tok in codes[rows][k].tolist() if tok != -1)
    ranking = [sorted(range(card), key=lambda tok: (-counts[k][tok], tok)) for k in range(K)]
    tokens, frames = [], []  # tokens: (k, model hit, model top-k hit, repeat hit, unigram hit, unigram top-k hit, conf)
    for codes in data:
        with torch.no_grad():
            out = model(codes[None])
        user = codes[rows]
        for t in range(codes.shape[1]):
            frame = []
            for k in range(K):
                if not out.user_mask[0, k, t]:
                    continue
                target = int(user[k, t])
                probs = out.user_logits[0, k, t].float().softmax(-1)
                previous = int(user[k, t - L]) if t - L >= 0 else -1
                repeat = previous if previous != -1 else ranking[k][0]
                frame.append((k, int(probs.argmax()) == target, target in probs.topk(top_k).indices.tolist(),
                              repeat == target, ranking[k][0] == target, target in ranking[k][:top_k],
                              float(probs.max())))
            tokens += frame
            if frame:
                frames.append([all(tok[i] for tok in frame) for i in (1, 3, 4)])
    bins = [[] for _ in range(num_bins)]
    for tok in tokens:
        bins[min(int(tok[6] * num_bins), num_bins - 1)].append(tok)
    ece = sum(abs(sum(t[1] for t in b) - sum(t[6] for t in b)) for b in bins) / len(tokens)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "tokens": tokens, "num_frames": len(frames), "ece": ece,
        "accuracy": [mean([tok[i] for tok in tokens]) for i in (1, 3, 4)],
        "top_k": [mean([tok[i] for tok in tokens]) for i in (2, 3, 5)],
        "sequence": [mean([f[i] for f in frames]) for i in range(3)],
        "per_codebook": [[mean([tok[i] for tok in tokens if tok[0] == k]) for k in range(K)] for i in (1, 3, 4)],
        "delay0": [mean([tok[i] for tok in tokens if tok[0] == 0]) for i in (1, 3, 4)],
        "bin_counts": [len(b) for b in bins],
    }


@pytest.mark.parametrize("lookahead", [1, 2])
def test_metrics_match_a_direct_computation(lookahead):
    model = tiny_model(user_prediction_lookahead=lookahead).train()
    data = dialogues(model, [9, 14, 9, 6])
    report = evaluate_user_prediction(model, data, batch_size=2, window=64, top_k=3, num_bins=7)
    assert model.training  # the mode is restored
    expected = direct_evaluation(model.eval(), data, top_k=3, num_bins=7)
    assert report.num_tokens == len(expected["tokens"]) and report.num_frames == expected["num_frames"]
    assert report.delay0_rows == [0]
    assert report.num_delay0_tokens == report.tokens_per_codebook[0] == sum(tok[0] == 0 for tok in expected["tokens"])
    for i, metrics in enumerate((report.model, report.repeat_last, report.unigram)):
        assert metrics.accuracy == pytest.approx(expected["accuracy"][i])
        assert metrics.top_k_accuracy == pytest.approx(expected["top_k"][i])
        assert metrics.sequence_accuracy == pytest.approx(expected["sequence"][i])
        assert metrics.per_codebook_accuracy == pytest.approx(expected["per_codebook"][i])
        assert metrics.delay0_accuracy == pytest.approx(expected["delay0"][i])
        delayed = sum(a * n for a, n in zip(metrics.per_codebook_accuracy[1:], report.tokens_per_codebook[1:]))
        assert metrics.delayed_accuracy == pytest.approx(delayed / sum(report.tokens_per_codebook[1:]))
    assert report.repeat_last.top_k_accuracy == report.repeat_last.accuracy
    assert report.ece == pytest.approx(expected["ece"])
    assert [b.count for b in report.reliability] == expected["bin_counts"]
    assert sum(b.count for b in report.delay0_reliability) == report.num_delay0_tokens
    assert [(b.lower, b.upper) for b in report.reliability][-1] == (6 / 7, 1.0)


def test_calibration_with_under_and_saturated_confidence():
    """Codebook 1 gets a zero head (uniform: confidence 1/card, argmax token 0) and only 0 targets, so it is right
    while unsure; codebook 7 a huge head (confidence exactly 1.0: the last bin includes 1)."""
    model = tiny_model(seed=1)
    with torch.no_grad():
        model.user_depformer.heads[1].weight.zero_()
        model.user_depformer.heads[7].weight.mul_(1e4)
    data = dialogues(model, [10, 8], zero_fraction=0.0)
    for codes in data:
        codes[model.user_rows.start + 1] = 0
    report = evaluate_user_prediction(model, data, window=64, num_bins=5)
    expected = direct_evaluation(model, data, top_k=5, num_bins=5)
    assert report.model.per_codebook_accuracy[1] == 1.0
    first, last = report.reliability[0], report.reliability[-1]
    assert first.accuracy > first.confidence and last.confidence == pytest.approx(1.0)
    assert last.count >= report.tokens_per_codebook[7] and last.accuracy < last.confidence
    assert [b.count for b in report.reliability] == expected["bin_counts"]
    assert report.ece == pytest.approx(expected["ece"])
    assert report.ece == pytest.approx(sum(b.count * abs(b.accuracy - b.confidence)
                                           for b in report.reliability if b.count) / report.num_tokens)


def hand_made(model, user_rows: dict[int, list[int]], frames: int = 12) -> torch.Tensor:
    """Random valid text/system rows; user codebooks given by `user_rows`, the other user codebooks zero tokens."""
    codes = random_codes(model.config, batch=1, frames=frames, zero_fraction=0.0)[0]
    codes[model.user_rows] = -1
    for k, values in user_rows.items():
        codes[model.user_rows.start + k] = torch.tensor(values)
    return codes


def test_baselines_on_hand_made_codes(model):
    constant, periodic = [7] * 12, [3, 3, 5] * 4
    report = evaluate_user_prediction(model, [hand_made(model, {0: constant, 1: periodic})], window=64, top_k=2)
    # codebook 0 (delay 0) scores all 12 frames; codebook 1 (delay 1) frames 0..10 (its delay tail has no logit).
    assert report.tokens_per_codebook == [12, 11, 0, 0, 0, 0, 0, 0] and report.num_frames == 12
    assert report.repeat_last.per_codebook_accuracy[0] == report.unigram.per_codebook_accuracy[0] == 1.0
    # repeat_last on 3,3,5,3,3,5,3,3,5,3,3: t=0 falls back to the unigram token 3 (8 of 12), then hits at t=1,4,7,10.
    assert report.repeat_last.per_codebook_accuracy[1] == pytest.approx(5 / 11)
    assert report.unigram.per_codebook_accuracy[1] == pytest.approx(8 / 11)
    assert report.unigram.top_k_accuracy == 1.0  # {3, 5} are the 2 most frequent tokens
    assert report.repeat_last.top_k_accuracy == report.repeat_last.accuracy == pytest.approx(17 / 23)
    assert report.repeat_last.delay0_accuracy == 1.0 and report.repeat_last.delayed_accuracy == pytest.approx(5 / 11)
    assert report.repeat_last.sequence_accuracy == pytest.approx(6 / 12)  # frame 11 has codebook 0 only
    assert report.unigram.sequence_accuracy == pytest.approx(9 / 12)
    assert report.repeat_last.per_codebook_accuracy[2:] == [None] * 6
    assert report.unigram_source == "evaluated dataset"


def test_unigram_counted_on_the_reference(model):
    data = [hand_made(model, {0: [7] * 12, 1: [3, 3, 5] * 4})]
    reference = [{"codes": hand_made(model, {0: [7] * 20, 1: [5] * 20}, frames=20)}]
    report = evaluate_user_prediction(model, data, window=64, reference=reference)
    assert report.unigram.per_codebook_accuracy[1] == pytest.approx(3 / 11)
    assert report.repeat_last.per_codebook_accuracy[1] == pytest.approx(4 / 11)  # the t=0 fallback is now 5: a miss
    assert report.unigram_source == "reference"


def test_repeat_last_uses_frame_t_minus_lookahead():
    model = tiny_model(user_prediction_lookahead=2)
    alternating = [4, 6] * 6
    report = evaluate_user_prediction(model, [hand_made(model, {0: alternating, 1: alternating})], window=64)
    # L = 2: codebook 0 (delay 0) is scored from frame 1 on, codebook 1 (delay 1) at every frame.
    assert report.tokens_per_codebook[:2] == [11, 12]
    # codes[t - 2] == codes[t]; before that, the unigram token (a 6/6 tie: the lower id 4) is right only at t=0.
    assert report.repeat_last.per_codebook_accuracy[:2] == pytest.approx([10 / 11, 11 / 12])
    lookahead_1 = evaluate_user_prediction(tiny_model(), [hand_made(model, {0: alternating})], window=64)
    assert lookahead_1.repeat_last.per_codebook_accuracy[0] == pytest.approx(1 / 12)  # codes[t - 1] != codes[t]


def test_windows_cover_every_frame_and_batching_does_not_matter(model):
    data = dialogues(model, [12, 12, 7], zero_fraction=0.0)
    report = evaluate_user_prediction(model, data, batch_size=8, window=5)
    assert report.num_frames == 12 + 12 + 7
    cut = [codes[:, start : start + 5] for codes in data for start in range(0, codes.shape[1], 5)]
    one_by_one = evaluate_user_prediction(model, cut, batch_size=1, window=64)
    assert report.to_dict() == pytest.approx(one_by_one.to_dict())
    default = evaluate_user_prediction(model, data)  # the window defaults to config.context = 5
    assert default.to_dict() == pytest.approx(report.to_dict())


def test_zero_tokens_are_never_scored(model):
    codes = dialogues(model, [12], zero_fraction=0.0)[0]
    codes[:, 8:] = -1  # a padded tail, as the segment collator writes
    codes[model.user_rows.start + 2, 3] = -1
    report = evaluate_user_prediction(model, [{"codes": codes}], window=64)
    with torch.no_grad():
        mask = model(codes[None]).user_mask[0]
    assert report.num_tokens == int(mask.sum()) and report.num_frames == 8
    assert not mask[:, 8:].any() and not mask[2, 3]
    with pytest.raises(ValueError, match="no user token"):
        evaluate_user_prediction(model, [torch.full_like(codes, -1)], window=64)


def test_report_dict_and_markdown(model):
    report = evaluate_user_prediction(model, dialogues(model, [10]), window=64)
    metrics = report.to_dict()
    for prefix in ("user", "repeat_last", "unigram"):
        for name in ("accuracy", "delay0_accuracy", "delayed_accuracy", "top_k_accuracy", "delay0_top_k_accuracy",
                     "sequence_accuracy", "codebook_0_accuracy", "codebook_7_accuracy"):
            assert isinstance(metrics[f"{prefix}/{name}"], float)
    assert {"ece", "delay0_ece", "num_tokens", "num_delay0_tokens", "num_frames", "top_k"} <= metrics.keys()
    assert metrics["num_tokens"] == report.num_tokens and json.loads(json.dumps(metrics)) == metrics
    assert all(math.isfinite(value) for value in metrics.values())
    table = report.to_markdown()
    assert "| | model | repeat_last | unigram |" in table and "| codebook 0 (delay 0) |" in table
    assert f"{100 * report.model.delay0_accuracy:.1f}%" in table


def test_plots(model, tmp_path, monkeypatch):
    report = evaluate_user_prediction(model, dialogues(model, [10]), window=64, plot_dir=tmp_path / "plots")
    assert set(report.plots) == {"per_codebook_accuracy", "reliability"}
    for name, path in report.plots.items():
        assert path == str(tmp_path / "plots" / f"{name}.png")
        with open(path, "rb") as file:
            assert file.read(8) == PNG_SIGNATURE
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(ImportError, match=r"hf_moshi_userpred\[plots\]"):
        plot_user_prediction(report, tmp_path)


def test_errors(model):
    no_branch = tiny_model(predict_user_audio=False)
    with pytest.raises(ValueError, match="no user branch"):
        evaluate_user_prediction(no_branch, dialogues(model, [6]))
    with pytest.raises(ValueError, match="no frame"):
        evaluate_user_prediction(model, [])
    with pytest.raises(ValueError, match="1 \\+ n_q"):
        evaluate_user_prediction(model, [torch.zeros(5, 6, dtype=torch.long)])
    with pytest.raises(ValueError, match="top_k"):
        evaluate_user_prediction(model, dialogues(model, [6]), top_k=0)
    assert isinstance(evaluate_user_prediction(model, dialogues(model, [3]), window=64), UserPredictionReport)


def test_top_k_above_the_vocabulary_is_refused():
    from helpers import tiny_model
    from hf_moshi_userpred.evaluation.user_prediction import evaluate_user_prediction
    from helpers import random_codes

    model = tiny_model()
    dataset = [random_codes(model.config, batch=1, frames=6)[0]]
    with pytest.raises(ValueError, match=r"top_k=41 exceeds the audio vocabulary \(card=40\)"):
        evaluate_user_prediction(model, dataset, top_k=41)
    assert evaluate_user_prediction(model, dataset, top_k=40).top_k == 40


# ------------------------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def held_out_model(demo_model_dir):
    """The 30-step demo model and the held-out dialogues the demo encoded next to it."""
    from hf_moshi_userpred.data.encoding import EncodedDialogues
    from hf_moshi_userpred.models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration

    model = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    return model, list(EncodedDialogues(demo_model_dir.parent / "encoded" / "eval"))


def direct_nll(model, data, temperature: float) -> list[float]:
    """Mean NLL per user codebook of `model(codes).user_logits / temperature` over the scored positions."""
    totals, counts = torch.zeros(model.config.user_dep_q, dtype=torch.float64), torch.zeros(model.config.user_dep_q)
    with torch.no_grad():
        for item in data:
            codes = item["codes"][None, :, : model.config.streaming_window]
            out = model(codes=codes)
            for k in range(model.config.user_dep_q):
                mask = out.user_mask[0, k]
                log_probs = (out.user_logits[0, k][mask].double() / temperature).log_softmax(-1)
                totals[k] -= log_probs.gather(-1, codes[0, model.user_rows.start + k][mask][:, None]).sum()
                counts[k] += mask.sum()
    return (totals / counts).tolist()


def test_calibration_fits_the_nll_minimum_and_tracks_a_rescaled_head(one_thread, held_out_model):
    from hf_moshi_userpred.evaluation.user_prediction import calibrate_user_prediction

    model, data = held_out_model
    data = [{"codes": item["codes"][:, : model.config.streaming_window]} for item in data]  # one window each
    report = calibrate_user_prediction(model, data)
    assert model.config.user_logit_temperature is None  # the fit does not change the model
    assert len(report.temperature) == model.config.user_dep_q
    assert all(after <= before for before, after in zip(report.nll_before, report.nll_after))
    for k, t in enumerate(report.temperature):  # the grid's minimum is the NLL's minimum within one step
        assert 0.06 < t < 6.0, "the fit must lie inside the grid for this check"
        here, lower, higher = (direct_nll(model, data, t * f)[k] for f in (1.0, 1 / 1.025, 1.025))
        assert here <= lower + 1e-9 and here <= higher + 1e-9
        assert here == pytest.approx(report.nll_after[k], rel=1e-6)
    assert report.nll_before == pytest.approx(direct_nll(model, data, 1.0), rel=1e-6)
    # The ECEs are evaluate_user_prediction's, raw and with the temperatures applied.
    assert report.ece_before == pytest.approx(evaluate_user_prediction(model, data).ece)
    model.config.user_logit_temperature = report.temperature
    try:
        assert report.ece_after == pytest.approx(evaluate_user_prediction(model, data).ece)
    finally:
        model.config.user_logit_temperature = None
    assert report.cross_fitted_ece is not None and 0.0 <= report.cross_fitted_ece <= 1.0
    # Logits three times sharper need three times the temperature (to the grid's 2.5 % step).
    sharper = copy.deepcopy(model)
    with torch.no_grad():
        for head in sharper.user_depformer.heads:
            head.weight.mul_(3.0)
    rescaled = calibrate_user_prediction(sharper, data)
    for t, t3 in zip(report.temperature, rescaled.temperature):
        assert t3 / (3 * t) == pytest.approx(1.0, abs=0.026)
    # ... and the overconfidence that sharpening caused is calibrated away.
    assert rescaled.ece_before > 0.1 and rescaled.ece_after < rescaled.ece_before / 3


def test_the_temperature_divides_the_user_logits_in_forward_and_streaming(one_thread):
    model = tiny_model(seed=3)
    codes = random_codes(model.config, batch=1, frames=8, seed=3)
    with torch.no_grad():
        raw = model(codes=codes).user_logits
        model.config.user_logit_temperature = [2.0] * model.config.user_dep_q
        calibrated = model(codes=codes).user_logits
    assert torch.allclose(calibrated.nan_to_num(), (raw / 2.0).nan_to_num(), atol=1e-6)
    user = codes[:, model.user_rows]
    runs = {}
    for temperature in (None, [2.0] * model.config.user_dep_q):
        model.config.user_logit_temperature = temperature
        with model.streaming(1, do_sample=False, audio_do_sample=False) as stream:
            steps = [stream.step(user[:, :, t : t + 1]) for t in range(4)]
            runs[temperature is None] = (steps, stream.last_user_logits.clone())
    model.config.user_logit_temperature = None
    (plain, plain_logits), (scaled, scaled_logits) = runs[True], runs[False]
    assert torch.allclose(scaled_logits, plain_logits / 2.0, atol=1e-6)
    for a, b in zip(plain, scaled):  # argmaxes, hence tokens and predictions, are unchanged
        assert torch.equal(a.tokens if a.tokens is not None else torch.tensor(0),
                           b.tokens if b.tokens is not None else torch.tensor(0))
        assert torch.equal(a.user_prediction, b.user_prediction)
    expected = scaled_logits.float().softmax(-1).max(-1).values
    assert torch.allclose(scaled[-1].user_probs[..., -1], expected, atol=1e-6)
    assert (scaled[-1].user_probs[..., -1] < plain[-1].user_probs[..., -1]).all()


@pytest.mark.parametrize("value", [[1.0], [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], "warm", [float("inf")] * 8])
def test_a_bad_temperature_is_refused(value):
    from helpers import tiny_config

    with pytest.raises(ValueError, match="user_logit_temperature"):
        tiny_config(user_logit_temperature=value)


def test_evaluate_calibrate_writes_the_temperature_into_the_config(one_thread, demo_model_dir, tmp_path, capsys):
    import shutil

    from hf_moshi_userpred.cli.main import main
    from hf_moshi_userpred.models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration

    model_dir = tmp_path / "model"
    shutil.copytree(demo_model_dir, model_dir)
    before = json.loads((model_dir / "config.json").read_text())
    assert main(["evaluate", str(model_dir), str(demo_model_dir.parent / "encoded" / "eval"), "--calibrate",
                 "--no-plots", "--out", str(tmp_path / "out")]) == 0
    after = json.loads((model_dir / "config.json").read_text())
    temperature = after.pop("user_logit_temperature")
    before.pop("user_logit_temperature", None)
    assert after == before  # only that key changed
    record = json.loads((tmp_path / "out" / "user_prediction_metrics.json").read_text())
    assert record["calibration"]["temperature"] == temperature
    assert record["metrics"]["ece"] == pytest.approx(record["calibration"]["ece_after"])
    assert "ECE, delay-0 codebooks" in capsys.readouterr().out
    reloaded = MoshiUserPredForConditionalGeneration.from_pretrained(model_dir)
    assert reloaded.config.user_logit_temperature == temperature
