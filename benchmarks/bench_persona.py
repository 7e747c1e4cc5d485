"""Starting a conversation from a persona prompt: PersonaPlex's frame-by-frame replay against our one-call prefill
and our cached copy, side by side.

A PersonaPlex-sized prompt (a 10 s voice sample: 125 frames, 6 silence frames, a 40-token role, 6 silence frames:
177 frames) on the moshiko-shaped config (`common.MOSHIKO_SMALL`, random weights; `--quick`: the tiny config and a
short prompt). Candidates, interleaved round by round:

- `moshi_replay`: kyutai's `LMGen.step` once per prompt frame, as PersonaPlex's `step_system_prompts` does (moshi
  0.2.13 cannot force the agent's tokens, so it samples them: the same transformer and Depformer work per frame);
- `ours_replay`: our session stepped through the prompt frame by frame (what `session.prompt` computes, one frame at
  a time: the reference the prefill is tested against);
- `ours_prefill`: `session.prompt` on a prompt it has not seen (one prefill of the main transformer);
- `ours_cached`: `session.prompt` on a prompt it has seen (a copy of the kept prefill into the slot).

Targets: the prefill at least 5x faster than moshi's replay; a cached start at least 5x faster than a prefill.
"""

from __future__ import annotations

import sys

import torch

from benchmarks.common import (
    MOSHIKO_SMALL,
    MOSHIKO_TINY,
    base_parser,
    interleaved,
    moshi_and_ours,
    setup,
    write_results,
)
from hf_moshi_userpred.models.generation_moshi_persona import MoshiPersonaPrompt

NAME = "persona"
PREFILL_TARGET, CACHE_TARGET = 5.0, 5.0


def prompt_codes(config, voice_frames: int, role_tokens: int, seed: int) -> MoshiPersonaPrompt:
    generator = torch.Generator().manual_seed(seed)
    codes = lambda *shape: torch.randint(0, config.card, shape, generator=generator)  # noqa: E731
    role = torch.randint(0, config.text_card, (role_tokens,), generator=generator).tolist()
    return MoshiPersonaPrompt.build(config, silence_codes=codes(config.dep_q), user_codes=codes(config.n_q - config.dep_q),
                                    role_tokens=role, voice_codes=codes(config.dep_q, voice_frames))


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    setup(args)
    torch.set_grad_enabled(False)
    lm_kwargs, voice_frames, role_tokens = (MOSHIKO_TINY, 10, 8) if args.quick else (MOSHIKO_SMALL, 125, 40)
    rounds, repeats = (1, 1) if args.quick else (3, 2)
    moshi, ours = moshi_and_ours(lm_kwargs)
    c = ours.config
    prompt = prompt_codes(c, voice_frames, role_tokens, seed=0)
    user_rows = prompt.codes[1 + c.dep_q :]
    from moshi.models.lm import LMGen

    lm_gen = LMGen(moshi, use_sampling=False)
    lm_gen.streaming_forever(1)
    fresh = iter(range(1, 10**6))
    with ours.streaming(1, do_sample=False, audio_do_sample=False, speculate_top_k=0) as stream:

        def moshi_replay():
            lm_gen.reset_streaming()
            for frame in range(prompt.num_frames):
                lm_gen.step(user_rows[None, :, frame : frame + 1])

        def ours_replay():
            stream.reset()
            for frame in range(prompt.num_frames):  # the user's rows; the agent's tokens are the model's own here
                stream.step(user_rows[None, :, frame : frame + 1])

        def ours_prefill():  # a prompt the session has not seen: one prefill
            stream.prompt(prompt_codes(c, voice_frames, role_tokens, seed=next(fresh)))

        def ours_cached():  # the same prompt again: a copy
            stream.prompt(prompt)

        stream.prompt(prompt)  # kept for `ours_cached`
        timings = interleaved({"moshi_replay": moshi_replay, "ours_replay": ours_replay, "ours_prefill": ours_prefill,
                               "ours_cached": ours_cached}, rounds=rounds, repeats=repeats, warmup=1)
    median = {name: timing["median_ms"] for name, timing in timings.items()}
    speedup = median["moshi_replay"] / median["ours_prefill"]
    cache_speedup = median["ours_prefill"] / median["ours_cached"]
    results = {
        "config": "MOSHIKO_TINY" if args.quick else "MOSHIKO_SMALL",
        "prompt_frames": prompt.num_frames,
        "timings": timings,
        "ratios": {"moshi_replay/ours_prefill": speedup, "ours_replay/ours_prefill": median["ours_replay"] / median[
            "ours_prefill"], "ours_prefill/ours_cached": cache_speedup},
        "targets": {
            "prefill": {"what": "moshi frame-by-frame replay / our one-call prefill, median", "min": PREFILL_TARGET,
                        "value": speedup, "met": speedup >= PREFILL_TARGET},
            "cache": {"what": "our prefill / a cached prompt's copy, median", "min": CACHE_TARGET,
                      "value": cache_speedup, "met": cache_speedup >= CACHE_TARGET},
        },
    }
    path = write_results(NAME, results, args.out)
    print(f"{prompt.num_frames}-frame prompt: moshi replay {median['moshi_replay']:.0f} ms, ours frame by frame "
          f"{median['ours_replay']:.0f} ms, prefill {median['ours_prefill']:.1f} ms ({speedup:.1f}x), cached "
          f"{median['ours_cached']:.2f} ms ({cache_speedup:.1f}x) -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
