"""Every field of Transformers' `GenerationConfig` is honoured on the stream(s) where it means something or refused
with its name and the reason; the text repetition penalty spares Moshi's padding; banned words never come out."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import CompileConfig, GenerationConfig, WatermarkingConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from helpers import tiny_model
from hf_moshi_userpred.models.generation_moshi_config import (
    AUDIO_USER_FIELDS,
    REFUSED_FIELDS,
    SAMPLING_FIELDS,
    SCORE_FIELDS,
    SEARCH_FIELDS,
    STREAMS,
    TEXT_FIELDS,
    TURN_FIELDS,
    MoshiRepetitionPenaltyLogitsProcessor,
    MoshiUserPredGenerationConfig,
    build_logits_processor,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # streaming tiny models: one intra-op thread (see conftest)

# A value that changes something, for each field the streams honour ...
HONOURED_VALUES = {
    "do_sample": False, "temperature": 0.5, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "typical_p": 0.9,
    "epsilon_cutoff": 3e-4, "eta_cutoff": 3e-4, "top_h": 0.5, "repetition_penalty": 1.3, "bad_words_ids": [[5]],
    "sequence_bias": [[[5], -2.0]], "suppress_tokens": [5], "remove_invalid_values": True, "renormalize_logits": True,
}
# ... and for the refused ones, where an arbitrary value would already fail Transformers' own checks
REFUSED_VALUES = {
    "stop_strings": "bye", "cache_implementation": "static", "cache_config": {"max_cache_len": 8},
    "compile_config": CompileConfig(), "watermarking_config": WatermarkingConfig(), "constraints": [object()],
    "force_words_ids": [[5]], "num_assistant_tokens_schedule": "constant", "speculation_type": "prompt_lookup",
    "use_cache": False, "output_attentions": True, "output_hidden_states": True, "output_scores": True,
    "output_logits": True, "return_dict_in_generate": True, "low_memory": True, "disable_compile": True,
    "is_assistant": True, "token_healing": True, "use_mtp": True, "dola_layers": "low",
    "continuous_batching_config": ContinuousBatchingConfig(), "begin_suppress_tokens": [5], "eos_token_id": 2,
    "exponential_decay_length_penalty": (5, 1.5), "early_stopping": True, "guidance_scale": 1.5,
    "assistant_confidence_threshold": 0.4, "assistant_early_exit": 2, "assistant_ensemble_weight": 0.5,
}
# ... and for the search fields (offline `generate` only), a valid setting that uses each (greedy text)
SEARCH_SETTINGS = {
    "num_beams": dict(num_beams=2), "num_beam_groups": dict(num_beams=2, num_beam_groups=2),
    "diversity_penalty": dict(num_beams=2, num_beam_groups=2, diversity_penalty=0.5),
    "length_penalty": dict(num_beams=2, length_penalty=0.5),
    "num_return_sequences": dict(num_beams=2, num_return_sequences=2),
    "penalty_alpha": dict(penalty_alpha=0.6, top_k=4),
}


def processor_types(config: MoshiUserPredGenerationConfig) -> dict[str, list[str]]:
    """Each stream's processors with their settings, as text."""
    return {stream: [f"{type(p).__name__}{sorted((k, str(v)) for k, v in vars(p).items())}"
                     for p in build_logits_processor(config, stream, padding_ids=(3, 0))]
            for stream in ("text", "audio", "user")}


@pytest.mark.parametrize("name", sorted(set(vars(GenerationConfig())) - {"transformers_version", "_from_model_config"}))
def test_every_generation_config_field_is_honoured_or_refused(name):
    default = processor_types(MoshiUserPredGenerationConfig())
    if name in HONOURED_VALUES:
        assert name in SAMPLING_FIELDS + TEXT_FIELDS + SCORE_FIELDS
        config = MoshiUserPredGenerationConfig(**{name: HONOURED_VALUES[name]})
        changed = processor_types(config)
        streams = ["text"] if name in SAMPLING_FIELDS + TEXT_FIELDS else ["text", "audio", "user"]
        for stream in ("text", "audio", "user"):
            assert (changed[stream] != default[stream]) == (stream in streams), (name, stream, changed[stream])
        if name in SAMPLING_FIELDS:  # the prefixed field sets the audio (user) stream the same way
            audio = processor_types(MoshiUserPredGenerationConfig(**{"audio_" + name: HONOURED_VALUES[name]}))
            assert audio["audio"] != default["audio"] and audio["text"] == default["text"]
    elif name in SEARCH_SETTINGS:  # honoured by generate's search, not by the processors; refused by streaming
        assert name in SEARCH_FIELDS and name not in REFUSED_FIELDS
        config = MoshiUserPredGenerationConfig(do_sample=False, **SEARCH_SETTINGS[name])
        config.validate()
        assert processor_types(config) == processor_types(MoshiUserPredGenerationConfig(do_sample=False))
    else:
        assert name in REFUSED_FIELDS, f"{name} is neither honoured nor refused"
        value = REFUSED_VALUES.get(name, 3)
        with pytest.raises(ValueError, match=rf"cannot honour: .*{name}=.*\(.+\)"):
            MoshiUserPredGenerationConfig(**{name: value})
        neutral = REFUSED_FIELDS[name][0]
        MoshiUserPredGenerationConfig(**{name: neutral})  # the neutral value changes nothing: accepted


def test_refused_fields_are_refused_by_streaming_and_generate():
    model = tiny_model()
    user = torch.zeros(1, model.config.n_q - model.config.dep_q, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens=5 .*user's frames end"):
        model.generate(user, max_new_tokens=5)
    with pytest.raises(ValueError, match="num_beams=4: .*offline"):
        with model.streaming(1, num_beams=4):
            pass


def test_repetition_penalty_spares_padding_and_the_history_before_the_start():
    """History `[pad, pad, end-pad, 7, pad]`: only token 7 is penalised (CTRL's rule), padding keeps its score."""
    scores = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0, 1.0, 1.0, 2.0, -2.0]])
    history = torch.tensor([[3, 3, 0, 7, 3]])
    out = MoshiRepetitionPenaltyLogitsProcessor(2.0, exempt_ids=(3, 0))(history, scores.clone())
    expected = scores.clone()
    expected[0, 7] = 1.0
    assert torch.equal(out, expected)
    out = MoshiRepetitionPenaltyLogitsProcessor(2.0, exempt_ids=(3, 0))(torch.tensor([[8, 8]]), scores.clone())
    assert out[0, 8] == -4.0 and torch.equal(out[0, :8], scores[0, :8])  # negative scores are multiplied
    with pytest.raises(ValueError, match="repetition_penalty=0"):
        MoshiRepetitionPenaltyLogitsProcessor(0, exempt_ids=())


def test_repetition_penalty_leaves_a_padding_only_stream_alone():
    """Streaming with a repetition penalty gives the same tokens as without while the model writes only padding
    (before the fix the pre-filled padding history pushed padding down from the first step)."""
    model = tiny_model(seed=3)
    c = model.config
    with torch.no_grad():  # a model that always writes padding, by a wide margin
        model.text_linear.weight.zero_()
        model.text_linear.bias = torch.nn.Parameter(torch.full((c.text_card_out,), -5.0))
        model.text_linear.bias[c.existing_text_padding_id] = 5.0
    user = torch.randint(0, c.card, (2, c.n_q - c.dep_q, 10), generator=torch.Generator().manual_seed(0))
    plain = model.generate(user, do_sample=False, audio_do_sample=False)
    penalised = model.generate(user, do_sample=False, audio_do_sample=False, repetition_penalty=50.0)
    assert (plain.text_tokens == c.existing_text_padding_id).all()
    assert torch.equal(plain.text_tokens, penalised.text_tokens)


def test_banned_words_never_appear_across_seeds():
    """`bad_words_ids` on the text stream: a token the model samples often never comes out once banned."""
    model = tiny_model(seed=1)
    c = model.config
    user = torch.randint(0, c.card, (4, c.n_q - c.dep_q, 8), generator=torch.Generator().manual_seed(1))
    sampling = dict(temperature=1.5, top_k=None)
    counts = torch.zeros(c.text_card_out, dtype=torch.long)
    for seed in range(3):
        counts += torch.bincount(model.generate(user, seed=seed, **sampling).text_tokens.flatten(),
                                 minlength=c.text_card_out)
    banned = int(counts.argmax())
    assert counts[banned] >= 5
    for seed in range(5):
        text = model.generate(user, seed=seed, bad_words_ids=[[banned]], **sampling).text_tokens
        assert not (text == banned).any()
        suppressed = model.generate(user, seed=seed, suppress_tokens=[banned], **sampling).text_tokens
        assert not (suppressed == banned).any()


def test_audio_and_user_suppress_tokens_act_on_their_own_stream():
    default = processor_types(MoshiUserPredGenerationConfig())
    for name, stream in zip(AUDIO_USER_FIELDS, ("audio", "user")):
        changed = processor_types(MoshiUserPredGenerationConfig(**{name: [5]}))
        assert [s for s in STREAMS if changed[s] != default[s]] == [stream]
        assert any(p.startswith("SuppressTokensLogitsProcessor") for p in changed[stream])


@pytest.mark.parametrize("field, value", [
    ("audio_suppress_tokens", [-1]), ("user_suppress_tokens", "7"), ("max_turn_words", 0), ("max_turn_words", 2.5),
    ("min_silence_frames", -1), ("min_silence_frames", True), ("turn_hold_threshold", 1.5),
    ("turn_hold_threshold", "0.5"),
])
def test_suppress_and_turn_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")):
        MoshiUserPredGenerationConfig(**{field: value})


def test_suppress_and_turn_fields_round_trip_through_generation_config_json(tmp_path):
    config = MoshiUserPredGenerationConfig(audio_suppress_tokens=[1, 2], user_suppress_tokens=[7], max_turn_words=4,
                                           min_silence_frames=3, turn_hold_threshold=0.6)
    config.save_pretrained(tmp_path)
    loaded = MoshiUserPredGenerationConfig.from_pretrained(tmp_path)
    assert {n: getattr(loaded, n) for n in AUDIO_USER_FIELDS + TURN_FIELDS} == {
        "audio_suppress_tokens": [1, 2], "user_suppress_tokens": [7], "max_turn_words": 4, "min_silence_frames": 3,
        "turn_hold_threshold": 0.6}
    defaults = MoshiUserPredGenerationConfig()
    assert (defaults.max_turn_words, defaults.min_silence_frames, defaults.turn_hold_threshold) == (None, 0, None)
    assert not defaults.holds_turns and config.holds_turns
