"""Quickstart: the Python API on a small moshi-shaped model, end to end, offline, in about a minute.

Builds a Moshi with the user-prediction branch from a moshi-style kwargs dict, runs the training forward
with the combined loss, fits one synthetic batch (a check that the combined loss trains the text, system
and user heads together; generalisation is measured on real dialogues by the training pipeline), streams
that conversation with speculative streaming (and checks it is lossless against plain streaming), exports
the shared part to kyutai's checkpoint layout, reloads it with `from_moshi`, and round-trips the whole model
through `save_pretrained` / `AutoModel`.

    .venv/bin/python examples/quickstart.py [--steps 30] [--out outputs/quickstart]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModel

from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.sample import moshiko_shaped_lm_kwargs

# moshiko's layout (17 rows, its delays, rope, RMS norm, gated FFN, per-step Depformer), shrunk.
SMALL_MOSHIKO = moshiko_shaped_lm_kwargs(dim=128, num_layers=2, num_heads=4, card=64, text_card=64, context=64,
                                         depformer_dim=64, depformer_num_heads=4)


def synthetic_conversation(config: MoshiUserPredConfig, batch: int, frames: int, seed: int) -> torch.Tensor:
    """Random text and system audio; a user whose codebook k repeats a short cycle."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.card, (batch, config.num_codebooks, frames), generator=g)
    codes[:, 0] = torch.randint(0, config.text_card, (batch, frames), generator=g)
    period = 4
    pattern = torch.randint(0, config.card, (batch, config.n_q - config.dep_q, period), generator=g)
    codes[:, 1 + config.dep_q:] = pattern.repeat(1, 1, frames // period + 1)[..., :frames]
    return codes


def user_accuracy(output, codes: torch.Tensor, rows: slice) -> float:
    mask = output.user_mask
    return (output.user_logits.argmax(-1) == codes[:, rows])[mask].float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"), help="where to save the model")
    args = parser.parse_args()
    torch.manual_seed(0)

    config = MoshiUserPredConfig.from_moshi_lm_kwargs(SMALL_MOSHIKO, user_loss_weight=1.0)
    model = MoshiUserPredForConditionalGeneration(config)
    model.init_user_branch("copy_system")
    n_user = sum(p.numel() for p in model.user_depformer.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model: {n_all / 1e6:.2f} M parameters, user branch {n_user / 1e6:.2f} M ({config.user_dep_q} codebooks)")

    train = synthetic_conversation(config, batch=8, frames=48, seed=0)
    held_out = synthetic_conversation(config, batch=4, frames=48, seed=1)
    output = model(train, return_loss=True)
    print(f"forward: text_logits {tuple(output.text_logits.shape)}, audio_logits {tuple(output.audio_logits.shape)}, "
          f"user_logits {tuple(output.user_logits.shape)}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps + 1):
        output = model(train, return_loss=True)
        if step % 10 == 0:
            print(f"step {step:3d}  loss {output.loss.item():.3f}  text {output.text_loss.item():.3f}  "
                  f"audio {output.audio_loss.item():.3f}  user {output.user_loss.item():.3f}")
        if step < args.steps:
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        held = model(held_out, return_loss=True)
    print(f"fitted the batch in {args.steps} steps ({time.perf_counter() - start:.1f} s): user token accuracy "
          f"{user_accuracy(output, train, model.user_rows):.1%}; on unseen conversations "
          f"{user_accuracy(held, held_out, model.user_rows):.1%} (chance {1 / config.card:.1%}: one batch "
          "teaches no general rule)")

    # Real-time loop over one fitted conversation: speculation precomputes each next step for the 4 most likely
    # next user tokens; a hit leaves only a commit on the critical path. Greedy, so plain streaming must agree.
    user_stream = train[:1, 1 + config.dep_q :]
    speculative = model.generate(user_stream, progress=False, do_sample=False, audio_do_sample=False,
                                 speculate_top_k=4)
    plain = model.generate(user_stream, progress=False, do_sample=False, audio_do_sample=False)
    stats = speculative.speculation
    lossless = torch.equal(speculative.text_tokens, plain.text_tokens) and torch.equal(
        speculative.audio_codes, plain.audio_codes)
    hit_ms = 1e3 * stats.critical_hit_s / max(stats.hit_steps, 1)
    normal_ms = 1e3 * stats.critical_normal_s / max(stats.normal_steps, 1)
    print(f"streaming {user_stream.shape[-1]} frames with speculation (k=4): hit rate {stats.hit_rate:.0%}, "
          f"critical path {hit_ms:.1f} ms on hits vs {normal_ms:.1f} ms otherwise, "
          f"{1e3 * stats.saved_s:.0f} ms saved; tokens identical to plain streaming: {lossless}")

    # kyutai layout out, and back in through from_moshi (the path a released Moshi checkpoint takes)
    moshi_weights = model.moshi_state_dict()
    reloaded = MoshiUserPredForConditionalGeneration.from_moshi(moshi_weights, lm_kwargs=SMALL_MOSHIKO,
                                                                user_init="copy_system")
    with torch.no_grad():
        again = reloaded(held_out)
    same = torch.equal(again.audio_logits.nan_to_num(), held.audio_logits.nan_to_num())
    print(f"moshi layout: {len(moshi_weights)} tensors; reloaded system-audio logits identical: {same}")

    model.save_pretrained(args.out)
    loaded = AutoModel.from_pretrained(args.out)
    with torch.no_grad():
        same = torch.equal(loaded(held_out).user_logits.nan_to_num(), held.user_logits.nan_to_num())
    print(f"saved to {args.out}; AutoModel reload gives identical user logits: {same}")


if __name__ == "__main__":
    main()
