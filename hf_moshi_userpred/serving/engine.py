"""The real-time engine behind `serve`: many live conversations through one batched streaming session.

kyutai's server holds one conversation at a time (a lock around the whole session). Here `max_conversations`
conversations share one [`MoshiStreamingSession`] of as many slots and one [`MimiStreamingCodec`], and a clock
ticks every 80 ms (one Mimi frame). Each tick, in the engine's own thread:

1. conversations that joined take a free slot (`reset` of that slot, or its persona prompt's prefill: the others run
   on), those that left free theirs;
2. every slot with a whole frame of audio waiting takes it; a slot whose frame is late is paused for the tick (the
   exec mask), or, when the operator turned gap filling on, steps on the user tokens the model predicted (at most
   `max_gap_frames` in a row; the late frame is then dropped when it arrives, its time has passed);
3. the frames are encoded (batched streaming Mimi), the critical half of the model step runs for all slots at once,
   and the system's audio is decoded and handed to each conversation with its text: the tick's critical path;
4. then, off the critical path, the user Depformer and the speculative look-ahead for the next tick run in the time
   left before the next frames (`step(..., look_ahead=False)` then `look_ahead()`; the speculation is skipped when
   the last one would not fit in what is left of the tick: a skipped speculation only means a normal step next
   time), and each conversation gets its per-frame extras (user prediction confidence, the turn-taking signal,
   speculation hit or miss, timings);
5. a slot that has fallen behind (more frames waiting than its jitter buffer, e.g. after a network hiccup) catches
   up with extra steps for it alone while the tick still has half its budget left.

A conversation starts once `jitter_frames` frames beyond its first have arrived (80 ms by default): client and
server clocks drift and packets jitter, and without that buffer a frame arriving just after its tick would pause the
slot and cost a catch-up step later (a whole batched step for one slot).

The engine never waits on a client: audio comes in through [`Conversation.push_audio`] (any thread) and goes out
through the conversation's `deliver` callback, so a slow or broken connection delays nobody else's frames.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from transformers import MimiModel

from ..data.audio import check_mimi, check_tokenizer, text_piece
from ..data.persona import PersonaLibrary
from ..data.voice_activity import STATISTICS_NAME, TurnTakingStatistics
from ..models.configuration_moshi_userpred import FRAME_PERIOD_S
from ..models.generation_moshi_persona import MoshiPersonaPrompt
from .audio_limiter import AudioLimiter
from .engine_protocol import FrameOutput, user_audio
from .mimi_streaming import MimiStreamingCodec

logger = logging.getLogger(__name__)

# persona prompts (role text, voice) an engine keeps built; each conversation's prefill is the session's to cache
PERSONA_CACHE_SIZE = 64
# speculate only while the tick would still end within this share of the period: the rest absorbs the jitter of
# arrivals and scheduling, so that a tick that speculates still ends before the next frames are due
SPECULATION_BUDGET = 0.7


@dataclass
class Conversation:
    """One live conversation in a slot of the engine (see [`RealtimeEngine.join`])."""

    slot: int
    deliver: Callable[[FrameOutput], None]
    frame_size: int
    jitter_frames: int = 0  # frames buffered before the first one is taken
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    frames_in: int = 0  # frames the model consumed (or gap-filled) so far
    gaps_in_a_row: int = 0
    to_drop: int = 0  # late frames that were gap-filled: dropped when they arrive
    persona: MoshiPersonaPrompt | None = None  # the prompt the slot starts from (PersonaPlex's voice and role)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def push_audio(self, pcm: np.ndarray) -> None:
        """Appends the user's audio (float32 samples at Mimi's rate, any length); the engine takes whole frames."""
        pcm = user_audio(pcm)
        with self.lock:
            self.buffer = np.concatenate([self.buffer, pcm])

    def waiting_frames(self) -> int:
        with self.lock:
            return len(self.buffer) // self.frame_size

    def take_frame(self) -> np.ndarray | None:
        """The oldest whole frame, dropping the ones whose time passed while they were gap-filled; before the
        conversation's first frame, None until `1 + jitter_frames` frames are there."""
        with self.lock:
            while self.to_drop and len(self.buffer) >= self.frame_size:
                self.buffer, self.to_drop = self.buffer[self.frame_size :], self.to_drop - 1
            needed = self.frame_size * (1 if self.frames_in else 1 + self.jitter_frames)
            if len(self.buffer) < needed:
                return None
            frame, self.buffer = self.buffer[: self.frame_size], self.buffer[self.frame_size :]
            return frame



def check_serving_folder(model_dir: str | os.PathLike) -> Path:
    """`model_dir` as a Path, refused (`ValueError`) unless it exists with the Mimi (`mimi/`) and tokenizer
    (`tokenizer.model`) that serving needs beside the weights; cheap, so `serve` checks it before loading."""
    from ..utils.files import MIMI_FOLDER, TOKENIZER_NAME

    folder = Path(model_dir)
    if not folder.exists():
        raise ValueError(f"{str(model_dir)!r} does not exist")
    for needed in (MIMI_FOLDER, TOKENIZER_NAME):
        if not (folder / needed).exists():
            raise ValueError(f"{model_dir} has no {needed}: serving needs the model's Mimi and tokenizer beside it "
                             "(as `demo`, `convert` and `train` write them)")
    return folder

class RealtimeEngine:
    """Serves up to `max_conversations` live conversations on one model, one 80 ms tick for all of them.

    Args:
        model ([`MoshiUserPredForConditionalGeneration`]): the model, in eval mode on its device.
        mimi (`MimiModel`): the codec the model was trained with (same device).
        tokenizer (`sentencepiece.SentencePieceProcessor`): the text tokenizer, for the text pieces.
        max_conversations (`int`): slots, i.e. conversations served at once.
        speculate_top_k (`int`): candidate next user tokens precomputed per slot in the idle time (0: off).
        gap_fill_threshold (`float`, *optional*): turns gap filling on: a late frame is replaced by the predicted
            user tokens whose probability reaches it (see the generation config); off: a late slot pauses.
        max_gap_frames (`int`): gap-fill at most this many frames in a row; a slot still silent after that pauses.
        jitter_frames (`int`): frames a conversation buffers before its first step (80 ms each): a frame that
            arrives up to that much later than its tick is not late, and the slot needs no catch-up step.
        seed (`int`, *optional*): sampling seed of the session.
        frame_period_s (`float`): the tick period (80 ms: real time).
        turn_taking_statistics ([`TurnTakingStatistics`], *optional*): the turn-taking signal's table (its `token`
            table goes to the session); default: `turn_taking_statistics.json` of the model's folder
            (`model.name_or_path`, where `demo` and `from_pretrained` put it) when there is one, else no signal.
        voice_prompt_dir (*optional*): a folder of voices for persona prompts (`NAME.wav` at Mimi's rate, or
            `NAME.npy` codes), encoded once at start; a conversation names one (`join(voice_prompt=NAME)`).
        text_prompt, voice_prompt (`str`, *optional*): the persona of a conversation that gives none (a role text;
            a voice name in `voice_prompt_dir`, or a voice file).
        **generation_kwargs: other generation config fields (e.g. `do_sample=False`, or `turn_hold_threshold=0.5`
            with a voice-activity head or the statistics).

    The per-frame extras (`FrameOutput.extras`): `frame`, `user_prob` and `user_entropy` (of the predicted next
    delay-0 user token; None before the first prediction), `turn_end` (P(the user's turn ends within the signal's
    horizon)) and `user_silence` (P(the user is silent in each of the next `horizon` frames), a list), both from
    the prediction made once this frame was in, with the user branch and a signal (the model's voice-activity head,
    else the turn-taking statistics),
    `speculation` ("hit", "miss", "not_tried"), `critical_ms` (the tick's critical path: encode, model step,
    decode), `tick_ms` (the whole tick so far), `late` and `gap_filled` (this frame of the user was late; it was
    gap-filled).
    """

    def __init__(
        self,
        model,
        mimi: MimiModel,
        tokenizer: sentencepiece.SentencePieceProcessor,
        *,
        max_conversations: int = 8,
        speculate_top_k: int = 4,
        gap_fill_threshold: float | None = None,
        max_gap_frames: int = 3,
        jitter_frames: int = 1,
        seed: int | None = None,
        frame_period_s: float = FRAME_PERIOD_S,
        turn_taking_statistics: TurnTakingStatistics | None = None,
        voice_prompt_dir: str | os.PathLike | None = None,
        text_prompt: str | None = None,
        voice_prompt: str | None = None,
        **generation_kwargs,
    ):
        if not isinstance(max_conversations, int) or max_conversations < 1:
            raise ValueError(f"max_conversations must be a positive integer, got {max_conversations!r}")
        if not isinstance(max_gap_frames, int) or max_gap_frames < 0:
            raise ValueError(f"max_gap_frames must be a non-negative integer, got {max_gap_frames!r}")
        if not isinstance(jitter_frames, int) or jitter_frames < 0:
            raise ValueError(f"jitter_frames must be a non-negative integer, got {jitter_frames!r}")
        if not frame_period_s > 0:
            raise ValueError(f"frame_period_s must be positive, got {frame_period_s!r}")
        c = model.config
        check_mimi(mimi, c)
        if c.dep_q != c.n_q - c.dep_q:
            raise ValueError(f"the engine streams one codec for both speakers: it needs as many system as user "
                             f"codebooks, got dep_q={c.dep_q} and n_q - dep_q={c.n_q - c.dep_q}")
        check_tokenizer(tokenizer, c)
        self.model, self.tokenizer, self.max_conversations = model, tokenizer, max_conversations
        self.frame_period_s, self.max_gap_frames, self.jitter_frames = frame_period_s, max_gap_frames, jitter_frames
        self.gap_filling = gap_fill_threshold is not None
        self.personas = PersonaLibrary(c, mimi, tokenizer, voice_prompt_dir)
        self.default_persona = (text_prompt, voice_prompt)
        self._personas: dict[tuple[str | None, str | None], MoshiPersonaPrompt | None] = {}
        self.persona(None, None)  # a bad default fails here, at start, not at the first connection
        self.codec = MimiStreamingCodec(mimi, max_conversations, num_codebooks=c.dep_q)
        self.frame_size = self.codec.frame_size
        self.sampling_rate = mimi.config.sampling_rate
        self.limiter = AudioLimiter(max_conversations, self.sampling_rate)  # one gain per slot: no audio leaves [-1, 1]
        if turn_taking_statistics is None and model.name_or_path:
            saved = Path(model.name_or_path) / STATISTICS_NAME
            if saved.is_file():
                turn_taking_statistics = TurnTakingStatistics.load(saved)
        self.turn_taking_statistics = turn_taking_statistics
        table = None if turn_taking_statistics is None else turn_taking_statistics.table("token")
        self._streaming = model.streaming(max_conversations, speculate_top_k=speculate_top_k,
                                          gap_fill_threshold=gap_fill_threshold, seed=seed,
                                          turn_taking_table=table, **generation_kwargs)
        self.session = self._streaming.__enter__()
        self.predicts_user = self.session.predicts_user  # the model has a user branch and predict_user is on
        self.device = model.device
        self.threads = torch.get_num_threads()  # the engine's thread uses the constructing thread's setting

        self.conversations: list[Conversation | None] = [None] * max_conversations
        self.joined: list[int] = []  # slots to reset at the next tick
        self.lock = threading.Lock()  # guards conversations / joined between the engine and the server
        self.running = False
        self.thread: threading.Thread | None = None
        self.ticks = 0
        self.tick_ms: deque[float] = deque(maxlen=20_000)
        self.critical_ms: deque[float] = deque(maxlen=20_000)
        self.overruns = 0  # ticks that started more than a period late
        self.catch_up_steps = 0
        self.speculate_s = 0.0  # the last speculative look-ahead's duration: does the next one fit?
        self.skipped_speculations = 0
        self.late_frames = 0  # a started conversation's frame had not arrived at its tick
        self.gap_filled_frames = 0
        self.served = 0
        self.error: BaseException | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu",
                        threads: int | None = None, **engine_kwargs) -> RealtimeEngine:
        """The engine of a model folder that holds its Mimi (`mimi/`) and tokenizer (`tokenizer.model`) beside the
        weights, as `demo` and `convert` write it, with `threads` torch threads for its ticks (default: the calling
        thread's setting).

        Raises:
            ValueError: the folder is not a complete model of this package, or lacks the Mimi or tokenizer.
        """
        from ..data.audio import load_mimi, load_tokenizer
        from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration
        from ..utils.files import MIMI_FOLDER, TOKENIZER_NAME

        if threads is not None:
            torch.set_num_threads(threads)
        folder = check_serving_folder(model_dir)
        model = MoshiUserPredForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
        return cls(model, load_mimi(folder / MIMI_FOLDER, device), load_tokenizer(folder / TOKENIZER_NAME),
                   **engine_kwargs)

    # ----------------------------------------------------------------------------------- conversations
    def persona(self, text_prompt: str | None, voice_prompt: str | None) -> MoshiPersonaPrompt | None:
        """The persona prompt of a role text and a voice name (None for either: the engine's default; "": none),
        built once per pair. A client names voices of `voice_prompt_dir` only; the default may be a file.

        Raises:
            ValueError: an unknown voice (listing the voices) or an unusable prompt, e.g. one too long for the
                context.
        """
        text = self.default_persona[0] if text_prompt is None else text_prompt
        voice = voice_prompt
        if voice_prompt is None and self.default_persona[1] is not None:  # the operator's: a name, or else a file
            default = self.default_persona[1]
            voice = default if default in self.personas.voices else Path(default)
            if isinstance(voice, Path) and not voice.is_file():
                known = ", ".join(self.personas.voices) or "none"
                raise ValueError(f"the default voice prompt {default!r} is neither a voice of the voice prompt folder "
                                 f"({known}) nor a voice file")
        if (text, voice) not in self._personas:
            prompt = self.personas.prompt(text, voice)
            window = self.model.config.streaming_window
            if prompt is not None and prompt.num_frames >= window:
                raise ValueError(f"the persona prompt has {prompt.num_frames} frames: it leaves no room in the "
                                 f"model's context of {window} frames (shorten the voice sample or the role text)")
            if len(self._personas) >= PERSONA_CACHE_SIZE:
                self._personas.pop(next(iter(self._personas)))
            self._personas[(text, voice)] = prompt
        return self._personas[(text, voice)]

    def persona_options(self) -> dict:
        """The voices of `voice_prompt_dir` and the default persona (what the page offers)."""
        return {"voices": list(self.personas.voices), "text_prompt": self.default_persona[0],
                "voice_prompt": self.default_persona[1]}

    def join(self, deliver: Callable[[FrameOutput], None], text_prompt: str | None = None,
             voice_prompt: str | None = None) -> Conversation | None:
        """Takes a free slot for a new conversation, or returns None when all `max_conversations` are in use.

        `deliver` is called from the engine's thread with each [`FrameOutput`]; it must not block (a server hands
        the output to its event loop). The conversation starts from the persona of `text_prompt` and
        `voice_prompt` (see `persona`; prefilled at its first tick).

        Raises:
            ValueError: a bad persona prompt, before any slot is taken.
        """
        persona = self.persona(text_prompt, voice_prompt)
        with self.lock:
            for slot, conversation in enumerate(self.conversations):
                if conversation is None:
                    conversation = Conversation(slot, deliver, self.frame_size, self.jitter_frames, persona=persona)
                    self.conversations[slot] = conversation
                    self.joined.append(slot)
                    self.served += 1
                    return conversation
        return None

    def leave(self, conversation: Conversation) -> None:
        """Frees the conversation's slot (idempotent); the slot stops at once and is reset for the next one."""
        with self.lock:
            conversation.closed = True
            if self.conversations[conversation.slot] is conversation:
                self.conversations[conversation.slot] = None

    @property
    def active_conversations(self) -> int:
        with self.lock:
            return sum(conversation is not None for conversation in self.conversations)

    # ------------------------------------------------------------------------------------------- clock
    def start(self) -> None:
        """Starts ticking in a background thread."""
        if self.running:
            return
        self.running = True
        self.thread = threading.Thread(target=self._run, name="realtime-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stops ticking (waits for the current tick) and closes the streaming session."""
        self.running = False
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.session.active:
            self._streaming.__exit__(None, None, None)

    def _run(self) -> None:
        # Both settings belong to the OS thread, and a new thread starts without them: the intra-op thread count
        # (OpenMP's), and flushing denormal floats to zero, without which Mimi's convolutions over quiet audio run
        # on denormals and a tick took twice as long (27 vs 58 ms for one conversation on the demo model).
        torch.set_num_threads(self.threads)
        torch.set_flush_denormal(True)
        deadline = time.perf_counter()
        while self.running:
            deadline += self.frame_period_s
            delay = deadline - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif -delay > self.frame_period_s:  # more than a whole period behind: start the clock again
                self.overruns += 1
                deadline = time.perf_counter()
            try:
                self.tick()
            except Exception as error:  # a bug, not a client's fault: stop serving rather than serve garbage
                logger.exception("the engine stopped")
                self.error, self.running = error, False

    # -------------------------------------------------------------------------------------------- tick
    @torch.no_grad()
    def tick(self) -> None:
        """One 80 ms tick for every conversation (steps 1-5 of the module docstring)."""
        start = time.perf_counter()
        with self.lock:
            slots = list(self.conversations)
            joined, self.joined = self.joined, []
        if joined:
            mask = torch.zeros(self.max_conversations, dtype=torch.bool)
            mask[joined] = True
            self.session.reset(mask.to(self.device))
            self.codec.reset(mask)
            for slot in joined:
                self.limiter.reset(slot)
            prompted: dict[int, list[int]] = {}  # one prefill (or cache copy) per persona for all its new slots
            for slot in joined:
                if slots[slot] is not None and slots[slot].persona is not None:
                    prompted.setdefault(id(slots[slot].persona), []).append(slot)
            for group in prompted.values():
                prompt_mask = torch.zeros(self.max_conversations, dtype=torch.bool)
                prompt_mask[group] = True
                self.session.prompt(slots[group[0]].persona, prompt_mask.to(self.device))
        if not any(slots):
            return
        self.ticks += 1
        self._step(slots, start, first=True)
        # catch up slots that fell behind, while half the budget is left
        while time.perf_counter() - start < self.frame_period_s / 2:
            behind = [c if c is not None and not c.closed and c.waiting_frames() > self.jitter_frames else None
                      for c in slots]
            if not any(behind):
                break
            self.catch_up_steps += 1
            self._step(behind, time.perf_counter(), first=False)

    def _step(self, slots: list[Conversation | None], start: float, first: bool) -> None:
        B = self.max_conversations
        audio = np.zeros((B, self.frame_size), dtype=np.float32)
        run, missing, late = [False] * B, [False] * B, [False] * B
        for slot, conversation in enumerate(slots):
            if conversation is None or conversation.closed:
                continue
            frame = conversation.take_frame()
            if frame is not None:
                audio[slot], run[slot] = frame, True
                conversation.gaps_in_a_row = 0
            elif first and conversation.frames_in > 0:  # a started conversation whose frame is late
                late[slot] = True
                self.late_frames += 1
                if self.gap_filling and conversation.gaps_in_a_row < self.max_gap_frames:
                    missing[slot] = True
                    conversation.gaps_in_a_row += 1
                    conversation.to_drop += 1
                    self.gap_filled_frames += 1
        if not any(run) and not any(missing):
            return
        run_mask = torch.tensor(run, device=self.device)
        missing_mask = torch.tensor(missing, device=self.device)
        stepping = run_mask | missing_mask
        self.session.set_exec_mask(stepping)
        codes = self.codec.encode(torch.from_numpy(audio).to(self.codec.device, self.codec.dtype), run_mask)
        codes = codes.long().masked_fill(~run_mask[:, None, None], -1)
        out = self.session.step(codes, missing=missing_mask if any(missing) else None, look_ahead=False)
        outputs = [None] * B
        if out.tokens is not None:
            tokens = out.tokens.to(self.codec.device)
            valid = (tokens[:, 1, 0] >= 0) & stepping
            if bool(valid.any()):
                pcm = self.codec.decode(tokens[:, 1:], valid).float().cpu().numpy()
                texts = tokens[:, 0, 0].tolist()
                decoded = valid.nonzero()[:, 0].tolist()
                limited = self.limiter(pcm[decoded], channels=decoded)
                for row, slot in enumerate(decoded):
                    outputs[slot] = (limited[row], text_piece(self.tokenizer, texts[slot], self.model.config))
        critical_ms = 1000 * (time.perf_counter() - start)
        frames = {}
        for slot, conversation in enumerate(slots):
            if conversation is None or not (run[slot] or missing[slot]):
                continue
            frames[slot] = conversation.frames_in
            conversation.frames_in += 1
            audio_out, text = outputs[slot] if outputs[slot] is not None else (None, "")
            self._deliver(conversation, FrameOutput(frames[slot], audio_out, text))
        if first:
            self.critical_ms.append(critical_ms)

        speculates = self.session.top_k > 0
        fits = speculates and time.perf_counter() - start + self.speculate_s < SPECULATION_BUDGET * self.frame_period_s
        self.skipped_speculations += speculates and not fits
        ahead = self.session.look_ahead(speculate=fits)  # off the critical path: the user Depformer, speculation
        if fits:
            self.speculate_s = ahead.speculate_s
        probs = entropy = turn_end = silence = None
        if self.predicts_user:
            probs, entropy = ahead.user_probs[:, 0, 0].tolist(), ahead.user_entropy[:, 0, 0].tolist()
        if ahead.user_turn is not None:
            turn_end, silence = ahead.user_turn.turn_end.tolist(), ahead.user_turn.silence.tolist()
        tick_ms = 1000 * (time.perf_counter() - start)
        for slot, frame in frames.items():
            extras = {
                "frame": frame,
                "user_prob": _finite(probs[slot]) if probs else None,
                "user_entropy": _finite(entropy[slot]) if entropy else None,
                "turn_end": _finite(turn_end[slot]) if turn_end else None,
                "user_silence": [_finite(p) for p in silence[slot]] if silence else None,
                "speculation": out.speculative[slot],
                "critical_ms": round(critical_ms, 3),
                "tick_ms": round(tick_ms, 3),
                "late": late[slot],
                "gap_filled": missing[slot],
            }
            self._deliver(slots[slot], FrameOutput(frame, extras=extras))
        if first:
            self.tick_ms.append(tick_ms)

    def _deliver(self, conversation: Conversation, output: FrameOutput) -> None:
        if conversation.closed:
            return
        try:
            conversation.deliver(output)
        except Exception:  # a broken connection's callback must not stop the others' frames
            logger.exception("delivering to slot %d failed: closing that conversation", conversation.slot)
            self.leave(conversation)

    # ----------------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict:
        """Sessions, tick time percentiles (ms), late and gap-filled frames, speculation hit rate."""
        stats = self.session.stats
        return {
            "conversations": self.active_conversations,
            "max_conversations": self.max_conversations,
            "conversations_served": self.served,
            "ticks": self.ticks,
            "tick_ms": _percentiles(self.tick_ms),
            "critical_ms": _percentiles(self.critical_ms),
            "overruns": self.overruns,
            "catch_up_steps": self.catch_up_steps,
            "skipped_speculations": self.skipped_speculations,
            "late_frames": self.late_frames,
            "gap_filled_frames": self.gap_filled_frames,
            "speculation": {"top_k": stats.top_k, "hits": stats.hits, "misses": stats.misses,
                            "hit_rate": stats.hit_rate},
            "running": self.running,
        }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 5)


def _percentiles(values: deque) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    array = np.asarray(values)
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "max": round(float(array.max()), 3)}


__all__ = ["Conversation", "FrameOutput", "RealtimeEngine"]
