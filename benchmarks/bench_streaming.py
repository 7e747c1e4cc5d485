"""Streaming: step latency and its scaling with session length, moshi's `LMGen` against our streaming session.

Measured on the moshiko-shaped small config (`--quick`: the tiny one), batch 1, the same
weights and user frames for every session, all in one process:

- Step latency, greedy and sampled (moshi's defaults: text temperature 0.7 / top-k 25, audio 0.8 / top-k 250, which
  are ours too): moshi's `LMGen.step`, our session with the user branch off, and with it on (a user Depformer of the
  system one's shape, no speculation). With the branch on we time the critical path (frame in -> system tokens
  committed, from the session's `SpeculationStats`, before the user Depformer runs) and the full step.
  Target: our critical path with the branch on <= 1.0x moshi's step (the user branch is off the critical path).
- Scaling: step time against position over a session of 3x the context window, moshi and ours (branch on, greedy),
  medians per window of context/3 positions. Target: flat past the window: our step over the last third of the
  session / over the window just past the context <= 1.1, each divided by moshi's over the same frames (moshi's
  ring-buffer step is flat by construction; dividing removes the machine's drift over a run of minutes, which
  moves both alike). The undivided figures are reported too.
- Memory: parameter counts; peak RSS (VmHWM) of each model streaming in its own process, and its resident growth
  from after the imports; our session's state bytes against moshi's streaming KV caches.

The sessions advance one frame per call, so a call cannot be repeated: they are stepped in lockstep on the same
frames, the order rotating every frame so that drifts of the machine hit all alike, and per-call times are kept
(medians and p95 after warm-up). The greedy run is the scaling session: the branch-off session joins it for the
latency frames, and greedy tokens are checked identical to moshi's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import (
    MOSHIKO_SMALL,
    MOSHIKO_TINY,
    base_parser,
    current_rss_mb,
    moshi_and_ours,
    moshi_lm_class,
    parameter_count,
    peak_rss_mb,
    random_codes,
    run_isolated,
    setup,
    summarize,
    write_results,
)

NAME = "streaming"
CRITICAL_TARGET = 1.0  # ours critical (branch on) / moshi step
FLAT_TARGET = 1.1  # ours step, last third / just past the context window, over moshi's same ratio
GREEDY = dict(do_sample=False, audio_do_sample=False)
MEMORY_SCENARIOS = ("moshi", "ours_branch_off", "ours_branch_on")

# A stepper advances one session by one frame and returns its timings (seconds) and the tokens it produced.
Stepper = Callable[[torch.Tensor], tuple[dict[str, float], torch.Tensor | None]]


def moshi_stepper(lm_gen) -> Stepper:
    def step(frame: torch.Tensor) -> tuple[dict[str, float], torch.Tensor | None]:
        start = time.perf_counter()
        tokens = lm_gen.step(frame)
        return {"step": time.perf_counter() - start}, tokens

    return step


def our_stepper(session) -> Stepper:
    def step(frame: torch.Tensor) -> tuple[dict[str, float], torch.Tensor | None]:
        start = time.perf_counter()
        out = session.step(frame)
        return {"step": time.perf_counter() - start, "critical": out.critical_s}, out.tokens

    return step


def lockstep(steppers: dict[str, Stepper], user: torch.Tensor, frames: dict[str, int]) -> tuple[dict, dict]:
    """Steps every session on the same user frames `[B, n_q - dep_q, T]`, session `name` for its first
    `frames[name]` frames, rotating the order each frame. Returns per-call timings `{name: {kind: [s, ...]}}` and
    tokens `{name: [tokens or None, ...]}`."""
    names = list(steppers)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    tokens: dict[str, list] = {name: [] for name in names}
    for t in range(max(frames.values())):
        frame = user[:, :, t : t + 1]
        for name in names[t % len(names) :] + names[: t % len(names)]:
            if t < frames[name]:
                timing, out = steppers[name](frame)
                for kind, seconds in timing.items():
                    times[name].setdefault(kind, []).append(seconds)
                tokens[name].append(None if out is None else out.clone())
    return times, tokens


def same_tokens(ours: list, expected: list) -> bool:
    return len(ours) == len(expected) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(ours, expected)
    )


def latency(times: dict, warmup: int, frames: int) -> dict:
    """Median/p95 of the calls `warmup .. frames` and the ratios to moshi's step."""
    window = slice(warmup, frames)
    result = {
        "moshi_step": summarize(times["moshi"]["step"][window]),
        "ours_branch_off_step": summarize(times["ours_branch_off"]["step"][window]),
        "ours_branch_on_critical": summarize(times["ours_branch_on"]["critical"][window]),
        "ours_branch_on_step": summarize(times["ours_branch_on"]["step"][window]),
    }
    moshi = result["moshi_step"]
    result["ratios"] = {
        f"{name}/moshi_step": {stat: result[name][f"{stat}_ms"] / moshi[f"{stat}_ms"] for stat in ("median", "p95")}
        for name in ("ours_branch_on_critical", "ours_branch_off_step", "ours_branch_on_step")
    }
    critical = result["ratios"]["ours_branch_on_critical/moshi_step"]["median"]
    result["target"] = {"what": "ours critical path (branch on) / moshi step, median", "max": CRITICAL_TARGET,
                        "value": critical, "met": critical <= CRITICAL_TARGET}
    return result


def scaling(times: dict, context: int) -> dict:
    """Medians per window of `context // 3` positions, and the flatness figure past the context."""
    width = max(1, context // 3)
    series = {"moshi_step": times["moshi"]["step"], "ours_branch_on_step": times["ours_branch_on"]["step"],
              "ours_branch_on_critical": times["ours_branch_on"]["critical"]}
    frames = len(series["moshi_step"])
    windows = []
    for start in range(0, frames, width):
        row = {"positions": [start, min(start + width, frames)]}
        row.update({f"{name}_median_ms": 1e3 * statistics.median(values[start : start + width])
                    for name, values in series.items()})
        row["ours_step/moshi_step"] = row["ours_branch_on_step_median_ms"] / row["moshi_step_median_ms"]
        windows.append(row)
    past = slice(context, context + width)
    last = slice(frames - frames // 3, frames)
    flatness = {name: statistics.median(values[last]) / statistics.median(values[past])
                for name, values in series.items()}
    value = flatness["ours_branch_on_step"] / flatness["moshi_step"]
    return {
        "frames": frames, "context": context, "window": width, "windows": windows,
        "last_third/just_past_context": flatness,
        "target": {"what": f"ours step (branch on), median over positions [{last.start}, {last.stop}) / over "
                           f"[{past.start}, {past.stop}), divided by moshi's same ratio", "max": FLAT_TARGET,
                   "value": value, "met": value <= FLAT_TARGET},
    }


def moshi_kv_nbytes(lm) -> int:
    """Bytes of the KV caches moshi's streaming state holds (its Depformer's is rebuilt every frame)."""
    total = 0
    for module in lm.modules():
        kv = getattr(getattr(module, "_streaming_state", None), "kv_cache", None)
        if kv is not None:
            total += kv.cache.numel() * kv.cache.element_size()
    return total


def run_sessions(lm_kwargs: dict, warmup: int, latency_frames: int) -> dict:
    from moshi.models.lm import LMGen

    moshi, ours_on = moshi_and_ours(lm_kwargs)
    _, ours_off = moshi_and_ours(lm_kwargs, predict_user_audio=False)
    context = lm_kwargs["context"]
    user = random_codes(1 + ours_on.config.n_q - ours_on.config.dep_q, lm_kwargs["card"], lm_kwargs["text_card"],
                        batch=1, frames=3 * context, seed=1)[:, 1:]
    results: dict = {"params": {"moshi": parameter_count(moshi), "ours_branch_off": parameter_count(ours_off),
                                "ours_branch_on": parameter_count(ours_on)}}
    for mode in ("greedy", "sampled"):
        sampled = mode == "sampled"
        # greedy: the scaling session (3x context); sampled: the latency frames only
        frames = 3 * context if not sampled else latency_frames
        torch.manual_seed(0)  # moshi samples with the global generator
        lm_gen = LMGen(moshi, use_sampling=sampled)
        settings = {"seed": 0} if sampled else GREEDY
        with contextlib.ExitStack() as stack:
            stack.enter_context(lm_gen.streaming(1))
            on = stack.enter_context(ours_on.streaming(1, **settings))
            off = stack.enter_context(ours_off.streaming(1, **settings))
            steppers = {"moshi": moshi_stepper(lm_gen), "ours_branch_off": our_stepper(off),
                        "ours_branch_on": our_stepper(on)}
            times, tokens = lockstep(steppers, user, {"moshi": frames, "ours_branch_on": frames,
                                                      "ours_branch_off": latency_frames})
            memory = {"moshi_kv_cache_bytes": moshi_kv_nbytes(moshi), "ours_session_bytes": on.nbytes(),
                      "ours_kv_cache_bytes": on.kv.nbytes()}
        results[mode] = latency(times, warmup, latency_frames)
        if not sampled:
            results[mode]["tokens_identical_to_moshi"] = {
                "branch_on": same_tokens(tokens["ours_branch_on"], tokens["moshi"]),
                "branch_off": same_tokens(tokens["ours_branch_off"], tokens["moshi"][:latency_frames]),
            }
            results["scaling"] = scaling(times, context)
            results["session_memory"] = memory
    return results


def memory_scenario(name: str, lm_kwargs: dict, frames: int) -> dict:
    """Peak RSS of one model streaming `frames` frames in this (fresh) process (ours does not import moshi), and
    the resident growth from after the imports: the model's and its session's."""
    user = random_codes(9, lm_kwargs["card"], lm_kwargs["text_card"], batch=1, frames=frames, seed=1)[:, 1:]
    if name == "moshi":
        from moshi.models.lm import LMGen

        before = current_rss_mb()
        model = moshi_lm_class()(**lm_kwargs, dtype=torch.float32).eval()
        lm_gen = LMGen(model, use_sampling=False)
        with lm_gen.streaming(1):
            for t in range(frames):
                lm_gen.step(user[:, :, t : t + 1])
    else:
        from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration

        before = current_rss_mb()
        config = MoshiUserPredConfig.from_moshi_lm_kwargs(dict(lm_kwargs),
                                                          predict_user_audio=name == "ours_branch_on")
        model = MoshiUserPredForConditionalGeneration(config).eval()
        with model.streaming(1, **GREEDY) as session:
            for t in range(frames):
                session.step(user[:, :, t : t + 1])
    return {"params": parameter_count(model), "peak_rss_mb": peak_rss_mb(), "rss_before_model_mb": before,
            "model_and_session_rss_mb": current_rss_mb() - before}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    # A streaming step is hundreds of small ops: on a shared 2-core machine a second intra-op thread mostly spins
    # waiting for the other (steps several times slower and erratic), so one thread unless asked.
    parser.set_defaults(threads=1)
    args = parser.parse_args()
    setup(args)
    lm_kwargs = MOSHIKO_TINY if args.quick else MOSHIKO_SMALL
    warmup, latency_frames = (5, 35) if args.quick else (20, 220)
    if args.scenario is not None:
        print(json.dumps(memory_scenario(args.scenario, lm_kwargs, frames=warmup)))
        return
    started = time.perf_counter()
    results = {"config": "MOSHIKO_TINY" if args.quick else "MOSHIKO_SMALL", "lm_kwargs": lm_kwargs, "batch": 1,
               "warmup_frames": warmup, "latency_frames": latency_frames - warmup}
    results.update(run_sessions(lm_kwargs, warmup, latency_frames))
    gc.collect()
    passthrough = ["--quick"] * args.quick + ([] if args.threads is None else ["--threads", str(args.threads)])
    results["peak_rss"] = {name: run_isolated("bench_streaming", name, passthrough) for name in MEMORY_SCENARIOS}
    results["wall_s"] = time.perf_counter() - started
    path = write_results(NAME, results, args.out)
    report(results)
    print(f"wrote {path}")


def report(results: dict) -> None:
    print(f"streaming, {results['config']}, batch 1, {results['latency_frames']} frames after "
          f"{results['warmup_frames']} warm-up, threads {torch.get_num_threads()}")
    print(f"{'':10} {'session':26} {'median ms':>10} {'p95 ms':>8} {'x moshi':>8}")
    for mode in ("greedy", "sampled"):
        figures = results[mode]
        moshi = figures["moshi_step"]["median_ms"]
        for name in ("moshi_step", "ours_branch_off_step", "ours_branch_on_critical", "ours_branch_on_step"):
            row = figures[name]
            print(f"{mode:10} {name:26} {row['median_ms']:10.1f} {row['p95_ms']:8.1f} "
                  f"{row['median_ms'] / moshi:8.2f}")
        target = figures["target"]
        print(f"{'':10} target critical <= {target['max']}x moshi: {target['value']:.2f} "
              f"({'met' if target['met'] else 'MISSED'})")
    print("greedy tokens identical to moshi:", results["greedy"]["tokens_identical_to_moshi"])
    scale = results["scaling"]
    print(f"scaling over {scale['frames']} frames (context {scale['context']}), medians per window (ms):")
    for row in scale["windows"]:
        print(f"  [{row['positions'][0]:5}, {row['positions'][1]:5})  moshi {row['moshi_step_median_ms']:7.1f}  "
              f"ours {row['ours_branch_on_step_median_ms']:7.1f}  (critical {row['ours_branch_on_critical_median_ms']:.1f})")
    target = scale["target"]
    flatness = scale["last_third/just_past_context"]
    print(f"  flat past the window: {target['what']} = {target['value']:.3f} (<= {target['max']}: "
          f"{'met' if target['met'] else 'MISSED'}); undivided: ours {flatness['ours_branch_on_step']:.3f}, "
          f"moshi {flatness['moshi_step']:.3f}")
    print("memory:", {name: f"{r['params'] / 1e6:.1f} M params, peak RSS {r['peak_rss_mb']:.0f} MiB "
                            f"(model + session {r['model_and_session_rss_mb']:.0f} MiB)"
                      for name, r in results["peak_rss"].items()})
    print("session state bytes:", results["session_memory"])


if __name__ == "__main__":
    main()
