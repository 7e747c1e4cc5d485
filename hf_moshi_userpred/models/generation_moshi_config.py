"""Generation settings of Moshi's three token streams (text, system audio, user prediction) and how a stream's
logits become a token: Transformers logits processors, then greedy or exponential-race sampling.
"""

from __future__ import annotations

import math

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                   "top_h")
# Honoured on the text stream only: they read the text history as `input_ids`.
TEXT_FIELDS = ("repetition_penalty", "bad_words_ids", "sequence_bias", "suppress_tokens")
# Honoured on every stream: they only read the scores.
SCORE_FIELDS = ("remove_invalid_values", "renormalize_logits")
# `suppress_tokens` of the audio and user streams. Their processors see the Depformer's sequence of one frame (the text
# token, then the codebooks chosen so far, each codebook its own vocabulary) as `input_ids`, so a multi-token bad word
# or a sequence bias would mix vocabularies: only the single-token ban has a meaning there.
AUDIO_USER_FIELDS = ("audio_suppress_tokens", "user_suppress_tokens")
# Turn length and turn-conditioned generation: they hold the text stream on padding (see the class docstring).
TURN_FIELDS = ("max_turn_words", "min_silence_frames", "turn_hold_threshold")
STREAMS = ("text", "audio", "user")  # the token streams a session samples; batch entries are "slots"
# Beam, diverse beam and contrastive search over the text stream (offline `generate` only), with their neutral values.
SEARCH_FIELDS = {"num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "length_penalty": 1.0,
                 "penalty_alpha": 0.0, "num_return_sequences": 1}

_ENDS_WITH_THE_USER = "a full-duplex stream ends when the user's frames end (stop feeding frames, or pass fewer to generate)"
_NOT_A_SEQUENCE = "the session returns one step's tokens per call (see MoshiStreamStepOutput), not a sequence"
# Every other field of Transformers' GenerationConfig, with why it is refused; a value that changes nothing
# (the field's neutral value) is accepted.
REFUSED_FIELDS: dict[str, tuple[object, str]] = {
    "max_length": (None, _ENDS_WITH_THE_USER),
    "max_new_tokens": (None, _ENDS_WITH_THE_USER),
    "min_length": (None, _ENDS_WITH_THE_USER),
    "min_new_tokens": (None, _ENDS_WITH_THE_USER),
    "max_time": (None, _ENDS_WITH_THE_USER),
    "stop_strings": (None, _ENDS_WITH_THE_USER),
    "eos_token_id": (None, _ENDS_WITH_THE_USER),
    "forced_eos_token_id": (None, _ENDS_WITH_THE_USER),
    "early_stopping": (None, _ENDS_WITH_THE_USER),
    "exponential_decay_length_penalty": (None, _ENDS_WITH_THE_USER),
    "bos_token_id": (None, "the streams start from the model's initial tokens (config.initial_token_id)"),
    "pad_token_id": (None, "Moshi's text padding is config.existing_text_padding_id"),
    "decoder_start_token_id": (None, "Moshi is not an encoder-decoder"),
    "forced_bos_token_id": (None, "the streams start from the model's initial tokens"),
    "begin_suppress_tokens": (None, "use suppress_tokens (the stream has no prompt to begin after)"),
    "no_repeat_ngram_size": (0, "the text stream repeats its padding between every word, so n-gram bans would ban "
                                "padding; use repetition_penalty (which ignores padding)"),
    "encoder_no_repeat_ngram_size": (0, "Moshi is not an encoder-decoder"),
    "encoder_repetition_penalty": (1.0, "Moshi is not an encoder-decoder"),
    "force_words_ids": (None, "constrained beam search is not implemented on Moshi's streams"),
    "constraints": (None, "constrained beam search is not implemented on Moshi's streams"),
    "guidance_scale": (1.0, "the model has no conditioning to guide on (moshi's conditioners are not supported)"),
    "use_cache": (True, "streaming always uses its ring-buffer KV cache"),
    "cache_implementation": (None, "the session uses its own ring-buffer KV cache (config.streaming_window)"),
    "cache_config": (None, "the session uses its own ring-buffer KV cache (config.streaming_window)"),
    "max_cache_len": (None, "the session's KV cache holds config.streaming_window positions"),
    "compile_config": (None, "the streaming step is replayed as CUDA graphs instead (cuda_graphs=)"),
    "disable_compile": (None, "the streaming step is replayed as CUDA graphs instead (cuda_graphs=)"),
    "prefill_chunk_size": (None, "there is no prompt to prefill: frames arrive one at a time"),
    "continuous_batching_config": (None, "use `serve --max-conversations` (RealtimeEngine) for continuous batching"),
    "low_memory": (None, "contrastive search runs its top_k * top_k candidate slots in one batch"),
    "dola_layers": (None, "DoLa decoding is not implemented on Moshi's streams"),
    "token_healing": (None, "there is no prompt to heal"),
    "watermarking_config": (None, "watermarking is not implemented on Moshi's streams"),
    "output_attentions": (False, _NOT_A_SEQUENCE),
    "output_hidden_states": (False, _NOT_A_SEQUENCE),
    "output_scores": (False, _NOT_A_SEQUENCE),
    "output_logits": (False, _NOT_A_SEQUENCE),
    "return_dict_in_generate": (False, _NOT_A_SEQUENCE),
    **{name: (None, "assisted decoding is not implemented: speculate_top_k is this model's speculation")
       for name in ("assistant_confidence_threshold", "assistant_early_exit", "assistant_ensemble_weight",
                    "assistant_lookbehind", "is_assistant", "max_matching_ngram_size", "num_assistant_tokens",
                    "num_assistant_tokens_schedule", "prompt_lookup_num_tokens", "speculation_type",
                    "target_lookbehind", "use_mtp")},
}


class MoshiUserPredGenerationConfig(GenerationConfig):
    r"""Sampling settings of the three streams, plus speculation and gap filling.

    Every field of Transformers' `GenerationConfig` is either honoured or refused:

    - the sampling fields (`do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, `typical_p`, `epsilon_cutoff`,
      `eta_cutoff`, `top_h`) set the **text** stream, as in any Transformers LM; the same fields prefixed with
      `audio_` set the system's audio codebooks and with `user_` the user prediction;
    - `repetition_penalty`, `bad_words_ids`, `sequence_bias` and `suppress_tokens` act on the text stream (its last
      `repetition_history` tokens are their `input_ids`, padding included: a multi-word sequence must spell the
      padding between its words). The repetition penalty never applies to the padding and end-of-padding ids, which
      Moshi writes between all words (and which fill the history before the conversation started);
    - `audio_suppress_tokens` and `user_suppress_tokens` ban audio tokens of the system's codebooks and of the user
      prediction (the user prediction's probabilities, entropy, speculation candidates and turn-taking signal read the
      raw logits). There is no `audio_`/`user_` `bad_words_ids` or `sequence_bias`: on those streams the processors'
      `input_ids` are one frame's codebooks, each with its own vocabulary, so a multi-token word means nothing;
    - `remove_invalid_values` and `renormalize_logits` act on all three streams;
    - `num_beams`, `num_beam_groups`, `diversity_penalty`, `length_penalty`, `num_return_sequences` and
      `penalty_alpha` (with `top_k` candidates) search the text stream, in `generate` only (see
      `generation_moshi_search.py`; the text stream must then be greedy: `do_sample=False`);
    - every other field (lengths and stop criteria, assisted decoding, cache and compile
      settings, output flags) raises a `ValueError` naming it and saying why, unless it holds its neutral value
      (e.g. `num_beams=1`).

    Defaults are moshi's (`LMGen`): text temperature 0.7 / top-k 25, audio 0.8 / 250, both sampled; the user
    prediction is greedy (the most likely next user token) by default.

    Args:
        speculate_top_k (`int`, defaults to 0): how many candidate next user tokens to precompute the next
            step for (0 turns speculation off). Needs a user branch with lookahead 1.
        gap_fill_threshold (`float`, *optional*): turns gap filling on: `step(None)` substitutes each predicted
            user token whose probability is at least this, else `gap_fill_fallback_token`.
        gap_fill_fallback_token (`int`, defaults to -1): token used for rows below the threshold (-1: zero token).
        repetition_history (`int`, defaults to 250): how many past text tokens the text processors see as
            `input_ids` (a fixed window keeps memory flat; entries before the conversation started hold the padding id).
        predict_user (`bool`, defaults to True): run the user branch. False switches it off at run time: the
            session never runs the user Depformer, so it neither predicts, speculates (`speculate_top_k` is then
            ignored) nor gap-fills from predictions (a missing frame gets `gap_fill_fallback_token`); the text and
            system audio are those of moshi's `LMGen`.
        max_turn_words (`int`, *optional*): after this many words since the user last spoke, the text stream is held
            on padding until the user speaks (a word starts at a text token that is neither padding nor
            end-of-padding after one that is; one that has started finishes). Needs `turn_taking_table` (the user's
            voice activity).
        min_silence_frames (`int`, defaults to 0): user frames of silence before the system may start a new turn (its
            first word since the user last spoke). Needs `turn_taking_table`.
        turn_hold_threshold (`float`, *optional*): turn-conditioned generation: the system may not start a word while
            the user branch's P(the user's turn ends within the horizon) is below this (before its first prediction
            it counts as 0). Needs the user branch and a signal: the model's voice-activity head, or `turn_taking_table`.

        The three share one hold: the text token is forced to padding while a hold applies and the last text token
        was padding or end-of-padding, so no word starts. The session reads the user's voice activity from the
        delay-0 user token of each frame (silent where `turn_taking_table[token, 0] >= 0.5`, and for the zero token)
        and the turn-end probability from the step's voice-activity head (or, without one, the table under the step's
        user prediction); a step's hold uses what was known after the
        previous step (the user's frames up to the previous one), so speculation stays lossless.

    Raises:
        ValueError: a field that neither Transformers' `GenerationConfig` nor this class defines, or a standard field
            the streams cannot honour (named, with the reason).
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("do_sample", True)
        if kwargs["do_sample"]:
            kwargs.setdefault("temperature", 0.7)
            kwargs.setdefault("top_k", 25)
        defaults = {"audio_do_sample": True, "audio_temperature": 0.8, "audio_top_k": 250, "user_do_sample": False,
                    "user_temperature": 1.0, "user_top_k": None}
        for prefix in ("audio_", "user_"):
            for name in SAMPLING_FIELDS:
                setattr(self, prefix + name, kwargs.pop(prefix + name, defaults.get(prefix + name)))
        self.speculate_top_k = kwargs.pop("speculate_top_k", 0)
        self.gap_fill_threshold = kwargs.pop("gap_fill_threshold", None)
        self.gap_fill_fallback_token = kwargs.pop("gap_fill_fallback_token", -1)
        self.repetition_history = kwargs.pop("repetition_history", 250)
        self.predict_user = kwargs.pop("predict_user", True)
        for name in AUDIO_USER_FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        self.max_turn_words = kwargs.pop("max_turn_words", None)
        self.min_silence_frames = kwargs.pop("min_silence_frames", 0)
        self.turn_hold_threshold = kwargs.pop("turn_hold_threshold", None)
        super().__init__(**kwargs)
        unknown = sorted(set(vars(self)) - _known_fields())
        if unknown:
            raise ValueError(f"unknown generation config field(s) {unknown}: text fields are Transformers' "
                             f"{list(SAMPLING_FIELDS)} and repetition_penalty, audio and user fields take the "
                             "prefixes 'audio_' and 'user_'")
        refused = [f"{name}={getattr(self, name)!r} ({reason})" for name, (neutral, reason) in REFUSED_FIELDS.items()
                   if getattr(self, name, None) not in (None, neutral)]
        if refused:
            raise ValueError(f"generation config field(s) the streams cannot honour: {'; '.join(refused)}")

    @classmethod
    def from_model_config(cls, model_config) -> "MoshiUserPredGenerationConfig":
        # The model config holds architecture only; generation defaults are moshi's.
        return cls()

    def validate(self, strict: bool = False, **kwargs) -> None:
        super().validate(strict=strict, **kwargs)
        _check_search_fields(self)
        if not isinstance(self.speculate_top_k, int) or self.speculate_top_k < 0:
            raise ValueError(f"speculate_top_k={self.speculate_top_k!r}: must be an integer >= 0")
        if self.gap_fill_threshold is not None and not 0.0 <= self.gap_fill_threshold <= 1.0:
            raise ValueError(f"gap_fill_threshold={self.gap_fill_threshold!r}: must be a probability in [0, 1]")
        if not isinstance(self.repetition_history, int) or self.repetition_history < 1:
            raise ValueError(f"repetition_history={self.repetition_history!r}: must be an integer >= 1")
        if not isinstance(self.predict_user, bool):
            raise ValueError(f"predict_user={self.predict_user!r}: must be True or False")
        for name in AUDIO_USER_FIELDS:
            tokens = getattr(self, name)
            if tokens is not None and not (isinstance(tokens, (list, tuple)) and all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)):
                raise ValueError(f"{name}={tokens!r}: must be a list of audio token ids (integers >= 0)")
        if self.max_turn_words is not None and (not _is_int(self.max_turn_words) or self.max_turn_words < 1):
            raise ValueError(f"max_turn_words={self.max_turn_words!r}: must be an integer >= 1 (or None)")
        if not _is_int(self.min_silence_frames) or self.min_silence_frames < 0:
            raise ValueError(f"min_silence_frames={self.min_silence_frames!r}: must be an integer >= 0")
        threshold = self.turn_hold_threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"turn_hold_threshold={threshold!r}: must be a probability in [0, 1] (or None)")

    @property
    def holds_turns(self) -> bool:
        """Whether a turn setting can hold the text stream."""
        return (self.max_turn_words is not None or self.min_silence_frames > 0
                or self.turn_hold_threshold is not None)

    def stream_settings(self, stream: str) -> dict:
        """The sampling fields of `stream` ("text", "audio" or "user") without prefix."""
        prefix = "" if stream == "text" else stream + "_"
        return {name: getattr(self, prefix + name) for name in SAMPLING_FIELDS}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_search_fields(config: GenerationConfig) -> None:
    """The search fields' values (None stands for the neutral value), each named in the error."""
    beams, groups, returned = (1 if getattr(config, name) is None else getattr(config, name)
                               for name in ("num_beams", "num_beam_groups", "num_return_sequences"))
    diversity, alpha, length = config.diversity_penalty, config.penalty_alpha, config.length_penalty
    if not _is_int(beams) or beams < 1:
        raise ValueError(f"num_beams={beams!r}: must be an integer >= 1")
    if not _is_int(groups) or groups < 1 or beams % groups:
        raise ValueError(f"num_beam_groups={groups!r}: must be an integer >= 1 that divides num_beams={beams}")
    if diversity is not None and (not _is_real(diversity) or diversity < 0 or (diversity > 0 and groups == 1)):
        raise ValueError(f"diversity_penalty={diversity!r}: must be a number >= 0, and > 0 only with "
                         "num_beam_groups > 1")
    if length is not None and not (_is_real(length) and math.isfinite(length)):
        raise ValueError(f"length_penalty={length!r}: must be a finite number")
    if not _is_int(returned) or not 1 <= returned <= beams:
        raise ValueError(f"num_return_sequences={returned!r}: must be an integer in [1, num_beams={beams}]")
    if alpha is not None and (not _is_real(alpha) or not 0 <= alpha <= 1):
        raise ValueError(f"penalty_alpha={alpha!r}: must be a number in [0, 1]")
    if alpha and (beams > 1 or not _is_int(config.top_k) or config.top_k < 2):
        raise ValueError(f"penalty_alpha={alpha!r}: contrastive search needs top_k >= 2 candidates (top_k="
                         f"{config.top_k!r}) and num_beams=1 (num_beams={beams})")
    if (beams > 1 or alpha) and config.do_sample:
        asked = f"num_beams={beams}" if beams > 1 else f"penalty_alpha={alpha!r}"
        raise ValueError(f"{asked} with do_sample=True: beam and contrastive search choose the text tokens "
                         "themselves; pass do_sample=False (audio_do_sample still samples the audio)")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _known_fields() -> set[str]:
    own = {p + n for p in ("audio_", "user_") for n in SAMPLING_FIELDS}
    own |= {"speculate_top_k", "gap_fill_threshold", "gap_fill_fallback_token", "repetition_history", "predict_user",
            *AUDIO_USER_FIELDS, *TURN_FIELDS}
    return set(vars(GenerationConfig())) | own | {"transformers_version", "_from_model_config", "_commit_hash"}


class MoshiRepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """Transformers' repetition penalty (CTRL's: divide a positive score, multiply a negative one, by `penalty` for
    every token in `input_ids`), except for `exempt_ids`: Moshi's text padding and end-of-padding, which it writes
    between every two words, and which fill the history before the conversation started."""

    def __init__(self, penalty: float, exempt_ids: tuple[int, ...]):
        if not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty={penalty!r}: must be a positive float")
        self.penalty, self.exempt_ids = float(penalty), list(exempt_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        seen = scores.gather(1, input_ids)
        penalized = scores.scatter(1, input_ids, torch.where(seen < 0, seen * self.penalty, seen / self.penalty))
        penalized[:, self.exempt_ids] = scores[:, self.exempt_ids]
        return penalized


def build_logits_processor(
    config: MoshiUserPredGenerationConfig,
    stream: str,
    custom: LogitsProcessorList | None = None,
    padding_ids: tuple[int, ...] = (),
) -> LogitsProcessorList:
    """Transformers processors for one stream ("text", "audio" or "user"), in `generate`'s order: invalid values,
    penalties and bans (text; the suppressed tokens on audio and user), the user's own processors, then (when
    sampling) the warpers, then renormalisation.

    Args:
        padding_ids: the text padding and end-of-padding ids, exempt from the repetition penalty.
    """
    settings = config.stream_settings(stream)
    processors = LogitsProcessorList()
    if config.remove_invalid_values:
        processors.append(InfNanRemoveLogitsProcessor())
    if stream == "text":
        if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
            processors.append(MoshiRepetitionPenaltyLogitsProcessor(config.repetition_penalty, padding_ids))
        if config.sequence_bias:
            processors.append(SequenceBiasLogitsProcessor(config.sequence_bias))
        if config.bad_words_ids:
            processors.append(NoBadWordsLogitsProcessor(config.bad_words_ids))
        if config.suppress_tokens:
            processors.append(SuppressTokensLogitsProcessor(config.suppress_tokens))
    elif getattr(config, f"{stream}_suppress_tokens"):
        processors.append(SuppressTokensLogitsProcessor(getattr(config, f"{stream}_suppress_tokens")))
    processors.extend(custom or [])
    if settings["do_sample"]:
        if settings["temperature"] is not None and settings["temperature"] != 1.0:
            processors.append(TemperatureLogitsWarper(settings["temperature"]))
        if settings["top_k"]:
            processors.append(TopKLogitsWarper(settings["top_k"]))
        if settings["top_p"] is not None and settings["top_p"] < 1.0:
            processors.append(TopPLogitsWarper(settings["top_p"]))
        if settings["min_p"] is not None:
            processors.append(MinPLogitsWarper(settings["min_p"]))
        if settings["typical_p"] is not None and settings["typical_p"] < 1.0:
            processors.append(TypicalLogitsWarper(settings["typical_p"]))
        if settings["epsilon_cutoff"]:
            processors.append(EpsilonLogitsWarper(settings["epsilon_cutoff"]))
        if settings["eta_cutoff"]:
            processors.append(EtaLogitsWarper(settings["eta_cutoff"]))
        if settings["top_h"]:
            processors.append(TopHLogitsWarper(settings["top_h"]))
    if config.renormalize_logits:
        processors.append(LogitNormalization())
    return processors


def sample_from_scores(scores: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Token from processed scores `[..., V]`: argmax without `noise`, else the exponential race
    `argmax(softmax(scores) / noise)` with `noise ~ Exp(1)` `[..., V]` (a sample of `softmax(scores)`, as in
    moshi). Passing the noise in makes a sample a deterministic function of (scores, noise): speculation reuses
    the noise a normal step would have drawn."""
    if noise is None:
        return scores.argmax(dim=-1)
    return (torch.softmax(scores.float(), dim=-1) / noise).argmax(dim=-1)


__all__ = [
    "AUDIO_USER_FIELDS",
    "REFUSED_FIELDS",
    "MoshiRepetitionPenaltyLogitsProcessor",
    "MoshiUserPredGenerationConfig",
    "SAMPLING_FIELDS",
    "SCORE_FIELDS",
    "SEARCH_FIELDS",
    "TEXT_FIELDS",
    "TURN_FIELDS",
    "STREAMS",
    "build_logits_processor",
    "sample_from_scores",
]
