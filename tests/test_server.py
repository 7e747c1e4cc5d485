"""`serve`: kyutai's own client talks to our server, several at once; bad input closes only the bad connection with a
clear reason; busy, health, metrics and a clean shutdown; the engine's batched conversations equal solo ones.

The servers are real `hf-moshi-userpred serve` processes on free localhost ports, with real WebSockets and real
Ogg-Opus (kyutai's `sphn`) on both sides.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types

import aiohttp
import numpy as np
import pytest
import soundfile
import soxr
import sphn

from helpers import serving
from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.audio import load_mimi, load_tokenizer
from hf_moshi_userpred.serving.engine import RealtimeEngine
from hf_moshi_userpred.sample import SAMPLE_DIR

RATE, FRAME = 24_000, 1920
CLI = [sys.executable, "-m", "hf_moshi_userpred"]


def held_out_user_channels(count: int, seconds: float) -> list[np.ndarray]:
    """The user (right) channels of the first `count` held-out sample dialogues at 24 kHz, `seconds` long each."""
    paths = [json.loads(line)["path"] for line in (SAMPLE_DIR / "eval.jsonl").read_text().splitlines() if line]
    channels = []
    for path in paths[:count]:
        audio, rate = soundfile.read(SAMPLE_DIR / path, dtype="float32", always_2d=True)
        user = soxr.resample(audio[:, 1], rate, RATE)[: int(seconds * RATE)]
        channels.append(np.ascontiguousarray(user, dtype=np.float32))
    return channels


async def get_json(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


class Talk:
    """A plain protocol client: sends `audio` in real time as Ogg-Opus, records everything it receives."""

    def __init__(self, url: str, audio: np.ndarray, extras: bool = False):
        self.url = url.replace("http", "ws") + "/api/chat" + ("?extras=1" if extras else "")
        self.audio, self.kinds, self.texts, self.extras = audio, [], [], []
        self.samples_received, self.close_code, self.handshake = 0, None, False

    async def run(self, session: aiohttp.ClientSession) -> Talk:
        writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
        async with session.ws_connect(self.url) as ws:
            receiver = asyncio.create_task(self._receive(ws, reader))
            while not self.handshake and not receiver.done():
                await asyncio.sleep(0.01)
            start = time.monotonic()
            for index, frame in enumerate(np.split(self.audio[: len(self.audio) // FRAME * FRAME],
                                                   len(self.audio) // FRAME)):
                if ws.closed:
                    break
                pages = writer.append_pcm(frame)
                if len(pages):
                    await ws.send_bytes(b"\x01" + pages)
                await asyncio.sleep(max(0.0, start + (index + 1) * 0.08 - time.monotonic()))
            await asyncio.sleep(0.6)  # the last frames' answers
            await ws.close()
            await receiver
        return self

    async def _receive(self, ws, reader) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                continue
            kind, payload = message.data[0], message.data[1:]
            self.kinds.append(kind)
            if kind == 0:
                self.handshake = True
            elif kind == 1:
                self.samples_received += reader.append_bytes(payload).size
            elif kind == 2:
                self.texts.append(payload.decode())
            elif kind == 7:
                self.extras.append(json.loads(payload))
        self.close_code = ws.close_code


async def expect_close(url: str, send, wait_s: float = 5.0) -> tuple[int, str]:
    """Connects, waits for the handshake, runs `send(ws)`, and returns the close code and reason the server sends."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url.replace("http", "ws") + "/api/chat") as ws:
            first = await ws.receive(timeout=10)
            assert first.type == aiohttp.WSMsgType.BINARY and first.data == b"\x00"
            await send(ws)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                message = await ws.receive(timeout=wait_s)
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    return ws.close_code, message.extra or ""
            raise AssertionError("the server did not close the connection")


# ------------------------------------------------------------------------------ kyutai's client, several
def kyutai_client_module(recordings: list, feeds: list):
    """`moshi.client` with `sounddevice` replaced: each input stream plays the next of `feeds` at real-time pace and
    each output stream records what the client plays into `recordings`, as `(connection, blocks)`: the client plays
    a block of the model's audio when it has one and zeros otherwise (an underrun, which it reports to its printer's
    `print_lag`)."""

    class Stream:
        def __init__(self, samplerate, channels, blocksize, callback):
            self.blocksize, self.callback, self.stop = blocksize, callback, threading.Event()
            self.thread = threading.Thread(target=self.run, daemon=True)

        def __enter__(self):
            self.thread.start()
            return self

        def __exit__(self, *exc):
            self.stop.set()
            self.thread.join()

    class InputStream(Stream):
        def run(self):
            audio = feeds.pop(0)
            start = time.monotonic()
            for index in range(len(audio) // self.blocksize):
                if self.stop.is_set():
                    return
                self.callback(audio[index * self.blocksize : (index + 1) * self.blocksize, None], self.blocksize,
                              None, None)
                self.stop.wait(max(0.0, start + (index + 1) * 0.08 - time.monotonic()))

    class OutputStream(Stream):
        def run(self):
            played = []
            recordings.append((getattr(self.callback, "__self__", None), played))
            start, index = time.monotonic(), 0
            while not self.stop.is_set():
                out = np.zeros((self.blocksize, 1), dtype=np.float32)
                self.callback(out, self.blocksize, None, None)
                played.append(out[:, 0].copy())
                index += 1
                self.stop.wait(max(0.0, start + index * 0.08 - time.monotonic()))

    sys.modules["sounddevice"] = types.SimpleNamespace(InputStream=InputStream, OutputStream=OutputStream)
    import moshi.client

    return moshi.client


@pytest.mark.slow
def test_kyutai_clients_hold_conversations_at_once(demo_model_dir):
    """Three of kyutai's `moshi.client.Connection`s, unchanged, talk to one server at the same time: each gets the
    model's audio (played back in 80 ms blocks, not underruns; the 30-step model may well say nothing loud), and text
    comes through."""
    from moshi.client_utils import RawPrinter

    recordings, feeds = [], held_out_user_channels(3, 5.0)
    client = kyutai_client_module(recordings, list(feeds))

    class Printer(RawPrinter):
        def __init__(self):
            super().__init__()
            self.tokens, self.underruns = [], 0

        def print_token(self, token: str):
            self.tokens.append(token)

        def print_lag(self):  # the client had no model audio to play for an 80 ms block
            self.underruns += 1

    async def converse(url: str, printer: Printer):
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "/api/chat") as ws:
            connection = client.Connection(printer, ws, asyncio.get_running_loop())
            task = asyncio.create_task(connection.run())
            await asyncio.sleep(6.0)
            await ws.close()
            await task

    async def main(url: str):
        printers = [Printer() for _ in feeds]
        await asyncio.gather(*(converse(url.replace("http", "ws"), printer) for printer in printers))
        return printers

    with serving(demo_model_dir, "--max-sessions", "3", "--seed", "0") as (url, _):
        printers = asyncio.run(main(url))
        _, metrics = asyncio.run(get_json(url + "/metrics"))
    assert len(recordings) == 3 and {connection.printer for connection, _ in recordings} == set(printers)
    for connection, played in recordings:
        # 5 s sent = 62 frames; minus the model's one-frame delay and what is still in flight at the end. A block is
        # the model's audio unless the client reported an underrun for it (and played zeros)
        delivered = len(played) - connection.printer.underruns
        assert delivered >= 45, f"only {delivered} 80 ms blocks of model audio played ({len(played)} blocks)"
        played = np.concatenate(played)
        # limited to -1 dBFS before Opus (whose coding may overshoot a little): never past full scale
        assert np.abs(played).max() <= 1.0
    # the 30-step model mostly writes padding: text from the three conversations together
    assert sum(len(printer.tokens) for printer in printers) > 0
    assert metrics["conversations_served"] == 3 and metrics["conversations"] == 0


# ------------------------------------------------------------------------------------ faults, isolated
@pytest.mark.slow
def test_bad_clients_get_a_reason_and_the_others_go_on(demo_model_dir):
    """Each misbehaving client is closed with its own code and reason and frees its slot, while a good client
    streaming through all of it gets every frame's audio in time."""
    good_audio = held_out_user_channels(1, 14.0)[0]

    async def unknown_kind(ws):
        await ws.send_bytes(b"\x05hello")

    async def text_frame(ws):
        await ws.send_str("hello")

    async def garbage_opus(ws):
        await ws.send_bytes(b"\x01" + b"not an ogg stream at all" * 4)
        await ws.send_bytes(b"\x01" + b"OggS" + bytes(60))

    async def empty(ws):
        await ws.send_bytes(b"")

    async def oversized(ws):  # over --max-message-bytes, small enough to be sent whole before the server closes
        await ws.send_bytes(b"\x01" + bytes(8192))

    async def stops_sending(ws):
        writer = sphn.OpusStreamWriter(RATE)
        await ws.send_bytes(b"\x01" + writer.append_pcm(good_audio[:FRAME]))

    async def main(url: str):
        async with aiohttp.ClientSession() as session:
            good = asyncio.create_task(Talk(url, good_audio, extras=True).run(session))
            await asyncio.sleep(1.0)
            closes = {}
            for name, send in [("unknown_kind", unknown_kind), ("text_frame", text_frame),
                               ("garbage_opus", garbage_opus), ("empty", empty), ("oversized", oversized),
                               ("stops_sending", stops_sending)]:
                closes[name] = await expect_close(url, send)
                _, health = await get_json(url + "/health")
                closes[name + "_sessions_after"] = health["conversations"]
            # a client that disconnects in the middle of a frame (half a frame sent, then the socket dropped)
            ws = await session.ws_connect(url.replace("http", "ws") + "/api/chat")
            await ws.receive(timeout=10)
            writer = sphn.OpusStreamWriter(RATE)
            await ws.send_bytes(b"\x01" + writer.append_pcm(good_audio[: FRAME // 2]))
            ws._response.connection.transport.abort()
            await asyncio.sleep(1.0)
            _, health = await get_json(url + "/health")
            closes["dropped_sessions_after"] = health["conversations"]
            return closes, await good

    with serving(demo_model_dir, "--max-sessions", "3", "--idle-timeout", "2", "--max-message-bytes", "4096",
                 "--seed", "0") as (url, _):
        closes, good = asyncio.run(main(url))
        _, metrics = asyncio.run(get_json(url + "/metrics"))
    assert closes["unknown_kind"][0] == 1003 and "unsupported message kind 0x05" in closes["unknown_kind"][1]
    assert closes["text_frame"][0] == 1003 and "text frames are not part of the protocol" in closes["text_frame"][1]
    assert closes["garbage_opus"][0] == 1007 and "invalid Ogg-Opus audio" in closes["garbage_opus"][1]
    assert closes["empty"] == (1007, "empty message")
    assert closes["oversized"][0] == 1009
    assert closes["stops_sending"][0] == 1008 and "no audio received for 2 s" in closes["stops_sending"][1]
    for name in ("unknown_kind", "text_frame", "garbage_opus", "empty", "oversized", "stops_sending", "dropped"):
        assert closes[name + "_sessions_after"] == 1, f"{name}: its slot was not freed"
    # the good client: the server never closed it, and every frame it sent was answered (all but the model's
    # one-frame delay), with an extras message per frame
    sent = len(good_audio) // FRAME
    assert good.close_code in (1000, None) and good.handshake
    assert good.samples_received >= (sent - 2) * FRAME, (good.samples_received / FRAME, sent)
    frames = [extra["frame"] for extra in good.extras]
    assert frames == list(range(len(frames))) and len(frames) >= sent - 1
    assert {"user_prob", "user_entropy", "turn_end", "user_silence", "speculation", "critical_ms", "tick_ms", "late",
            "gap_filled"} <= set(good.extras[-1])
    assert all(0 <= extra["turn_end"] <= 1 for extra in good.extras[1:])  # the demo model's voice-activity head
    assert metrics["server"]["closed_by_server"] >= 5 and metrics["conversations"] == 0


@pytest.mark.slow
def test_busy_health_metrics_and_clean_shutdown(demo_model_dir):
    """All slots taken: the next client is refused before the handshake with 1013 and a reason, the slot is
    taken again once free; /health and /metrics report it; SIGTERM closes live conversations with 1001 and exits 0."""

    async def main(url: str, process: subprocess.Popen):
        async with aiohttp.ClientSession() as session:
            first = await session.ws_connect(url.replace("http", "ws") + "/api/chat")
            assert (await first.receive(timeout=10)).data == b"\x00"
            refused = await session.ws_connect(url.replace("http", "ws") + "/api/chat")
            message = await refused.receive(timeout=10)
            busy = (message.type, refused.close_code, message.extra)
            health = await get_json(url + "/health")
            await first.close()
            await asyncio.sleep(0.5)
            live = await session.ws_connect(url.replace("http", "ws") + "/api/chat")
            handshake = (await live.receive(timeout=10)).data
            writer = sphn.OpusStreamWriter(RATE)
            for frame in np.split(held_out_user_channels(1, 2.0)[0], 25):
                await live.send_bytes(b"\x01" + writer.append_pcm(frame))
                await asyncio.sleep(0.08)
            metrics = await get_json(url + "/metrics")
            process.send_signal(signal.SIGTERM)
            while (closing := await live.receive(timeout=15)).type == aiohttp.WSMsgType.BINARY:
                pass  # the output still in flight
            return busy, health, handshake, metrics, (closing.type, live.close_code, closing.extra)

    with serving(demo_model_dir, "--max-sessions", "1") as (url, process):
        busy, health, handshake, metrics, closing = asyncio.run(main(url, process))
        assert process.wait(timeout=20) == 0
    assert busy[0] == aiohttp.WSMsgType.CLOSE and busy[1] == 1013
    assert "server busy: all 1 conversation slots are in use" in busy[2]
    assert health == (200, {"status": "ok", "conversations": 1, "max_conversations": 1})
    assert handshake == b"\x00"
    status, metrics = metrics
    assert status == 200 and metrics["conversations"] == 1 and metrics["server"]["refused_busy"] == 1
    for key in ("p50", "p95", "p99"):
        assert metrics["tick_ms"][key] > 0 and metrics["critical_ms"][key] > 0
    assert metrics["ticks"] >= 20 and 0 <= metrics["speculation"]["hit_rate"] <= 1
    assert closing == (aiohttp.WSMsgType.CLOSE, 1001, "server shutting down")


# ------------------------------------------------------------------------------------- the engine itself
@pytest.fixture(scope="module")
def parts(demo_model_dir, one_thread):
    model = MoshiUserPredForConditionalGeneration.from_pretrained(demo_model_dir).eval()
    return model, load_mimi(demo_model_dir / "mimi"), load_tokenizer(demo_model_dir / "tokenizer.model")


def engine_run(parts, max_conversations: int, plan: dict, ticks: int, **kwargs) -> dict:
    """Ticks an engine by hand. `plan[name] = (slot_join_tick, leave_tick, audio, late_ticks)`; returns per name the
    list of outputs it received."""
    # ticked by hand: a long period leaves time to speculate whatever the machine's load
    engine = RealtimeEngine(*parts, max_conversations=max_conversations, do_sample=False, audio_do_sample=False,
                            speculate_top_k=2, seed=0, frame_period_s=10.0, **kwargs)
    received, conversations, fed = {name: [] for name in plan}, {}, {name: 0 for name in plan}
    try:
        for tick in range(ticks):
            for name, (join, leave, audio, late) in plan.items():
                if tick == join:
                    conversations[name] = engine.join(received[name].append)
                    assert conversations[name] is not None
                if tick == leave:
                    engine.leave(conversations.pop(name))
                if name in conversations and tick not in late and fed[name] < len(audio) // FRAME:
                    conversations[name].push_audio(audio[fed[name] * FRAME : (fed[name] + 1) * FRAME])
                    fed[name] += 1
            engine.tick()
    finally:
        engine.stop()
    return received


def assert_same_conversation(batched: list, solo: list) -> None:
    audio = [(o.frame, o.text) for o in batched if o.extras is None]
    assert audio == [(o.frame, o.text) for o in solo if o.extras is None]
    for a, b in zip([o for o in batched if o.audio is not None], [o for o in solo if o.audio is not None]):
        np.testing.assert_allclose(a.audio, b.audio, atol=1e-4 * max(1.0, np.abs(b.audio).max()))
    assert sum(o.audio is not None for o in batched) >= 5
    assert max(np.abs(o.audio).max() for o in batched if o.audio is not None) <= 10 ** (-1 / 20)  # the limiter


def test_engine_conversations_equal_solo_runs(parts):
    """Greedy: conversations that join, leave, reuse a freed slot and have a late frame (paused) each get exactly
    what they would get alone on the server."""
    a, b, c = held_out_user_channels(3, 2.4)
    plan = {"a": (0, None, a, {5, 6}), "b": (3, 12, b, set()), "c": (13, None, c, {16})}
    batched = engine_run(parts, 2, plan, 40)
    for name, (join, leave, audio, late) in plan.items():
        solo = engine_run(parts, 1, {name: (0, None if leave is None else leave - join, audio,
                                            {t - join for t in late})}, 40 - join)
        assert_same_conversation(batched[name], solo[name])
    extras = [o.extras for o in batched["a"] if o.extras is not None]
    assert [e["late"] for e in extras] == [False] * len(extras)  # a paused slot has no frame: nothing to report
    assert {e["speculation"] for e in extras} <= {"hit", "miss", "not_tried"}
    assert sum(e["speculation"] != "not_tried" for e in extras) >= len(extras) - 4  # all but after a join / pause


def test_engine_gap_fills_late_frames_and_drops_them_on_arrival(parts):
    """With gap filling on, a late frame is stepped on the prediction (flagged late and gap-filled) and the real
    frame, when it arrives after its tick, is dropped: the conversation stays in time."""
    audio = held_out_user_channels(1, 2.0)[0]
    engine = RealtimeEngine(*parts, max_conversations=2, gap_fill_threshold=0.0, max_gap_frames=2, jitter_frames=0,
                            seed=0)
    outputs = []
    conversation = engine.join(outputs.append)
    # frame 4 arrives one tick late, with frame 5; frames 7, 8 and 9 arrive with frame 10 (in order, as over TCP)
    arrivals = {tick: [tick] for tick in range(12) if tick not in (4, 7, 8, 9)}
    arrivals[5], arrivals[10] = [4, 5], [7, 8, 9, 10]
    try:
        for tick in range(12):
            for frame in arrivals.get(tick, []):
                conversation.push_audio(audio[frame * FRAME : (frame + 1) * FRAME])
            engine.tick()
    finally:
        engine.stop()
    extras = {o.extras["frame"]: o.extras for o in outputs if o.extras is not None}
    assert extras[4]["late"] and extras[4]["gap_filled"]
    assert extras[7]["gap_filled"] and extras[8]["gap_filled"]  # two in a row at most ...
    assert 9 not in extras or not extras[9]["gap_filled"]  # ... then the slot pauses
    metrics = engine.metrics()
    assert metrics["gap_filled_frames"] == 3 and metrics["late_frames"] == 4


def test_engine_without_the_user_branch(parts):
    """`predict_user=False` (`serve --no-predict-user`): moshi's work only, the same system output as with the
    branch (greedy), extras without a prediction and no speculation."""
    audio = held_out_user_channels(1, 1.6)[0]
    plan = {"a": (0, None, audio, set())}
    with_branch = engine_run(parts, 1, plan, 20)["a"]
    without = engine_run(parts, 1, plan, 20, predict_user=False)["a"]
    assert_same_conversation(without, with_branch)
    extras = [o.extras for o in without if o.extras is not None]
    assert len(extras) == 19  # 20 ticks, the first one filling the jitter buffer
    assert all(e["user_prob"] is None and e["user_entropy"] is None and e["speculation"] == "not_tried"
               for e in extras)


def test_engine_rejects_bad_settings(parts):
    with pytest.raises(ValueError, match="max_conversations must be a positive integer, got 0"):
        RealtimeEngine(*parts, max_conversations=0)
    with pytest.raises(ValueError, match="frame_period_s must be positive"):
        RealtimeEngine(*parts, frame_period_s=0)
    engine = RealtimeEngine(*parts, max_conversations=1)
    try:
        conversation = engine.join(lambda output: None)
        assert engine.join(lambda output: None) is None  # busy
        with pytest.raises(ValueError, match="audio samples must be finite"):
            conversation.push_audio(np.array([0.0, np.nan], dtype=np.float32))
    finally:
        engine.stop()


def test_serve_cli_errors_are_one_line(tmp_path):
    for args, message in [(["serve", str(tmp_path / "missing")], "does not exist"),
                          (["serve", str(tmp_path), "--max-sessions", "0"], "--max-conversations must be at least 1")]:
        result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_engine_failure_closes_conversations_with_1011(parts):
    """A bug in the engine (here: the model step raising) stops serving cleanly: every conversation is closed with
    1011 and a reason, and /health answers 503."""
    from aiohttp.test_utils import TestClient, TestServer

    from hf_moshi_userpred.serving.server import MoshiServer

    engine = RealtimeEngine(*parts, max_conversations=2, seed=0)

    def broken_step(*args, **kwargs):
        raise RuntimeError("a bug in the step")

    engine.session.step = broken_step

    async def main():
        async with TestClient(TestServer(MoshiServer(engine).app())) as client:
            ws = await client.ws_connect("/api/chat")
            assert (await ws.receive(timeout=10)).data == b"\x00"
            writer = sphn.OpusStreamWriter(RATE)
            for frame in np.split(held_out_user_channels(1, 0.8)[0], 10):
                await ws.send_bytes(b"\x01" + writer.append_pcm(frame))
            while (message := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY:
                pass
            health = await client.get("/health")
            return message, ws.close_code, health.status, await health.json()

    message, code, status, health = asyncio.run(main())
    assert (code, message.extra) == (1011, "internal error: the engine stopped")
    assert status == 503 and health["status"] == "error"
    assert isinstance(engine.error, RuntimeError)


# ------------------------------------------------------------------------------- the turn-taking signal in extras
def test_extras_carry_the_turn_signal_over_a_websocket(parts, demo_model_dir):
    """The engine reads `turn_taking_statistics.json` from the model's folder (the demo writes it there); a client
    with `?extras=1` gets, per frame, P(turn end) and P(user silent) for each frame of the signal's horizon, the
    values the session computes from the user branch (the same as in `generate`)."""
    import torch
    from aiohttp.test_utils import TestServer

    from hf_moshi_userpred.serving.server import MoshiServer
    from hf_moshi_userpred.data.voice_activity import TurnTakingStatistics

    saved = TurnTakingStatistics.load(demo_model_dir)
    engine = RealtimeEngine(*parts, max_conversations=1, seed=0)
    assert torch.equal(engine.turn_taking_statistics.token_table, saved.token_table)
    audio = held_out_user_channels(1, 2.4)[0]

    async def main():
        server = TestServer(MoshiServer(engine).app())
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                return await Talk(str(server.make_url("")).rstrip("/"), audio, extras=True).run(session)
        finally:
            await server.close()

    talk = asyncio.run(main())
    assert len(talk.extras) >= 25
    for extra in talk.extras:
        assert 0 <= extra["turn_end"] <= 1
        assert len(extra["user_silence"]) == saved.horizon and all(0 <= p <= 1 for p in extra["user_silence"])
    assert len({extra["turn_end"] for extra in talk.extras}) > 3  # it follows the user, frame by frame


def test_engine_turn_hold_and_no_signal_without_statistics(parts, tmp_path):
    """Through the engine, the turn hold of the generation config works with the folder's statistics: a threshold
    no P(turn end) reaches holds every word back (sampled text otherwise); a model folder without statistics gives
    the session no table, and the signal comes from the demo model's voice-activity head alone."""
    audio = held_out_user_channels(1, 3.2)[0]

    def texts(**kwargs) -> tuple[str, list]:
        engine = RealtimeEngine(*parts, max_conversations=1, speculate_top_k=0, seed=0, frame_period_s=10.0, **kwargs)
        outputs = []
        conversation = engine.join(outputs.append)
        try:
            for frame in range(len(audio) // FRAME):
                conversation.push_audio(audio[frame * FRAME : (frame + 1) * FRAME])
                engine.tick()
        finally:
            engine.stop()
        return "".join(o.text for o in outputs if o.extras is None), [o.extras for o in outputs if o.extras]

    free, extras = texts()
    held, _ = texts(turn_hold_threshold=1.0)
    assert free.strip() and held == ""
    assert all(e["turn_end"] is not None for e in extras)
    parts[0].save_pretrained(tmp_path)  # a model folder without turn_taking_statistics.json
    engine = RealtimeEngine(MoshiUserPredForConditionalGeneration.from_pretrained(tmp_path), *parts[1:],
                            max_conversations=1)
    engine.stop()
    assert engine.turn_taking_statistics is None and engine.session.constraints.table is None
    assert engine.session.constraints.head_signal
