"""Serving: how many live conversations one `serve` process holds in real time on this machine.

K simulated clients, in one process apart from the server, each stream a held-out sample dialogue's user channel in
real time (one 80 ms frame every 80 ms) as real Ogg-Opus over real WebSockets on localhost, with the per-frame extras
on. For K = 1, 2, 4, ... it reports the engine's tick time p50/p95/p99 (`/metrics`), late frames (a tick found a
conversation's frame not there yet), dropped frames (sent but never answered), the clients' answer latency (frame sent
-> its extras received), the speculation hit rate and the CPU used by the server and by the clients, and the largest K
that stays real time: p99 tick < 80 ms, no dropped frame, no tick started a whole period late.

moshi's server is one conversation at a time by design (an `asyncio.Lock` around the session): its capacity is 1 on
any machine; ours is K. Two models: the demo's (`--model`, else the cached demo model as in `bench_speculation`) and
the moshiko-shaped small config with random weights, served with a Mimi of the released architecture (random weights,
codebooks of 2048) and a stand-in tokenizer (text pieces are numbers: the text is meaningless, the cost is real).

    python -m benchmarks.bench_serving [--quick] [--threads N] [--seconds S] [--configs demo moshiko_small]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    MOSHIKO_SMALL,
    MOSHIKO_TINY,
    REPO,
    base_parser,
    demo_model_dir,
    summarize,
    write_results,
)

NAME = "serving"
FRAME_S, RATE, FRAME = 0.08, 24_000, 1920
LADDER, QUICK_LADDER = (1, 2, 4, 8, 12, 16, 24), (1, 2)
DEMO_TARGET = 8  # conversations at once on a 2-core machine, speculation on (moshi's server: 1)
TOP_K = 4


class NumberedPieces:
    """A stand-in for the sentencepiece processor of a random model: piece `i` is `" i"`."""

    def __init__(self, size: int):
        self.size = size

    def get_piece_size(self) -> int:
        return self.size

    def id_to_piece(self, token: int) -> str:
        return f"▁{token}"


def build_parts(config: str, model_dir: Path | None, quick: bool):
    """(model, Mimi, tokenizer) for `config`."""
    from transformers import MimiConfig, MimiModel
    from transformers.models.mimi.modeling_mimi import MimiEuclideanCodebook

    from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration
    from hf_moshi_userpred.data.audio import load_mimi, load_tokenizer

    if config == "demo":
        model = MoshiUserPredForConditionalGeneration.from_pretrained(model_dir).eval()
        return model, load_mimi(model_dir / "mimi"), load_tokenizer(model_dir / "tokenizer.model")
    lm_kwargs = MOSHIKO_TINY if quick else MOSHIKO_SMALL
    torch.manual_seed(0)
    model = MoshiUserPredForConditionalGeneration(MoshiUserPredConfig.from_moshi_lm_kwargs(lm_kwargs)).eval()
    mimi = MimiModel(MimiConfig(codebook_size=lm_kwargs["card"], num_quantizers=16)).eval()
    for module in mimi.modules():
        if isinstance(module, MimiEuclideanCodebook):  # initialised to zeros: every code would be 0
            module.embed_sum.normal_()
            module._embed = None
    return model, mimi, NumberedPieces(lm_kwargs["text_card"])


def build_engine(config: str, model_dir: Path | None, quick: bool, sessions: int, top_k: int, threads: int | None):
    """The engine the server scenario serves (module level: an `EngineProcess` builds it in its child)."""
    from hf_moshi_userpred.serving.engine import RealtimeEngine

    if threads is not None:
        torch.set_num_threads(threads)
    model, mimi, tokenizer = build_parts(config, model_dir, quick)
    return RealtimeEngine(model, mimi, tokenizer, max_conversations=sessions, speculate_top_k=top_k, seed=0)


def serve_scenario(args: argparse.Namespace) -> None:
    """The server process: one engine of `--sessions` slots on `--port` until SIGTERM, in a process of its own
    (what `serve` does) or, with `--in-process`, in the server's."""
    from hf_moshi_userpred.serving.engine_process import EngineProcess
    from hf_moshi_userpred.serving.server import MoshiServer, run_server

    build = functools.partial(build_engine, args.config, args.model, args.quick, args.sessions, args.top_k,
                              args.threads)
    engine = build() if args.in_process else EngineProcess(build)
    run_server(MoshiServer(engine, idle_timeout_s=30.0), port=args.port)


def user_channels() -> list[np.ndarray]:
    """The user (right) channels of the 5 held-out sample dialogues at 24 kHz."""
    import soundfile
    import soxr

    from hf_moshi_userpred.sample import SAMPLE_DIR

    paths = [json.loads(line)["path"] for line in (SAMPLE_DIR / "eval.jsonl").read_text().splitlines() if line]
    channels = []
    for path in paths:
        audio, rate = soundfile.read(SAMPLE_DIR / path, dtype="float32", always_2d=True)
        channels.append(np.ascontiguousarray(soxr.resample(audio[:, 1], rate, RATE), dtype=np.float32))
    return channels


async def client(url: str, audio: np.ndarray, num_frames: int) -> dict:
    """One conversation: `num_frames` frames of `audio` (looped) in real time; counts what comes back."""
    import aiohttp
    import sphn

    writer, reader = sphn.OpusStreamWriter(RATE), sphn.OpusStreamReader(RATE)
    sent_at, latencies, answered, audio_samples = {}, [], set(), 0
    async with aiohttp.ClientSession() as session, session.ws_connect(url + "/api/chat?extras=1") as ws:
        handshake = await ws.receive(timeout=30)
        assert handshake.type == aiohttp.WSMsgType.BINARY and handshake.data[:1] == b"\x00", handshake

        async def receive():
            nonlocal audio_samples
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    continue
                kind = message.data[0]
                if kind == 1:
                    audio_samples += reader.append_bytes(message.data[1:]).size
                elif kind == 7:
                    frame = json.loads(message.data[1:])["frame"]
                    answered.add(frame)
                    latencies.append(time.monotonic() - sent_at[frame])

        receiver = asyncio.create_task(receive())
        looped = np.tile(audio, num_frames * FRAME // len(audio) + 1)
        start = time.monotonic()
        for index in range(num_frames):
            sent_at[index] = time.monotonic()
            pages = writer.append_pcm(looped[index * FRAME : (index + 1) * FRAME])
            if len(pages):
                await ws.send_bytes(b"\x01" + pages)
            await asyncio.sleep(max(0.0, start + (index + 1) * FRAME_S - time.monotonic()))
        await asyncio.sleep(0.5)  # answers still in flight (the server counts these ticks as late frames)
        await ws.close()
        await receiver
    return {"sent": num_frames, "answered": len(answered), "latency_s": latencies, "audio_samples": audio_samples}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and of its children that are running (from /proc)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def measure(args: argparse.Namespace, config: str, sessions: int, channels: list[np.ndarray], in_process: bool) -> dict:
    """Starts a server of `sessions` slots (its engine in the server's process or its own), runs as many clients for
    `args.seconds`, and reads the figures."""
    import aiohttp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "benchmarks.bench_serving", "--scenario", "serve", "--config", config,
               "--port", str(port), "--sessions", str(sessions), "--top-k", str(TOP_K)]
    command += ["--threads", str(args.threads)] if args.threads else []
    command += (["--quick"] if args.quick else []) + (["--model", str(args.model)] if args.model else [])
    command += ["--in-process"] if in_process else []
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start within 300 s")
                time.sleep(0.5)
        num_frames = round(args.seconds / FRAME_S)

        async def run_clients():
            cpu, wall = process_cpu_s(server.pid), time.monotonic()
            clients_cpu = resource.getrusage(resource.RUSAGE_SELF)
            results = await asyncio.gather(*(client(url.replace("http", "ws"), channels[i % len(channels)],
                                                    num_frames) for i in range(sessions)))
            wall = time.monotonic() - wall
            cpu = process_cpu_s(server.pid) - cpu
            clients_after = resource.getrusage(resource.RUSAGE_SELF)
            clients_cpu = (clients_after.ru_utime + clients_after.ru_stime
                           - clients_cpu.ru_utime - clients_cpu.ru_stime)
            async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
                metrics = await response.json()
            return results, metrics, cpu / wall, clients_cpu / wall

        results, metrics, server_cpu, clients_cpu = asyncio.run(run_clients())
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    sent = sum(r["sent"] for r in results)
    dropped = sent - sum(r["answered"] for r in results)
    latency = summarize([s for r in results for s in r["latency_s"]])
    tick, critical = metrics["tick_ms"], metrics["critical_ms"]
    realtime = tick["p99"] is not None and tick["p99"] < 1000 * FRAME_S and dropped == 0 and metrics["overruns"] == 0
    row = {
        "conversations": sessions, "frames_sent": sent, "dropped_frames": dropped, "late_frames": metrics["late_frames"],
        "tick_ms": tick, "critical_ms": critical, "overruns": metrics["overruns"],
        "catch_up_steps": metrics["catch_up_steps"], "answer_latency": latency,
        "hit_rate": metrics["speculation"]["hit_rate"], "server_cpu_cores": server_cpu, "clients_cpu_cores": clients_cpu,
        "realtime": realtime,
    }
    print(f"{config:<14} {'in-process' if in_process else 'process':<10} K={sessions:<3} tick p50/p95/p99 {tick['p50']:6.1f} {tick['p95']:6.1f} {tick['p99']:6.1f} ms  "
          f"critical p50 {critical['p50']:5.1f}  dropped {dropped:3d}  late {metrics['late_frames']:3d}  "
          f"answer p50 {latency['median_ms']:5.1f} ms  hits {row['hit_rate']:.2f}  "
          f"cpu {server_cpu:.2f}+{clients_cpu:.2f}  {'real time' if realtime else 'NOT real time'}", flush=True)
    return row


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["demo", "moshiko_small"], choices=["demo", "moshiko_small"])
    parser.add_argument("--seconds", type=float, default=None, help="conversation length (default 12, quick 3)")
    parser.add_argument("--model", type=Path, default=None, help="a demo's model/ folder")
    parser.add_argument("--retrain", action="store_true", help="retrain the cached demo model")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)  # internal: the server process
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--top-k", type=int, default=TOP_K, help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.scenario == "serve":
        return serve_scenario(args)
    args.seconds = args.seconds or (3.0 if args.quick else 12.0)
    if "demo" in args.configs:
        args.model = demo_model_dir(args)
    channels = user_channels()
    ladder = QUICK_LADDER if args.quick else LADDER
    results = {}
    for config in args.configs:
        results[config] = {"moshi_server_sessions": 1}
        # Side by side: the engine in a process of its own (what `serve` does), then in the server's process.
        for mode, in_process in (("engine_process", False), ("in_process", True)):
            rows = []
            for sessions in ladder:
                rows.append(measure(args, config, sessions, channels, in_process))
                if rows[-1]["dropped_frames"] or rows[-1]["tick_ms"]["p50"] > 1000 * FRAME_S:
                    break  # well past real time: larger K only drop more
            largest = max([row["conversations"] for row in rows if row["realtime"]], default=0)
            results[config][mode] = {"rows": rows, "largest_realtime_sessions": largest}
            if config == "demo":
                target = min(DEMO_TARGET, max(ladder))
                results[config][mode]["target"] = {"conversations": target, "met": largest >= target}
    results["settings"] = {"seconds": args.seconds, "speculate_top_k": TOP_K, "threads": torch.get_num_threads()}
    path = write_results(NAME, results, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
