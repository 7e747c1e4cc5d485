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

Each connection has its own Opus decoder and encoder and its own outgoing queue, so a slow or broken client delays no
one else. What ends a conversation, with its WebSocket close code: all slots taken, before the handshake
(`CLOSE_BUSY` 1013, "try again later"); a message kind other than audio or a text frame (1003); an empty message or
audio that is not Ogg-Opus (1007); a message over `max_message_bytes` (1009); no message for `idle_timeout_s` or a
client that stopped reading (1008); server shutdown (1001); the engine stopped on an error (1011). Its slot is freed at
once; the other conversations go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import sphn
from aiohttp import WSCloseCode, WSMsgType, web

from .engine_protocol import ConversationEngine, FrameOutput

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
KIND_HANDSHAKE, KIND_AUDIO, KIND_TEXT, KIND_EXTRAS = 0x00, 0x01, 0x02, 0x07
CLOSE_BUSY = WSCloseCode.TRY_AGAIN_LATER  # 1013


class _Closing(Exception):
    """Ends a conversation with a close code and a reason for the client."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class MoshiServer:
    """The aiohttp application around an engine: a [`RealtimeEngine`], or an [`EngineProcess`] running one.

    Args:
        engine: the engine (started with the application, stopped at shutdown).
        idle_timeout_s: close a conversation that sent nothing for this long.
        max_message_bytes: the largest message accepted (a 80 ms Opus page is a few hundred bytes).
        max_queued_frames: close a client that has this many frames of output it has not read.
    """

    def __init__(self, engine: ConversationEngine, *, idle_timeout_s: float = 10.0, max_message_bytes: int = 1 << 20,
                 max_queued_frames: int = 250):
        if not idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be positive, got {idle_timeout_s!r}")
        self.engine, self.idle_timeout_s = engine, idle_timeout_s
        self.max_message_bytes, self.max_queued_frames = max_message_bytes, max_queued_frames
        self.connections: set[web.WebSocketResponse] = set()
        self.counts = {"connections": 0, "refused_busy": 0, "closed_by_server": 0}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/chat", self.chat)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        if STATIC_DIR.is_dir():
            app.router.add_get("/", self.index)
            app.router.add_static("/static/", STATIC_DIR)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _start(self, app: web.Application) -> None:
        self.engine.start()

    async def _shutdown(self, app: web.Application) -> None:
        for ws in list(self.connections):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def health(self, request: web.Request) -> web.Response:
        ok = self.engine.running and self.engine.error is None
        return web.json_response({"status": "ok" if ok else "error", "conversations": self.engine.active_conversations,
                                  "max_conversations": self.engine.max_conversations}, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.json_response({**self.engine.metrics(), "server": dict(self.counts)})

    # ---------------------------------------------------------------------------------------- /api/chat
    async def chat(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, timeout=2.0)
        await ws.prepare(request)
        self.counts["connections"] += 1
        extras = request.query.get("extras", "").lower() in ("1", "true", "yes")
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[FrameOutput] = asyncio.Queue()
        conversation = self.engine.join(lambda output: loop.call_soon_threadsafe(outbox.put_nowait, output))
        if conversation is None:
            self.counts["refused_busy"] += 1
            reason = f"server busy: all {self.engine.max_conversations} conversation slots are in use, try again later"
            await ws.close(code=CLOSE_BUSY, message=reason.encode())
            return ws
        logger.info("conversation in slot %d (%s)", conversation.slot, request.remote)
        self.connections.add(ws)
        sender = asyncio.create_task(self._send(ws, outbox, extras))
        try:
            await ws.send_bytes(bytes([KIND_HANDSHAKE]))
            receiver = asyncio.create_task(self._receive(ws, conversation))
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if isinstance(error, _Closing):
                    self.counts["closed_by_server"] += 1
                    logger.info("closing slot %d: %s", conversation.slot, error.reason)
                    await ws.close(code=error.code, message=error.reason.encode()[:120])
                elif error is not None and not isinstance(error, ConnectionError):
                    raise error
            receiver.cancel()
        except ConnectionError:
            pass
        finally:
            self.engine.leave(conversation)
            sender.cancel()
            self.connections.discard(ws)
            logger.info("slot %d free", conversation.slot)
        return ws

    async def _receive(self, ws: web.WebSocketResponse, conversation) -> None:
        """Decodes the client's audio into the conversation until it closes; raises `_Closing` on bad input."""
        reader = sphn.OpusStreamReader(self.engine.sampling_rate)
        while True:
            try:
                message = await ws.receive(timeout=self.idle_timeout_s)
            except asyncio.TimeoutError:
                raise _Closing(WSCloseCode.POLICY_VIOLATION, f"no audio received for {self.idle_timeout_s:g} s")
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

    async def _send(self, ws: web.WebSocketResponse, outbox: asyncio.Queue, extras: bool) -> None:
        """Sends the engine's output to the client as it comes; raises `_Closing` if the client stops reading or the
        engine stopped."""
        writer = sphn.OpusStreamWriter(self.engine.sampling_rate)
        while True:
            try:
                output = await asyncio.wait_for(outbox.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if self.engine.error is not None:
                    raise _Closing(WSCloseCode.INTERNAL_ERROR, "internal error: the engine stopped")
                continue
            if outbox.qsize() > self.max_queued_frames:
                raise _Closing(WSCloseCode.POLICY_VIOLATION,
                               f"client not reading: {outbox.qsize()} frames of output queued")
            if output.audio is not None:
                pages = writer.append_pcm(output.audio)
                if len(pages):
                    await ws.send_bytes(bytes([KIND_AUDIO]) + pages)
            if output.text:
                await ws.send_bytes(bytes([KIND_TEXT]) + output.text.encode("utf-8"))
            if output.extras is not None and extras:
                await ws.send_bytes(bytes([KIND_EXTRAS]) + json.dumps(output.extras).encode("utf-8"))


def run_server(server: MoshiServer, host: str = "127.0.0.1", port: int = 8998) -> None:
    """Serves until SIGINT or SIGTERM, then closes every conversation (1001) and stops the engine."""
    logger.info("serving on http://%s:%d (%d conversation slots)", host, port, server.engine.max_conversations)
    web.run_app(server.app(), host=host, port=port, print=None, handle_signals=True, shutdown_timeout=5.0,
                access_log=None)
    if server.engine.error is not None:
        raise RuntimeError(f"the engine stopped: {server.engine.error}") from server.engine.error


__all__ = ["CLOSE_BUSY", "KIND_AUDIO", "KIND_EXTRAS", "KIND_HANDSHAKE", "KIND_TEXT", "MoshiServer", "run_server"]
