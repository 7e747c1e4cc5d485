"""Lossless speculative streaming on the shipped sample's held-out dialogues.

The model is the one `hf-moshi-userpred demo` trains (900 steps on the 23 training dialogues of the shipped sample;
`--model DIR` reuses a demo's `model/` folder and its `../encoded/eval`, otherwise one is trained once into
`outputs/benchmarks/demo/` and reused). The user channels of the 5 held-out dialogues are streamed frame by frame
with `model.streaming(1, speculate_top_k=k, seed=i)` for k = 0 (no speculation), 1, 2, 4, 8, with the model's
default (sampled) generation settings and with greedy decoding.

Measured, per k:
- hit rate: how often the streamed user frame's delay-0 token was among the k precomputed candidates, next to the
  user branch's teacher-forced delay-0 top-k accuracy on the same dialogues (`evaluate_user_prediction`; a
  consistency check: streaming conditions on the model's own system tokens and an unbounded history, teacher forcing
  on the recorded ones in `context`-frame windows, so they agree closely but not exactly);
- lossless: every dialogue's text and system audio tokens equal the k = 0 run with the same seed;
- critical path per frame (user frame in -> system tokens out, the LM step only: Mimi encode/decode are the same
  with and without speculation): mean and p95 over all frames, and its reduction `1 - mean(k) / mean(0)`;
- the speculation cost per frame (precomputing the next call, done while waiting for the next frame) and whether
  critical path + speculation fit in the 80 ms frame at p95.
k values are interleaved within each round (so a drift of this noisy machine hits them all alike); the figures are
medians over rounds of each round's mean / p95 / reduction, after a warm-up pass.

Memory: parameter count, `session.nbytes()`, and peak RSS of streaming every held-out dialogue with k = 0 and with
k = 8, each in a fresh process.

Target: >= 50% lower mean critical path with speculation (met when some k reaches it; the best k is reported).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import (
    base_parser,
    demo_model_dir,
    parameter_count,
    peak_rss_mb,
    run_isolated,
    setup,
    summarize,
    write_results,
)
from hf_moshi_userpred import MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.data.encoding import EncodedDialogues
from hf_moshi_userpred.evaluation.user_prediction import evaluate_user_prediction

NAME = "speculation"
TOP_KS = (1, 2, 4, 8)
TARGET_REDUCTION = 0.5
FRAME_MS = 80.0  # one Mimi frame at 12.5 Hz: the real-time budget of critical path + speculation
QUICK_DIALOGUES = 2
WARMUP_FRAMES = 25  # untimed frames per k before the timed rounds (first-call allocations, lazy initialisations)
MODES = {"sampled": {}, "greedy": {"do_sample": False, "audio_do_sample": False, "user_do_sample": False}}


def load(model_dir: Path) -> tuple[MoshiUserPredForConditionalGeneration, EncodedDialogues, list[torch.Tensor]]:
    """The model, its held-out dialogues and their user rows `[n_q - dep_q, T]`."""
    model = MoshiUserPredForConditionalGeneration.from_pretrained(model_dir).eval()
    held_out = EncodedDialogues(model_dir.parent / "encoded" / "eval")
    users = [held_out[i]["codes"][1 + model.config.dep_q:] for i in range(len(held_out))]
    return model, held_out, users


def stream(model: MoshiUserPredForConditionalGeneration, user: torch.Tensor, k: int, seed: int,
           settings: dict) -> dict:
    """Streams one dialogue's user rows; per-frame critical-path and speculation seconds, tokens and hit counts."""
    critical, speculate, tokens = [], [], []
    with model.streaming(1, speculate_top_k=k, seed=seed, **settings) as session:
        stats = session.stats
        for t in range(user.shape[-1]):
            out = session.step(user[None, :, t: t + 1])
            critical.append(out.critical_s)
            speculate.append(out.speculate_s)
            if out.tokens is not None:
                tokens.append(out.tokens[0, :, 0])
        nbytes = session.nbytes()
    return {"critical": critical, "speculate": speculate, "tokens": torch.stack(tokens, dim=1),
            "hits": stats.hits, "misses": stats.misses, "nbytes": nbytes}


def measure_mode(model, users: list[torch.Tensor], settings: dict, rounds: int) -> dict:
    """All k, interleaved within each round; per round, pooled frames over all dialogues."""
    ks = (0, *TOP_KS)
    for k in ks:
        stream(model, users[0][:, :WARMUP_FRAMES], k, 0, settings)
    per_round: dict[int, list[dict]] = {k: [] for k in ks}
    lossless = {k: True for k in TOP_KS}
    for _ in range(rounds):
        runs: dict[int, list[dict]] = {k: [] for k in ks}
        for seed, user in enumerate(users):  # k innermost: the finest interleaving
            for k in ks:
                runs[k].append(stream(model, user, k, seed, settings))
        for k in ks:
            critical = [s for run in runs[k] for s in run["critical"]]
            speculate = [s for run in runs[k] for s in run["speculate"]]
            frame = [c + s for c, s in zip(critical, speculate)]
            hits, misses = sum(r["hits"] for r in runs[k]), sum(r["misses"] for r in runs[k])
            per_round[k].append({"critical": summarize(critical), "speculate": summarize(speculate),
                                 "frame": summarize(frame), "hit_rate": hits / max(hits + misses, 1),
                                 "hits": hits, "tried": hits + misses, "frames": len(critical)})
            if k:
                lossless[k] &= all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(runs[k], runs[0]))
    base = [r["critical"]["mean_ms"] for r in per_round[0]]
    out = {}
    for k in ks:
        rows = per_round[k]
        median = lambda key, stat: statistics.median(r[key][stat] for r in rows)  # noqa: E731
        reduction = statistics.median(1 - r["critical"]["mean_ms"] / b for r, b in zip(rows, base))
        out[str(k)] = {
            "critical_mean_ms": median("critical", "mean_ms"), "critical_p95_ms": median("critical", "p95_ms"),
            "critical_median_ms": median("critical", "median_ms"),
            "speculate_mean_ms": median("speculate", "mean_ms"), "speculate_p95_ms": median("speculate", "p95_ms"),
            "critical_plus_speculate_p95_ms": median("frame", "p95_ms"),
            "fits_frame_at_p95": median("frame", "p95_ms") < FRAME_MS,
            "critical_reduction": reduction if k else 0.0,
            "critical_reduction_per_round": [1 - r["critical"]["mean_ms"] / b for r, b in zip(rows, base)],
            "hit_rate": rows[0]["hit_rate"], "hits": rows[0]["hits"], "tried": rows[0]["tried"],
            "frames": rows[0]["frames"], "lossless": lossless.get(k, True),
        }
    return out


def scenario(args: argparse.Namespace) -> None:
    """One process: stream every held-out dialogue once with `k` = the scenario's; print its memory as JSON."""
    k = int(args.scenario.removeprefix("stream_k"))
    model, _, users = load(args.model)
    users = users[:QUICK_DIALOGUES] if args.quick else users
    before = peak_rss_mb()
    nbytes = max(stream(model, user, k, seed, {})["nbytes"] for seed, user in enumerate(users))
    print(json.dumps({"k": k, "peak_rss_mb": peak_rss_mb(), "peak_rss_after_load_mb": before,
                      "session_nbytes": nbytes}))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a demo's model/ folder (its ../encoded/eval is used)")
    parser.add_argument("--retrain", action="store_true", help="retrain the cached demo model")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    args = parser.parse_args()
    setup(args)
    if args.scenario:
        return scenario(args)

    start = time.perf_counter()
    model_dir = demo_model_dir(args)
    model, held_out, users = load(model_dir)
    rounds = args.rounds or (1 if args.quick else 3)
    # Quick: two dialogues, sampled settings only: a pipeline check.
    modes = {"sampled": MODES["sampled"]} if args.quick else MODES
    streamed = users[:QUICK_DIALOGUES] if args.quick else users
    results: dict = {"model_dir": str(model_dir), "dialogues": len(streamed),
                     "frames": sum(u.shape[-1] for u in streamed),
                     "rounds": rounds, "threads": torch.get_num_threads(), "parameters": parameter_count(model),
                     "target": {"critical_reduction": TARGET_REDUCTION}, "modes": {}}
    for mode, settings in modes.items():
        results["modes"][mode] = measure_mode(model, streamed, settings, rounds)

    evaluated = EncodedDialogues.from_codes([held_out[i]["codes"] for i in range(len(streamed))])  # the streamed ones
    teacher = {str(k): evaluate_user_prediction(model, evaluated, top_k=k).model.delay0_top_k_accuracy for k in TOP_KS}
    results["teacher_forced_delay0_top_k_accuracy"] = teacher

    isolated_args = ["--model", str(model_dir)] + (["--quick"] if args.quick else [])
    isolated_args += [] if args.threads is None else ["--threads", str(args.threads)]
    results["memory"] = {f"k{k}": run_isolated("bench_speculation", f"stream_k{k}", isolated_args) for k in (0, 8)}

    sampled = results["modes"]["sampled"]
    best = max(TOP_KS, key=lambda k: sampled[str(k)]["critical_reduction"])
    meeting = [k for k in TOP_KS if sampled[str(k)]["critical_reduction"] >= TARGET_REDUCTION]
    results["target"].update(best_k=best, best_reduction=sampled[str(best)]["critical_reduction"],
                             k_meeting_target=meeting, met=bool(meeting),
                             lossless=all(all(r["lossless"] for r in m.values()) for m in results["modes"].values()))
    results["total_s"] = time.perf_counter() - start
    path = write_results(NAME, results, args.out)
    print_table(results)
    print(f"\nwritten: {path}")


def print_table(results: dict) -> None:
    print(f"\nspeculation on {results['dialogues']} held-out dialogues ({results['frames']} frames), "
          f"{results['rounds']} round(s), {results['threads']} threads, {results['parameters']:,} parameters")
    teacher = results["teacher_forced_delay0_top_k_accuracy"]
    for mode, rows in results["modes"].items():
        print(f"\n[{mode}]  k | hit rate | teacher-forced top-k | critical mean / p95 ms | reduction | "
              f"speculate mean ms | crit+spec p95 ms | lossless")
        for k, r in rows.items():
            tf = f"{100 * teacher[k]:.1f}%" if teacher.get(k) is not None else "-"
            hit = f"{100 * r['hit_rate']:.1f}%" if k != "0" else "-"
            print(f"  {k:>2} | {hit:>6} | {tf:>6} | {r['critical_mean_ms']:6.2f} / {r['critical_p95_ms']:6.2f} | "
                  f"{100 * r['critical_reduction']:5.1f}% | {r['speculate_mean_ms']:6.2f} | "
                  f"{r['critical_plus_speculate_p95_ms']:6.2f} | {r['lossless']}")
    memory = results["memory"]
    print("\nmemory: " + ", ".join(f"{name}: peak RSS {m['peak_rss_mb']:.0f} MiB, "
                                   f"session {m['session_nbytes'] / 2**20:.2f} MiB" for name, m in memory.items()))
    target = results["target"]
    print(f"target >= {100 * target['critical_reduction']:.0f}% lower mean critical path: "
          f"{'met' if target['met'] else 'MISSED'} (best k={target['best_k']}: {100 * target['best_reduction']:.1f}%; "
          f"k meeting it: {target['k_meeting_target']}); lossless: {target['lossless']}")


if __name__ == "__main__":
    main()
