"""Streaming a user recording through the model frame by frame, as a live session would (the `stream` command).

[`stream_user_audio`] reads the user's audio a block at a time, encodes it with the streaming Mimi encoder one 80 ms
frame at a time, hands the model's streaming session each frame in arrival order (optionally paced in real time,
like a microphone), with speculation on, and writes to `output_dir`:

    system.wav     the system's audio: Mimi decode of its `dep_q` codebooks, mono at Mimi's rate
    dialogue.wav   both speakers in moshi-finetune's layout: system on the left channel, user on the right
    text.txt       the system's text (its word tokens' ids when no tokenizer is given)
    frames.jsonl   one JSON object per user frame `t`: `frame`; `time_s` (where the frame starts in the user's
                   audio); `user_tokens` (the frame's delay-0 user tokens, as received); `predicted` (the user
                   branch's prediction of them, made at frame `t - 1`), `correct`, and its `probability` and
                   `entropy` (nats): lists over the predicted delay-0 codebooks, null at frame 0; `speculative`
                   ("hit", "miss" or "not_tried"); `critical_ms`; `text_token` (the text token emitted at this
                   frame, null during the first `max(delays)` frames) and `text` (its piece, "" for padding, null
                   without a tokenizer)
    summary.json   [`StreamResult.to_dict`]: hit rate, critical-path latencies, prediction accuracy, text, settings

The critical path measured here is the LM step from a frame's arrival (read and encoded) to the system's tokens
(the session's [`SpeculationStats`]); Mimi decodes the system's codes at the end. [`StreamResult`] (in
`stream_result.py`) holds what the run produced.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from transformers import MimiModel
from transformers.utils import logging
from transformers.utils.logging import tqdm

from ..data.audio import (
    FRAME_RATE,
    check_finite,
    check_mimi,
    check_tokenizer,
    load_mimi,
    load_tokenizer,
    padding_ids,
    read_mono_blocks,
    text_piece,
)
from ..models.configuration_moshi_userpred import FRAME_PERIOD_S
from ..models.generation_moshi_config import STREAMS
from ..models.generation_moshi_step_output import SpeculationStats
from ..utils.files import atomic_write, check_output_dir, write_json
from .audio_limiter import AudioLimiter
from .mimi_streaming import MimiStreamingCodec
from .stream_result import StreamResult, frame_statistics

logger = logging.get_logger(__name__)

OUTPUT_FILES = {
    "system_audio": "system.wav",
    "dialogue_audio": "dialogue.wav",
    "text": "text.txt",
    "frames": "frames.jsonl",
    "summary": "summary.json",
}


def stream_user_audio(
    model,
    user_audio: str | os.PathLike | torch.Tensor,
    output_dir: str | os.PathLike,
    *,
    mimi: str | os.PathLike | MimiModel,
    tokenizer: str | os.PathLike | sentencepiece.SentencePieceProcessor | None = None,
    channel: int | None = None,
    speculate_top_k: int = 4,
    realtime: bool = False,
    seed: int | None = 0,
    max_frames: int | None = None,
    progress: bool = True,
    **generation_kwargs,
) -> StreamResult:
    """Streams a user recording through `model` one Mimi frame at a time and writes what the system produced.

    The audio is read a block at a time and cut into Mimi frames, each encoded once it is complete by the streaming
    Mimi encoder of the live server ([`MimiStreamingCodec`]), keeping the model's `n_q - dep_q` user codebooks;
    frame `t` is then handed to `model.streaming(1, ...)` as a live session would receive it. Only the frames
    streamed are read and encoded (`max_frames=10` of a two-hour file reads its first second). The codes are those
    of a one-shot `MimiModel.encode` of the recording zero-padded to whole frames: the frame count and every whole
    frame's codes are the one-shot encode's of the recording itself, while its last, partial frame, which one-shot
    pads layer by layer instead, may get other codes (as would a live microphone's last frame ended by silence).
    With greedy settings (`do_sample=False, audio_do_sample=False`) the system's tokens are exactly those of
    `model.generate` on the same codes: speculation only changes the critical path.

    In dialogue.wav, system frame `j` (the `j`-th frame of `audio_codes`) starts with user frame `j + 1`: the
    alignment of the training data (user frame `f` of a session plays training frame `f - 1`, docs/design.md §2). Live,
    each system frame is heard `max(delays)` frames later, once the user frames it depends on have arrived.

    Args:
        model ([`MoshiUserPredForConditionalGeneration`]): the model, on the device to stream on.
        user_audio: the user's recording: an audio file (any rate, resampled to Mimi's; mono unless `channel` is
            given), or a 1-D float tensor `[num_samples]` already at Mimi's sampling rate.
        output_dir: where the files go (created if needed; existing files of the same names are replaced).
        mimi: a `MimiModel`, a local folder or a Hub repo id: the codec the model was trained with (moved to the
            model's device).
        tokenizer: the text tokenizer (sentencepiece `.model` or processor) to write the text with; without one,
            text.txt holds the word tokens' ids.
        channel (`int`, *optional*): the channel to take from a multi-channel file (1 is the user of a
            moshi-finetune dialogue).
        speculate_top_k (`int`): candidate next user tokens the session precomputes each frame (0: off).
        realtime (`bool`): hand frame `t` to the model `t` frame periods (80 ms each) after frame 0, as a live
            microphone delivers them, instead of as fast as possible.
        seed (`int`, *optional*): sampling seed of the session (None: random).
        max_frames (`int`, *optional*): stream at most this many frames.
        progress (`bool`): show a progress bar.
        **generation_kwargs: generation config fields for `model.streaming` (e.g. `do_sample=False`,
            `audio_temperature=0.6`), or `generation_config=` and the logits processors it takes.

    Returns:
        [`StreamResult`].

    Raises:
        ValueError: if the audio cannot be read, is empty, holds a NaN or infinite sample (naming its time; no file
            is written), or has several channels and no `channel` picks one (or `channel` comes with a tensor); if
            Mimi or the tokenizer do not match the model (codebook size, number of codebooks, frame rate, text
            vocabulary) or Mimi cannot stream (see [`MimiStreamingCodec`]); if `max_frames` is not a positive
            integer, if `output_dir` is a file, or for invalid generation settings.
    """
    c = model.config
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames={max_frames!r}: must be a positive integer or None")
    check_output_dir(output_dir, overwrite=True)  # created once the stream is done
    output_dir = Path(output_dir)
    mimi = load_mimi(mimi, model.device)
    check_mimi(mimi, c)
    if tokenizer is not None:
        tokenizer = load_tokenizer(tokenizer)
        check_tokenizer(tokenizer, c)

    rate = mimi.config.sampling_rate
    blocks, seconds = _user_blocks(user_audio, rate, channel)
    codec = MimiStreamingCodec(mimi, 1, num_codebooks=c.n_q - c.dep_q)
    frames = itertools.islice(_user_frames(blocks, codec), max_frames)  # stops reading after max_frames
    expected = min(math.ceil(seconds * FRAME_RATE), max_frames or math.inf)  # for the progress bar
    streamed = _stream_frames(model, frames, expected, tokenizer, progress=progress, realtime=realtime,
                              speculate_top_k=speculate_top_k, seed=seed, **generation_kwargs)
    system_audio = _system_audio(mimi, streamed.audio_codes, codec.frame_size)
    result = StreamResult(
        output_dir=output_dir,
        text=_text(streamed.text_tokens.tolist(), tokenizer, c),
        text_tokens=streamed.text_tokens,
        audio_codes=streamed.audio_codes,
        user_codes=streamed.user_codes,
        frame_rate=FRAME_RATE,
        **frame_statistics(streamed.records, streamed.stats),
        wall_s=streamed.wall_s,
        settings={
            "user_audio": str(user_audio) if isinstance(user_audio, (str, os.PathLike)) else "tensor",
            "channel": channel,
            "model": str(model.name_or_path) or None,
            "mimi": str(mimi.name_or_path) or None,
            "speculate_top_k": speculate_top_k,
            "realtime": realtime,
            "seed": seed,
            "max_frames": max_frames,
            "persona_frames": 0 if generation_kwargs.get("persona") is None else generation_kwargs["persona"].num_frames,
            "sampling": streamed.sampling,
        },
        files={name: output_dir / filename for name, filename in OUTPUT_FILES.items()},
    )
    # the user's recording as it is (a float file may hold samples past full scale: those alone are clipped)
    dialogue = _dialogue(system_audio, np.clip(streamed.user_audio, -1.0, 1.0), result.num_frames, codec.frame_size)
    _write_outputs(result, streamed.records, system_audio, dialogue, rate)
    return result


def _user_blocks(
    user_audio: str | os.PathLike | torch.Tensor, rate: int, channel: int | None
) -> tuple[Iterable[np.ndarray], float]:
    """The user's audio at `rate` as float32 blocks `[n]`, read lazily from a file or the whole of a 1-D tensor,
    and its duration in seconds. Both are checked for NaN and infinite samples (a file's blocks as they are read)."""
    if isinstance(user_audio, (str, os.PathLike)):
        return read_mono_blocks(user_audio, rate, channel)
    if channel is not None:
        raise ValueError(f"channel={channel!r} picks a channel of an audio file; user_audio is already one signal")
    if not isinstance(user_audio, torch.Tensor):
        raise ValueError(f"user_audio must be a path or a 1-D float tensor, got {type(user_audio).__name__}")
    if user_audio.ndim != 1 or not user_audio.dtype.is_floating_point:
        raise ValueError(f"user_audio must be a 1-D float tensor [num_samples] at {rate} Hz, got shape "
                         f"{tuple(user_audio.shape)} and dtype {user_audio.dtype}")
    if user_audio.numel() == 0:
        raise ValueError("user_audio has no samples")
    audio = user_audio.detach().float().cpu().numpy()
    check_finite(audio, "user_audio", rate)
    return [audio], audio.size / rate


def _user_frames(blocks: Iterable[np.ndarray], codec: MimiStreamingCodec) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Cuts `blocks` into Mimi frames and encodes each once it is complete, as the live server does: yields the
    frame's samples (float32 `[frame_size]`, fewer for a last, partial frame, which is encoded zero-padded) and its
    codes `[num_codebooks]` (long, CPU). A block is read only when the frames before it are consumed.

    Raises:
        ValueError: if the blocks hold no sample at all (a file of one sample at four times Mimi's rate).
    """
    size = codec.frame_size

    def encode(samples: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        frame = torch.from_numpy(np.pad(samples, (0, size - samples.size)))[None].to(codec.device, codec.dtype)
        return samples, codec.encode(frame)[0, :, 0].long().cpu()

    pending, count = np.zeros(0, np.float32), 0
    for block in blocks:
        pending = np.concatenate([pending, block])
        whole = pending.size - pending.size % size
        for start in range(0, whole, size):
            yield encode(pending[start : start + size])
        pending, count = pending[whole:], count + whole // size
    if pending.size:
        yield encode(pending)
    elif count == 0:
        raise ValueError(f"the user's audio has no sample at Mimi's rate ({codec.mimi.config.sampling_rate} Hz)")


@dataclass
class _Streamed:
    """What a streaming session produced from the user frames: `records` (frames.jsonl, one per frame),
    `user_codes` `[n_q - dep_q, T]`, `user_audio` (the frames' samples `[num_samples]`, the last one's padding
    excluded), `text_tokens` `[T']`, `audio_codes` `[dep_q, T']`, `wall_s`, the session's `stats` and `sampling`
    settings."""

    records: list[dict]
    user_codes: torch.Tensor
    user_audio: np.ndarray
    text_tokens: torch.Tensor
    audio_codes: torch.Tensor
    wall_s: float
    stats: SpeculationStats
    sampling: dict


def _stream_frames(
    model,
    frames: Iterable[tuple[np.ndarray, torch.Tensor]],
    expected: int,
    tokenizer: sentencepiece.SentencePieceProcessor | None,
    *,
    progress: bool,
    realtime: bool,
    **streaming_kwargs,
) -> _Streamed:
    """Hands each (samples, codes) of `frames` to `model.streaming(1, **streaming_kwargs)` in order (frame `t` at
    `t` frame periods after frame 0 when `realtime`), recording per frame the user prediction, the speculation and
    the system's text token. `expected` (the number of frames) sizes the progress bar."""
    c = model.config
    user_delays = c.delays[1 + c.dep_q :]
    delay0_rows = [k for k in range(c.n_q - c.dep_q) if user_delays[k] == 0]
    # a prefix of delay0_rows: the user branch predicts the first user_dep_q user rows
    predicted_rows = [k for k in delay0_rows if k < c.user_dep_q] if c.predict_user_audio else []
    records, user_codes, user_audio, texts, audios = [], [], [], [], []
    previous = None  # the last step's output: its user prediction is for the current frame
    with model.streaming(1, **streaming_kwargs) as session:
        sampling = {stream: session.config.stream_settings(stream) for stream in STREAMS}
        start = time.perf_counter()
        late, max_lag = 0, 0.0  # realtime: frames handed over more than a frame period after their slot
        frames = tqdm(frames, total=expected, desc="streaming", unit="frame", disable=not progress)
        for t, (samples, codes) in enumerate(frames):
            if realtime:
                lag = time.perf_counter() - (start + t * FRAME_PERIOD_S)
                if lag < 0:
                    time.sleep(-lag)
                elif lag > FRAME_PERIOD_S:  # the previous steps took longer than their frames: the backlog grows
                    late, max_lag = late + 1, max(max_lag, lag)
                    if late == 1:
                        logger.warning(f"realtime: frame {t} is handed over {1000 * lag:.0f} ms after it arrived: the "
                                       f"steps cannot keep up with {1000 * FRAME_PERIOD_S:.0f} ms frames on this "
                                       "machine (fewer threads in use elsewhere, a GPU, or speculation off may help)")
            out = session.step(codes[None, :, None])
            text_token = None
            if out.tokens is not None:
                text_token = out.tokens[0, 0, 0].item()
                texts.append(text_token)
                audios.append(out.tokens[0, 1:, 0].cpu())
            records.append({
                "frame": t,
                "time_s": t / FRAME_RATE,
                **_prediction_record(previous, codes[delay0_rows].tolist(), predicted_rows),
                "speculative": out.speculative[0],
                "critical_ms": round(1000 * out.critical_s, 3),
                "text_token": text_token,
                "text": None if text_token is None or tokenizer is None else text_piece(tokenizer, text_token, c),
            })
            user_codes.append(codes)
            user_audio.append(samples)
            previous = out
        wall_s = time.perf_counter() - start
        stats = session.stats
    if late:
        logger.warning(f"realtime: {late} of {len(records)} frames were handed over more than "
                       f"{1000 * FRAME_PERIOD_S:.0f} ms late (at worst {1000 * max_lag:.0f} ms): this machine did not "
                       f"stream in real time ({wall_s:.1f} s for {len(records) * FRAME_PERIOD_S:.1f} s of audio)")
    return _Streamed(
        records=records,
        user_codes=torch.stack(user_codes, dim=1),
        user_audio=np.concatenate(user_audio),
        text_tokens=torch.tensor(texts, dtype=torch.long),
        audio_codes=torch.stack(audios, dim=1) if audios else torch.empty(c.dep_q, 0, dtype=torch.long),
        wall_s=wall_s,
        stats=stats,
        sampling=sampling,
    )


def _prediction_record(previous, received: list[int], predicted_rows: list[int]) -> dict:
    """The frames.jsonl fields of the user prediction for one frame, from the previous step's output.

    `received` holds the frame's delay-0 user tokens; the other fields are lists over `predicted_rows` (the delay-0
    rows the user branch predicts), None when there is no prediction (the first frame, or no such row).
    """
    fields = {"user_tokens": received, "predicted": None, "correct": None, "probability": None, "entropy": None}
    if previous is None or not predicted_rows:
        return fields
    # entry 0 of a row's window is the token the main transformer reads at the next call: this frame's
    predicted = previous.user_prediction[0, predicted_rows, 0].tolist()
    return {
        **fields,
        "predicted": predicted,
        "correct": predicted == received[: len(predicted)],
        "probability": previous.user_probs[0, predicted_rows, 0].tolist(),
        "entropy": previous.user_entropy[0, predicted_rows, 0].tolist(),
    }


def _text(text_tokens: list[int], tokenizer: sentencepiece.SentencePieceProcessor | None, config) -> str:
    """The system's words: the tokenizer's pieces joined, or without one the word tokens' ids, space-separated."""
    words = [token for token in text_tokens if token not in padding_ids(config)]
    if tokenizer is not None:
        return "".join(text_piece(tokenizer, token, config) for token in words).strip()
    return " ".join(map(str, words))


def _system_audio(mimi: MimiModel, audio_codes: torch.Tensor, samples_per_frame: int) -> np.ndarray:
    """Mimi decode of the system's codes `[dep_q, T']` through the output limiter: float32
    `[T' * samples_per_frame]` within [-1, 1]."""
    if audio_codes.shape[1] == 0:
        return np.zeros(0, np.float32)
    with torch.no_grad():
        audio = mimi.decode(audio_codes[None].to(mimi.device)).audio_values[0, 0].float().cpu().numpy()
    # the limiter runs frame by frame, as in `serve`: the WAV sounds like the live conversation
    return AudioLimiter(1, mimi.config.sampling_rate).limit_all(audio, samples_per_frame)


def _dialogue(system: np.ndarray, user: np.ndarray, num_frames: int, samples_per_frame: int) -> np.ndarray:
    """`[N, 2]`: the system (left) from user frame 1 on (see `stream_user_audio`), the user (right), zero-padded
    to the same length: the streamed frames, or longer when the system's audio runs past them."""
    length = max(num_frames * samples_per_frame, samples_per_frame + system.size)
    dialogue = np.zeros((length, 2), np.float32)
    dialogue[samples_per_frame : samples_per_frame + system.size, 0] = system
    dialogue[: user.size, 1] = user
    return dialogue


def _write_outputs(result: StreamResult, records: list[dict], system_audio: np.ndarray, dialogue: np.ndarray,
                   rate: int) -> None:
    """Writes the five files of `result.files`, each atomically (a run stopped midway leaves no partial file)."""
    import soundfile

    # float samples: exact (the limiter already keeps them within [-1, 1])
    def wav(audio: np.ndarray):
        return lambda path: soundfile.write(path, audio, rate, subtype="FLOAT", format="WAV")

    files = result.files
    result.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(files["system_audio"], wav(system_audio))
    atomic_write(files["dialogue_audio"], wav(dialogue))
    atomic_write(files["text"], lambda path: path.write_text(result.text + "\n", encoding="utf-8"))
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    atomic_write(files["frames"], lambda path: path.write_text(lines, encoding="utf-8"))
    write_json(files["summary"], result.to_dict())


__all__ = ["StreamResult", "stream_user_audio"]
