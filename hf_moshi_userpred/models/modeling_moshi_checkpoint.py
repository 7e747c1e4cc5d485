"""Key layout of kyutai's Moshi checkpoints, both ways.

Our module tree differs from moshi's `LMModel` only in how the system Depformer is grouped
(`depformer.in_projs.0` is moshi's `depformer_in.0`, `depformer.heads.3` its `linears.3`, ...) and in
the attention projections: kyutai's released files store them fused over weight sets
(`self_attn.in_proj_weight` `[num_sets * qkv_dim, dim]`, `self_attn.out_proj.weight`), while
moshi-finetune saves moshi's unfused module keys (`self_attn.in_projs.{i}.weight`). Both are read;
export writes the released (fused) layout, which moshi's `LMModel.load_state_dict(strict=True)` reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# (our prefix, moshi prefix) for the system Depformer; everything else has moshi's name already.
_DEPFORMER_PREFIXES = (
    ("depformer.transformer.", "depformer."),
    ("depformer.in_projs.", "depformer_in."),
    ("depformer.text_emb.", "depformer_text_emb."),
    ("depformer.emb.", "depformer_emb."),
    ("depformer.norms.", "depformer_norms."),
    ("depformer.heads.", "linears."),
)
_PER_SET_PROJ = re.compile(r"^(.*\.self_attn)\.(in|out)_projs\.(\d+)\.weight$")
# Our user branch, which kyutai's checkpoints do not hold: the user Depformer and the voice-activity head.
USER_BRANCH_PREFIXES = ("user_depformer.", "voice_activity_head.")


def to_moshi_key(key: str) -> str:
    """Our parameter name -> moshi's module name (unfused)."""
    for ours, theirs in _DEPFORMER_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def _fused_key(moshi_key: str) -> tuple[str, int] | None:
    """`x.self_attn.in_projs.2.weight` -> (`x.self_attn.in_proj_weight`, 2); None for other keys."""
    match = _PER_SET_PROJ.match(moshi_key)
    if match is None:
        return None
    prefix, kind, index = match.groups()
    return (f"{prefix}.in_proj_weight" if kind == "in" else f"{prefix}.out_proj.weight"), int(index)


def moshi_layout(shapes: Mapping[str, torch.Size]) -> dict[str, list[str]]:
    """Released-checkpoint key -> our keys it holds, in row order, for the shared (non-user) parameters."""
    layout: dict[str, list[tuple[int, str]]] = {}
    for key in shapes:
        if key.startswith(USER_BRANCH_PREFIXES):
            continue
        moshi_key = to_moshi_key(key)
        fused = _fused_key(moshi_key)
        name, index = fused if fused is not None else (moshi_key, 0)
        layout.setdefault(name, []).append((index, key))
    return {name: [key for _, key in sorted(parts)] for name, parts in layout.items()}


def convert_from_moshi(
    state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """Map a moshi state dict (released or moshi-finetune layout) onto our parameter names.

    Args:
        state_dict: moshi `LMModel` weights.
        shapes: our model's parameter shapes (`{name: shape}`); the user branch's (`USER_BRANCH_PREFIXES`) are ignored.

    Raises:
        ValueError: listing every missing, unexpected and mis-shaped key (moshi names, both shapes).
    """
    layout = moshi_layout(shapes)
    unfused = {to_moshi_key(key): key for parts in layout.values() for key in parts}
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: dict[str, tuple[torch.Size, torch.Size]] = {}  # moshi key -> (checkpoint shape, model shape)
    for key, tensor in state_dict.items():
        if key in layout:
            parts = layout[key]
            rows = [shapes[part][0] for part in parts]
            expected = torch.Size([sum(rows), *shapes[parts[0]][1:]])
            if tensor.shape != expected:
                mismatched[key] = (tensor.shape, expected)
                continue
            out.update(zip(parts, torch.split(tensor, rows)))
        elif key in unfused:
            ours = unfused[key]
            if tensor.shape != shapes[ours]:
                mismatched[key] = (tensor.shape, shapes[ours])
                continue
            out[ours] = tensor
        else:
            unexpected.append(key)
    missing = sorted({name for name, parts in layout.items() for part in parts if part not in out} - set(mismatched))
    if missing or unexpected or mismatched:
        lines = [f"the moshi checkpoint does not match the config ({len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped keys):"]
        lines += [f"  missing: {key}" for key in missing]
        lines += [f"  unexpected: {key}" for key in sorted(unexpected)]
        lines += [f"  mis-shaped: {key}: checkpoint {tuple(got)} vs model {tuple(want)}"
                  for key, (got, want) in mismatched.items()]
        raise ValueError("\n".join(lines))
    return out


def convert_to_moshi(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> kyutai's released layout (fused attention projections, no user branch)."""
    layout = moshi_layout({key: tensor.shape for key, tensor in state_dict.items()})
    return {
        name: state_dict[parts[0]] if len(parts) == 1 else torch.cat([state_dict[part] for part in parts], dim=0)
        for name, parts in layout.items()
    }


__all__ = ["convert_from_moshi", "convert_to_moshi", "moshi_layout", "to_moshi_key", "USER_BRANCH_PREFIXES"]
