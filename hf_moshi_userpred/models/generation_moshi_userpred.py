"""Inference entry points of [`MoshiUserPredForConditionalGeneration`]: `streaming` opens a
[`MoshiStreamingSession`], `generate` runs one over a whole user recording.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.utils import ModelOutput
from transformers.utils.logging import tqdm

from .generation_moshi_config import SAMPLING_FIELDS, SEARCH_FIELDS, MoshiUserPredGenerationConfig
from .generation_moshi_persona import MoshiPersonaPrompt
from .generation_moshi_search import requests_search, search_generate
from .generation_moshi_step_output import MoshiStreamStepOutput, SpeculationStats
from .generation_moshi_streaming import MoshiStreamingSession
from .generation_moshi_text_constraints import WordTokenizer
from .modeling_moshi_codes import check_codes


@dataclass
class MoshiGenerateOutput(ModelOutput):
    r"""Result of [`MoshiUserPredGenerationMixin.generate`] over `T` user frames.

    Args:
        text_tokens (`torch.LongTensor` `[B, T - max(delays)]`): the text stream, frame-aligned with `audio_codes`.
        audio_codes (`torch.LongTensor` `[B, dep_q, T - max(delays)]`): the system's audio codebooks.
        user_prediction (`torch.LongTensor` `[B, user_dep_q, T]`): at call `o`, the prediction for the position
            `o + L` (see [`MoshiStreamStepOutput`]).
        user_probs, user_entropy (`torch.FloatTensor` `[B, user_dep_q, T]`).
        user_silence (`torch.FloatTensor` `[B, horizon, T]`, *optional*): at call `o`, the turn-taking signal's
            P(the user is silent `n - 1` frames after the predicted frame) (see [`MoshiUserTurnOutput`]); None without
            a signal (neither a voice-activity head nor `turn_taking_table`).
        user_turn_end (`torch.FloatTensor` `[B, T]`, *optional*): P(the user's turn ends within the horizon).
        speculation ([`SpeculationStats`]).
        sequences_scores (`torch.FloatTensor` `[B * n]`, *optional*): beam and contrastive search only: the
            hypothesis's summed text log-probabilities (with the diversity penalties) divided by
            `T ** length_penalty`; with `num_return_sequences=n`, every field has the `n` best hypotheses of input `b`
            in rows `b * n .. b * n + n - 1`.
    """

    text_tokens: torch.Tensor | None = None
    audio_codes: torch.Tensor | None = None
    user_prediction: torch.Tensor | None = None
    user_probs: torch.Tensor | None = None
    user_entropy: torch.Tensor | None = None
    user_silence: torch.Tensor | None = None
    user_turn_end: torch.Tensor | None = None
    speculation: SpeculationStats | None = None
    sequences_scores: torch.Tensor | None = None

    @classmethod
    def from_steps(
        cls,
        steps: Sequence[tuple[MoshiStreamStepOutput, MoshiStreamStepOutput, torch.Tensor | None]],
        batch_size: int,
        dep_q: int,
        device: torch.device,
        speculation: SpeculationStats,
        **fields,
    ) -> MoshiGenerateOutput:
        """Stack a session's steps along time: each entry is (the step's output, the output of its look-ahead (the same
        object when the step ran it), the slots to keep `[batch_size]` or None for all of them)."""
        columns: dict[str, list[torch.Tensor]] = {name: [] for name in (
            "text_tokens", "audio_codes", "user_prediction", "user_probs", "user_entropy", "user_silence",
            "user_turn_end")}

        def keep(values: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
            return values if slots is None else values[slots]

        for step, ahead, slots in steps:
            if step.tokens is not None:
                tokens = keep(step.tokens, slots)
                columns["text_tokens"].append(tokens[:, 0, 0])
                columns["audio_codes"].append(tokens[:, 1:, 0])
            if ahead.user_prediction is not None:
                for name in ("user_prediction", "user_probs", "user_entropy"):
                    columns[name].append(keep(getattr(ahead, name), slots)[..., -1])
            if ahead.user_turn is not None:
                columns["user_silence"].append(keep(ahead.user_turn.silence, slots))
                columns["user_turn_end"].append(keep(ahead.user_turn.turn_end, slots))
        stacked = {name: torch.stack(values, dim=-1) if values else None for name, values in columns.items()}
        if stacked["text_tokens"] is None:  # every slot still warming up: empty streams, not None
            stacked["text_tokens"] = torch.empty(batch_size, 0, dtype=torch.long, device=device)
            stacked["audio_codes"] = torch.empty(batch_size, dep_q, 0, dtype=torch.long, device=device)
        return cls(**stacked, speculation=speculation, **fields)


class MoshiUserPredGenerationMixin:
    """Streaming (`streaming`) and offline (`generate`) inference for [`MoshiUserPredForConditionalGeneration`].

    The class name must contain "GenerationMixin": Transformers' `PreTrainedModel.can_generate()` looks for that
    substring among the model's base classes, and only a model that can generate gets its `generation_config`
    loaded from `generation_config.json` and saved with it.
    """

    generation_config_class = MoshiUserPredGenerationConfig

    def _resolve_generation_config(self, generation_config: GenerationConfig | None, **kwargs):
        base = self.generation_config if generation_config is None else generation_config
        if not isinstance(base, GenerationConfig):
            raise ValueError(f"generation_config must be a GenerationConfig, got {type(base).__name__}")
        values = base.to_dict()
        if not kwargs.get("do_sample", values.get("do_sample", True)):
            # Greedy text: the inherited warpers are irrelevant (and Transformers warns about them).
            for name in SAMPLING_FIELDS[1:]:
                values.pop(name, None)
        values.update(kwargs)
        for key in ("transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash"):
            values.pop(key, None)
        config = MoshiUserPredGenerationConfig(**values)
        config.validate()
        c = self.config
        if c.text_card_out > c.text_card:
            raise ValueError(f"text_card_out={c.text_card_out} > text_card={c.text_card}: sampled text tokens could "
                             "not be fed back to the model, so it cannot stream")
        if config.speculate_top_k and config.predict_user:  # without user prediction there is nothing to speculate on
            if not c.predict_user_audio or c.user_prediction_lookahead != 1:
                raise ValueError(f"speculate_top_k={config.speculate_top_k} needs a user branch with "
                                 f"user_prediction_lookahead=1 (predict_user_audio={c.predict_user_audio}, "
                                 f"lookahead={c.user_prediction_lookahead})")
            user_delays = c.delays[1 + c.dep_q :]
            if user_delays[0] != 0 or user_delays.count(0) != 1:
                raise ValueError(f"speculation needs exactly one delay-0 user codebook, the first; user delays "
                                 f"are {user_delays}")
            if config.speculate_top_k > c.card:
                raise ValueError(f"speculate_top_k={config.speculate_top_k} exceeds the audio vocabulary ({c.card})")
        if config.gap_fill_threshold is not None and any(d > 1 for d in c.delays[1 + c.dep_q :]):
            raise ValueError(f"gap filling supports user delays 0 and 1, got {c.delays[1 + c.dep_q:]}")
        return config

    @contextlib.contextmanager
    def streaming(
        self,
        batch_size: int = 1,
        generation_config: GenerationConfig | None = None,
        *,
        text_logits_processor: LogitsProcessorList | None = None,
        audio_logits_processor: LogitsProcessorList | None = None,
        user_logits_processor: LogitsProcessorList | None = None,
        seed: int | None = None,
        cuda_graphs: bool | None = None,
        turn_taking_table: torch.Tensor | None = None,
        prompt_text: str | Sequence[Sequence[int]] | None = None,
        tokenizer: WordTokenizer | None = None,
        persona: MoshiPersonaPrompt | None = None,
        **kwargs,
    ) -> Iterator[MoshiStreamingSession]:
        """Open `batch_size` real-time conversations ("slots"): `with model.streaming(B) as stream: out =
        stream.step(frame)`.

        Args:
            batch_size: number of independent slots (a server `reset`s and pauses each on its own).
            generation_config: a [`MoshiUserPredGenerationConfig`] (or any `GenerationConfig`: its fields are read
                with the same names); default `model.generation_config`.
            text_logits_processor, audio_logits_processor, user_logits_processor: extra Transformers processors of
                each token stream, applied after the penalties and before the sampling warpers. Text processors see
                the last `repetition_history` text tokens as `input_ids`; audio and user processors see the Depformer's
                sequence of the frame so far (the text token, then the codebooks already chosen).
            seed: seeds the session's sampling generator (reproducible sampling).
            cuda_graphs: replay the critical-path step (main transformer, text sampling, system Depformer) as CUDA
                graphs, one per shape; default: on for a CUDA model.
            turn_taking_table (`torch.FloatTensor` `[card, horizon + 1]`, *optional*): `TurnTakingStatistics.table()`
                (turn_taking.py): each step's output then carries `user_turn` (with the user branch; a model with a
                voice-activity head always does, from its head), and `max_turn_words` / `min_silence_frames` read the
                user's voice activity from it.
            prompt_text: what every slot says first (`stream.say(prompt_text)` before the first step): a string
                (needs `tokenizer`) or words as token ids.
            tokenizer: the default tokenizer of `stream.say` (e.g. `load_tokenizer(folder / "tokenizer.model")`).
            persona: a persona prompt (a voice and a role, `MoshiPersonaPrompt.build`) every slot starts from
                (`stream.prompt(persona)`; per slot: `stream.prompt(persona, mask=...)` after a `reset`).
            **kwargs: generation config fields overriding `generation_config` (e.g. `speculate_top_k=4`).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        base = self.generation_config if generation_config is None else generation_config
        searching = [f"{name}={value!r}" for name, neutral in SEARCH_FIELDS.items()
                     if (value := kwargs.get(name, getattr(base, name, None))) not in (None, neutral)]
        if searching:
            raise ValueError(f"{', '.join(searching)}: beam and contrastive search run offline, in model.generate "
                             "(num_beams > 1 or penalty_alpha > 0): a real-time stream cannot wait for a beam to "
                             "finish")
        config = self._resolve_generation_config(generation_config, **kwargs)
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        elif cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {self.device}")
        processors = {"text": text_logits_processor, "audio": audio_logits_processor, "user": user_logits_processor}
        session = MoshiStreamingSession(self, batch_size, config, processors, generator, cuda_graphs,
                                        turn_taking_table=turn_taking_table, tokenizer=tokenizer)
        if persona is not None:
            session.prompt(persona)
        if prompt_text is not None:
            session.say(prompt_text)
        try:
            yield session
        finally:
            session.close()

    @torch.no_grad()
    def generate(
        self,
        user_codes: torch.Tensor,
        generation_config: GenerationConfig | None = None,
        *,
        progress: bool = True,
        seed: int | None = None,
        forced_text: Mapping[int, str | Sequence[Sequence[int]]] | None = None,
        **kwargs,
    ) -> MoshiGenerateOutput:
        """Run the streaming loop over a whole user stream (offline convenience). With `num_beams > 1` or
        `penalty_alpha > 0` (and `do_sample=False`), beam, diverse beam or contrastive search over the text stream
        instead (`generation_moshi_search.search_generate`; the output then has `sequences_scores`).

        Args:
            user_codes: `[B, n_q - dep_q, T]` the user's Mimi tokens.
            generation_config, seed, **kwargs: as for `streaming` (processors, `turn_taking_table`, `prompt_text`,
                `tokenizer` and `persona` included).
            progress: show a progress bar.
            forced_text: `{call: text}`: every slot says `text` from call `call` on (`stream.say(text)` before that
                step; a string needs `tokenizer`).

        Returns:
            [`MoshiGenerateOutput`].
        """
        c = self.config
        user_codes = check_codes(user_codes, c, name="user_codes", first_row=1 + c.dep_q)
        B, _, T = user_codes.shape
        forced_text = dict(forced_text or {})
        late = [call for call in forced_text if not isinstance(call, int) or not 0 <= call < T]
        if late:
            raise ValueError(f"forced_text calls {late} are not calls of this stream (0 .. {T - 1})")
        if requests_search(self.generation_config if generation_config is None else generation_config, kwargs):
            return search_generate(self, user_codes, generation_config, progress=progress, seed=seed,
                                   forced_text=forced_text, **kwargs)
        steps = []
        with self.streaming(B, generation_config, seed=seed, **kwargs) as stream:
            for t in tqdm(range(T), desc="streaming", unit="frame", disable=not progress):
                if t in forced_text:
                    stream.say(forced_text[t])
                out = stream.step(user_codes[:, :, t : t + 1])
                steps.append((out, out, None))
        return MoshiGenerateOutput.from_steps(steps, B, c.dep_q, self.device, stream.stats)

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             cache_dir=None, force_download=False, proxies=None, local_files_only=False, token=None,
                             revision=None, subfolder="", trust_remote_code=None, **kwargs) -> None:
        """Called by `from_pretrained`: load the saved `generation_config.json` into our config class."""
        if generation_config is not None:
            self.generation_config = MoshiUserPredGenerationConfig(**generation_config.to_diff_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        try:
            self.generation_config = MoshiUserPredGenerationConfig.from_pretrained(
                pretrained_model_name_or_path, cache_dir=cache_dir, force_download=force_download, proxies=proxies,
                local_files_only=local_files_only, token=token, revision=revision, subfolder=subfolder,
            )
        except OSError:
            pass  # no generation_config.json: keep moshi's defaults



__all__ = ["MoshiGenerateOutput", "MoshiUserPredGenerationMixin"]
