"""The Trainer: combined loss, curriculum (and its resume), logging, evaluation, training modes, collator."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from helpers import tiny_model
from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.collator import DialogueSegments, MoshiSegmentCollator
from hf_moshi_userpred.data.encoding import EncodedDialogues
from hf_moshi_userpred.training.train import DERIVED_FILES, check_data_fits_model, main as train_main
from hf_moshi_userpred.training.trainer import (
    MoshiUserPredTrainer,
    MoshiUserPredTrainingArguments,
    UserLossCurriculum,
    parse_stages,
)
from hf_moshi_userpred.training.modes import (
    apply_lora,
    freeze_all_but_user_branch,
    lora_target_modules,
    prepare_model_for_training,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# n_q 4 (2 system + 2 user rows), moshi-like delays: a delay-0 and a delay-1 codebook per speaker.
TINY = dict(
    dim=32, text_card=30, card=16, n_q=4, dep_q=2, num_heads=2, num_layers=2, hidden_scale=2, context=32,
    delays=[0, 0, 1, 0, 1], depformer_dim=16, depformer_num_heads=2, depformer_num_layers=1,
    depformer_dim_feedforward=32, user_depformer_dim=16, user_depformer_num_heads=2, user_depformer_num_layers=1,
    user_depformer_dim_feedforward=32,
)


def dialogues(n: int = 6, frames: int = 40, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        codes = torch.randint(0, 16, (5, frames + 3 * i), generator=g)
        codes[0] = torch.randint(0, 30, (frames + 3 * i,), generator=g)
        out.append({"codes": codes, "name": f"d{i}"})
    return out


def training_args(tmp_path, **overrides) -> MoshiUserPredTrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=2, logging_steps=1,
        segment_frames=16, learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    return MoshiUserPredTrainingArguments(**{**base, **overrides})


def step_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log]


# --------------------------------------------------------------------------------------------- loss
def test_compute_loss_is_the_combined_loss_with_the_curriculum_weight(tmp_path):
    model = tiny_model(base=TINY, first_codebook_weight_multiplier=3.0, text_padding_weight=0.5)
    trainer = MoshiUserPredTrainer(model=model, args=training_args(tmp_path, user_loss_stages="0:0.25"))
    codes = MoshiSegmentCollator(16)(dialogues(2))["codes"]
    codes[0, 0, :4] = 3  # padding ids get text_padding_weight
    model.eval()
    loss, out = trainer.compute_loss(model, {"codes": codes}, return_outputs=True)
    torch.testing.assert_close(loss, out.text_loss + out.audio_loss + 0.25 * out.user_loss)
    # An independent masked mean for the user loss: codebook 0 weighted x3.
    targets = codes[:, 3:5]
    ce = torch.nn.functional.cross_entropy(out.user_logits.nan_to_num().flatten(0, 2), targets.flatten(),
                                           reduction="none").view_as(targets)
    w = out.user_mask.float() * torch.tensor([3.0, 1.0])[None, :, None]
    torch.testing.assert_close(out.user_loss, (ce * w).sum() / w.sum())


@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_curriculum_stages_follow_steps_or_epochs(tmp_path, unit):
    # 6 dialogues, batch 2: 3 steps per epoch.
    stages = "0:0.0,2:0.05,4:0.1" if unit == "step" else "0:0.0,1:0.05,1.5:0.1"
    args = training_args(tmp_path, user_loss_stages=stages, user_loss_stage_unit=unit)
    trainer = MoshiUserPredTrainer(model=tiny_model(base=TINY), args=args, train_dataset=dialogues())
    trainer.train()
    weights = [log["user_weight"] for log in step_logs(trainer)]
    # A step's weight is that of the stage it starts in: steps done (step unit) or epochs done before it.
    expected = [0.0, 0.0, 0.05, 0.05, 0.1, 0.1] if unit == "step" else [0.0, 0.0, 0.0, 0.05, 0.05, 0.1]
    assert weights == expected
    for log in step_logs(trainer):
        for key in ("loss/text", "loss/audio"):
            assert math.isfinite(log[key]), key
        user_keys = ("loss/user", "user_accuracy", "user_delay0_accuracy")
        if log["user_weight"] == 0:  # the user branch is not run while its weight is 0
            assert not any(key in log for key in user_keys), log
            continue
        for key in user_keys:
            assert math.isfinite(log[key]), key
        assert 0 <= log["user_accuracy"] <= 1


def test_the_user_branch_is_not_run_while_its_weight_is_0(tmp_path):
    model = tiny_model(base=TINY)
    calls = []
    model.user_depformer.register_forward_hook(lambda *_: calls.append(model.training))
    before = {name: p.detach().clone() for name, p in model.user_depformer.named_parameters()}
    args = training_args(tmp_path, max_steps=2, user_loss_stages="0:0.0,2:0.1", user_loss_stage_unit="step",
                         weight_decay=0.1)
    trainer = MoshiUserPredTrainer(model=model, args=args, train_dataset=dialogues())
    trainer.train()
    assert calls == []  # neither forward nor backward in the zero stage
    for name, param in model.user_depformer.named_parameters():
        assert torch.equal(param, before[name]), name  # not even weight decay touched it
    assert trainer.evaluate(dialogues(2))["eval_loss/user"] > 0  # evaluation still measures the branch
    assert calls == [False]


def test_training_drops_a_calibration_temperature(tmp_path, caplog):
    """A temperature fitted to the weights before training does not hold after it, and the loss must see the raw
    user logits: the trained model is uncalibrated until `evaluate --calibrate` runs again."""
    model = tiny_model(base=TINY, user_logit_temperature=[2.0, 2.0])
    trainer = MoshiUserPredTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=dialogues())
    with caplog.at_level("WARNING", logger="hf_moshi_userpred"):
        trainer.train()
    assert model.config.user_logit_temperature is None
    assert "calibration temperature [2.0, 2.0]" in caplog.text


def test_default_curriculum_fits_the_training_mode(tmp_path):
    full = MoshiUserPredTrainer(model=tiny_model(base=TINY, user_loss_weight=0.2), args=training_args(tmp_path))
    assert full.args.user_loss_stages == "0:0.0,1:0.1,2:0.2"
    model = prepare_model_for_training(tiny_model(base=TINY, user_loss_weight=0.2), "user_branch")
    branch = MoshiUserPredTrainer(model=model, args=training_args(tmp_path / "b", max_steps=1),
                                  train_dataset=dialogues())
    assert branch.args.user_loss_stages == "0:0.2"  # no zero stage where nothing else learns
    branch.train()
    assert step_logs(branch)[0]["user_weight"] == 0.2 and "loss/user" in step_logs(branch)[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_steps=2, user_loss_stages="0:0.0,1:0.1"), r"weight is 0 for all 2 steps .* 3 steps per epoch"),
        (dict(max_steps=-1, num_train_epochs=1, user_loss_stages="0:0.0,1:0.1"), r"weight is 0 for all 3 steps"),
        (dict(max_steps=4, user_loss_stages="0:0.0,5:0.1", user_loss_stage_unit="step"), r"for all 4 steps"),
        (dict(max_steps=4, user_loss_stages="0:0.0"), r"for all 4 steps"),
    ],
)
def test_a_user_branch_run_that_would_train_nothing_is_refused(tmp_path, overrides, message):
    model = prepare_model_for_training(tiny_model(base=TINY), "user_branch")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = MoshiUserPredTrainer(model=model, args=training_args(tmp_path, **overrides), train_dataset=dialogues())
    with pytest.raises(ValueError, match=message + r".*only the user branch is trainable"):
        trainer.train()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_full_run_whose_user_weight_stays_0_warns(tmp_path, monkeypatch):
    import hf_moshi_userpred.training.trainer as trainer_module

    warnings = []
    monkeypatch.setattr(trainer_module.logger, "warning", warnings.append)
    trainer = MoshiUserPredTrainer(model=tiny_model(base=TINY), args=training_args(tmp_path, max_steps=2),
                                   train_dataset=dialogues())
    trainer.train()  # the shared model trains: allowed, but said
    assert any("the user branch will not train in this run" in str(w) for w in warnings), warnings


def test_a_model_with_nothing_trainable_is_refused(tmp_path):
    model = tiny_model(base=TINY).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        MoshiUserPredTrainer(model=model, args=training_args(tmp_path))


def test_logged_loss_is_the_combination_of_its_parts(tmp_path):
    trainer = MoshiUserPredTrainer(model=tiny_model(base=TINY), args=training_args(tmp_path, max_steps=3,
                                   user_loss_stages="0:0.3"), train_dataset=dialogues())
    trainer.train()
    for log in step_logs(trainer):
        combined = log["loss/text"] + log["loss/audio"] + 0.3 * log["loss/user"]
        assert log["loss"] == pytest.approx(combined, rel=1e-5)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Resuming at step 3 (inside the second curriculum stage) gives the same losses and weights for steps 4-6:
    model, optimizer, scheduler, data order, segment offsets (torch RNG) and curriculum stage all come back."""
    kwargs = dict(user_loss_stages="0:0.0,2:0.2,5:0.4", user_loss_stage_unit="step", save_strategy="steps",
                  save_steps=3)
    full = MoshiUserPredTrainer(model=tiny_model(base=TINY), args=training_args(tmp_path / "a", **kwargs),
                                train_dataset=dialogues())
    full.train()
    resumed = MoshiUserPredTrainer(model=tiny_model(base=TINY, seed=1), args=training_args(tmp_path / "b", **kwargs),
                                   train_dataset=dialogues())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    a = [log for log in step_logs(full) if log["step"] > 3]
    b = [log for log in step_logs(resumed) if log["step"] > 3]  # the log history before 3 is restored too
    assert [log["step"] for log in b] == [4, 5, 6]
    for x, y in zip(a, b):
        assert x["user_weight"] == y["user_weight"]
        for key in ("loss", "loss/text", "loss/audio", "loss/user"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
    assert [log["user_weight"] for log in b] == [0.2, 0.2, 0.4]


def _params_after_one_step(tmp_path, **overrides) -> dict[str, torch.Tensor]:
    # Segments as long as the dialogues: no random offset, so the batches do not depend on how they are split.
    args = training_args(tmp_path, max_steps=1, segment_frames=40, user_loss_stages="0:0.5", **overrides)
    model = tiny_model(base=TINY)
    MoshiUserPredTrainer(model=model, args=args, train_dataset=dialogues(4, frames=40)[:1] * 4).train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    reference = _params_after_one_step(tmp_path / "a", per_device_train_batch_size=4)
    accumulated = _params_after_one_step(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for name, value in reference.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    reference = _params_after_one_step(tmp_path / "a")
    checkpointed = _params_after_one_step(tmp_path / "b", activation_checkpointing=True)
    for name, value in reference.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its mixed-precision setting in a process-wide singleton: start and leave it clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_trains(tmp_path, fresh_accelerate_state):
    fp32 = MoshiUserPredTrainer(model=tiny_model(base=TINY), args=training_args(tmp_path / "f", max_steps=3),
                                train_dataset=dialogues())
    fp32.train()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = MoshiUserPredTrainer(model=tiny_model(base=TINY), args=training_args(tmp_path, bf16=True, max_steps=3),
                                   train_dataset=dialogues())
    seen = []
    hook = trainer.model.text_linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    hook.remove()
    assert torch.bfloat16 in seen  # autocast was on
    assert next(trainer.model.parameters()).dtype == torch.float32  # master weights stay fp32
    for a, b in zip(step_logs(fp32), step_logs(trainer)):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_returns_losses_and_user_metrics_over_every_frame(tmp_path):
    model = tiny_model(base=TINY)
    data = dialogues(3, frames=37)
    trainer = MoshiUserPredTrainer(model=model, args=training_args(tmp_path, user_loss_stages="0:0.1"),
                                   eval_dataset=data)
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_loss/text", "eval_loss/audio", "eval_loss/user", "eval_user_accuracy",
                "eval_user_delay0_accuracy"):
        assert math.isfinite(metrics[key]), key
    # Independent check: accuracy over every valid user target of every 16-frame segment of every dialogue,
    # each padded to 16 frames as in a batch (the padding frame after a short segment's end gives its delay-1
    # rows' last target a position).
    model.eval()
    correct = total = 0
    pad = MoshiSegmentCollator(16, random_offset=False)
    with torch.no_grad():
        for item in DialogueSegments(data, 16):
            codes = pad([item])["codes"]
            out = model(codes)
            hits = (out.user_logits.argmax(-1) == codes[:, 3:5]) & out.user_mask
            correct, total = correct + hits.sum().item(), total + out.user_mask.sum().item()
    assert metrics["eval_user_accuracy"] == pytest.approx(correct / total)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(metrics["eval_loss"])  # deterministic


def test_dialogue_segments_cover_every_frame_once():
    data = dialogues(3, frames=37)  # 37, 40, 43 frames
    segments = DialogueSegments(data, 16)
    assert len(segments) == 3 + 3 + 3
    for i, item in enumerate(data):
        pieces = [s["codes"] for s in segments if s["name"].startswith(f"d{i}@")]
        torch.testing.assert_close(torch.cat(pieces, dim=1), item["codes"])


def test_collator_cuts_random_segments_and_pads_with_the_zero_token():
    data = dialogues(2, frames=40)
    collate = MoshiSegmentCollator(16)
    torch.manual_seed(0)
    starts = set()
    for _ in range(20):
        batch = collate(data)["codes"]
        assert batch.shape == (2, 5, 16) and batch.dtype == torch.long
        for i in range(2):
            full = data[i]["codes"]
            matches = [s for s in range(full.shape[1] - 15) if torch.equal(full[:, s:s + 16], batch[i])]
            assert matches
            starts.add(matches[0])
    assert len(starts) > 5
    short = {"codes": torch.zeros(5, 10, dtype=torch.long)}
    batch = MoshiSegmentCollator(16, random_offset=False)([short])["codes"]
    assert (batch[0, :, :10] == 0).all() and (batch[0, :, 10:] == -1).all()
    with pytest.raises(ValueError, match="different numbers of rows"):
        collate([data[0], {"codes": torch.zeros(3, 20, dtype=torch.long)}])
    with pytest.raises(ValueError, match="segment_frames must be >= 1, got 0"):
        MoshiSegmentCollator(0)


# ---------------------------------------------------------------------------------------------- modes
def test_user_branch_mode_keeps_text_and_system_audio_bit_identical(tmp_path):
    model = tiny_model(base=TINY)
    codes = MoshiSegmentCollator(16, random_offset=False)(dialogues(2))["codes"]
    model.eval()
    with torch.no_grad():
        before = model(codes)
    trainable = freeze_all_but_user_branch(model)
    assert trainable and all(name.startswith("user_depformer.") for name in trainable)
    trainer = MoshiUserPredTrainer(model=model, args=training_args(tmp_path, user_loss_stages="0:1.0"),
                                   train_dataset=dialogues())
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    # Compare the saved model (parameters requiring grad, like the start): CPU matmul takes another, last-bit
    # different path for frozen weights fed a strided input, so comparing the frozen model itself would test that.
    saved = MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        after = saved(codes)
    for head in ("text", "audio"):
        torch.testing.assert_close(getattr(after, f"{head}_logits"), getattr(before, f"{head}_logits"),
                                   rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(after.user_logits.nan_to_num(), before.user_logits.nan_to_num())


def test_lora_trains_saves_reloads_and_merges(tmp_path):
    from peft import PeftModel

    base = tiny_model(base=TINY)
    start = {name: p.detach().clone() for name, p in base.named_parameters()}
    targets = lora_target_modules(base)
    assert targets and all(name.startswith("transformer.layers.") for name in targets)
    model = prepare_model_for_training(base, "lora", r=4, alpha=8)
    assert isinstance(model, PeftModel)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable) and any("user_depformer" in name for name in trainable)
    assert not any(name.endswith("text_linear.weight") for name in trainable)
    MoshiUserPredTrainer(model=model, args=training_args(tmp_path, user_loss_stages="0:0.5"),
                         train_dataset=dialogues()).train()
    codes = MoshiSegmentCollator(16, random_offset=False)(dialogues(2))["codes"]
    model.eval()
    with torch.no_grad():
        trained = model(codes=codes)
    model.save_pretrained(tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved

    reloaded = PeftModel.from_pretrained(tiny_model(base=TINY), tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(codes=codes)
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, MoshiUserPredForConditionalGeneration)
        folded = merged(codes)
    for head in ("text", "audio", "user"):
        a = getattr(trained, f"{head}_logits")
        torch.testing.assert_close(getattr(again, f"{head}_logits"), a, equal_nan=True)
        torch.testing.assert_close(getattr(folded, f"{head}_logits"), a, rtol=1e-4, atol=1e-4, equal_nan=True)
    # The base weights the adapter was trained on were not touched; the merge changed the targeted ones.
    for name, value in base.state_dict().items():
        if "lora_" not in name and "modules_to_save" not in name and "base_layer" not in name:
            if name in start:
                torch.testing.assert_close(value, start[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(merged.transformer.layers[0].self_attn.in_projs[0].weight,
                           start["transformer.layers.0.self_attn.in_projs.0.weight"])


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "spec, message",
    [
        ("1:0.1", "must start at 0"),
        ("0:0,2:0.1,1:0.2", "starts must increase, got 2 then 1"),
        ("0:0,x", "stage 'x'"),
        ("0:-0.1", "weight -0.1"),
        ("0:nan", "weight nan"),
    ],
)
def test_bad_curriculum_is_a_clear_error(spec, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        parse_stages(spec)
    with pytest.raises(ValueError, match=message):
        training_args(tmp_path, user_loss_stages=spec)


def test_bad_mode_and_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="curriculum unit 'batch'"):
        UserLossCurriculum("0:0", unit="batch")
    with pytest.raises(ValueError, match="training mode 'half'"):
        prepare_model_for_training(tiny_model(base=TINY), "half")
    with pytest.raises(ValueError, match="needs a model with a user branch"):
        prepare_model_for_training(tiny_model(base=TINY, predict_user_audio=False), "user_branch")
    with pytest.raises(ValueError, match=r"LoRA options \['r'\] given for training mode 'full'"):
        prepare_model_for_training(tiny_model(base=TINY), "full", r=4)
    with pytest.raises(ValueError, match=r"LoRA parts \['decoder'\] unknown"):
        apply_lora(tiny_model(base=TINY), parts=("decoder",))
    with pytest.raises(ValueError, match="args must be MoshiUserPredTrainingArguments"):
        from transformers import TrainingArguments

        MoshiUserPredTrainer(model=tiny_model(base=TINY), args=TrainingArguments(output_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1, got 0"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be >= 1, got 0"),
        ({"max_steps": 0}, "max_steps=0 trains nothing"),
        ({"max_steps": -5, "num_train_epochs": 0}, r"num_train_epochs=0 trains nothing \(max_steps=-5"),
    ],
)
def test_a_run_of_no_batch_or_no_step_is_refused(tmp_path, overrides, message):
    """They failed as a ZeroDivisionError, or trained 1 or 0 steps and saved the result as a trained model."""
    with pytest.raises(ValueError, match=message):
        training_args(tmp_path, **overrides)
    assert training_args(tmp_path, max_steps=-1, num_train_epochs=0.5).max_steps == -1  # epochs decide: fine


def _encoded_folder(folder, items: list[dict]) -> str:
    """`items` saved as an `encode` output without index.json (every `codes/*.safetensors` is read)."""
    (folder / "codes").mkdir(parents=True)
    for item in items:
        save_file({"codes": item["codes"].int()}, folder / "codes" / f"{item['name']}.safetensors",
                  metadata={"source": item["name"]})
    return str(folder)


def test_training_into_the_model_folder_needs_overwrite_model_which_removes_stale_files(tmp_path, capsys):
    """The trained model replaces the one it started from only with --overwrite_model, and the files describing the
    old weights go with them; without the flag nothing is touched."""
    model_dir = tmp_path / "model"
    tiny_model(base=TINY).save_pretrained(model_dir)
    for name in DERIVED_FILES:
        (model_dir / name).write_text("{}")
    before = {path.name: path.read_bytes() for path in model_dir.iterdir()}
    argv = ["--model_name_or_path", str(model_dir), "--train_data", _encoded_folder(tmp_path / "data", dialogues(2)),
            "--output_dir", str(model_dir), "--max_steps", "1", "--segment_frames", "16",
            "--per_device_train_batch_size", "2", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true"]
    assert train_main(argv) == 2
    assert "is the model being trained" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in model_dir.iterdir()} == before

    assert train_main([*argv, "--overwrite_model"]) == 0
    assert (model_dir / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert not any((model_dir / name).exists() for name in DERIVED_FILES if name != "training_config.json")
    assert (model_dir / "training_config.json").read_text() != "{}"  # this run's
    MoshiUserPredForConditionalGeneration.from_pretrained(model_dir)


def test_data_the_model_cannot_read_is_refused_before_training(tmp_path):
    """Another codebook count in eval_data failed only after the whole run; a segment longer than the model's context
    and every dialogue allocated it anyway."""
    config = tiny_model(base=TINY).config  # 1 + n_q = 5 rows, context 32
    train = ("train", EncodedDialogues.from_codes([d["codes"] for d in dialogues(2)]))  # 40 and 43 frames
    check_data_fits_model(config, 43, train_data=train, eval_data=(None, None))
    other = ("ev", EncodedDialogues.from_codes([torch.zeros(7, 10, dtype=torch.long)]))
    with pytest.raises(ValueError, match=r"eval_data 'ev' has 7 rows per dialogue .* 1 \+ n_q = 5: encode it with "
                                         r"--num-codebooks 2"):
        check_data_fits_model(config, 16, train_data=train, eval_data=other)
    out_of_range = ("ev", EncodedDialogues.from_codes([torch.full((5, 10), 16)]))
    with pytest.raises(ValueError, match=r"eval_data 'ev': codes_list\[0\] codes\[1, 0\] = 16 is out of range"):
        check_data_fits_model(config, 16, train_data=train, eval_data=out_of_range)
    with pytest.raises(ValueError, match=r"segment_frames=44 is longer than both the model's context \(32 frames\) "
                                         r"and the longest dialogue of train_data \(43 frames\): give at most 43"):
        check_data_fits_model(config, 44, train_data=train, eval_data=(None, None))


# ------------------------------------------------------------------------------------------------ persona prompts
def test_a_persona_prompt_starts_every_segment_and_carries_no_loss(tmp_path):
    items = dialogues(2, frames=40)
    prompt = torch.randint(0, 16, (5, 6), generator=torch.Generator().manual_seed(1))
    items[0]["prompt"] = prompt
    batch = MoshiSegmentCollator(16)(items)
    assert batch["prompt_frames"].tolist() == [6, 0]
    assert torch.equal(batch["codes"][0, :, :6], prompt)
    dialogue = items[0]["codes"]  # the rest of the segment: 10 consecutive frames of the dialogue
    starts = [s for s in range(dialogue.shape[1] - 9) if torch.equal(dialogue[:, s : s + 10], batch["codes"][0, :, 6:])]
    assert starts
    with pytest.raises(ValueError, match="d0: its persona prompt has 16 frames, which leaves no room"):
        MoshiSegmentCollator(16)([{**items[0], "prompt": torch.zeros(5, 16, dtype=torch.long)}])

    model = tiny_model(base=TINY)
    trainer = MoshiUserPredTrainer(model=model, args=training_args(tmp_path, user_loss_stages="0:0.25"))
    model.eval()
    with torch.no_grad():
        _, prompted = trainer.compute_loss(model, batch, return_outputs=True)
        plain = model(batch["codes"], return_loss=True)
    for name in ("text_mask", "audio_mask", "user_mask"):
        mask, reference = getattr(prompted, name), getattr(plain, name)
        assert not mask[0, :, :6].any() and torch.equal(mask[0, :, 6:], reference[0, :, 6:]), name
        assert torch.equal(mask[1], reference[1]), name  # the other dialogue keeps all its targets
    assert not torch.allclose(prompted.loss, plain.loss)
    # a training step runs on prompted dialogues
    trainer = MoshiUserPredTrainer(model=model, args=training_args(tmp_path, max_steps=2),
                                   train_dataset=items, data_collator=MoshiSegmentCollator(16, config=model.config))
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in step_logs(trainer))
