"""Fixtures: one intra-op thread, the moshi oracle. What the tests share otherwise is in `helpers.py`."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# moshi compiles some kernels lazily with torch.compile; on CPU that only costs minutes.
os.environ.setdefault("NO_TORCH_COMPILE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Streaming tiny models is hundreds of small ops per step: intra-op threads only add synchronisation
    (a step is >10x slower with 2 threads on a loaded 2-core machine). Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def moshi_lm():
    """moshi's `LMModel` class: the oracle. Its absence fails the run (CI installs it; see scripts/setup.sh)."""
    try:
        return importlib.import_module("moshi.models.lm").LMModel
    except ImportError as error:  # never a skip: parity tests must run wherever the suite runs
        pytest.fail(f"the moshi oracle is not installed ({error}); run `bash scripts/setup.sh test`")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """A model folder the way `demo` writes it (weights, tokenizer.model, mimi/), trained for 30 steps on the
    shipped sample: what `serve` and the web page are tested with (about 40 s, once per session)."""
    from hf_moshi_userpred.demo.pipeline import run_demo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("demo")
        run_demo(out, steps=30, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out / "model"
