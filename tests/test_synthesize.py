"""The conversational corpus generator (`hf_moshi_userpred/corpus/`, `hf-moshi-userpred synthesize`): cue-bearing
grammar, turn timing where silence cannot decide, the statistics as the evaluation sees them, the written folder.
Needs espeak-ng (installed by scripts/setup.sh test)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
import subprocess
import sys

import pytest
import soundfile as sf

from hf_moshi_userpred.corpus.conversation import ConversationSettings, make_conversation
from hf_moshi_userpred.corpus.espeak import Espeak
from hf_moshi_userpred.corpus.grammar import HOLD_ENDINGS, Grammar, sentence_overlap
from hf_moshi_userpred.corpus.statistics import corpus_statistics
from hf_moshi_userpred.corpus.timeline import SYSTEM, USER, check_alignments

CUE_WORDS = {"and", "but", "because", "so", "or", "um", "uh"}


def _turns(seed: int, count: int, **kwargs) -> list:
    grammar = Grammar(random.Random(seed))
    options = dict(mean_holds=1.5, finished_hold_share=0.0, question_share=0.35, tag_share=0.15) | kwargs
    return [grammar.turn(False, **options) for _ in range(count)]


def test_grammar_marks_holds_and_shifts_with_words():
    turns = _turns(0, 400)
    held = [(ipu, cue) for turn in turns for ipu, cue in zip(turn.ipus, turn.hold_cues)]
    assert len(held) > 300 and {cue for _, cue in held} == set(HOLD_ENDINGS)
    for ipu, cue in held:  # an IPU before a hold ends unfinished, never with a full stop or a question mark
        assert ipu[-1] not in ".?!", ipu
        last = re.findall(r"[a-z']+", ipu.lower())[-1]
        if cue in ("conjunction", "filler"):
            assert last in CUE_WORDS, ipu
        if cue == "comma":
            assert ipu.endswith(","), ipu
    for turn in turns:  # a turn ends finished: a full stop, or a question mark for questions and tags
        assert turn.ipus[-1][-1] == ("." if turn.ending == "statement" else "?"), turn
        assert turn.asks == (turn.ending != "statement")
        for ipu in turn.ipus:  # no punctuation inside an IPU, where espeak-ng would pause without a cue
            assert not re.search(r"[,.?!].", ipu), ipu


def test_grammar_finished_holds_and_its_size():
    finished = _turns(1, 300, finished_hold_share=1.0)
    assert all(cue == "finished" for turn in finished for cue in turn.hold_cues)
    assert all(ipu.endswith(".") for turn in finished for ipu in turn.ipus[:-1])
    train = [ipu for turn in _turns(2, 2000) for ipu in turn.ipus]
    held_out = [ipu for turn in _turns(3, 300) for ipu in turn.ipus]
    assert sentence_overlap(train, held_out) < 0.35  # most held-out sentences were never said in training
    assert sentence_overlap(held_out, held_out) == 1.0


@pytest.fixture(scope="module")
def conversations():
    espeak = Espeak()
    rng = random.Random(0)
    pairs = [make_conversation(rng, espeak, ConversationSettings(), 60.0) for _ in range(12)]
    return [d for d, _ in pairs], [log for _, log in pairs]


def test_conversations_are_timed_as_recorded_speech(conversations):
    dialogues, logs = conversations
    for dialogue in dialogues:
        check_alignments(dialogue)  # every word holds speech on its channel, silence between words
        assert dialogue.duration >= 60.0 and dialogue.audio.shape[1] == 2
    holds = [h for log in logs for h in log.holds[USER] + log.holds[SYSTEM]]
    gaps = [g for log in logs for side in (USER, SYSTEM) for g in log.gaps[side]]
    overlaps = [-g for g in gaps if g < 0]
    assert min(holds) >= 0.25 and max(holds) <= 2.0
    assert 0.4 <= statistics.median(holds) <= 0.65  # a median near 500 ms
    assert sum(h > 0.7 for h in holds) / len(holds) >= 0.25
    assert 0.15 <= statistics.median([g for g in gaps if g >= 0]) <= 0.25  # a median near 200 ms
    assert 0.2 <= len(overlaps) / len(gaps) <= 0.4 and max(overlaps) <= 0.6
    assert statistics.mean(holds) > statistics.mean(g for g in gaps if g >= 0)  # holds are longer than gaps
    assert sum(log.backchannels[USER] for log in logs) >= 10 and sum(log.barge_ins[USER] for log in logs) >= 5
    voices = {log.voices[USER].split()[0] for log in logs}
    assert len(voices) >= 3  # drawn per dialogue from five


def test_settings_are_checked_and_events_can_be_turned_off():
    quiet, quiet_log = make_conversation(random.Random(5), Espeak(),
                                         ConversationSettings(backchannels_per_minute=0, user_barge_in_share=0,
                                                              system_barge_in_share=0), 20.0)
    assert quiet_log.backchannels == {SYSTEM: 0, USER: 0} and quiet_log.barge_ins == {SYSTEM: 0, USER: 0}
    with pytest.raises(ValueError, match="overlap_share must be in"):
        ConversationSettings(overlap_share=1.5)
    with pytest.raises(ValueError, match="hold_s must be a range"):
        ConversationSettings(hold_s=(2.0, 0.5))
    with pytest.raises(ValueError, match="has no voice 'xx-nowhere'"):
        make_conversation(random.Random(0), Espeak(), ConversationSettings(user_voices=("xx-nowhere",)), 10.0)


@pytest.mark.slow
def test_conversations_are_deterministic_in_a_fresh_process(tmp_path):
    """espeak-ng's wave generator keeps state from one call to the next (its pitch flutter), so the same seed gives
    the same audio in a fresh process, as `synthesize` runs, not after other speech in the same one."""
    script = ("import random, sys, hashlib\n"
              "from hf_moshi_userpred.corpus.conversation import ConversationSettings, make_conversation\n"
              "from hf_moshi_userpred.corpus.espeak import Espeak\n"
              "d, _ = make_conversation(random.Random(5), Espeak(), ConversationSettings(), 20.0)\n"
              "print(hashlib.sha256(d.audio.tobytes() + repr(d.alignments).encode()).hexdigest())\n")
    digests = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout.split()[-1] for _ in range(2)}
    assert len(digests) == 1


def test_statistics_see_the_generated_holds_and_timers_cannot_decide(conversations):
    dialogues, logs = conversations
    alignments = [[[w, list(span), s] for w, span, s in d.alignments] for d in dialogues]
    frames = [math.ceil(d.duration * 12.5) for d in dialogues]
    stats = corpus_statistics({"all": (alignments, frames)}, logs)
    evaluated, generated = stats["evaluated"]["all"], stats["generated"]["user"]
    # the evaluation's event finder sees exactly the user's generated holds: no pause without a cue slipped in
    assert evaluated["holds"] == generated["holds"]["count"] > 50
    assert evaluated["shifts"] > 40 and evaluated["backchannels"] > 10 and evaluated["barge_ins"] > 10
    assert set(evaluated["timer_balanced_accuracy"]) == {"timer_200ms", "timer_500ms", "timer_700ms", "timer_1000ms"}
    assert all(value <= 0.65 for value in evaluated["timer_balanced_accuracy"].values())
    # the gaps before replies are shorter than the pauses inside turns, on the frame grid too
    assert evaluated["shift_silence"]["q50_s"] < evaluated["hold_silence"]["q50_s"]
    # the last word decides most pauses (a conjunction or a filler holds, a tag or a question mark ends), not all
    half = len(dialogues) // 2
    split = corpus_statistics({"train": (alignments[:half], frames[:half]), "eval": (alignments[half:], frames[half:])},
                              logs)
    assert 0.7 < split["last_word"]["balanced_accuracy"] < 1.0 and split["last_word"]["words"] > 20


def test_encoder_fit_targets_are_causal_and_train_only_the_encoder(one_thread):
    """Frame t's log-mel targets are spectra of windows ending inside frame t (audio after it changes nothing); the
    fit moves the encoder and nothing that decoding uses; too-short audio is refused with its length."""
    import torch

    from hf_moshi_userpred.corpus.codec import initial_mimi
    from hf_moshi_userpred.corpus.encoder_fit import EncoderFit, FrameSpectra, fit_encoder

    fit = EncoderFit(steps=2, batch_size=2, segment_frames=4, warmup_steps=1)
    spectra = FrameSpectra(fit, 24_000, 1920)
    audio = torch.randn(1, 1920 * 6, generator=torch.Generator().manual_seed(0))
    changed = audio.clone()
    changed[:, 1920 * 4 :] = 0.5  # frames 4 and 5
    a, b = spectra(audio), spectra(changed)
    assert a.shape == (1, 6, fit.subframes * fit.mel_bands)
    assert torch.equal(a[:, :4], b[:, :4]) and not torch.equal(a[:, 4:], b[:, 4:])

    mimi = initial_mimi(16, seed=0)
    mimi.encoder.requires_grad_(False)  # as a caller may have left it: the fit trains it anyway and restores this
    before = {name: t.clone() for name, t in mimi.state_dict().items()}
    assert fit_encoder(mimi, [torch.randn(1920 * 8, generator=torch.Generator().manual_seed(1))], fit) > 0
    after = mimi.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.startswith("encoder.") for name in moved)
    assert not any(p.requires_grad for p in mimi.encoder.parameters())
    with pytest.raises(ValueError, match="segment_frames=4 frames"):
        fit_encoder(mimi, [torch.zeros(1920 * 3)], fit)


@pytest.mark.slow
def test_synthesize_command_writes_a_moshi_finetune_corpus(tmp_path, capsys):
    from transformers import MimiModel

    from hf_moshi_userpred.cli.main import main

    out = tmp_path / "corpus"
    assert main(["synthesize", "--out", str(out), "--hours", "0.06", "--eval-hours", "0.02", "--decoder-steps", "3",
                 "--encoder-steps", "3", "--codec-minutes", "1", "--kmeans-iterations", "3", "--vocab-size", "300", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held out:" in printed and "silence timers' balanced accuracy" in printed
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        assert rows
        for row in rows:
            info = sf.info(out / row["path"])
            assert (info.channels, info.samplerate) == (2, 16000)
            assert row["duration"] == pytest.approx(info.frames / 16000)
            words = json.loads((out / row["path"]).with_suffix(".json").read_text())["alignments"]
            assert {speaker for _, _, speaker in words} == {"SPEAKER_MAIN", "SPEAKER_USER"}
    mimi = MimiModel.from_pretrained(out / "mimi")
    assert mimi.config.frame_rate == 12.5 and mimi.config.codebook_size == 64
    assert (out / "tokenizer.model").stat().st_size > 0 and (out / "statistics.png").stat().st_size > 10_000
    stats = json.loads((out / "statistics.json").read_text())
    assert set(stats["evaluated"]) == {"train", "eval"} and 0 <= stats["held_out_sentences_in_training"] < 0.5
    assert 0 <= stats["codec"]["clause_ending_probe"]["balanced_accuracy"] <= 1
    sequence = stats["codec"]["clause_ending_probe"]["sequence"]  # a few minutes may be too few pauses to fit it
    assert sequence["frames"] == 25 and ("not_fitted" in sequence or 0 <= sequence["balanced_accuracy"] <= 1)
    assert 0.5 <= stats["last_word"]["balanced_accuracy"] <= 1  # the grammar's cue words decide most pauses
    assert stats["codec"]["fit_seconds"]["encoder_and_codebooks"] > 0 and stats["settings"]["encoder_steps"] == 3
    assert stats["settings"]["seed"] == 0 and stats["settings"]["overlap_share"] == 0.3
    assert not list(tmp_path.glob(".corpus.tmp-*"))  # built beside and renamed into place

    # another corpus reuses this one's codec as it is (no fit)
    again = tmp_path / "again"
    assert main(["synthesize", "--out", str(again), "--hours", "0.03", "--eval-hours", "0.01", "--seed", "1",
                 "--vocab-size", "300", "--mimi", str(out / "mimi"), "--quiet"]) == 0
    reused = json.loads((again / "statistics.json").read_text())["codec"]
    assert reused["fit_seconds"] == {} and reused["reused"] == str(out / "mimi")
    assert (again / "mimi" / "model.safetensors").read_bytes() == (out / "mimi" / "model.safetensors").read_bytes()

    # an existing corpus is never overwritten; a bad setting is one clean line
    assert main(["synthesize", "--out", str(out), "--hours", "0.01"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["synthesize", "--out", str(tmp_path / "other"), "--overlap-share", "2"]) == 2
    error = capsys.readouterr().err
    assert "overlap_share must be in [0, 1], got 2.0" in error and "Traceback" not in error
    assert not (tmp_path / "other").exists()
