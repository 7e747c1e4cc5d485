"""What every benchmark shares: the moshiko-shaped config, the moshi oracle with the same weights, timing (median and
p95 after warm-up), peak memory of a scenario in its own process, the machine description, and the JSON result file.

Benchmarks compare this package with kyutai's `moshi` in one process, on the same weights, inputs and thread count,
and report ratios: these machines are noisy, ratios measured side by side are not.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads the flag once
os.environ.setdefault("NO_TORCH_COMPILE", "1")  # moshi would otherwise compile kernels lazily (minutes on CPU)

from hf_moshi_userpred.utils.files import write_json  # noqa: E402
from hf_moshi_userpred.sample import moshiko_shaped_lm_kwargs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"

# moshiko's layout at benchmark size (dim 512, 8 layers, a 60 s window), and a quick variant for `--quick` (CI).
MOSHIKO_SMALL = moshiko_shaped_lm_kwargs(dim=512, num_layers=8, num_heads=8, card=2048, text_card=8000, context=750,
                                         depformer_dim=256, depformer_num_heads=8)
MOSHIKO_TINY = moshiko_shaped_lm_kwargs(dim=128, num_layers=2, num_heads=4, card=256, text_card=500, context=50,
                                        depformer_dim=64, depformer_num_heads=4)


DEMO_CACHE = REPO / "outputs" / "benchmarks" / "demo"  # git-ignored; reused across runs
QUICK_DEMO_CACHE = REPO / "outputs" / "benchmarks" / "demo_quick"
DEMO_STEPS, QUICK_STEPS = 900, 30  # the demo's default; enough for quick's pipeline check


def demo_model_dir(args: argparse.Namespace) -> Path:
    """The demo model to benchmark: `--model`, else the cached full demo (trained on first use or with `--retrain`),
    or (in `--quick`) a cached 30-step one: quick only checks the pipeline."""
    if args.model is not None:
        if not (args.model / "config.json").is_file() or not (args.model.parent / "encoded" / "eval").is_dir():
            raise SystemExit(f"--model {args.model}: expected a demo's model/ folder beside its encoded/eval/")
        return args.model.resolve()
    cache, steps = (QUICK_DEMO_CACHE, QUICK_STEPS) if args.quick else (DEMO_CACHE, DEMO_STEPS)
    if args.retrain or not (cache / "model" / "config.json").is_file():
        from hf_moshi_userpred.demo.pipeline import run_demo

        run_demo(cache, steps=steps, progress=False)
    return cache / "model"



def moshi_lm_class():
    """moshi's `LMModel` (the oracle); a clear error when `moshi` is missing (`bash scripts/setup.sh test`)."""
    try:
        from moshi.models.lm import LMModel
    except ImportError as error:
        raise SystemExit(f"benchmarks compare against kyutai's moshi, which is not installed ({error}): "
                         "run `bash scripts/setup.sh test`") from error
    return LMModel


def moshi_and_ours(lm_kwargs: dict, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A moshi `LMModel` with random weights and our model loaded from the same weights (`from_moshi`).

    Args:
        lm_kwargs: moshi LM kwargs (e.g. `MOSHIKO_SMALL`).
        overrides: fields of our config (e.g. `predict_user_audio=False`, `user_depformer_dim=128`).

    Returns:
        `(moshi_model, our_model)`, both in eval mode.
    """
    from hf_moshi_userpred import MoshiUserPredForConditionalGeneration

    torch.manual_seed(seed)
    moshi = moshi_lm_class()(**lm_kwargs, dtype=dtype).eval()
    overrides.setdefault("user_init", "copy_system")
    ours = MoshiUserPredForConditionalGeneration.from_moshi(moshi.state_dict(), lm_kwargs=lm_kwargs, dtype=dtype,
                                                            **overrides)
    return moshi, ours.eval()


def random_codes(num_codebooks: int, card: int, text_card: int, batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    """Valid codes `[B, num_codebooks, T]`: text on row 0, audio on the others."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, card, (batch, num_codebooks, frames), generator=generator)
    codes[:, 0] = torch.randint(0, text_card, (batch, frames), generator=generator)
    return codes


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn` after `warmup` untimed ones (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize()
        start = time.perf_counter()
        fn()
        _synchronize()
        times.append(time.perf_counter() - start)
    return times


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median, p95, mean and count of a list of durations, in milliseconds."""
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_ms": 1e3 * statistics.median(ordered), "p95_ms": 1e3 * p95,
            "mean_ms": 1e3 * statistics.fmean(ordered), "n": len(ordered)}


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, repeats: int, warmup: int) -> dict[str, dict]:
    """Times each candidate in turn, `rounds` times, so drifts of a noisy machine hit them all alike; returns each
    one's [`summarize`] over all its timed calls."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(rounds):
        for name, fn in candidates.items():
            times[name] += time_calls(fn, repeats, warmup if round_index == 0 else 0)
    return {name: summarize(values) for name, values in times.items()}


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def proc_status_mb(field: str) -> float:
    """`VmRSS` (resident now) or `VmHWM` (peak) of this process, MiB (Linux). Not `getrusage`'s `ru_maxrss`: Linux
    carries it over fork and exec, so a scenario's child process would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return proc_status_mb("VmHWM")


def current_rss_mb() -> float:
    """Resident memory of this process now (MiB)."""
    return proc_status_mb("VmRSS")


def run_isolated(module: str, scenario: str, args: list[str]) -> dict:
    """Runs `python -m benchmarks.<module> --scenario <scenario> ...` in a fresh process (its peak RSS is then the
    scenario's alone) and returns the JSON object it prints on its last stdout line."""
    command = [sys.executable, "-m", f"benchmarks.{module}", "--scenario", scenario, *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import moshi
        import transformers

        info.update(moshi=moshi.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny config and few repeats: a smoke run (CI)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file (default: benchmarks/results/)")
    parser.add_argument("--scenario", default=None, help=argparse.SUPPRESS)  # internal: one scenario per process
    return parser


def setup(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    gc.collect()


def write_results(name: str, results: dict, out: Path | None) -> Path:
    """Writes `{"benchmark", "machine", "results"}` to `out` (default `benchmarks/results/<name>.json`) atomically."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"benchmark": name, "machine": machine(), "results": results})
    return path
