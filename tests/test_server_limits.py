"""`serve`'s limits on real sockets: a client that sends messages without audio, or stops reading what the server
sends, loses its slot within seconds (close 1008) and the next client gets it; output that outruns the socket stops
at the queue's bound; `serve --quiet` prints nothing.

One `serve` process of one slot (`--idle-timeout 1 --send-timeout 1`) for the module, on the demo's model.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request

import aiohttp
import numpy as np
import pytest
import sphn
import torch
from helpers import free_port, serving

from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.sample import SAMPLE_MIMI, SAMPLE_TOKENIZER, sample_model_config

RATE, FRAME = 24_000, 1920


@pytest.fixture(scope="module")
def server(demo_model_dir):
    with serving(demo_model_dir, "--max-conversations", "1", "--idle-timeout", "1", "--send-timeout", "1",
                 "--seed", "0") as (url, process):
        yield url, process


def conversations(url: str) -> int:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.load(response)["conversations"]


def handshake(url: str) -> bytes:
    """What a new client receives first (b"\\x00" once it has a slot)."""

    async def main():
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "/api/chat") as ws:
            return (await ws.receive(timeout=10)).data

    return asyncio.run(main())


def tone(seconds: float) -> np.ndarray:
    """Audio to talk with (the model's answer does not matter here)."""
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)


@pytest.mark.slow
def test_messages_without_audio_do_not_hold_a_slot(server):
    """Bare `0x01` messages (no Ogg page, so no audio) every 0.3 s: closed 1008 after the 1 s idle timeout, as if
    silent; its slot goes to the next client."""
    url, _ = server

    async def main():
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "/api/chat") as ws:
            assert (await ws.receive(timeout=10)).data == b"\x00"
            start = time.monotonic()
            while time.monotonic() - start < 8:
                await ws.send_bytes(b"\x01")
                try:
                    message = await ws.receive(timeout=0.3)
                except asyncio.TimeoutError:
                    continue
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                    return ws.close_code, message.extra, time.monotonic() - start
            return None, None, time.monotonic() - start

    code, reason, seconds = asyncio.run(main())
    assert (code, reason) == (1008, "no audio received for 1 s"), (code, reason, seconds)
    assert seconds < 3
    assert conversations(url) == 0
    assert handshake(url) == b"\x00"


# ------------------------------------------------------------------------------------- a client that stops reading
def unread_websocket(port: int, path: str) -> socket.socket:
    """A WebSocket client that reads the handshake's HTTP response and nothing after it, on a socket with the
    smallest receive buffer (so the server's side fills within seconds)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connecting: the window it advertises
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = b""
    while not response.endswith(b"\r\n\r\n"):
        response += sock.recv(1)  # byte by byte: nothing of the WebSocket stream is read
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def client_frame(payload: bytes) -> bytes:
    """A binary WebSocket frame as a client sends it (masked; payloads under 64 KiB)."""
    mask = os.urandom(4)
    length = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0xFE]) + len(payload).to_bytes(2, "big")
    return bytes([0x82]) + length + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


@pytest.mark.slow
def test_a_client_that_stops_reading_loses_its_slot(server):
    """A client that talks in real time (so the engine keeps answering, with extras: about 5 KB/s) but never reads:
    the server notices within seconds (its output for the client is bounded), logs "client not reading", drops the
    connection and frees the slot for the next client."""
    url, process = server
    sock = unread_websocket(int(url.rsplit(":", 1)[1]), "/api/chat?extras=1")
    writer, audio = sphn.OpusStreamWriter(RATE), tone(40.0)
    slots_taken, dropped, start = [], False, time.monotonic()
    try:
        for index in range(len(audio) // FRAME):
            pages = writer.append_pcm(audio[index * FRAME : (index + 1) * FRAME])
            if len(pages):
                sock.sendall(client_frame(b"\x01" + pages))
            if index % 6 == 5:
                slots_taken.append(conversations(url))
                if dropped := slots_taken[-1] == 0:
                    break
            time.sleep(max(0.0, start + (index + 1) * 0.08 - time.monotonic()))
    except OSError:  # the server dropped the connection
        dropped = True
    finally:
        seconds = time.monotonic() - start
        sock.close()
    log = "".join(process.log)[-2000:]
    assert slots_taken[0] == 1, slots_taken  # it had the slot ...
    assert dropped and seconds < 30, f"still connected after {seconds:.0f} s: {log}"
    time.sleep(0.5)
    assert conversations(url) == 0, log  # ... and lost it
    assert "client not reading" in log, log
    assert handshake(url) == b"\x00"


def test_output_queued_past_the_bound_closes_the_client():
    """An engine whose output comes faster than any socket takes it (300 KiB of text at once, against a 128 KiB
    bound): the connection's queue stops growing, the client is closed 1008 and its slot freed."""
    from aiohttp.test_utils import TestClient, TestServer

    from hf_moshi_userpred.serving.engine_protocol import FrameOutput
    from hf_moshi_userpred.serving.server import MoshiServer

    class Flood:
        max_conversations, sampling_rate, frame_size, running, error = 1, RATE, FRAME, False, None
        active_conversations = 0

        def start(self):
            self.running = True

        def stop(self):
            self.running = False

        def join(self, deliver, text_prompt=None, voice_prompt=None):
            self.active_conversations = 1
            for frame in range(300):
                deliver(FrameOutput(frame, text="x" * 1024))
            return types.SimpleNamespace(slot=0, push_audio=lambda pcm: None)

        def leave(self, conversation):
            self.active_conversations = 0

        def metrics(self):
            return {}

    engine = Flood()

    async def main():
        async with TestClient(TestServer(MoshiServer(engine).app())) as client:
            ws = await client.ws_connect("/api/chat")
            while (message := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.BINARY:
                pass
            return ws.close_code, message.extra

    assert asyncio.run(main()) == (1008, "client not reading: over 128 KiB of output queued")
    assert engine.active_conversations == 0


# ------------------------------------------------------------------------------------------------- --quiet
@pytest.mark.slow
def test_quiet_serve_prints_nothing(tmp_path):
    """`serve --quiet` on a tiny model, stopped by SIGTERM to its whole process group (as a service manager or a
    terminal does): exit 0 and an empty stderr: no loading bars (the engine process's either), no torchao or torch
    warnings, no leaked semaphores (the engine process exits cleanly)."""
    torch.manual_seed(0)
    model = MoshiUserPredForConditionalGeneration(sample_model_config(dim=32, num_layers=1)).eval()
    model.save_pretrained(tmp_path / "model")
    shutil.copyfile(SAMPLE_TOKENIZER, tmp_path / "model" / "tokenizer.model")
    shutil.copytree(SAMPLE_MIMI, tmp_path / "model" / "mimi")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "hf_moshi_userpred", "serve", str(tmp_path / "model"),
                                "--port", str(port), "--max-conversations", "1", "--quiet"],
                               env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate(timeout=30)
            try:
                assert conversations(f"http://127.0.0.1:{port}") == 0
                break
            except OSError:
                time.sleep(0.3)
        os.killpg(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, stderr
    assert (stdout, stderr) == ("", "")
