"""The voice-activity-projection head: its targets, config checks, loss, what it leaves untouched, the collator's
targets, training it alone with the Trainer, its signal in streaming and in the turn hold, and `train
--voice_activity_horizon`."""

from __future__ import annotations

import pytest
import torch
from helpers import toy_turn_dialogues

from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.collator import DialogueSegments, MoshiSegmentCollator
from hf_moshi_userpred.models.modeling_moshi_voice_activity import voice_activity_targets
from hf_moshi_userpred.sample import sample_model_config
from hf_moshi_userpred.data.voice_activity import DialoguesWithVoiceActivity, fit_turn_taking_statistics, voice_activity
from hf_moshi_userpred.evaluation.turn_taking import evaluate_turn_taking


def head_model(horizon: int = 4, turn_end_frames: int = 2, seed: int = 0) -> MoshiUserPredForConditionalGeneration:
    torch.manual_seed(seed)
    config = sample_model_config(dim=32, num_layers=1)
    config.voice_activity_horizon, config.voice_activity_turn_end_frames = horizon, turn_end_frames
    return MoshiUserPredForConditionalGeneration(config).eval()


# ---------------------------------------------------------------------------------------------------- targets
def test_targets_known_values():
    # frames:           0  1  2  3  4  5  6
    activity = torch.tensor([[1, 0, 0, 1, 0, 0, -1]])
    targets, known = voice_activity_targets(activity, num_positions=5, offset=1, horizon=3, turn_end_frames=2)
    assert targets.shape == known.shape == (1, 5, 4)
    # position 0 looks at frames 1, 2, 3: silent, silent, speech; turn end: frames 2-3 all silent? no
    assert targets[0, 0].tolist() == [1, 1, 0, 0] and known[0, 0].all()
    # position 2: frames 3, 4, 5 -> speech, silent, silent; turn end over 4-5: yes
    assert targets[0, 2].tolist() == [0, 1, 1, 1] and known[0, 2].all()
    # position 3: frames 4, 5, 6 (unknown): the turn end over 5-6 is unknown
    assert known[0, 3].tolist() == [True, True, False, False]
    # position 4: frames 5, 6, 7 (past the end)
    assert known[0, 4].tolist() == [True, False, False, False]


def test_config_checks_name_the_field():
    base = {**sample_model_config(dim=32, num_layers=1).to_dict(), "voice_activity_turn_end_frames": 2}
    for field, value, message in (("voice_activity_turn_end_frames", 6, "must be in 1..voice_activity_horizon = 4"),
                                  ("voice_activity_loss_weight", -1.0, "must be >= 0")):
        with pytest.raises(ValueError, match=f"MoshiUserPredConfig.{field}={value!r}: {message}"):
            MoshiUserPredConfig(**{**base, "voice_activity_horizon": 4, field: value})
    with pytest.raises(ValueError, match="voice_activity_horizon=4: the voice-activity head belongs to the user"):
        MoshiUserPredConfig(**{**base, "voice_activity_horizon": 4, "predict_user_audio": False})
    model = MoshiUserPredForConditionalGeneration(MoshiUserPredConfig(**base))
    with pytest.raises(ValueError, match="voice_activity_turn_end_frames=9"):
        model.add_voice_activity_head(4, 9)
    assert model.voice_activity_head is None and model.config.voice_activity_horizon == 0  # left as it was


# ------------------------------------------------------------------------------------------- forward and loss
def test_head_changes_nothing_else_and_its_loss_trains_only_the_head():
    model = head_model()
    plain = MoshiUserPredForConditionalGeneration(sample_model_config(dim=32, num_layers=1)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("voice_activity_head.")})
    items, alignments = toy_turn_dialogues(model.config, n=2)
    codes = torch.stack([item["codes"] for item in items])
    activity = torch.stack([voice_activity(a, 40, user=True).long() for a in alignments])
    out = model(codes, return_loss=True, user_activity=activity)
    reference = plain(codes, return_loss=True)
    for name in ("text_logits", "audio_logits", "user_logits"):
        assert torch.equal(getattr(out, name).nan_to_num(), getattr(reference, name).nan_to_num()), name
    assert out.voice_activity_logits.shape == (2, 40, 5) and reference.voice_activity_logits is None
    targets, known = voice_activity_targets(activity, 40, 0, 4, 2)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.voice_activity_logits[known], targets[known])
    torch.testing.assert_close(out.voice_activity_loss, expected)
    torch.testing.assert_close(out.loss, reference.loss + model.config.voice_activity_loss_weight * expected)
    model.zero_grad()
    out.voice_activity_loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"voice_activity_head.proj.weight", "voice_activity_head.proj.bias"}
    assert model(codes).voice_activity_loss is None  # no targets, no loss
    # kyutai's layout holds no head; the moshi conversion ignores it both ways
    assert not any("voice_activity" in key for key in model.moshi_state_dict())
    other = head_model(seed=1)
    other.load_moshi_state_dict(model.moshi_state_dict())
    assert not torch.equal(other.voice_activity_head.proj.weight, model.voice_activity_head.proj.weight)


def test_save_and_reload_keep_the_head(tmp_path):
    model = head_model()
    model.save_pretrained(tmp_path / "m")
    again = MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert again.config.voice_activity_horizon == 4 and again.config.voice_activity_turn_end_frames == 2
    assert torch.equal(again.voice_activity_head.proj.weight, model.voice_activity_head.proj.weight)


# ------------------------------------------------------------------------------------------------ the collator
def test_collator_cuts_the_activity_at_the_segment_and_past_it():
    model = head_model()
    items, alignments = toy_turn_dialogues(model.config, n=3)
    dataset = DialoguesWithVoiceActivity(items, alignments)
    assert dataset[0]["user_activity"].tolist() == voice_activity(alignments[0], 40, user=True).long().tolist()
    collate = MoshiSegmentCollator(16, config=model.config)
    torch.manual_seed(0)
    batch = collate([dataset[i] for i in range(3)])
    assert batch["user_activity"].shape == (3, 16 + 0 + 4)  # lookahead 1, horizon 4
    for i in range(3):
        codes = dataset[i]["codes"]
        start = next(s for s in range(25) if torch.equal(codes[:, s : s + 16], batch["codes"][i]))
        assert batch["user_activity"][i].tolist() == dataset[i]["user_activity"][start : start + 20].tolist()
    # the last evaluation segment reaches the end: unknown (-1) after it
    segments = DialogueSegments(dataset, 16)
    last = MoshiSegmentCollator(16, random_offset=False, config=model.config)([segments[2]])
    assert last["user_activity"][0, 8:].eq(-1).all() and last["user_activity"][0, :8].ge(0).all()
    # no activity, or no head: no targets
    assert "user_activity" not in collate(items)
    plain = MoshiSegmentCollator(16, config=sample_model_config(dim=32, num_layers=1))
    assert "user_activity" not in plain([dataset[0]])
    with pytest.raises(ValueError, match="3 dialogues but 2 alignment lists"):
        DialoguesWithVoiceActivity(items, alignments[:2])


# ------------------------------------------------------------------------------------------------- training
def test_trainer_trains_the_head_alone_and_it_learns_the_toy_pattern(tmp_path):
    from transformers import PrinterCallback

    from hf_moshi_userpred.training.trainer import MoshiUserPredTrainer, MoshiUserPredTrainingArguments
    from hf_moshi_userpred.training.modes import prepare_model_for_training

    torch.manual_seed(0)
    model = MoshiUserPredForConditionalGeneration(sample_model_config(dim=32, num_layers=1))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.add_voice_activity_head(4, 2)
    prepare_model_for_training(model, "voice_activity_head")
    items, alignments = toy_turn_dialogues(model.config)
    args = MoshiUserPredTrainingArguments(
        output_dir=str(tmp_path), max_steps=80, per_device_train_batch_size=4, segment_frames=40, learning_rate=3e-2,
        logging_steps=10, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    trainer = MoshiUserPredTrainer(model=model, args=args, train_dataset=DialoguesWithVoiceActivity(items, alignments))
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [h["loss/voice_activity"] for h in trainer.state.log_history if "loss/voice_activity" in h]
    assert len(losses) == 8 and losses[-1] < 0.85 * losses[0]
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters() if name in before)
    model.eval()
    stats = fit_turn_taking_statistics(items, alignments, model.config, horizon=4, turn_end_frames=2)
    report = evaluate_turn_taking(model, items, alignments, stats)
    assert list(report.predictors)[:4] == ["model", "vap_head", "repeat_last", "unigram"]
    head = report.frames["vap_head"]
    # every toy dialogue repeats one timing, which the random model's hidden state carries only in part
    assert head.count == report.frames["model"].count > 0 and head.auc > 0.8 > report.frames["model"].auc
    assert "| vap_head |" in report.to_markdown() and "turn_taking/vap_head/frame_auc" in report.to_dict()
    with pytest.raises(ValueError, match="needs a model with a voice-activity head"):
        prepare_model_for_training(MoshiUserPredForConditionalGeneration(sample_model_config(dim=32, num_layers=1)),
                                   "voice_activity_head")


# ------------------------------------------------------------------------------------- streaming and the hold
def test_streaming_signal_is_the_heads_and_drives_the_hold_without_a_table():
    model = head_model(horizon=6, turn_end_frames=3)
    with torch.no_grad():
        model.voice_activity_head.proj.bias.fill_(0.3)  # a signal that is not one half everywhere
    c = model.config
    items, _ = toy_turn_dialogues(c, n=2)
    user = torch.stack([item["codes"][1 + c.dep_q :] for item in items])
    greedy = dict(do_sample=False, audio_do_sample=False, user_do_sample=False, progress=False)
    out = model.generate(user, **greedy)
    assert out.user_silence.shape == (2, 6, 40) and out.user_turn_end.shape == (2, 40)
    frames = 40 - max(c.delays)
    codes = torch.cat([out.text_tokens[:, None], out.audio_codes, user[:, :, 1 : frames + 1]], dim=1)
    with torch.no_grad():
        probs = torch.sigmoid(model(codes).voice_activity_logits)  # [B, frames, 7]
    torch.testing.assert_close(out.user_turn_end[:, :frames], probs[..., -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.user_silence[:, :, :frames], probs[..., :-1].transpose(1, 2), rtol=0, atol=1e-5)
    # the hold reads the head: 1 holds every word start, 0 none (the same as no hold)
    forced = dict(forced_text={0: [[5], [6, 7]], 1: [[5]]}, **greedy)
    never = model.generate(user, turn_hold_threshold=1.0, **forced).text_tokens
    assert torch.isin(never, torch.tensor([c.existing_text_padding_id, c.existing_text_end_padding_id])).all()
    assert torch.equal(model.generate(user, turn_hold_threshold=0.0, **forced).text_tokens,
                       model.generate(user, **forced).text_tokens)
    with pytest.raises(ValueError, match="max_turn_words=2, min_silence_frames=0: these turn settings need"):
        model.generate(user, max_turn_words=2, **greedy)


# ------------------------------------------------------------------------------------------------------ CLI
def test_train_command_adds_and_trains_a_head(demo_model_dir, tmp_path):
    from hf_moshi_userpred.cli.main import main

    encoded = demo_model_dir.parent / "encoded"
    out = tmp_path / "run"
    code = main(["train", "--model_name_or_path", str(demo_model_dir), "--train_data", str(encoded / "train"),
                 "--eval_data", str(encoded / "eval"), "--output_dir", str(out), "--training_mode",
                 "voice_activity_head", "--voice_activity_horizon", "6", "--voice_activity_turn_end_frames", "2",
                 "--max_steps", "3", "--per_device_train_batch_size", "2", "--segment_frames", "32", "--use_cpu",
                 "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1"])
    assert code == 0
    trained = MoshiUserPredForConditionalGeneration.from_pretrained(out)
    assert trained.config.voice_activity_horizon == 6 and trained.voice_activity_head.proj.out_features == 7
    original = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir)
    assert torch.equal(trained.text_linear.weight, original.text_linear.weight)
    import json

    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_loss/voice_activity"] > 0
    # a new head trained jointly with the transformer
    joint = tmp_path / "joint"
    assert main(["train", "--model_name_or_path", str(demo_model_dir), "--train_data", str(encoded / "train"),
                 "--output_dir", str(joint), "--voice_activity_horizon", "6", "--voice_activity_turn_end_frames", "2",
                 "--voice_activity_trains_transformer", "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--segment_frames", "32", "--use_cpu", "--report_to", "none", "--save_strategy", "no"]) == 0
    assert MoshiUserPredForConditionalGeneration.from_pretrained(joint).config.voice_activity_trains_transformer


def test_the_head_loss_reaches_the_transformer_only_when_configured(tmp_path):
    """Detached by default (the head changes nothing the model says); `voice_activity_trains_transformer` trains
    them jointly, as VAP models are, and survives a save and reload."""
    items, alignments = toy_turn_dialogues(sample_model_config(dim=32, num_layers=1))
    activity = DialoguesWithVoiceActivity(items, alignments)[0]["user_activity"][None]
    for joint in (False, True):
        torch.manual_seed(0)
        config = sample_model_config(dim=32, num_layers=1)
        config.voice_activity_trains_transformer = joint
        model = MoshiUserPredForConditionalGeneration(config)
        model.add_voice_activity_head(4, 2)
        out = model(items[0]["codes"][None], user_activity=activity, return_loss=True)
        out.voice_activity_loss.backward()
        reached = [name for name, p in model.named_parameters()
                   if not name.startswith("voice_activity_head") and p.grad is not None and p.grad.abs().sum() > 0]
        assert bool(reached) == joint, reached[:3]
    model.save_pretrained(tmp_path)
    assert MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path).voice_activity_head.trains_transformer
