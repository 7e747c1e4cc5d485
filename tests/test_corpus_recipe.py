"""`hf-moshi-userpred demo --data DIR`: the recipe end to end on a small synthesised corpus (a few minutes of audio),
and its refusals. Needs espeak-ng (installed by scripts/setup.sh test)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hf_moshi_userpred.corpus.corpus_options import CorpusOptions
    from hf_moshi_userpred.corpus.synthesize import synthesize_corpus

    out = tmp_path_factory.mktemp("recipe") / "corpus"
    options = CorpusOptions(hours=0.08, eval_hours=0.03, dialogue_seconds=(30.0, 45.0), encoder_steps=10,
                            decoder_steps=3, codec_minutes=1.0, kmeans_iterations=3, vocab_size=300)
    synthesize_corpus(out, options)
    return out


def test_recipe_runs_end_to_end_on_a_synthesised_corpus(corpus, tmp_path, capsys, one_thread):
    from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
    from hf_moshi_userpred.cli.main import main
    from hf_moshi_userpred.demo.corpus_recipe import THRESHOLDS

    out = tmp_path / "recipe"
    assert main(["demo", "--data", str(corpus), "--out", str(out), "--steps", "24", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "shift_hold_balanced_accuracy/vap_head" in printed and "report.md" in printed

    # the validation dialogues are the last training ones, and never held-out ones
    train = [json.loads(line)["path"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line)["path"] for line in (corpus / "eval.jsonl").read_text().splitlines()]
    fitted = [json.loads(line)["path"] for line in (out / "train.jsonl").read_text().splitlines()]
    validation = [json.loads(line)["path"] for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [str((corpus / p).resolve()) for p in train] == fitted + validation and len(validation) >= 1
    assert not {str((corpus / p).resolve()) for p in held_out} & set(fitted + validation)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["held_out_shifts"] > 0 and summary["held_out_holds"] > 0
    assert set(summary["thresholds"]) == {"model", "vap_head"} and set(summary["thresholds"].values()) <= set(
        THRESHOLDS)
    metrics = json.loads((out / "evaluation" / "turn_taking_metrics.json").read_text())["metrics"]
    for name in ("model", "vap_head", "timer_200ms", "timer_1000ms"):  # keyed by predictor
        assert 0 <= metrics[f"turn_taking/{name}/balanced_accuracy"] <= 1
    assert metrics["turn_taking/vap_head/threshold"] == summary["thresholds"]["vap_head"]
    low, high = (metrics["turn_taking/model/balanced_accuracy_ci_low"],
                 metrics["turn_taking/model/balanced_accuracy_ci_high"])
    assert low <= metrics["turn_taking/model/balanced_accuracy"] <= high
    assert "dialogue_behaviour/timer 500 ms/pause_takeover_rate" in metrics  # the agents without prediction
    assert f"dialogue_behaviour/hold {summary['thresholds']['vap_head']:g}/pause_takeover_rate" in metrics
    assert (out / "evaluation" / "plots" / "turn_taking_tradeoff.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "## Turn taking" in report and "| timer 1000 ms |" in report

    model = MoshiUserPredForConditionalGeneration.from_pretrained(out / "model")
    assert model.voice_activity_head is not None and model.config.user_logit_temperature is not None
    # trained jointly with the transformer, over the recipe's 2 s window
    assert model.config.voice_activity_trains_transformer
    assert (model.config.voice_activity_horizon, model.config.voice_activity_turn_end_frames) == (25, 12)
    assert model.config.card == 64 and model.config.dep_q == 4
    assert (out / "model" / "turn_taking_statistics.json").is_file() and (out / "model" / "mimi").is_dir()


def test_recipe_refuses_what_it_cannot_run(corpus, tmp_path, capsys):
    from hf_moshi_userpred.cli.main import main
    from hf_moshi_userpred.demo.corpus_recipe import run_corpus_recipe

    assert main(["demo", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "train.jsonl is missing" in error and "Traceback" not in error
    assert main(["demo", "--data", str(corpus), "--out", str(tmp_path / "out"), "--steps", "0"]) == 2
    assert "steps must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num_codebooks must be within 1..8"):
        run_corpus_recipe(corpus, tmp_path / "out", num_codebooks=9)
    with pytest.raises(ValueError, match="no text tokenizer"):
        run_corpus_recipe(corpus, tmp_path / "out", tokenizer=tmp_path / "missing.model")
