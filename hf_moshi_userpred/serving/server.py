"""`hf-moshi-userpred serve`: live conversations over kyutai's moshi WebSocket protocol, many at once.

Routes (aiohttp):

- `GET /api/chat` (WebSocket): moshi's protocol, so kyutai's own clients connect unchanged. Every message is binary,
  its first byte the kind: the server sends `0x00` (handshake) once the conversation has a slot; then both sides send
  `0x01` + Ogg-Opus pages (24 kHz mono, through kyutai's `sphn`), and the server sends `0x02` + a UTF-8 text piece of
  the inner monologue. A client that connects with `?extras=1` also gets `0x07` + a JSON object per 80 ms frame (the
  user prediction's probability and entropy, speculation hit or miss, critical-path and tick milliseconds, late and
  gap-filled flags: see [`RealtimeEngine`]).
- `GET /health`: `{"status": "ok", "conversations": n, "max_conversations": N}` (503 and `"error"` if the engine stopped).
- `GET /metrics`: the engine's metrics (tick time p50/p95/p99, late frames, hit rate, ...) and the server's counts.
- `GET /` and `/static/...`: the web page.

Each connection has its own Opus decoder and encoder and its own bounded outgoing queue, sent by a writer task, so a
slow or broken client delays no one else and costs a bounded amount of memory. What ends a conversation, with its
WebSocket close code: all slots taken, before the handshake (`CLOSE_BUSY` 1013, "try again later"); a message kind
other than audio or a text frame (1003); an empty message or audio that is not Ogg-Opus (1007); a message over
`max_message_bytes` (1009); no decoded audio for `idle_timeout_s`, or a client that stopped reading: a send waiting
`send_timeout_s` or `max_queued_bytes` of output queued (1008); server shutdown (1001); the engine stopped on an error
(1011). Its slot is freed at once; the other conversations go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
from pathlib import Path

import sphn
from aiohttp import WSCloseCode, WSMsgType, web

from .engine_protocol import ConversationEngine, FrameOutput

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
KIND_HANDSHAKE, KIND_AUDIO, KIND_TEXT, KIND_EXTRAS = 0x00, 0x01, 0x02, 0x07
CLOSE_BUSY = WSCloseCode.TRY_AGAIN_LATER  # 1013
# Output held for a connection past its outbox, in the kernel's socket buffer and again in the server's transport:
# a few seconds of output (2-9 KB/s), plenty for any round trip, and small enough that a send waits soon after a
# client stops reading. The kernel would otherwise grow its buffer to megabytes on a fast link (minutes of output),
# and the slot would stay taken that long.
SEND_BUFFER_BYTES = 16 * 1024
CLOSE_TIMEOUT_S = 2.0  # how long a closed client has to answer the close before its socket is dropped


class _Closing(Exception):
    """Ends a conversation with a close code and a reason for the client."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class _Outbox:
    """A connection's encoded output (Opus pages, text, extras) on its way to the socket: at most `max_bytes` of it.

    The engine's frames are encoded as they come (in the event loop), so what waits is a few hundred bytes a frame,
    not the frame's samples; once full it takes nothing more and is `overflowed` (the writer then closes).
    """

    def __init__(self, sampling_rate: int, extras: bool, max_bytes: int):
        self.opus, self.extras, self.max_bytes = sphn.OpusStreamWriter(sampling_rate), extras, max_bytes
        self.messages: asyncio.Queue[bytes] = asyncio.Queue()
        self.queued_bytes, self.overflowed = 0, False

    def put(self, output: FrameOutput) -> None:
        if self.overflowed:
            return
        if output.audio is not None:
            pages = self.opus.append_pcm(output.audio)
            if len(pages):
                self.add(bytes([KIND_AUDIO]) + pages)
        if output.text:
            self.add(bytes([KIND_TEXT]) + output.text.encode("utf-8"))
        if output.extras is not None and self.extras:
            self.add(bytes([KIND_EXTRAS]) + json.dumps(output.extras).encode("utf-8"))

    def add(self, message: bytes) -> None:
        if self.queued_bytes + len(message) > self.max_bytes:
            self.overflowed = True
            return
        self.queued_bytes += len(message)
        self.messages.put_nowait(message)

    async def get(self) -> bytes:
        message = await self.messages.get()
        self.queued_bytes -= len(message)
        return message


class MoshiServer:
    """The aiohttp application around an engine: a [`RealtimeEngine`], or an [`EngineProcess`] running one.

    Args:
        engine: the engine (started with the application, stopped at shutdown).
        idle_timeout_s: close a conversation that sent no audio (no Opus that decodes to samples) for this long.
        send_timeout_s: close a client whose socket took none of its output for this long (the client stopped
            reading, or its network did: the output buffered for it is full).
        max_message_bytes: the largest message accepted (a 80 ms Opus page is a few hundred bytes).
        max_queued_bytes: close a client with this much encoded output waiting for it (2-9 KB a second of
            conversation: 128 KiB is 15-60 s behind), a client reading slower than the output comes.
    """

    def __init__(self, engine: ConversationEngine, *, idle_timeout_s: float = 10.0, send_timeout_s: float = 10.0,
                 max_message_bytes: int = 1 << 20, max_queued_bytes: int = 128 * 1024):
        for name, seconds in (("idle_timeout_s", idle_timeout_s), ("send_timeout_s", send_timeout_s)):
            if not 0 < seconds < math.inf:
                raise ValueError(f"{name} must be a positive number of seconds, got {seconds!r}")
        self.engine, self.idle_timeout_s, self.send_timeout_s = engine, idle_timeout_s, send_timeout_s
        self.max_message_bytes, self.max_queued_bytes = max_message_bytes, max_queued_bytes
        self.connections: dict[web.WebSocketResponse, web.Request] = {}
        self.counts = {"connections": 0, "refused_busy": 0, "refused_prompt": 0, "closed_by_server": 0}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/chat", self.chat)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/personas", self.personas)
        if STATIC_DIR.is_dir():
            app.router.add_get("/", self.index)
            app.router.add_static("/static/", STATIC_DIR)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _start(self, app: web.Application) -> None:
        self.engine.start()

    async def _shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(_close(ws, request, WSCloseCode.GOING_AWAY, "server shutting down")
                               for ws, request in list(self.connections.items())))
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def health(self, request: web.Request) -> web.Response:
        ok = self.engine.running and self.engine.error is None
        return web.json_response({"status": "ok" if ok else "error", "conversations": self.engine.active_conversations,
                                  "max_conversations": self.engine.max_conversations}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.json_response({**self.engine.metrics(), "server": dict(self.counts)})

    async def personas(self, request: web.Request) -> web.Response:
        """The voices a connection may name (`voice_prompt`) and the default persona: the page's voice picker."""
        return web.json_response(self.engine.persona_options())

    # ---------------------------------------------------------------------------------------- /api/chat
    async def chat(self, request: web.Request) -> web.WebSocketResponse:
        # writer_limit: aiohttp checks whether the transport is full only every writer_limit bytes sent
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, timeout=CLOSE_TIMEOUT_S,
                                   writer_limit=SEND_BUFFER_BYTES)
        await ws.prepare(request)
        self.counts["connections"] += 1
        outbox = _Outbox(self.engine.sampling_rate, request.query.get("extras", "").lower() in ("1", "true", "yes"),
                         self.max_queued_bytes)
        loop = asyncio.get_running_loop()
        # PersonaPlex's query parameters: absent, the server's default persona; empty, none.
        text_prompt, voice_prompt = request.query.get("text_prompt"), request.query.get("voice_prompt")
        try:
            conversation = self.engine.join(lambda output: loop.call_soon_threadsafe(outbox.put, output),
                                            text_prompt, voice_prompt)
        except ValueError as error:  # a bad persona prompt: refused before any slot is taken
            self.counts["refused_prompt"] += 1
            await _close(ws, request, WSCloseCode.POLICY_VIOLATION, f"bad persona prompt: {error}")
            return ws
        if conversation is None:
            self.counts["refused_busy"] += 1
            reason = f"server busy: all {self.engine.max_conversations} conversation slots are in use, try again later"
            await ws.close(code=CLOSE_BUSY, message=reason.encode())
            return ws
        logger.info("conversation in slot %d (%s)", conversation.slot, request.remote)
        _limit_send_buffer(request.transport)
        self.connections[ws] = request
        outbox.add(bytes([KIND_HANDSHAKE]))
        tasks = {asyncio.create_task(self._write(ws, outbox)), asyncio.create_task(self._receive(ws, conversation))}
        closing = None
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if isinstance(error, _Closing):
                    closing = error
                    self.counts["closed_by_server"] += 1
                    logger.info("closing slot %d: %s", conversation.slot, error.reason)
                elif error is not None and not isinstance(error, ConnectionError):
                    raise error
        finally:
            self.engine.leave(conversation)  # before the close: a client that does not read may take it a while
            for task in tasks:
                task.cancel()
            del self.connections[ws]
            logger.info("slot %d free", conversation.slot)
        if closing is not None:
            await _close(ws, request, closing.code, closing.reason)
        return ws

    async def _receive(self, ws: web.WebSocketResponse, conversation) -> None:
        """Decodes the client's audio into the conversation until it closes; raises `_Closing` on bad input, or
        when no audio came for `idle_timeout_s` (messages that decode to no samples, e.g. bare `0x01`, do not
        count: they would hold a slot forever)."""
        reader = sphn.OpusStreamReader(self.engine.sampling_rate)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.idle_timeout_s
        while True:
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:  # (aiohttp reads a timeout of 0 as none)
                    raise asyncio.TimeoutError
                message = await ws.receive(timeout=remaining)
            except asyncio.TimeoutError:
                raise _Closing(WSCloseCode.POLICY_VIOLATION,
                               f"no audio received for {self.idle_timeout_s:g} s") from None
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return  # the client left, or aiohttp closed it (a message over max_msg_size: 1009)
            if message.type == WSMsgType.TEXT:
                raise _Closing(WSCloseCode.UNSUPPORTED_DATA,
                               "text frames are not part of the protocol: send binary 0x01 + Ogg-Opus")
            data = message.data
            if not data:
                raise _Closing(WSCloseCode.INVALID_TEXT, "empty message")
            if data[0] != KIND_AUDIO:
                raise _Closing(WSCloseCode.UNSUPPORTED_DATA,
                               f"unsupported message kind 0x{data[0]:02x}: clients send 0x01 (Ogg-Opus audio)")
            try:
                pcm = reader.append_bytes(data[1:])
            except ValueError as error:  # sphn: not an Ogg stream, or not Opus in it
                raise _Closing(WSCloseCode.INVALID_TEXT, f"invalid Ogg-Opus audio: {error}")
            if pcm.size:
                try:
                    conversation.push_audio(pcm)
                except ValueError as error:
                    raise _Closing(WSCloseCode.INVALID_TEXT, f"invalid audio: {error}")
                deadline = loop.time() + self.idle_timeout_s

    async def _write(self, ws: web.WebSocketResponse, outbox: _Outbox) -> None:
        """Sends the outbox to the client as it fills; raises `_Closing` when the client stops reading (a send
        waits `send_timeout_s`, or the outbox overflowed) or the engine stopped."""
        while True:
            if outbox.overflowed:
                raise _Closing(WSCloseCode.POLICY_VIOLATION,
                               f"client not reading: over {outbox.max_bytes // 1024} KiB of output queued")
            try:
                message = await asyncio.wait_for(outbox.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if self.engine.error is not None:
                    raise _Closing(WSCloseCode.INTERNAL_ERROR, "internal error: the engine stopped")
                continue
            try:
                await asyncio.wait_for(ws.send_bytes(message), self.send_timeout_s)
            except asyncio.TimeoutError:
                raise _Closing(WSCloseCode.POLICY_VIOLATION,
                               f"client not reading: a send waited {self.send_timeout_s:g} s") from None


def _limit_send_buffer(transport: asyncio.Transport | None) -> None:
    """Caps what the kernel and the transport hold for one connection at `SEND_BUFFER_BYTES` each."""
    if transport is None:  # the client is already gone
        return
    transport.set_write_buffer_limits(high=SEND_BUFFER_BYTES)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)


async def _close(ws: web.WebSocketResponse, request: web.Request, code: int, reason: str) -> None:
    """Closes with `code` and `reason`, waiting `CLOSE_TIMEOUT_S` at most: a client that does not read never takes
    the close frame, and its socket is then dropped with what was still buffered for it."""
    try:
        # a close reason holds 123 bytes: cut on a character boundary (a client refuses broken UTF-8)
        message = reason.encode()[:120].decode(errors="ignore").encode()
        await asyncio.wait_for(ws.close(code=code, message=message), CLOSE_TIMEOUT_S)
    except asyncio.TimeoutError:
        pass
    transport = request.transport
    if transport is not None and transport.get_write_buffer_size():  # output stuck: the client does not read
        transport.abort()


def run_server(server: MoshiServer, host: str = "127.0.0.1", port: int = 8998) -> None:
    """Serves until SIGINT or SIGTERM, then closes every conversation (1001) and stops the engine."""
    logger.info("serving on http://%s:%d (%d conversation slots)", host, port, server.engine.max_conversations)
    web.run_app(server.app(), host=host, port=port, print=None, handle_signals=True, shutdown_timeout=5.0,
                access_log=None)
    if server.engine.error is not None:
        raise RuntimeError(f"the engine stopped: {server.engine.error}") from server.engine.error


__all__ = ["CLOSE_BUSY", "KIND_AUDIO", "KIND_EXTRAS", "KIND_HANDSHAKE", "KIND_TEXT", "MoshiServer", "run_server"]
