"""Streaming a user recording through the model frame by frame, as a live session would (the `stream` command).

[`stream_user_audio`] encodes the user's audio with Mimi, hands the model's streaming session one 80 ms frame at a
time in arrival order (optionally paced in real time, like a microphone), with speculation on, and writes to
`output_dir`:

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

The critical path measured here is the LM step from a frame's arrival to the system's tokens (the session's
[`SpeculationStats`]); Mimi encodes the whole recording up front and decodes the system's codes at the end.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from transformers import MimiModel
from transformers.utils import logging
from transformers.utils.logging import tqdm

from ..data.audio import (
    FRAME_RATE,
    check_mimi,
    check_tokenizer,
    load_mimi,
    load_mono,
    load_tokenizer,
    padding_ids,
    text_piece,
)
from ..models.configuration_moshi_userpred import FRAME_PERIOD_S
from ..models.generation_moshi_config import STREAMS
from ..utils.files import atomic_write, check_output_dir, write_json
from .audio_limiter import AudioLimiter

logger = logging.get_logger(__name__)

OUTPUT_FILES = {
    "system_audio": "system.wav",
    "dialogue_audio": "dialogue.wav",
    "text": "text.txt",
    "frames": "frames.jsonl",
    "summary": "summary.json",
}


@dataclass
class StreamResult:
    r"""What [`stream_user_audio`] produced. Per-frame lists have one entry per user frame streamed.

    Args:
        output_dir (`Path`): where the files were written; `files` maps each output (`system_audio`,
            `dialogue_audio`, `text`, `frames`, `summary`) to its path.
        text (`str`): the system's text (its word tokens' ids, space-separated, without a tokenizer).
        text_tokens (`torch.LongTensor` `[T - max(delays)]`): the text stream, padding included, frame-aligned
            with `audio_codes`.
        audio_codes (`torch.LongTensor` `[dep_q, T - max(delays)]`): the system's Mimi codes.
        user_codes (`torch.LongTensor` `[n_q - dep_q, T]`): the user's Mimi codes that were streamed.
        frame_rate (`float`): frames per second (user frame `t` starts at `t / frame_rate` s).
        statuses (`list[str]`): per frame, "hit" (the step precomputed for a guessed user token was committed),
            "miss" (the guesses were wrong: a normal step ran) or "not_tried" (frame 0, or speculation off).
        critical_ms (`list[float]`): per frame, milliseconds from the frame's arrival to the system's tokens.
        correct (`list[bool | None]`): per frame, whether the user branch's prediction (made one frame earlier) of
            the frame's delay-0 user tokens was right; None where there was no prediction.
        confidence (`list[float | None]`): per frame, the user branch's probability of that prediction (the
            product over the predicted delay-0 codebooks); None where there was none.
        hits, misses (`int`): frames whose speculation was committed / failed; `hit_rate = hits / (hits + misses)`.
        critical_ms_mean, critical_ms_p95 (`float`): mean and 95th percentile of `critical_ms`.
        critical_ms_hit_mean, critical_ms_hit_p95 (`float`, *optional*): the same over the hit frames.
        critical_ms_normal_mean, critical_ms_normal_p95 (`float`, *optional*): the same over the other frames
            (a normal step ran).
        saved_ms (`float`): critical-path time speculation saved in all (the session's `SpeculationStats.saved_s`).
        delay0_accuracy (`float`, *optional*): fraction of the predicted delay-0 user tokens that were right.
        wall_s (`float`): wall-clock seconds of the streaming loop (paced by the frame rate when `realtime`).
        settings (`dict`): the inputs and sampling settings of the run, as recorded in summary.json.
    """

    output_dir: Path
    text: str
    text_tokens: torch.Tensor
    audio_codes: torch.Tensor
    user_codes: torch.Tensor
    frame_rate: float
    statuses: list[str]
    critical_ms: list[float]
    correct: list[bool | None]
    confidence: list[float | None]
    hits: int
    misses: int
    hit_rate: float
    critical_ms_mean: float
    critical_ms_p95: float
    critical_ms_hit_mean: float | None
    critical_ms_hit_p95: float | None
    critical_ms_normal_mean: float | None
    critical_ms_normal_p95: float | None
    saved_ms: float
    delay0_accuracy: float | None
    wall_s: float
    settings: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return self.user_codes.shape[1]

    def to_dict(self) -> dict:
        """The summary written to summary.json (the per-frame lists are in frames.jsonl), JSON-serialisable."""
        return {
            "frames": self.num_frames,
            "seconds": self.num_frames / self.frame_rate,
            "system_frames": self.audio_codes.shape[1],
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "hit_frames": self.statuses.count("hit"),
            "normal_frames": self.num_frames - self.statuses.count("hit"),
            **{name: getattr(self, name) for name in (
                "critical_ms_mean", "critical_ms_p95", "critical_ms_hit_mean", "critical_ms_hit_p95",
                "critical_ms_normal_mean", "critical_ms_normal_p95", "saved_ms", "delay0_accuracy", "wall_s", "text",
                "settings",
            )},
            "files": {name: path.name for name, path in self.files.items()},
        }

    def describe(self) -> str:
        """A few lines for a terminal: frames, speculation, latency, prediction accuracy, text and files."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} ms"

        accuracy = "-" if self.delay0_accuracy is None else f"{100 * self.delay0_accuracy:.1f}%"
        lines = [
            f"streamed {self.num_frames} frames ({self.num_frames / self.frame_rate:.2f} s of user audio) in "
            f"{self.wall_s:.2f} s",
            f"speculation: {self.hits} hits, {self.misses} misses (hit rate {100 * self.hit_rate:.1f}%), "
            f"saved {self.saved_ms:.1f} ms of critical path",
            f"critical path per frame: {ms(self.critical_ms_hit_mean)} on hits, {ms(self.critical_ms_normal_mean)} "
            f"on normal steps; all: {ms(self.critical_ms_mean)} mean, {ms(self.critical_ms_p95)} p95",
            f"user's next delay-0 tokens predicted right: {accuracy}",
            f"text: {self.text}",
            "wrote " + ", ".join(str(path) for path in self.files.values()),
        ]
        return "\n".join(lines)


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

    The audio is encoded with Mimi in one call (Transformers' Mimi gives another frame count when fed in chunks),
    keeping the model's `n_q - dep_q` user codebooks; frame `t` is then handed to `model.streaming(1, ...)` as a
    live session would receive it. With greedy settings (`do_sample=False, audio_do_sample=False`) the system's
    tokens are exactly those of `model.generate` on the same codes: speculation only changes the critical path.

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
        ValueError: if the audio cannot be read, is empty, or has several channels and no `channel` picks one (or
            `channel` comes with a tensor); if Mimi or the tokenizer do not match the model (codebook size, number
            of codebooks, frame rate, text vocabulary); if `max_frames` is not a positive integer, if `output_dir`
            is a file, or for invalid generation settings.
    """
    c = model.config
    num_user_rows = c.n_q - c.dep_q
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
    audio = _user_waveform(user_audio, rate, channel)
    with torch.no_grad():
        user_codes = mimi.encode(audio[None, None].to(mimi.device, mimi.dtype), num_quantizers=num_user_rows)
    user_codes = user_codes.audio_codes[0].long().cpu()[:, :max_frames]  # [K, T]

    user_delays = c.delays[1 + c.dep_q :]
    delay0_rows = [k for k in range(num_user_rows) if user_delays[k] == 0]
    # a prefix of delay0_rows: the user branch predicts the first user_dep_q user rows
    predicted_rows = [k for k in delay0_rows if k < c.user_dep_q] if c.predict_user_audio else []
    frames, texts, audios = [], [], []
    previous = None  # the last step's output: its user prediction is for the current frame
    with model.streaming(1, speculate_top_k=speculate_top_k, seed=seed, **generation_kwargs) as session:
        sampling = {stream: session.config.stream_settings(stream) for stream in STREAMS}
        start = time.perf_counter()
        late, max_lag = 0, 0.0  # realtime: frames handed over more than a frame period after their slot
        for t in tqdm(range(user_codes.shape[1]), desc="streaming", unit="frame", disable=not progress):
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
            out = session.step(user_codes[None, :, t : t + 1])
            text_token = None
            if out.tokens is not None:
                text_token = out.tokens[0, 0, 0].item()
                texts.append(text_token)
                audios.append(out.tokens[0, 1:, 0].cpu())
            frames.append({
                "frame": t,
                "time_s": t / FRAME_RATE,
                **_prediction_record(previous, user_codes[delay0_rows, t].tolist(), predicted_rows),
                "speculative": out.speculative[0],
                "critical_ms": round(1000 * out.critical_s, 3),
                "text_token": text_token,
                "text": None if text_token is None or tokenizer is None else text_piece(tokenizer, text_token, c),
            })
            previous = out
        wall_s = time.perf_counter() - start
        stats = session.stats
    if late:
        logger.warning(f"realtime: {late} of {user_codes.shape[1]} frames were handed over more than "
                       f"{1000 * FRAME_PERIOD_S:.0f} ms late (at worst {1000 * max_lag:.0f} ms): this machine did not "
                       f"stream in real time ({wall_s:.1f} s for {user_codes.shape[1] * FRAME_PERIOD_S:.1f} s of audio)")

    text_tokens = torch.tensor(texts, dtype=torch.long)
    audio_codes = torch.stack(audios, dim=1) if audios else torch.empty(c.dep_q, 0, dtype=torch.long)
    words = [token for token in texts if token not in padding_ids(c)]
    if tokenizer is not None:
        text = "".join(text_piece(tokenizer, token, c) for token in words).strip()
    else:
        text = " ".join(map(str, words))
    samples_per_frame = round(rate / FRAME_RATE)
    # the limiter runs frame by frame, as in `serve`: the WAV sounds like the live conversation
    system_audio = AudioLimiter(1, rate).limit_all(_decode(mimi, audio_codes).numpy(), samples_per_frame)
    num_frames = user_codes.shape[1]
    # the user's recording as it is (a float file may hold samples past full scale: those alone are clipped)
    user_heard = audio[: num_frames * samples_per_frame].clamp(-1.0, 1.0)
    dialogue = _dialogue(torch.from_numpy(system_audio), user_heard, num_frames, samples_per_frame)

    statuses = [frame["speculative"] for frame in frames]
    critical = [frame["critical_ms"] for frame in frames]
    # predicted delay-0 tokens, right or wrong (predicted rows are a prefix of the delay-0 rows: zip pairs them)
    scored = [p == u for f in frames if f["predicted"] for p, u in zip(f["predicted"], f["user_tokens"])]
    mean, p95 = _mean_p95(critical)
    hit_mean, hit_p95 = _mean_p95([ms for ms, status in zip(critical, statuses) if status == "hit"])
    normal_mean, normal_p95 = _mean_p95([ms for ms, status in zip(critical, statuses) if status != "hit"])
    result = StreamResult(
        output_dir=output_dir,
        text=text,
        text_tokens=text_tokens,
        audio_codes=audio_codes,
        user_codes=user_codes,
        frame_rate=FRAME_RATE,
        statuses=statuses,
        critical_ms=critical,
        correct=[frame["correct"] for frame in frames],
        confidence=[None if frame["probability"] is None else math.prod(frame["probability"]) for frame in frames],
        hits=stats.hits,
        misses=stats.misses,
        hit_rate=stats.hit_rate,
        critical_ms_mean=mean,
        critical_ms_p95=p95,
        critical_ms_hit_mean=hit_mean,
        critical_ms_hit_p95=hit_p95,
        critical_ms_normal_mean=normal_mean,
        critical_ms_normal_p95=normal_p95,
        saved_ms=1000 * stats.saved_s,
        delay0_accuracy=sum(scored) / len(scored) if scored else None,
        wall_s=wall_s,
        settings={
            "user_audio": str(user_audio) if isinstance(user_audio, (str, os.PathLike)) else "tensor",
            "channel": channel,
            "model": str(model.name_or_path) or None,
            "mimi": str(mimi.name_or_path) or None,
            "speculate_top_k": speculate_top_k,
            "realtime": realtime,
            "seed": seed,
            "max_frames": max_frames,
            "sampling": sampling,
        },
        files={name: output_dir / filename for name, filename in OUTPUT_FILES.items()},
    )
    _write_outputs(result, frames, system_audio, dialogue, rate)
    return result


def _user_waveform(user_audio: str | os.PathLike | torch.Tensor, rate: int, channel: int | None) -> torch.Tensor:
    """The user's audio `[num_samples]` at `rate` (float32, CPU), from a file or a 1-D tensor."""
    if isinstance(user_audio, (str, os.PathLike)):
        return load_mono(user_audio, rate, channel)
    if channel is not None:
        raise ValueError(f"channel={channel!r} picks a channel of an audio file; user_audio is already one signal")
    if not isinstance(user_audio, torch.Tensor):
        raise ValueError(f"user_audio must be a path or a 1-D float tensor, got {type(user_audio).__name__}")
    if user_audio.ndim != 1 or not user_audio.dtype.is_floating_point:
        raise ValueError(f"user_audio must be a 1-D float tensor [num_samples] at {rate} Hz, got shape "
                         f"{tuple(user_audio.shape)} and dtype {user_audio.dtype}")
    if user_audio.numel() == 0:
        raise ValueError("user_audio has no samples")
    return user_audio.detach().float().cpu()


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


def _mean_p95(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), values.quantile(0.95).item()


def _decode(mimi: MimiModel, audio_codes: torch.Tensor) -> torch.Tensor:
    """Mimi decode of the system's codes `[dep_q, T']` -> `[T' * samples_per_frame]` (float32, CPU)."""
    if audio_codes.shape[1] == 0:
        return torch.zeros(0)
    with torch.no_grad():
        audio = mimi.decode(audio_codes[None].to(mimi.device)).audio_values
    return audio[0, 0].float().cpu()


def _dialogue(system: torch.Tensor, user: torch.Tensor, num_frames: int, samples_per_frame: int) -> torch.Tensor:
    """`[2, N]`: the system (left) from user frame 1 on (see `stream_user_audio`), the user (right), zero-padded
    to the same length: the streamed frames, or longer when the system's audio runs past them."""
    length = max(num_frames * samples_per_frame, samples_per_frame + system.numel())
    dialogue = torch.zeros(2, length)
    dialogue[0, samples_per_frame : samples_per_frame + system.numel()] = system
    dialogue[1, : user.numel()] = user
    return dialogue


def _write_outputs(result: StreamResult, frames: list[dict], system_audio: np.ndarray, dialogue: torch.Tensor,
                   rate: int) -> None:
    import soundfile

    # float samples: exact (the limiter already keeps them within [-1, 1])
    def wav(audio: torch.Tensor | np.ndarray):
        return lambda path: soundfile.write(path, np.asarray(audio), rate, subtype="FLOAT", format="WAV")

    files = result.files
    result.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(files["system_audio"], wav(system_audio))
    atomic_write(files["dialogue_audio"], wav(dialogue.T.contiguous()))
    atomic_write(files["text"], lambda path: path.write_text(result.text + "\n", encoding="utf-8"))
    lines = "".join(json.dumps(frame, ensure_ascii=False) + "\n" for frame in frames)
    atomic_write(files["frames"], lambda path: path.write_text(lines, encoding="utf-8"))
    write_json(files["summary"], result.to_dict())


__all__ = ["StreamResult", "stream_user_audio"]
