"""Quantized weights (torchao weight-only int8 / int4 through `TorchAoConfig`) against the same model unquantized.

Per model (the moshiko-shaped small config with random weights, and the demo's trained sample model): weight bytes,
max |delta logit| (teacher-forced), greedy token agreement over 250 streaming steps, the user prediction's delay-0
accuracy change, and the streaming step time ratio. Then the full-size table from the meta device (moshiko 7B + the
user branch): bytes at bf16, int8 and int4, computed from parameter shapes under the rule below. On a GPU (when one
is there): step time and peak memory at full size.

Byte rule (what torchao leaves, through Transformers): every `nn.Linear` weight is quantized except the module of the
model's last parameter (Transformers keeps it: the last user head); int8 = 1 byte per weight + one bf16 scale per output
row; int4 (the CUDA tinygemm layout) = 0.5 byte per weight + a bf16 scale and zero per group of 128 inputs; embeddings,
norms, biases and the kept head stay bf16 (2 bytes).

On CPU, torchao 0.18 has no int4 kernel: int4 runs as `IntxWeightOnlyConfig(torch.int4)` (the same grid, one value
per byte), so its measured bytes are int8's and its accuracy is int4's.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    MOSHIKO_SMALL,
    MOSHIKO_TINY,
    base_parser,
    demo_model_dir,
    random_codes,
    setup,
    write_results,
)
from hf_moshi_userpred import MoshiUserPredConfig, MoshiUserPredForConditionalGeneration
from hf_moshi_userpred.hub.conversion import quantization_config
from hf_moshi_userpred.data.encoding import EncodedDialogues
from hf_moshi_userpred.evaluation.user_prediction import evaluate_user_prediction

SCHEMES = ("int8", "int4")
STEPS, QUICK_STEPS = 250, 20
TARGETS = {"int8": 0.99, "int4": 0.95}  # greedy streaming steps with identical tokens
FULL_SIZE_INT4_TARGET_GB = 5.0
GREEDY = {"do_sample": False, "audio_do_sample": False}


def weight_bytes(model: nn.Module) -> int:
    """Bytes the parameters hold in memory; a torchao tensor counts the tensors it is made of."""
    total = 0
    for tensor in model.state_dict().values():
        parts = [getattr(tensor, name) for name in getattr(tensor, "tensor_data_names", [])]
        parts += [getattr(tensor, name, None) for name in getattr(tensor, "optional_tensor_data_names", [])]
        parts = [part for part in parts if part is not None] or [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def stream_tokens(model, user: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Greedy streaming of `user` `[1, n_q - dep_q, T]`: the tokens `[T', 1 + dep_q]` and the median step seconds."""
    tokens, times = [], []
    with model.streaming(1, **GREEDY) as stream:
        for t in range(user.shape[-1]):
            start = time.perf_counter()
            out = stream.step(user[:, :, t : t + 1])
            times.append(time.perf_counter() - start)
            if out.tokens is not None:
                tokens.append(out.tokens[0, :, 0])
    return torch.stack(tokens), sorted(times)[len(times) // 2]


def compare(plain, folder: Path, codes: torch.Tensor, user: torch.Tensor, held_out: EncodedDialogues) -> dict:
    """Every scheme against the unquantized `plain` model saved in `folder`."""
    with torch.no_grad():
        expected = plain(codes)
    plain_tokens, plain_step = stream_tokens(plain, user)
    plain_delay0 = evaluate_user_prediction(plain, held_out).model.delay0_accuracy
    rows = {"unquantized": {"dtype": str(plain.dtype), "weight_bytes": weight_bytes(plain), "step_ms": 1e3 * plain_step,
                            "delay0_accuracy": plain_delay0}}
    for scheme in SCHEMES:
        config = quantization_config(scheme, plain.config)
        model = MoshiUserPredForConditionalGeneration.from_pretrained(folder, quantization_config=config).eval()
        with torch.no_grad():
            got = model(codes)
        names = ("text_logits", "audio_logits", "user_logits")
        delta = max((getattr(got, name) - getattr(expected, name)).nan_to_num().abs().max().item() for name in names)
        # Argmax agreement with the same inputs at every position: free of the divergence that one different token
        # starts in free-running streaming (a random model's logits are near ties).
        valid = [getattr(expected, name.replace("logits", "mask")) for name in names]
        argmax_same = torch.cat([(getattr(got, name).argmax(-1) == getattr(expected, name).argmax(-1))[mask]
                                 for name, mask in zip(names, valid)])
        tokens, step = stream_tokens(model, user)
        same = (tokens == plain_tokens).all(dim=1)
        diverged = (~same).nonzero()
        delay0 = evaluate_user_prediction(model, held_out).model.delay0_accuracy
        rows[scheme] = {
            "torchao_config": type(config.quant_type).__name__,
            "weight_bytes": weight_bytes(model),
            "bytes_ratio": weight_bytes(model) / rows["unquantized"]["weight_bytes"],
            "max_abs_delta_logit": delta,
            "teacher_forced_argmax_agreement": argmax_same.float().mean().item(),
            "greedy_agreement": same.float().mean().item(),
            "first_divergence_step": int(diverged[0]) if len(diverged) else None,
            "streamed_steps": len(same),
            "delay0_accuracy": delay0,
            "delay0_accuracy_change": delay0 - plain_delay0,
            "step_ms": 1e3 * step,
            "step_time_ratio": step / plain_step,
            "target": {"greedy_agreement": TARGETS[scheme], "met": same.float().mean().item() >= TARGETS[scheme]},
        }
    return rows


def moshiko_shaped(args, folder: Path) -> dict:
    """The moshiko-shaped small config, random weights (fp32), random codes for the logits, random user frames."""
    lm_kwargs = MOSHIKO_TINY if args.quick else MOSHIKO_SMALL
    torch.manual_seed(0)
    plain = MoshiUserPredForConditionalGeneration(MoshiUserPredConfig.from_moshi_lm_kwargs(lm_kwargs)).eval()
    plain.save_pretrained(folder)
    c = plain.config
    steps = QUICK_STEPS if args.quick else STEPS
    codes = random_codes(1 + c.n_q, c.card, c.text_card, batch=1, frames=50, seed=1)
    user = random_codes(1 + c.n_q, c.card, c.text_card, batch=1, frames=steps, seed=2)[:, 1 + c.dep_q:]
    held_out = EncodedDialogues.from_codes([random_codes(1 + c.n_q, c.card, c.text_card, 1, 100, seed)[0]
                                            for seed in (3, 4)])
    return compare(plain, folder, codes, user, held_out)


def trained_sample(args) -> dict:
    """The demo's trained sample model on the held-out dialogues: their user frames, concatenated to 250 steps."""
    folder = demo_model_dir(args)
    plain = MoshiUserPredForConditionalGeneration.from_pretrained(folder).eval()
    held_out = EncodedDialogues(folder.parent / "encoded" / "eval")
    dialogues = [held_out[i]["codes"].long() for i in range(len(held_out))]
    steps = QUICK_STEPS if args.quick else STEPS
    user = torch.cat(dialogues, dim=1)[None, 1 + plain.config.dep_q:, :steps]
    return {"model_dir": str(folder), **compare(plain, folder, dialogues[0][None], user, held_out)}


def full_size_table() -> dict:
    """moshiko 7B + the user branch on the meta device: bytes at bf16 / int8 / int4 (the module docstring's rule)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    with torch.device("meta"):
        model = MoshiUserPredForConditionalGeneration(MoshiUserPredConfig())
    kept = set(get_keys_to_not_convert(model))
    quantized = [(name, module.weight.shape) for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name not in kept]
    linear_elements = sum(shape.numel() for _, shape in quantized)
    all_elements = sum(p.numel() for p in model.parameters())
    other_bytes = 2 * (all_elements - linear_elements)
    int8_bytes = other_bytes + linear_elements + sum(2 * shape[0] for _, shape in quantized)
    group_bytes = sum(2 * 2 * shape[0] * (shape[1] // 128) for _, shape in quantized)  # bf16 scale + zero per group
    int4_bytes = other_bytes + linear_elements // 2 + group_bytes
    user = sum(p.numel() for p in model.user_depformer.parameters())
    return {
        "parameters": all_elements, "user_branch_parameters": user, "quantized_linear_weights": linear_elements,
        "kept_in_bf16": sorted(kept), "bf16_gb": 2 * all_elements / 1e9, "int8_gb": int8_bytes / 1e9,
        "int4_gb": int4_bytes / 1e9,
        "target": {"int4_gb": FULL_SIZE_INT4_TARGET_GB, "met": int4_bytes / 1e9 <= FULL_SIZE_INT4_TARGET_GB},
    }


def full_size_gpu() -> dict:
    """moshiko 7B + user branch on the GPU, random bf16 weights: streaming step time and peak memory per scheme."""
    results = {}
    for scheme in (None, *SCHEMES):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        config = MoshiUserPredConfig()
        with torch.device("cuda"):
            model = MoshiUserPredForConditionalGeneration(config).to(torch.bfloat16).eval()
        if scheme is not None:
            from torchao.quantization import quantize_

            quantize_(model, quantization_config(scheme, config, "cuda").quant_type)
        user = torch.randint(0, config.card, (1, config.n_q - config.dep_q, 100), device="cuda")
        _, step = stream_tokens(model, user)
        results[scheme or "bf16"] = {"step_ms": 1e3 * step, "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
                                     "weight_gb": weight_bytes(model) / 1e9}
        del model
    return results


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a demo's model/ folder (its ../encoded/eval is used)")
    parser.add_argument("--retrain", action="store_true", help="retrain the cached demo model")
    args = parser.parse_args()
    setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "steps": QUICK_STEPS if args.quick else STEPS,
            "threads": torch.get_num_threads(),
            "moshiko_shaped_small": moshiko_shaped(args, Path(tmp)),
            "trained_sample": trained_sample(args),
            "full_size": full_size_table(),
        }
    results["full_size_gpu"] = full_size_gpu() if torch.cuda.is_available() else "no GPU on this machine"
    path = write_results("quantization", results, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
