"""The turn-taking signal and its evaluation: metrics on hand-made timelines with known answers, the signal's
tables and shapes, and the whole evaluation (library and `evaluate --turn-taking`) on a briefly trained sample
model."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from helpers import toy_turn_dialogues

from hf_moshi_userpred.sample import sample_model_config
from hf_moshi_userpred.data.voice_activity import (
    STATISTICS_NAME,
    TurnTakingStatistics,
    dialogue_alignments,
    fit_turn_taking_statistics,
    future_silence_targets,
    voice_activity,
)
from hf_moshi_userpred.evaluation.turn_taking import evaluate_turn_taking, turn_taking_signal
from hf_moshi_userpred.evaluation.turn_taking_events import Pause, find_events
from hf_moshi_userpred.evaluation.turn_taking_metrics import (
    anticipation_frames,
    auc,
    binary_metrics,
    timer_fires,
    timer_frames,
)


def activity(T: int, *spans: tuple[int, int]) -> torch.Tensor:
    """Bool [T], True on the inclusive frame spans."""
    out = torch.zeros(T, dtype=torch.bool)
    for first, last in spans:
        out[first : last + 1] = True
    return out


# ---------------------------------------------------------------------------------------- activity and events
def test_voice_activity_marks_every_frame_a_word_overlaps():
    words = [["hi", [0.0, 0.1], "SPEAKER_USER"], ["there", [0.16, 0.4], "SPEAKER_USER"],
             ["yes", [0.5, 0.5], "SPEAKER_USER"], ["ok", [0.33, 0.41], "SPEAKER_MAIN"]]
    # frames of 80 ms: hi 0-1 ([0, 0.08), [0.08, 0.16)), there 2-4 (0.4 is the end of frame 4), yes (instant) 6
    assert voice_activity(words, 10, user=True).nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 6]
    assert voice_activity(words, 10, user=False).nonzero().flatten().tolist() == [4, 5]
    assert voice_activity(words, 5, user=True).tolist() == [True] * 5  # cut at the last frame


def test_events_of_a_hand_made_dialogue():
    T = 60
    user = activity(T, (0, 4), (7, 10), (16, 17), (30, 40), (45, 50))
    system = activity(T, (14, 25), (29, 33), (53, 58))
    events = find_events(user, system, min_pause_frames=2, max_backchannel_frames=12, context_frames=3)
    # 0-4 then 2 silent frames then the user again: hold; 7-10 then the system at 14: shift (silence 5 frames);
    # 16-17 inside the system's 14-25: a backchannel, ends while the system speaks (no pause);
    # 30-40 starts while the system speaks (29-33): a barge-in; it ends with the system silent, the user resumes
    # at 45: hold; 45-50 then the system at 53: shift with no later user speech.
    assert [(p.start_frame, p.end_frame, p.shift, p.silence_frames, p.system_onset) for p in events.pauses] == [
        (0, 4, False, 2, None), (7, 10, True, 5, 14), (30, 40, False, 4, None), (45, 50, True, None, 53)]
    assert [(o.start_frame, o.end_frame, o.backchannel) for o in events.onsets] == [(16, 17, True), (30, 40, False)]
    assert len(events.shifts) == 2 and len(events.holds) == 2


def test_short_gaps_merge_into_one_unit():
    user = activity(20, (0, 3), (5, 8))  # one silent frame: no pause with min_pause_frames=2
    system = activity(20, (12, 18))
    events = find_events(user, system, min_pause_frames=2)
    assert [(p.start_frame, p.end_frame, p.shift) for p in events.pauses] == [(0, 8, True)]
    assert [(p.start_frame, p.end_frame) for p in find_events(user, system, min_pause_frames=1).pauses] == [
        (0, 3), (5, 8)]


# ---------------------------------------------------------------------------------------------------- metrics
def test_binary_metrics_known_values():
    scores = [0.9, 0.8, 0.4, 0.7, 0.2, 0.1]
    labels = [True, True, True, False, False, False]
    m = binary_metrics(scores, labels, threshold=0.5)
    # predicted positive: 0.9, 0.8, 0.7 -> tp 2, fp 1, fn 1, tn 2
    assert m.recall == pytest.approx(2 / 3) and m.specificity == pytest.approx(2 / 3)
    assert m.balanced_accuracy == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # pairs (pos > neg): 0.9 and 0.8 beat all 3, 0.4 beats 0.2 and 0.1 -> 8 of 9
    assert m.auc == pytest.approx(8 / 9) and m.count == 6
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5  # a tie counts half
    assert binary_metrics([1.0, 0.0], [True, True]).balanced_accuracy is None  # one class only
    assert binary_metrics([1.0, 0.0], [True, True]).auc is None
    perfect = binary_metrics([1.0, 0.0, 1.0], [True, False, True])
    assert (perfect.balanced_accuracy, perfect.f1, perfect.auc) == (1.0, 1.0, 1.0)


def test_anticipation_frames_known_values():
    pause = Pause(start_frame=2, end_frame=9, shift=True, silence_frames=None, system_onset=15)
    signal = torch.zeros(20)
    signal[7:] = 0.9  # above the threshold from boundary 7; the turn ends at boundary 10 -> 3 frames early
    assert anticipation_frames(signal, pause, 0.5) == 3
    signal[8] = 0.1  # dips at 8: the crossing that sticks is 9 -> 1 frame early
    assert anticipation_frames(signal, pause, 0.5) == 1
    late = torch.zeros(20)
    late[12:] = 0.9  # only from boundary 12: 2 frames late
    assert anticipation_frames(late, pause, 0.5) == -2
    always = torch.ones(20)  # bounded by the start of the user's last unit (boundary start + 1)
    assert anticipation_frames(always, pause, 0.5) == 10 - 3
    never = torch.zeros(20)
    never[16:] = 1.0  # after the system's onset at 15: missed
    assert anticipation_frames(never, pause, 0.5) is None


def test_timer_frames():
    assert [timer_frames(ms) for ms in (80, 200, 500, 700)] == [1, 3, 7, 9]


def test_timer_fires_in_time():
    """A timer takes the turn only if the mutual silence lasts its frames: to the user's next unit at a hold (it cuts
    the user off), to the system's onset at a shift (a later answer is not the turn taking the dialogue shows)."""
    hold = Pause(start_frame=0, end_frame=9, shift=False, silence_frames=5, system_onset=None)
    assert [timer_fires(hold, frames) for frames in (4, 5, 6)] == [True, True, False]
    # a shift: the user resumes 30 frames later, but the system answered 3 silent frames after frame 9
    shift = Pause(start_frame=0, end_frame=9, shift=True, silence_frames=30, system_onset=13)
    assert [timer_fires(shift, frames) for frames in (3, 4)] == [True, False]
    # silence to the end of the dialogue: every timer fires
    assert timer_fires(Pause(start_frame=0, end_frame=9, shift=False, silence_frames=None, system_onset=None), 99)


def test_future_silence_targets_known_values():
    silent = torch.tensor([False, True, True, False, True, True])
    targets, valid = future_silence_targets(silent, horizon=3, turn_end_frames=2)
    # row t: silent at t, t+1, t+2, then silent at both t+1 and t+2
    assert targets[0].tolist() == [False, True, True, True]
    assert targets[1].tolist() == [True, True, False, False]
    assert targets[3].tolist() == [False, True, True, True]
    assert valid[3].tolist() == [True, True, True, True]
    assert valid[4].tolist() == [True, True, False, False]  # t+2 is past the end


# ---------------------------------------------------------------------------------------------------- the signal
def test_statistics_learn_the_silence_token_and_what_follows():
    config = sample_model_config(dim=32, num_layers=1)
    items, alignments = toy_turn_dialogues(config)
    stats = fit_turn_taking_statistics(items, alignments, config, horizon=4, turn_end_frames=2, prior_weight=1e-6)
    assert stats.silence_tokens() == [7]
    assert stats.codebook == 0 and stats.num_frames == 4 * 40
    # token 29 is the last speech frame of the first unit: then 2 silent frames, then the system's... the user is
    # silent at t+1, t+2, t+3 (frames 15-17) -> row [speech, silent, silent, silent, silent over the last 2]
    assert stats.token_table[29].tolist() == pytest.approx([0, 1, 1, 1, 1], abs=1e-4)
    assert stats.token_table[20].tolist() == pytest.approx([0, 0, 0, 0, 0], abs=1e-4)
    # a one-hot prediction reads its token's row; the table's rows are probabilities
    logits = torch.full((2, 3, config.card), -1e4)
    logits[..., 29] = 0
    silence, turn_end = turn_taking_signal(logits, stats.table("token"))
    assert silence.shape == (2, 3, 4) and turn_end.shape == (2, 3)
    assert silence[0, 0].tolist() == pytest.approx([0, 1, 1, 1], abs=1e-3)
    assert turn_end.min() > 0.99
    uniform_silence, uniform_end = turn_taking_signal(torch.zeros(5, config.card), stats.table("two_state"))
    assert ((uniform_silence >= 0) & (uniform_silence <= 1)).all() and ((uniform_end >= 0) & (uniform_end <= 1)).all()
    assert stats.table("two_state")[7].tolist() == stats.two_state_table[1].tolist()  # the silence token's state
    with pytest.raises(ValueError, match="kind"):
        stats.table("nope")


def test_statistics_round_trip_through_json(tmp_path):
    config = sample_model_config(dim=32, num_layers=1)
    items, alignments = toy_turn_dialogues(config, n=2)
    stats = fit_turn_taking_statistics(items, alignments, config, horizon=5, turn_end_frames=3)
    path = stats.save(tmp_path)
    loaded = TurnTakingStatistics.load(tmp_path)
    assert path.name == "turn_taking_statistics.json"
    assert torch.equal(loaded.token_table, stats.token_table) and torch.equal(loaded.token_counts, stats.token_counts)
    assert (loaded.horizon, loaded.turn_end_frames, loaded.silence_tokens()) == (5, 3, stats.silence_tokens())
    with pytest.raises(ValueError, match="turn_end_frames"):
        fit_turn_taking_statistics(items, alignments, config, horizon=3, turn_end_frames=4)


def test_evaluation_on_a_random_model_andtoy_turn_dialogues(tmp_path):
    """Plumbing with known events: 4 dialogues, each with one shift (the user's unit 5-14, the system from 17) and
    one barge-in (the user's unit 25-29 starts 3 frames after the system's last frame, 22); the second unit ends
    the dialogue's speech, so it is no pause."""
    config = sample_model_config(dim=32, num_layers=1)
    torch.manual_seed(0)
    from hf_moshi_userpred import MoshiUserPredForConditionalGeneration

    model = MoshiUserPredForConditionalGeneration(config).eval()
    items, alignments = toy_turn_dialogues(config)
    stats = fit_turn_taking_statistics(items, alignments, config)
    report = evaluate_turn_taking(model, items, alignments, stats, plot_dir=tmp_path)
    assert (report.num_shifts, report.num_holds, report.num_dialogues) == (4, 0, 4)
    assert (report.num_backchannels, report.num_barge_ins) == (0, 4)
    assert set(report.predictors) == {"model", "repeat_last", "unigram", "timer_200ms", "timer_500ms", "timer_700ms",
                                      "timer_1000ms"}
    # the system answers 2 silent frames after the user's last one (frames 15-16), before any timer (3, 7, 9 frames)
    # fires: a timer is scored in time (`timer_fires`), so it detects no shift and has no anticipation
    for name in ("timer_200ms", "timer_500ms", "timer_700ms", "timer_1000ms"):
        assert report.predictors[name].shift_hold.recall == 0.0
        assert report.predictors[name].median_anticipation_ms is None
    # repeat-last reads the table row of the last token seen: token 20 + i is at frame 5 + i, and the user is
    # silent over frames j + 5 .. j + 9 after frame j from token 25 (frame 10) on; seen at boundary 11, the turn
    # ends at boundary 15: 4 frames early. Token 24 (frame 9) is followed by speech at frame 14.
    assert report.predictors["repeat_last"].shift_hold.recall == 1.0
    assert report.predictors["repeat_last"].median_anticipation_ms == pytest.approx(4 * 80)
    turn_end = report.timeline["turn_end"]["model"]
    assert turn_end.shape == (40,) and ((turn_end >= 0) & (turn_end <= 1)).all()
    assert report.timeline["silence"].shape == (40, stats.horizon)
    metrics = report.to_dict()
    assert metrics["turn_taking/num_shifts"] == 4 and "turn_taking/timer_500ms/recall" in metrics
    assert all(v is not None for v in metrics.values())
    assert "| model |" in report.to_markdown() and "timer_700ms" in report.to_markdown()
    assert set(report.plots) == {"turn_taking_roc", "turn_taking_timeline", "turn_taking_tradeoff"}
    assert all((tmp_path / f"{name}.png").stat().st_size > 0 for name in report.plots)
    # no hold: nothing to take over, no interval for a balanced accuracy with one class
    assert report.false_takeovers["model"] is None and report.intervals["model"]["balanced_accuracy"] is None
    assert report.intervals["repeat_last"]["median_anticipation_ms"] == (320, 320)  # every shift 4 frames early


def test_takeover_latency_tradeoff_and_bootstrap():
    """A signal takes over a hold where it reaches the threshold anywhere in the user's silence; a patient timer
    takes over every hold its wait fits in and answers every shift that late; bootstrap intervals hold the estimate."""
    from hf_moshi_userpred.evaluation.turn_taking_tradeoff import (
        bootstrap_interval,
        hold_peak,
        takeover_latency_curve,
        timer_curve,
    )

    turn_end = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.4, 0.1, 0.8, 0.0])
    hold = Pause(start_frame=0, end_frame=2, shift=False, silence_frames=2, system_onset=None)  # silent frames 3-4
    assert hold_peak(turn_end, hold) == pytest.approx(0.9)  # boundaries 3 and 4; 6 comes after the user resumed
    assert hold_peak(turn_end, Pause(0, 4, False, None, None)) == pytest.approx(0.8)  # silent to the end
    curve = takeover_latency_curve([0.9, 0.2], {0.5: [-80.0, 160.0, math.inf], 0.95: [math.inf] * 3})
    assert [(p.setting, p.false_takeover, p.median_latency_ms) for p in curve] == [(0.5, 0.5, 160.0),
                                                                                  (0.95, 0.0, None)]
    timers = timer_curve([240.0, 800.0, math.inf], num_shifts=5, timers_ms=(200, 500, 1000))
    assert [(p.false_takeover, p.median_latency_ms) for p in timers] == [(1.0, 200.0), (pytest.approx(2 / 3), 500.0),
                                                                         (pytest.approx(1 / 3), 1000.0)]
    values = [float(v) for v in range(100)]
    low, high = bootstrap_interval(values, lambda sample: sum(sample) / len(sample))
    assert low < 49.5 < high and high - low < 25
    assert bootstrap_interval([], lambda sample: 0.0) is None
    assert bootstrap_interval([1.0, 2.0], lambda sample: None) is None  # never defined


# ------------------------------------------------------------------------------- a trained sample model (plumbing)
def test_signal_and_evaluation_on_the_trained_sample_model(demo_model_dir, tmp_path):
    from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
    from hf_moshi_userpred.data.encoding import EncodedDialogues

    encoded = demo_model_dir.parent / "encoded"
    model = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    train, held_out = EncodedDialogues(encoded / "train"), EncodedDialogues(encoded / "eval")
    train_alignments, eval_alignments = dialogue_alignments(encoded / "train"), dialogue_alignments(encoded / "eval")
    assert len(train_alignments) == 23 and len(eval_alignments) == 5
    stats = fit_turn_taking_statistics(train, train_alignments, model.config)
    # the sample's silence is one dominant semantic token (its README: silence stability 0.98)
    assert 1 <= len(stats.silence_tokens()) <= 8
    assert stats.silence_prob[stats.token_counts.argmax()] > 0.9
    # a silence token's row: silence persists (the two-state table orders the states the same way)
    assert (stats.two_state_table[1] > stats.two_state_table[0]).all()
    codes = held_out[0]["codes"]
    with torch.no_grad():
        logits = model(codes[None]).user_logits[0, stats.codebook]
    silence, turn_end = turn_taking_signal(logits, stats.table())
    assert silence.shape == (codes.shape[1], stats.horizon) and turn_end.shape == (codes.shape[1],)
    assert torch.isfinite(turn_end).all() and (turn_end >= 0).all() and (turn_end <= 1).all()
    # where the user speaks now and next frame, the model's P(silent next frame) is low on average
    user = voice_activity(eval_alignments[0], codes.shape[1], user=True)
    speaking = user & torch.roll(user, -1)
    speaking[-1] = False
    assert silence[speaking, 0].mean() < silence[~user, 0].mean()

    report = evaluate_turn_taking(model, held_out, eval_alignments, stats)
    assert report.num_shifts + report.num_holds >= 5 and report.num_shifts >= 1 and report.num_holds >= 1
    for name in ("timer_500ms", "timer_700ms"):  # the sample's in-turn pauses are shorter than 500 ms: never cut off
        assert report.predictors[name].shift_hold.specificity == 1.0
    assert report.predictors["unigram"].shift_hold.auc == 0.5  # a constant signal
    for name, m in report.predictors.items():
        assert 0 <= m.shift_hold.balanced_accuracy <= 1 and 0 <= report.false_takeovers[name] <= 1
    low, high = report.intervals["model"]["balanced_accuracy"]
    assert low <= report.predictors["model"].shift_hold.balanced_accuracy <= high
    timer = {p.setting: p for p in report.tradeoff["timer"]}
    assert timer[500].false_takeover == 0.0 and timer[500].median_latency_ms == 500  # no hold lasts 500 ms


def test_evaluate_turn_taking_command(demo_model_dir, tmp_path, capsys):
    from hf_moshi_userpred.cli.main import main

    encoded = demo_model_dir.parent / "encoded"
    out = tmp_path / "eval"
    assert main(["evaluate", str(demo_model_dir), str(encoded / "eval"), "--reference", str(encoded / "train"),
                 "--out", str(out), "--turn-taking", "--horizon", "8"]) == 0
    printed = capsys.readouterr().out
    assert "timer_500ms" in printed and "shifts" in printed
    record = json.loads((out / "turn_taking_metrics.json").read_text())
    assert record["metrics"]["turn_taking/horizon"] == 8 and record["metrics"]["turn_taking/turn_end_frames"] == 4
    assert (out / "plots" / "turn_taking_timeline.png").is_file()
    assert (out / "user_prediction_metrics.json").is_file()  # the plain evaluation still runs
    # without a reference and without statistics saved with the model, the command says what it needs
    bare = tmp_path / "model"
    shutil.copytree(demo_model_dir, bare)
    (bare / STATISTICS_NAME).unlink()
    assert main(["evaluate", str(bare), str(encoded / "eval"), "--out", str(out), "--turn-taking",
                 "--no-plots"]) == 2
    assert "--reference" in capsys.readouterr().err

