"""`EngineProcess`: the real-time engine in a child process behind RealtimeEngine's interface (what `serve` runs)."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time

import numpy as np
import pytest

from hf_moshi_userpred.serving.engine_process import EngineProcess
from hf_moshi_userpred.serving.engine import RealtimeEngine


def broken_engine(model_dir: str) -> RealtimeEngine:
    """An engine whose tick fails, built in the child (this module is importable there: spawn passes sys.path)."""
    engine = RealtimeEngine.from_pretrained(model_dir, max_conversations=1)

    def tick() -> None:
        raise RuntimeError("boom in the tick")

    engine.tick = tick
    return engine


def wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_conversations_through_the_engine_process(demo_model_dir):
    engine = EngineProcess(functools.partial(RealtimeEngine.from_pretrained, str(demo_model_dir), max_conversations=2,
                                             speculate_top_k=2, seed=0, threads=1))
    try:
        assert (engine.max_conversations, engine.sampling_rate, engine.frame_size) == (2, 24000, 1920)
        received: dict[int, list] = {0: [], 1: []}
        lock = threading.Lock()

        def collect(index):
            def deliver(output):
                with lock:
                    received[index].append(output)
            return deliver

        first, second = engine.join(collect(0)), engine.join(collect(1))
        assert {first.slot, second.slot} == {0, 1} and engine.active_conversations == 2
        assert engine.join(collect(0)) is None  # busy: both slots taken
        engine.start()
        rng = np.random.default_rng(0)
        for _ in range(12):
            for conversation in (first, second):
                conversation.push_audio(rng.standard_normal(1920).astype(np.float32) * 0.05)
            time.sleep(0.08)
        assert wait_for(lambda: all(sum(o.extras is not None for o in received[i]) >= 10 for i in (0, 1)))
        with lock:
            for outputs in received.values():
                frames = [o.extras["frame"] for o in outputs if o.extras is not None]
                assert frames == list(range(len(frames)))  # every frame, in order, once
                audio = [o.audio for o in outputs if o.audio is not None]
                assert audio and all(a.shape == (1920,) and a.dtype == np.float32 for a in audio)
        with pytest.raises(ValueError, match="finite"):
            first.push_audio(np.array([np.nan], dtype=np.float32))  # refused here, before the pipe
        metrics = engine.metrics()
        assert metrics["conversations"] == 2 and metrics["ticks"] >= 10 and metrics["tick_ms"]["p50"] > 0
        engine.leave(first)
        engine.leave(first)  # idempotent
        assert engine.active_conversations == 1
        assert wait_for(lambda: engine.metrics()["conversations"] == 1)
        assert engine.join(collect(0)) is not None  # the freed slot is taken again
        assert engine.error is None and engine.running
    finally:
        engine.stop()
    assert not engine.running and engine.pid is None


def test_a_folder_that_is_no_model_fails_at_start_with_its_reason(tmp_path):
    with pytest.raises(ValueError, match="has no mimi"):
        EngineProcess(functools.partial(RealtimeEngine.from_pretrained, str(tmp_path)))


def test_a_failing_engine_is_reported_to_the_server_side(demo_model_dir):
    engine = EngineProcess(functools.partial(broken_engine, str(demo_model_dir)))
    try:
        engine.start()
        assert wait_for(lambda: engine.error is not None)
        assert "boom in the tick" in str(engine.error) and not engine.running
        with pytest.raises(RuntimeError, match="boom in the tick"):
            engine.metrics()
    finally:
        engine.stop()


def test_an_engine_process_that_dies_is_reported(demo_model_dir):
    engine = EngineProcess(functools.partial(RealtimeEngine.from_pretrained, str(demo_model_dir), max_conversations=1))
    try:
        engine.start()
        os.kill(engine.pid, signal.SIGKILL)  # e.g. the kernel's out-of-memory killer
        assert wait_for(lambda: engine.error is not None)
        assert "exited (code -9)" in str(engine.error) and not engine.running
    finally:
        engine.stop()
