"""The benchmarks run (`--quick`, a smoke run: no timing is asserted, targets live in benchmarks/) and write their
results with the machine they ran on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses / end-to-end runs

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["training", "streaming", "speculation", "serving", "quantization", "turn_taking",
                                  "persona"])
def test_benchmark_quick_run_writes_its_results(name, tmp_path):
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", f"benchmarks.bench_{name}", "--quick", "--threads", "1",
                             "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["benchmark"] == name
    assert record["machine"]["torch_threads"] == 1 and record["machine"]["moshi"]
    verdicts = list(_verdicts(record["results"]))
    assert verdicts and all(isinstance(met, bool) for met in verdicts)  # every target says whether it was met


def _verdicts(node):
    """Every `met` value in a results tree (one per target)."""
    if isinstance(node, dict):
        if "met" in node:
            yield node["met"]
        for value in node.values():
            yield from _verdicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from _verdicts(value)
