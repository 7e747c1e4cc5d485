"""Persona prompts from files: a role text and a voice sample, as the codes of a `MoshiPersonaPrompt`.

PersonaPlex's procedure (models/generation_moshi_persona.py): the voice sample's Mimi codes in the agent's rows, the
role `<system> {text} <system>` through the text tokenizer, the agent's silence and the user's sine tone around
them. A voice is a 24 kHz WAV (loudness-normalised, then encoded with the model's Mimi) or its codes saved as a
`.npy` array `[dep_q, frames]`; a `--voice-prompt-dir` holds several, named by their file stem.

    personas = PersonaLibrary(model.config, mimi, tokenizer, voice_dir="voices/")
    prompt = personas.prompt("You are a patient math tutor.", "NATF2")
    with model.streaming(1, persona=prompt) as stream: ...
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import sentencepiece
import soundfile
import torch
from transformers import MimiModel

from ..models.generation_moshi_persona import MoshiPersonaPrompt, role_text
from .audio import check_audio_file, check_mimi, load_mono

VOICE_SUFFIXES = (".wav", ".npy")
# PersonaPlex normalises a voice sample to -24 LUFS. An RMS level stays within about a decibel of it on speech (the
# K-weighting mostly lifts frequencies above 1.5 kHz) and needs no loudness library.
VOICE_RMS_DBFS = -24.0
# The user's rows during a prompt: the codes of a steady tone, as PersonaPlex feeds (it ships them as constants for
# kyutai's Mimi; we encode the tone with the model's own Mimi).
SINE_HZ, SINE_AMPLITUDE = 440.0, 0.5
STEADY_SECONDS = 1.0  # a constant signal's codes settle within the encoder's receptive field; the last frame is kept


class PersonaLibrary:
    """Builds persona prompts for one model: its Mimi, its text tokenizer, and a folder of voices.

    Args:
        config: the model's [`MoshiUserPredConfig`] (`dep_q` agent and user codebooks, the vocabularies).
        mimi: the model's Mimi (voices and the silence and tone codes are encoded with it).
        tokenizer: the text tokenizer (needed for role texts).
        voice_dir: a folder of voices (`NAME.wav` at Mimi's rate, or `NAME.npy` codes); their codes are computed
            once, here, so a conversation's prompt costs no encoding.

    Raises:
        ValueError: a Mimi that does not fit the model, a missing voice folder, or a voice in it that is unusable
            (naming the file).
    """

    def __init__(self, config, mimi: MimiModel, tokenizer: sentencepiece.SentencePieceProcessor | None = None,
                 voice_dir: str | os.PathLike | None = None):
        check_mimi(mimi, config)
        self.config, self.mimi, self.tokenizer = config, mimi, tokenizer
        rate = mimi.config.sampling_rate
        steady = torch.arange(int(STEADY_SECONDS * rate), dtype=torch.float32) / rate
        self.silence_codes = self._encode(torch.zeros_like(steady), config.dep_q)[:, -1]
        sine = SINE_AMPLITUDE * torch.sin(2 * math.pi * SINE_HZ * steady)
        self.user_codes = self._encode(sine, config.n_q - config.dep_q)[:, -1]
        self.voices: dict[str, torch.Tensor] = {}
        if voice_dir is not None:
            folder = Path(voice_dir)
            if not folder.is_dir():
                raise ValueError(f"voice prompt folder {str(voice_dir)!r} does not exist or is not a folder")
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in VOICE_SUFFIXES:
                    self.voices[path.stem] = self.voice_codes(path)

    def voice_codes(self, path: str | os.PathLike) -> torch.Tensor:
        """The agent codes `[dep_q, frames]` of a voice file: a mono WAV at Mimi's rate (normalised to
        `VOICE_RMS_DBFS`, then encoded), or a `.npy` integer array of codes.

        Raises:
            ValueError: naming the file: missing, unreadable, another sample rate, silent, or codes of the wrong
                shape or range.
        """
        path = check_audio_file(path)  # a missing, empty or non-regular file, in one message
        dep_q, card = self.config.dep_q, self.config.card
        if path.suffix.lower() == ".npy":
            try:
                codes = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise ValueError(f"cannot read voice codes {path}: {error}") from error
            if codes.ndim != 2 or codes.shape[0] != dep_q or not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"voice codes {path} hold a {codes.dtype} array of shape {codes.shape}: expected "
                                 f"integers of shape [{dep_q}, frames]")
            if codes.size and (codes.min() < 0 or codes.max() >= card):
                raise ValueError(f"voice codes {path} hold a code outside 0..{card - 1}")
            return torch.from_numpy(codes.astype(np.int64))
        rate = self.mimi.config.sampling_rate
        try:
            found = soundfile.info(str(path)).samplerate
        except (soundfile.SoundFileError, RuntimeError) as error:
            raise ValueError(f"cannot read voice prompt {path}: {error}") from error
        if found != rate:
            raise ValueError(f"voice prompt {path} is sampled at {found} Hz: it must be at Mimi's {rate} Hz (resample "
                             f"it, e.g. `sox in.wav -r {rate} out.wav`)")
        audio = load_mono(path, rate)
        rms = float(audio.pow(2).mean().sqrt())
        if rms < 1e-4:
            raise ValueError(f"voice prompt {path} is silent: it must hold the voice to imitate")
        return self._encode(audio * (10 ** (VOICE_RMS_DBFS / 20) / rms), dep_q)

    def prompt(self, text: str | None = None, voice: str | os.PathLike | None = None) -> MoshiPersonaPrompt | None:
        """The persona prompt of a role `text` and a `voice`: a string names a voice of the folder (never a file, so
        a client naming "../secret.wav" reads nothing), a `Path` is a voice file. None when both are empty.

        Raises:
            ValueError: an unknown voice name (listing the folder's voices), a role text without a tokenizer, or an
                unusable voice file.
        """
        text = (text or "").strip()
        if not text and not voice:
            return None
        voice_codes = None
        if isinstance(voice, os.PathLike):
            voice_codes = self.voice_codes(voice)
        elif voice:
            if voice not in self.voices:
                known = ", ".join(self.voices) or "none (no voice prompt folder)"
                raise ValueError(f"unknown voice prompt {voice!r}: the voices are {known}")
            voice_codes = self.voices[voice]
        role = None
        if text:
            if self.tokenizer is None:
                raise ValueError("a role text needs the model's text tokenizer (tokenizer.model)")
            role = self.tokenizer.encode(role_text(text))
        return MoshiPersonaPrompt.build(self.config, silence_codes=self.silence_codes, user_codes=self.user_codes,
                                        role_tokens=role, voice_codes=voice_codes)

    @torch.no_grad()
    def _encode(self, audio: torch.Tensor, codebooks: int) -> torch.Tensor:
        """Mimi's first `codebooks` codes `[codebooks, frames]` of mono audio `[samples]` at Mimi's rate."""
        mimi = self.mimi
        encoded = mimi.encode(audio.to(mimi.device, mimi.dtype)[None, None], num_quantizers=codebooks)
        return encoded.audio_codes[0].long().cpu()


__all__ = ["PersonaLibrary", "SINE_HZ", "VOICE_RMS_DBFS", "VOICE_SUFFIXES"]
