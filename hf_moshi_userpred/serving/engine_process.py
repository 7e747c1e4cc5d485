"""The real-time engine in a process of its own, behind the same interface as [`RealtimeEngine`].

A server in one process runs two kinds of work on one Python interpreter: the event loop (WebSockets, Opus
encoding and decoding through sphn: 1.7 ms per 80 ms frame and conversation) and the engine's tick (hundreds of
small torch operations, each one taking the interpreter lock back when it returns). They take turns on the lock, so
on a machine with two cores the tick waits for the loop's Opus work instead of running beside it. [`EngineProcess`]
starts the engine in a child process (`spawn`: a fresh interpreter, no forked torch state) that loads the model
itself, and talks to it over a pipe (commands: join, audio, leave, metrics, stop) and a queue (events: frames and
replies). The server cannot tell the difference: `serve` uses it unless `--in-process` is given.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import RealtimeEngine
from .engine_protocol import FrameOutput, user_audio

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # loading a full-size model from a slow disk
REPLY_TIMEOUT_S = 10.0


@dataclass
class RemoteConversation:
    """A conversation of the engine process, as the server sees it (see [`Conversation`])."""

    id: int
    slot: int
    owner: EngineProcess

    def push_audio(self, pcm: np.ndarray) -> None:
        """Sends the user's audio (float32 at Mimi's rate, any length) to the engine.

        Raises:
            ValueError: a sample is NaN or infinite (checked here, so the caller gets the error at once).
        """
        self.owner._send(("audio", self.id, user_audio(pcm)))


class EngineProcess:
    """Runs `build()` (which returns a [`RealtimeEngine`]) in a child process and proxies it.

    Args:
        build: a picklable callable (a module-level function or a `functools.partial` of one) that loads the model
            and returns the engine, run in the child.

    Raises:
        ValueError: the child could not build the engine (its error message, e.g. a bad model folder).
        RuntimeError: the child died or did not answer within `STARTUP_TIMEOUT_S`.
    """

    def __init__(self, build: Callable[[], RealtimeEngine]):
        from transformers.utils import logging as transformers_logging

        context = multiprocessing.get_context("spawn")
        self._commands, child_end = context.Pipe(duplex=False)[::-1]
        self._events = context.Queue()
        progress = transformers_logging.is_progress_bar_enabled()  # off under `serve --quiet`: off in the child too
        self._process = context.Process(target=_serve_engine, args=(build, child_end, self._events, progress),
                                        name="realtime-engine", daemon=True)
        self._process.start()
        child_end.close()
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._deliver: dict[int, Callable[[FrameOutput], None]] = {}
        self._replies: dict[int, Any] = {}
        self._reply_ready = threading.Condition()
        self.error: BaseException | None = None
        self.running = False
        self._persona_options: dict | None = None
        kind, *payload = self._next_event(STARTUP_TIMEOUT_S)
        if kind == "failed":
            self._process.join()
            raise ValueError(payload[0])
        if kind != "ready":
            raise RuntimeError(f"the engine process did not start: {payload[0]}")
        self.max_conversations, self.sampling_rate, self.frame_size = payload[0]
        self._reader = threading.Thread(target=self._read_events, name="engine-events", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------------------------ engine interface
    def start(self) -> None:
        """Starts ticking (the child's engine thread)."""
        if not self.running:
            self._send(("start",))
            self.running = True

    def stop(self) -> None:
        """Stops the engine and its process (waits for both)."""
        if self._process.is_alive():
            try:
                self._send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=REPLY_TIMEOUT_S)
            if self._process.is_alive():
                self._process.kill()
        self.running = False

    def join(self, deliver: Callable[[FrameOutput], None], text_prompt: str | None = None,
             voice_prompt: str | None = None) -> RemoteConversation | None:
        """Takes a free slot for a new conversation (None when all are in use) with the persona of `text_prompt` and
        `voice_prompt` (see [`RealtimeEngine.join`]); `deliver` is called from a reader thread with each
        [`FrameOutput`] and must not block.

        Raises:
            ValueError: the engine refused the persona prompt (its message).
        """
        conversation_id = next(self._ids)
        slot = self._request(("join", conversation_id, text_prompt, voice_prompt), conversation_id)
        if isinstance(slot, str):
            raise ValueError(slot)
        if slot is None:
            return None
        # Registered once joined: its first frame needs audio, which only comes after `join` returns.
        self._deliver[conversation_id] = deliver
        return RemoteConversation(conversation_id, slot, self)

    def leave(self, conversation: RemoteConversation) -> None:
        """Frees the conversation's slot (idempotent)."""
        if self._deliver.pop(conversation.id, None) is not None:
            self._send(("leave", conversation.id))

    @property
    def active_conversations(self) -> int:
        return len(self._deliver)

    @property
    def pid(self) -> int | None:
        """The engine process's id (None once it is gone)."""
        return self._process.pid if self._process.is_alive() else None

    def metrics(self) -> dict:
        """The engine's [`RealtimeEngine.metrics`], read in the child."""
        request_id = next(self._ids)
        return self._request(("metrics", request_id), request_id)

    def persona_options(self) -> dict:
        """The engine's [`RealtimeEngine.persona_options`], read in the child once (they do not change)."""
        if self._persona_options is None:
            request_id = next(self._ids)
            self._persona_options = self._request(("persona_options", request_id), request_id)
        return self._persona_options

    # ------------------------------------------------------------------------------------------ plumbing
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._commands.send(message)

    def _request(self, message: tuple, request_id: int) -> Any:
        self._send(message)
        with self._reply_ready:
            if not self._reply_ready.wait_for(lambda: request_id in self._replies or self.error is not None,
                                              timeout=REPLY_TIMEOUT_S):
                raise RuntimeError(f"the engine process did not answer {message[0]!r} in {REPLY_TIMEOUT_S} s")
            if request_id not in self._replies:
                raise RuntimeError(f"the engine stopped: {self.error}")
            return self._replies.pop(request_id)

    def _next_event(self, timeout: float | None = None) -> tuple:
        """The child's next event; `("error", why)` when the child is gone (or silent past `timeout`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._events.get(timeout=0.5)
            except queue.Empty:
                if not self._process.is_alive():
                    return "error", f"the engine process exited (code {self._process.exitcode})"
                if deadline is not None and time.monotonic() > deadline:
                    return "error", f"no answer from the engine process in {timeout} s"
            except (EOFError, OSError):
                return "error", "the engine process is gone"

    def _read_events(self) -> None:
        while True:
            kind, *payload = self._next_event()
            if kind == "frame":
                deliver = self._deliver.get(payload[0])
                if deliver is not None:
                    try:
                        deliver(payload[1])
                    except Exception:  # a broken connection's callback must not stop the others' frames
                        logger.exception("delivering to conversation %d failed", payload[0])
            elif kind == "reply":
                with self._reply_ready:
                    self._replies[payload[0]] = payload[1]
                    self._reply_ready.notify_all()
            elif kind == "error":
                with self._reply_ready:
                    self.error, self.running = RuntimeError(payload[0]), False
                    self._reply_ready.notify_all()
                return
            elif kind == "stopped":
                return


def _serve_engine(build: Callable[[], RealtimeEngine], commands, events, progress: bool) -> None:
    """The child process: builds the engine, then serves commands until "stop", the parent is gone, or SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent shuts down
    # SIGTERM (the parent's exit terminating it, or a service manager stopping the whole group) ends it through
    # Python's exit, which stops the engine and releases the semaphores it made (tqdm's lock): killed outright, it
    # left them to the resource tracker, which warned of "leaked semaphore objects" on stderr.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        engine = build()
    except Exception as error:  # reported to the parent, which raises it where the server starts
        events.put(("failed", str(error)))
        return
    events.put(("ready", (engine.max_conversations, engine.sampling_rate, engine.frame_size)))
    try:
        _serve_commands(engine, commands, events)
    finally:
        engine.stop()


def _serve_commands(engine: RealtimeEngine, commands, events) -> None:
    """Runs the parent's commands on the engine until "stop", the parent is gone, or the engine failed."""
    conversations = {}
    while True:
        if not commands.poll(0.5):
            if engine.error is not None:
                events.put(("error", f"{type(engine.error).__name__}: {engine.error}"))
                return
            continue
        try:
            kind, *payload = commands.recv()
        except EOFError:  # the parent is gone
            return
        if kind == "audio":
            conversation = conversations.get(payload[0])
            if conversation is not None:
                conversation.push_audio(payload[1])
        elif kind == "join":
            conversation_id, text_prompt, voice_prompt = payload
            try:
                conversation = engine.join(lambda output, cid=conversation_id: events.put(("frame", cid, output)),
                                           text_prompt, voice_prompt)
            except ValueError as error:  # a bad persona prompt: the reason goes back to the client
                events.put(("reply", conversation_id, str(error)))
                continue
            if conversation is not None:
                conversations[conversation_id] = conversation
            events.put(("reply", conversation_id, None if conversation is None else conversation.slot))
        elif kind == "leave":
            conversation = conversations.pop(payload[0], None)
            if conversation is not None:
                engine.leave(conversation)
        elif kind == "metrics":
            events.put(("reply", payload[0], engine.metrics()))
        elif kind == "persona_options":
            events.put(("reply", payload[0], engine.persona_options()))
        elif kind == "start":
            engine.start()
        elif kind == "stop":
            engine.stop()  # before "stopped": the parent then knows the engine is done
            events.put(("stopped",))
            return


def _exit_on_signal(signum: int, frame) -> None:
    sys.exit(128 + signum)


__all__ = ["EngineProcess", "RemoteConversation"]
