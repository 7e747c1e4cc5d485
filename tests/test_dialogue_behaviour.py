"""Full-Duplex-Bench-style behaviour of the system stream: system speech from the text stream and every metric on
hand-made timelines with known answers, then the evaluation (with and without the turn hold) on the trained sample
model."""

from __future__ import annotations

import pytest
import torch

from hf_moshi_userpred.evaluation.dialogue_behaviour import (
    BehaviourOutcomes,
    dialogue_behaviour,
    evaluate_dialogue_behaviour,
    system_speech,
    timer_speech,
)
from hf_moshi_userpred.evaluation.turn_taking_events import find_events

PAD, END_PAD = 3, 0


def activity(T: int, *spans: tuple[int, int]) -> torch.Tensor:
    """Bool [T], True on the inclusive frame spans."""
    out = torch.zeros(T, dtype=torch.bool)
    for first, last in spans:
        out[first : last + 1] = True
    return out


def text(T: int, words: dict[int, int]) -> torch.Tensor:
    """[T] text tokens: padding, a word token at each given frame."""
    tokens = torch.full((T,), PAD)
    for frame, token in words.items():
        tokens[frame] = token
    return tokens


# ---------------------------------------------------------------------------------------------- system speech
def test_system_speech_bridges_gaps_and_adds_the_hangover():
    tokens = text(20, {2: 50, 3: 51, 7: 52, 16: 53})
    tokens[6] = END_PAD  # end-of-padding is no speech
    tokens[12] = -2  # ungenerated
    speech = system_speech(tokens, 20, (PAD, END_PAD), offset=0, bridge_frames=4, hangover_frames=2)
    # 2-3 and 7 (gap of 3 frames < 4: bridged) + 2 frames after 7; 16 alone + 2 frames
    assert speech.nonzero().flatten().tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 18]
    no_bridge = system_speech(tokens, 20, (PAD, END_PAD), offset=0, bridge_frames=3, hangover_frames=0)
    assert no_bridge.nonzero().flatten().tolist() == [2, 3, 7, 16]  # a 3-frame gap is not bridged at 3


def test_system_speech_offset_aligns_generate_output_with_the_user_frames():
    """`generate`'s text token j is the system's text for user frame j + 1; tokens past the dialogue are dropped
    and frame 0 has no system text."""
    tokens = text(10, {0: 40, 9: 41})
    speech = system_speech(tokens, 10, (PAD, END_PAD), offset=1, bridge_frames=0, hangover_frames=0)
    assert speech.nonzero().flatten().tolist() == [1]
    assert system_speech(tokens, 12, (PAD,), offset=1, bridge_frames=0, hangover_frames=1).nonzero().flatten(
    ).tolist() == [1, 2, 10, 11]
    with pytest.raises(ValueError, match="bridge_frames"):
        system_speech(tokens, 10, (PAD,), bridge_frames=-1)
    with pytest.raises(ValueError, match="1-D"):
        system_speech(tokens[None], 10, (PAD,))


# ---------------------------------------------------------------------------------------------------- metrics
def hand_made_dialogue():
    """The recorded dialogue of tests/test_turn_taking.py's event test: holds after the user's units 0-4 (gap
    5-6) and 30-40 (gap 41-44); turn ends after 7-10 (recorded system at 14) and 45-50 (at 53, end of the user's
    speech); a backchannel 16-17 over the system's 14-25; a barge-in 30-40 over its 29-33."""
    T = 60
    user = activity(T, (0, 4), (7, 10), (16, 17), (30, 40), (45, 50))
    system = activity(T, (14, 25), (29, 33), (53, 58))
    return T, find_events(user, system, min_pause_frames=2, max_backchannel_frames=12, context_frames=3)


def test_the_recorded_system_behaves_as_recorded():
    """Scoring the recorded system's own activity: no takeover in a hold, answers at the recorded gaps (14 - 11 = 3
    frames, 53 - 51 = 2 frames), keeps talking through the backchannel, and stops the barge-in when the recording
    does (frame 34, 4 frames after the user's onset at 30)."""
    T, events = hand_made_dialogue()
    out = dialogue_behaviour(events, events.system_activity)
    assert out.pause_takeovers == [False, False]
    assert out.response_frames == [3, 2]
    assert out.backchannel_takeovers == [False]
    assert out.stop_frames == [4] and out.barge_ins_over_silence == 0
    m = out.metrics(frame_ms=80)
    assert (m.pause_takeover_rate, m.response_rate, m.backchannel_takeover_rate, m.stop_rate) == (0, 1, 0, 1)
    assert m.median_response_ms == pytest.approx(200) and m.mean_response_ms == pytest.approx(200)
    assert m.median_stop_ms == pytest.approx(320)
    assert (m.num_pauses, m.num_turn_ends, m.no_responses, m.num_backchannels, m.num_barge_ins) == (2, 2, 0, 1, 1)
    assert m.speech_share == pytest.approx((12 + 5 + 6) / 60)


def test_a_system_that_talks_into_pauses_answers_backchannels_and_never_yields():
    T, events = hand_made_dialogue()
    speech = activity(T, (6, 6), (12, 12), (19, 22), (28, 41), (43, 43))
    out = dialogue_behaviour(events, speech, context_frames=3)
    # hold gap 5-6: speaks at 6; hold gap 41-44: speaks at 41 and 43
    assert out.pause_takeovers == [True, True]
    # turn end after 10: the user's silence is 11-15 (back at 16), speech at 12 -> 1 frame; after 50: no speech
    # to the end -> no response
    assert out.response_frames == [1, None]
    # backchannel 16-17: new utterance at 19 (within 3 frames after 17)
    assert out.backchannel_takeovers == [True]
    # barge-in at 30 over speech 28-41: it speaks through the user's unit 30-40 and the frame after: no stop
    assert out.stop_frames == [None]
    m = out.metrics()
    assert m.pause_takeover_rate == 1 and m.response_rate == 0.5 and m.no_responses == 1
    assert m.median_response_ms == pytest.approx(80) and m.stop_rate == 0 and m.median_stop_ms is None


def test_a_silence_timer_agent_speaks_after_the_wait_and_stops_on_hearing_the_user():
    user = activity(12, (2, 4), (7, 7))
    # silent runs: frames 0-1 (2), 5-6 (2), 8-11; it speaks at f once the 2 frames before f were silent
    assert timer_speech(user, 2).nonzero().flatten().tolist() == [2, 7, 10, 11]
    # the hand-made dialogue through the same scorer: a 3-frame timer takes the 4-frame hold (41-44), not the
    # 2-frame one (5-6), answers the turn end after 10 three frames late, and stops one frame into the barge-in
    T, events = hand_made_dialogue()
    out = dialogue_behaviour(events, timer_speech(events.user_activity, 3), context_frames=3)
    assert out.pause_takeovers == [False, True] and out.response_frames[0] == 3


def test_a_silent_system():
    T, events = hand_made_dialogue()
    out = dialogue_behaviour(events, torch.zeros(T, dtype=torch.bool))
    assert out.pause_takeovers == [False, False] and out.response_frames == [None, None]
    assert out.backchannel_takeovers == [False]
    assert out.stop_frames == [] and out.barge_ins_over_silence == 1  # nothing to stop
    m = out.metrics()
    assert m.response_rate == 0 and m.median_response_ms is None and m.stop_rate is None
    assert m.num_barge_ins == 0 and m.barge_ins_over_silence == 1 and m.speech_share == 0


def test_outcomes_add_up_over_dialogues():
    T, events = hand_made_dialogue()
    total = BehaviourOutcomes()
    total.extend(dialogue_behaviour(events, events.system_activity))
    total.extend(dialogue_behaviour(events, torch.zeros(T, dtype=torch.bool)))
    m = total.metrics()
    assert (m.num_pauses, m.num_turn_ends, m.num_backchannels, m.num_barge_ins) == (4, 4, 2, 1)
    assert m.response_rate == 0.5 and m.speech_share == pytest.approx(23 / 120)
    assert BehaviourOutcomes().metrics().pause_takeover_rate is None  # no event: no rate


def test_bad_input():
    T, events = hand_made_dialogue()
    with pytest.raises(ValueError, match="bool"):
        dialogue_behaviour(events, torch.zeros(T))
    with pytest.raises(ValueError, match="frame 50"):
        dialogue_behaviour(events, torch.zeros(40, dtype=torch.bool))


# ------------------------------------------------------------------------------------ the trained sample model
def test_evaluation_on_the_trained_sample_model_with_and_without_the_turn_hold(demo_model_dir, one_thread, tmp_path):
    """The 5 held-out dialogues streamed (one batch) without the hold, with a hold that never applies (threshold
    0: the same tokens) and with one that always applies (threshold 1 is above every P(turn end): no word ever
    starts). The recorded system, measured the same way, behaves as its recording: no takeover in a hold pause,
    every turn end answered, no backchannel answered."""
    from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
    from hf_moshi_userpred.data.encoding import EncodedDialogues
    from hf_moshi_userpred.data.voice_activity import STATISTICS_NAME, TurnTakingStatistics, dialogue_alignments

    encoded = demo_model_dir.parent / "encoded"
    model = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    held_out = EncodedDialogues(encoded / "eval")
    stats = TurnTakingStatistics.load(demo_model_dir / STATISTICS_NAME)  # the demo saves them with the model
    report = evaluate_dialogue_behaviour(model, held_out, dialogue_alignments(encoded / "eval"), stats,
                                         hold_thresholds=(None, 0.0, 1.0), seed=0, plot_dir=tmp_path)
    assert list(report.settings) == ["recorded", "model", "hold 0", "hold 1"]
    recorded, free, never, always = report.settings.values()
    assert recorded.num_pauses >= 2 and recorded.num_turn_ends >= 3 and recorded.num_backchannels >= 1
    assert (recorded.pause_takeover_rate, recorded.response_rate, recorded.backchannel_takeover_rate) == (0, 1, 0)
    assert 200 <= recorded.median_response_ms <= 1500  # the sample's gaps between turns
    assert never == free
    assert always.speech_share == 0 and always.pause_takeover_rate == 0 and always.response_rate == 0
    assert free.speech_share > 0  # the 30-step model does write words, so the hold had something to hold
    T = held_out[0]["codes"].shape[1]
    turn_end = report.timeline["turn_end"]["model"]
    assert turn_end.shape == (T,) and turn_end[0].isnan() and ((turn_end[1:] >= 0) & (turn_end[1:] <= 1)).all()
    assert report.timeline["speech"]["hold 1"].sum() == 0
    metrics = report.to_dict()
    assert metrics["dialogue_behaviour/recorded/response_rate"] == 1 and metrics["dialogue_behaviour/seed"] == 0
    table = report.to_markdown()
    assert "| hold 1 | 0% | 0% |" in table and "| recorded | 0% | 100% |" in table
    assert (tmp_path / "dialogue_behaviour_timeline.png").stat().st_size > 0


def test_evaluation_options_and_bad_input(demo_model_dir, one_thread):
    from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
    from hf_moshi_userpred.data.encoding import EncodedDialogues
    from hf_moshi_userpred.data.voice_activity import TurnTakingStatistics, dialogue_alignments

    model = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir)
    stats = TurnTakingStatistics.load(demo_model_dir)
    encoded = demo_model_dir.parent / "encoded" / "eval"
    # the first 30 frames of 2 dialogues, one at a time, the second drawn
    held_out = EncodedDialogues(encoded)
    short = evaluate_dialogue_behaviour(model, [held_out[0], held_out[1]], dialogue_alignments(encoded)[:2], stats,
                                        hold_thresholds=(None,), max_frames=30, batch_size=1, timeline_dialogue=1,
                                        do_sample=False)
    assert list(short.settings) == ["recorded", "model"] and short.frames_per_dialogue == 30
    assert short.timeline["user"].shape == (30,) and short.timeline["name"].endswith("024.flac")
    assert short.settings["model"].speech_share == 0  # greedy, the 30-step model writes padding only
    codes = torch.zeros(1 + model.config.n_q, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="max_frames must be at least 2, got 1"):
        evaluate_dialogue_behaviour(model, [codes], [[]], stats, max_frames=1)
    with pytest.raises(ValueError, match="1 dialogues but 2"):
        evaluate_dialogue_behaviour(model, [codes], [[], []], stats)
    with pytest.raises(ValueError, match="distinct"):
        evaluate_dialogue_behaviour(model, [codes], [[]], stats, hold_thresholds=(0.5, 0.5))
    with pytest.raises(ValueError, match="kind"):
        evaluate_dialogue_behaviour(model, [codes], [[]], stats, kind="nope")
    with pytest.raises(ValueError, match="dialogue 0"):
        evaluate_dialogue_behaviour(model, [codes[:3]], [[]], stats)


def test_evaluate_turn_taking_command_reports_the_behaviour(demo_model_dir, one_thread, tmp_path, capsys):
    """`evaluate --turn-taking` on the demo's model folder (its saved statistics, no --reference): the behaviour
    table next to the signal's, in turn_taking_report.md with the timeline plot and in the metrics JSON."""
    import json

    from hf_moshi_userpred.cli.main import main

    encoded = demo_model_dir.parent / "encoded"
    out = tmp_path / "eval"
    assert main(["evaluate", str(demo_model_dir), str(encoded / "eval"), "--out", str(out), "--turn-taking",
                 "--threshold", "0.4", "--seed", "3"]) == 0
    assert "| hold 0.4 |" in capsys.readouterr().out
    record = json.loads((out / "turn_taking_metrics.json").read_text())
    assert record["metrics"]["dialogue_behaviour/recorded/response_rate"] == 1
    assert record["metrics"]["dialogue_behaviour/seed"] == 3
    report = (out / "turn_taking_report.md").read_text()
    assert "| timer_500ms |" in report and "| hold 0.4 |" in report
    assert "plots/dialogue_behaviour_timeline.png" in report
    assert (out / "plots" / "dialogue_behaviour_timeline.png").is_file()
    with pytest.raises(SystemExit) as exit:  # refused by the parser, before the model loads
        main(["evaluate", str(demo_model_dir), str(encoded / "eval"), "--out", str(out), "--turn-taking",
              "--threshold", "1.5", "--no-plots"])
    assert exit.value.code == 2
    assert "argument --threshold: must be a probability in [0, 1], got 1.5" in capsys.readouterr().err
