"""Kyutai's Moshi with a user-audio Depformer that predicts what the user is about to say, the Hugging Face way."""

import importlib
import importlib.abc
import logging
import sys

__version__ = "0.1.0"

# torchao (the `quant` extra), which transformers' quantizers import whenever it is installed, logs at import that its
# CUDA-only extensions do not load on a CPU build, and torch that torchao registers its enums needlessly: lines that
# say nothing to someone who imports this package (or runs its command line) for anything but CUDA quantization.
for _noisy_logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy_logger).setLevel(logging.ERROR)

# Every name is imported on first use, so `import hf_moshi_userpred` (and the command line's `--help`) does not pay
# for torch and transformers. The config and model are registered with `AutoConfig`/`AutoModel` as soon as
# transformers' auto classes are imported (or any name of this package is used), so
# `import hf_moshi_userpred; AutoModel.from_pretrained(folder)` still finds them.
_MODEL = {
    "MoshiUserPredConfig": "models.configuration_moshi_userpred",
    "MoshiUserPredGenerationConfig": "models.generation_moshi_config",
    "MoshiStreamingSession": "models.generation_moshi_streaming",
    "MoshiStreamStepOutput": "models.generation_moshi_streaming",
    "MoshiUserTurnOutput": "models.generation_moshi_text_constraints",
    "SpeculationStats": "models.generation_moshi_streaming",
    "MoshiGenerateOutput": "models.generation_moshi_userpred",
    "MoshiUserPredForConditionalGeneration": "models.modeling_moshi_userpred",
    "MoshiUserPredOutput": "models.modeling_moshi_userpred",
    "MoshiUserPredPreTrainedModel": "models.modeling_moshi_userpred",
    "masked_cross_entropy": "models.modeling_moshi_userpred",
}
_AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")
# Also watched: this package's model module. When transformers' auto modules run while transformers itself is still
# importing (some optional backends, e.g. torchao, import them from inside `import transformers`), registering fails
# there; once the model module has run, transformers is complete and it succeeds.
_WATCHED_MODULES = (*_AUTO_MODULES, f"{__name__}.models.modeling_moshi_userpred")
_registered = False


def _register() -> None:
    """Registers the config and model with transformers' auto classes (once)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel

    from .models.configuration_moshi_userpred import MoshiUserPredConfig
    from .models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration

    AutoConfig.register(MoshiUserPredConfig.model_type, MoshiUserPredConfig, exist_ok=True)
    AutoModel.register(MoshiUserPredConfig, MoshiUserPredForConditionalGeneration, exist_ok=True)
    # save_pretrained then writes `auto_map` and copies the configuration/modeling files, so a saved model loads
    # with `trust_remote_code=True` where this package is not installed.
    MoshiUserPredConfig.register_for_auto_class()
    MoshiUserPredForConditionalGeneration.register_for_auto_class("AutoModel")
    _registered = True
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterWithAutoClasses)]


def _register_when_possible() -> None:
    try:
        _register()
    except ImportError:  # transformers is still importing itself: the other auto module will try again
        pass


class _RegisterWithAutoClasses(importlib.abc.MetaPathFinder):
    """Runs `_register` right after transformers' auto-class modules are executed."""

    def find_spec(self, name, path, target=None):
        if name not in _WATCHED_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            original = loader.exec_module

            def exec_module(module, original=original):
                original(module)
                _register_when_possible()

            loader.exec_module = exec_module
        return spec


if any(name in sys.modules for name in _AUTO_MODULES):
    _register()
else:
    sys.meta_path.insert(0, _RegisterWithAutoClasses())

# Fine-tuning, data, evaluation, Hub and audio-streaming names, imported on first use: inference does not need the
# Trainer stack, audio I/O, jinja or matplotlib.
_LAZY = {
    "DialogueSegments": "data.collator",
    "MoshiSegmentCollator": "data.collator",
    "EncodeSummary": "data.encoding",
    "EncodedDialogues": "data.encoding",
    "encode_dataset": "data.encoding",
    "load_mimi": "data.audio",
    "load_mono": "data.audio",
    "load_stereo": "data.audio",
    "load_tokenizer": "data.audio",
    "evaluate_user_prediction": "evaluation.user_prediction",
    "UserPredictionReport": "evaluation.user_prediction",
    "PushResult": "hub.push",
    "build_model_card": "hub.push",
    "push_to_hub": "hub.push",
    "StreamResult": "serving.stream_recording",
    "stream_user_audio": "serving.stream_recording",
    "run_demo": "demo.pipeline",
    "interleave_text": "data.text_alignment",
    "MoshiUserPredTrainer": "training.trainer",
    "MoshiUserPredTrainingArguments": "training.trainer",
    "UserLossCurriculum": "training.trainer",
    "prepare_model_for_training": "training.modes",
}


def __getattr__(name: str):
    module = _MODEL.get(name) or _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _register()
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [*_LAZY, *_MODEL]
