"""What a fine-tuning run updates: everything, the user branch alone, or LoRA adapters (through PEFT).

- `full`: every parameter.
- `user_branch`: only the user branch (the user Depformer, and the voice-activity head when the model has one); text and system-audio outputs stay bit-identical to the starting model.
  The cheap way to add user prediction to a released Moshi.
- `voice_activity_head`: only the voice-activity head (`config.voice_activity_horizon`): turn taking added to a
  trained model without changing anything it says or predicts.
- `lora`: PEFT LoRA adapters on the main transformer's linear layers (and, by default, the whole user Depformer
  trained as a PEFT `modules_to_save` copy, since a new branch has nothing to adapt from).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

TRAINING_MODES = ("full", "user_branch", "voice_activity_head", "lora")
LORA_PARTS = ("transformer", "text_linear", "depformer", "user_depformer")


def freeze_all_but_user_branch(model: nn.Module, parts: tuple[str, ...] | None = None) -> list[str]:
    """Freeze every parameter outside the user branch (`model.user_branch_prefixes`: the user Depformer, or a shared
    Depformer's user steps, and the voice-activity head), or outside the modules `parts` (name prefixes); returns
    the names left trainable.

    Raises:
        ValueError: the model has none of them.
    """
    user_branch = parts is None
    parts = model.user_branch_prefixes if user_branch else parts
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(parts))
        if param.requires_grad:
            trainable.append(name)
    if not trainable:
        what = ("a user branch (predict_user_audio=True)" if user_branch
                else "a voice-activity head (config.voice_activity_horizon > 0)")
        raise ValueError(f"this training mode needs a model with {what}")
    return trainable


def lora_target_modules(model: nn.Module, parts: Sequence[str] = ("transformer",)) -> list[str]:
    """Full names of the `nn.Linear` layers under the top-level modules `parts` (see `LORA_PARTS`)."""
    unknown = sorted(set(parts) - set(LORA_PARTS))
    if unknown:
        raise ValueError(f"LoRA parts {unknown} unknown: choose among {LORA_PARTS}")
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[0] in parts
    ]


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.0,
    parts: Sequence[str] = ("transformer",),
    train_user_branch: bool = True,
) -> nn.Module:
    """Wrap `model` with `peft.get_peft_model`: LoRA of rank `r` on the linear layers of `parts`.

    Args:
        train_user_branch: also train the whole user Depformer and voice-activity head (`modules_to_save`); saved
            with the adapter.

    Returns:
        A `peft.PeftModel`: `save_pretrained` writes the adapter, `PeftModel.from_pretrained(base, path)` reloads
        it, `merge_and_unload()` folds it into the base weights.
    """
    from peft import LoraConfig, get_peft_model

    if train_user_branch and "user_depformer" in parts:
        raise ValueError("parts includes user_depformer while train_user_branch=True trains it fully: choose one")
    if train_user_branch and model.config.predict_user_audio and model.user_depformer is None:
        raise ValueError("train_user_branch=True with a shared user Depformer (its user steps live inside the system "
                         "Depformer, which PEFT cannot save apart): train them with training_mode 'user_branch', or "
                         "adapt them with LoRA part 'depformer' and train_user_branch=False")
    targets = lora_target_modules(model, parts)
    if not targets:
        raise ValueError(f"no linear layer found under {list(parts)}")
    modules_to_save = [name for name in ("user_depformer", "voice_activity_head")
                       if train_user_branch and getattr(model, name) is not None] or None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        modules_to_save=modules_to_save)
    return get_peft_model(model, config)


def prepare_model_for_training(model: nn.Module, mode: str = "full", **lora_kwargs) -> nn.Module:
    """Set up `model` for `mode` (one of `TRAINING_MODES`); returns the model to hand to the Trainer."""
    if mode not in TRAINING_MODES:
        raise ValueError(f"training mode {mode!r} must be one of {TRAINING_MODES}")
    if lora_kwargs and mode != "lora":
        raise ValueError(f"LoRA options {sorted(lora_kwargs)} given for training mode {mode!r}")
    if mode == "user_branch":
        freeze_all_but_user_branch(model)
    elif mode == "voice_activity_head":
        freeze_all_but_user_branch(model, ("voice_activity_head.",))
    elif mode == "lora":
        return apply_lora(model, **lora_kwargs)
    else:
        model.requires_grad_(True)
    return model


__all__ = [
    "LORA_PARTS",
    "TRAINING_MODES",
    "apply_lora",
    "freeze_all_but_user_branch",
    "lora_target_modules",
    "prepare_model_for_training",
]
