"""Training step throughput and memory: kyutai's moshi `LMModel` vs ours, with the user branch off and on.

Measured on the moshiko-shaped small config (`MOSHIKO_TINY` with `--quick`), all
candidates from the same weights, on the same batch, in one process, timed interleaved (medians after warm-up):

- `moshi`: moshi's `LMModel.forward(codes)` with moshi-finetune's loss (`compute_loss_with_mask`, written out
  below: text CE with padding weight + audio CE, both masked).
- `ours_branch_off`: ours with `predict_user_audio=False`, `model(codes, return_loss=True).loss` (same loss).
- `ours_branch_on`: ours with the user Depformer the same shape as the system one (`user_dep_q = dep_q`).
- `ours_branch_half`: ours with a half-width user Depformer (`user_depformer_dim = depformer_dim / 2`).

One step = `zero_grad` + forward + `loss.backward()` + `torch.optim.AdamW.step()` (foreach default), train mode,
float32. Tokens per second = B * T * (1 + n_q) / step time: every code of the batch (text row + all audio rows,
system and user) counts as one token, for every candidate alike.

FLOPs per step (forward + backward, `torch.utils.flop_counter.FlopCounterMode`, counted on one sequence and scaled
by B) give the branch's share of the work. The first loss of moshi and of ours (branch off) must agree (same work).

Memory: parameter count of each candidate, and peak RSS of a training run (two steps: AdamW state included) of
each candidate in its own process (its `VmHWM`); every such process imports both moshi and this package, so the
baselines match.

Targets:
- `ours_branch_off` tokens/s >= 1.0x moshi's.
- The branch's time cost (`time_on / time_off - 1`) <= its FLOP share (`flops_on / flops_off - 1`) + 5 points,
  for the full-width and the half-width user Depformer.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    MOSHIKO_SMALL,
    MOSHIKO_TINY,
    base_parser,
    interleaved,
    moshi_and_ours,
    moshi_lm_class,
    parameter_count,
    peak_rss_mb,
    random_codes,
    run_isolated,
    setup,
    write_results,
)

NAME = "training"
TEXT_PADDING_WEIGHT = 0.5  # moshi-finetune's default and ours: padding / end-of-padding targets in the text loss
COST_TOLERANCE = 0.05  # the branch may cost up to its FLOP share + 5 points


def finetune_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """moshi-finetune's `compute_loss_with_mask`: CE over all positions (NaN logits included), zeroed off the mask,
    weighted mean."""
    target = torch.where(mask, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
    ce = torch.where(mask.reshape(-1), ce, torch.zeros_like(ce))
    weights = weights.reshape(-1)
    return (ce * weights).sum() / weights.sum()


def moshi_loss(moshi: torch.nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """moshi-finetune's training loss: text loss (padding and end-of-padding down-weighted) + system audio loss."""
    output = moshi(codes)
    text_target = codes[:, :1]
    text_weights = output.text_mask.float()
    padding = (text_target == moshi.existing_text_padding_id) | (text_target == moshi.existing_text_end_padding_id)
    text_weights[padding] *= TEXT_PADDING_WEIGHT
    audio_target = codes[:, 1:1 + moshi.dep_q]
    return (finetune_loss(output.text_logits, text_target, output.text_mask, text_weights)
            + finetune_loss(output.logits, audio_target, output.mask, output.mask.float()))


def candidate_overrides(lm_kwargs: dict) -> dict[str, dict | None]:
    """Our config overrides per candidate (None: moshi)."""
    return {
        "moshi": None,
        "ours_branch_off": {"predict_user_audio": False},
        "ours_branch_on": {"user_init": "copy_system"},  # the user Depformer defaults to the system one's shape
        "ours_branch_half": {"user_depformer_dim": lm_kwargs["depformer_dim"] // 2, "user_init": "random"},
    }


def build(lm_kwargs: dict) -> dict[str, torch.nn.Module]:
    """Every candidate, from the same moshi weights (each with its own copy), in train mode."""
    from hf_moshi_userpred import MoshiUserPredForConditionalGeneration

    moshi, _ = moshi_and_ours(lm_kwargs, predict_user_audio=False)
    models = {}
    for name, overrides in candidate_overrides(lm_kwargs).items():
        if overrides is None:
            models[name] = moshi.train()
            continue
        weights = {key: value.clone() for key, value in moshi.state_dict().items()}
        models[name] = MoshiUserPredForConditionalGeneration.from_moshi(
            weights, lm_kwargs=lm_kwargs, text_padding_weight=TEXT_PADDING_WEIGHT, **overrides).train()
    return models


def train_step_fn(name: str, model: torch.nn.Module, codes: torch.Tensor, optimizer: torch.optim.Optimizer | None):
    """One training step of `model`, returning its loss (no optimizer step when `optimizer` is None: FLOP counting)."""
    def loss() -> torch.Tensor:
        if name == "moshi":
            return moshi_loss(model, codes)
        return model(codes, return_loss=True).loss

    def step() -> float:
        if optimizer is not None:
            optimizer.zero_grad()
        value = loss()
        value.backward()
        if optimizer is not None:
            optimizer.step()
        return value.item()

    return step


def count_flops(name: str, model: torch.nn.Module, codes: torch.Tensor) -> tuple[int, float]:
    """FLOPs of forward + backward on `codes` (the optimizer's elementwise work is not counted), and the loss of the
    first sequence. Counted on that one sequence and scaled: every sequence of the batch costs the same, and counting
    is slow (it hooks every op)."""
    with FlopCounterMode(display=False) as counter:
        loss = train_step_fn(name, model, codes[:1], None)()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() * codes.shape[0], loss


def run_scenario(name: str, lm_kwargs: dict, batch: int, frames: int, steps: int) -> dict:
    """Peak RSS of `steps` training steps of one candidate (run in its own process by `run_isolated`)."""
    moshi_lm_class()  # same imports in every scenario: the RSS difference is the model's
    from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration

    baseline = peak_rss_mb()
    overrides = candidate_overrides(lm_kwargs)[name]
    torch.manual_seed(0)
    if overrides is None:
        model = moshi_lm_class()(**lm_kwargs, dtype=torch.float32)
    else:
        config = MoshiUserPredConfig.from_moshi_lm_kwargs(lm_kwargs, text_padding_weight=TEXT_PADDING_WEIGHT,
                                                          **overrides)
        model = MoshiUserPredForConditionalGeneration(config)
    model.train()
    codes = random_codes(1 + lm_kwargs["n_q"], lm_kwargs["card"], lm_kwargs["text_card"], batch, frames)
    step = train_step_fn(name, model, codes, torch.optim.AdamW(model.parameters(), lr=1e-5))
    for _ in range(steps):
        step()
    return {"peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline, "parameters": parameter_count(model)}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    setup(args)
    lm_kwargs = MOSHIKO_TINY if args.quick else MOSHIKO_SMALL
    batch, frames = (2, 25) if args.quick else (2, 125)  # full: 10 s segments at 12.5 Hz
    rounds, repeats, warmup = (2, 1, 1) if args.quick else (5, 1, 1)
    rss_steps = 2  # the second step has the AdamW state and a second set of activations and grads
    if args.scenario is not None:  # child process of run_isolated
        print(json.dumps(run_scenario(args.scenario, lm_kwargs, batch, frames, rss_steps)))
        return

    # Memory first, while this process is small: a child's peak RSS (ru_maxrss) starts from its parent's at fork.
    common_args = ["--quick"] if args.quick else []
    if args.threads is not None:
        common_args += ["--threads", str(args.threads)]
    memory = {name: run_isolated("bench_training", name, common_args) for name in candidate_overrides(lm_kwargs)}

    models = build(lm_kwargs)
    codes = random_codes(1 + lm_kwargs["n_q"], lm_kwargs["card"], lm_kwargs["text_card"], batch, frames)
    tokens = batch * frames * (1 + lm_kwargs["n_q"])
    counted = {name: count_flops(name, model, codes) for name, model in models.items()}
    flops = {name: flops for name, (flops, _) in counted.items()}
    # Same weights, same batch: the same loss shows moshi and ours (branch off) do the same computation.
    moshi_loss_value, off_loss_value = counted["moshi"][1], counted["ours_branch_off"][1]
    same_loss = abs(off_loss_value - moshi_loss_value) <= 1e-5 * abs(moshi_loss_value)
    if not same_loss:
        raise SystemExit(f"ours_branch_off's loss {off_loss_value} differs from moshi's {moshi_loss_value}")
    steps = {name: train_step_fn(name, model, codes, torch.optim.AdamW(model.parameters(), lr=1e-5))
             for name, model in models.items()}
    timings = interleaved(steps, rounds=rounds, repeats=repeats, warmup=warmup)
    params = {name: parameter_count(model) for name, model in models.items()}

    candidates = {}
    for name, timing in timings.items():
        candidates[name] = {
            **timing,
            "tokens_per_s": tokens / (timing["median_ms"] / 1e3),
            "speed_vs_moshi": timings["moshi"]["median_ms"] / timing["median_ms"],
            "gflops_per_step": flops[name] / 1e9,
            "initial_loss": counted[name][1],
            "parameters": params[name],
            "peak_rss_mb": memory[name]["peak_rss_mb"],
            "baseline_rss_mb": memory[name]["baseline_rss_mb"],
        }
    off = candidates["ours_branch_off"]
    targets = {"ours_branch_off_vs_moshi": {"value": off["speed_vs_moshi"], "target": ">= 1.0",
                                            "met": off["speed_vs_moshi"] >= 1.0}}
    for name in ("ours_branch_on", "ours_branch_half"):
        time_cost = candidates[name]["median_ms"] / off["median_ms"] - 1
        flop_share = flops[name] / flops["ours_branch_off"] - 1
        targets[f"{name}_cost"] = {"time_cost": time_cost, "flop_share": flop_share,
                                   "target": f"time_cost <= flop_share + {COST_TOLERANCE}",
                                   "met": time_cost <= flop_share + COST_TOLERANCE}
    results = {
        "config": "MOSHIKO_TINY" if args.quick else "MOSHIKO_SMALL", "lm_kwargs": lm_kwargs,
        "batch": batch, "frames": frames, "tokens_per_step": tokens,
        "token_definition": "every code of the batch: B * T * (1 + n_q)",
        "step": "zero_grad + forward + loss.backward() + AdamW.step(), train mode, float32",
        "rounds": rounds, "repeats_per_round": repeats, "warmup": warmup, "rss_steps": rss_steps,
        "same_loss_as_moshi": same_loss, "candidates": candidates, "targets": targets,
    }
    path = write_results(NAME, results, args.out)

    print(f"{'candidate':<18}{'median ms':>11}{'p95 ms':>9}{'tok/s':>9}{'vs moshi':>10}{'GFLOP':>8}"
          f"{'params M':>10}{'peak RSS MiB':>14}")
    for name, row in candidates.items():
        print(f"{name:<18}{row['median_ms']:>11.1f}{row['p95_ms']:>9.1f}{row['tokens_per_s']:>9.0f}"
              f"{row['speed_vs_moshi']:>9.2f}x{row['gflops_per_step']:>8.1f}{row['parameters'] / 1e6:>10.2f}"
              f"{row['peak_rss_mb']:>14.0f}")
    for name, target in targets.items():
        detail = ", ".join(f"{key} {value:.3f}" for key, value in target.items() if isinstance(value, float))
        print(f"{name}: {detail} (target {target['target']}): {'met' if target['met'] else 'MISSED'}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
