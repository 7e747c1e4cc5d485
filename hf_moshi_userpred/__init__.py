"""Kyutai's Moshi with a user-audio Depformer that predicts what the user is about to say, the Hugging Face way."""

from transformers import AutoConfig, AutoModel

from .configuration_moshi_userpred import MoshiUserPredConfig
from .generation_moshi_config import MoshiUserPredGenerationConfig
from .generation_moshi_streaming import MoshiStreamingSession, MoshiStreamStepOutput, SpeculationStats
from .generation_moshi_userpred import MoshiGenerateOutput
from .modeling_moshi_userpred import (
    MoshiUserPredForConditionalGeneration,
    MoshiUserPredOutput,
    MoshiUserPredPreTrainedModel,
    masked_cross_entropy,
)

AutoConfig.register(MoshiUserPredConfig.model_type, MoshiUserPredConfig, exist_ok=True)
AutoModel.register(MoshiUserPredConfig, MoshiUserPredForConditionalGeneration, exist_ok=True)
# save_pretrained then writes `auto_map` and copies the configuration/modeling files, so a saved model loads
# with `trust_remote_code=True` where this package is not installed.
MoshiUserPredConfig.register_for_auto_class()
MoshiUserPredForConditionalGeneration.register_for_auto_class("AutoModel")

__version__ = "0.1.0"

# Fine-tuning, data, evaluation, Hub and audio-streaming names, imported on first use: inference does not need the
# Trainer stack, audio I/O, jinja or matplotlib.
_LAZY = {
    "DialogueSegments": "data_collator",
    "MoshiSegmentCollator": "data_collator",
    "EncodeSummary": "encoding",
    "EncodedDialogues": "encoding",
    "encode_dataset": "encoding",
    "load_mimi": "audio",
    "load_mono": "audio",
    "load_stereo": "audio",
    "load_tokenizer": "audio",
    "evaluate_user_prediction": "evaluation",
    "UserPredictionReport": "evaluation",
    "PushResult": "hub",
    "build_model_card": "hub",
    "push_to_hub": "hub",
    "StreamResult": "streaming_audio",
    "stream_user_audio": "streaming_audio",
    "run_demo": "demo",
    "interleave_text": "text_alignment",
    "MoshiUserPredTrainer": "trainer",
    "MoshiUserPredTrainingArguments": "trainer",
    "UserLossCurriculum": "trainer",
    "prepare_model_for_training": "training_modes",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "MoshiGenerateOutput",
    "MoshiStreamStepOutput",
    "MoshiStreamingSession",
    "MoshiUserPredConfig",
    "MoshiUserPredGenerationConfig",
    "MoshiUserPredForConditionalGeneration",
    "MoshiUserPredOutput",
    "MoshiUserPredPreTrainedModel",
    "SpeculationStats",
    "masked_cross_entropy",
]
