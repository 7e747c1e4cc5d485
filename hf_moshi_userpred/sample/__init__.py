"""The shipped dialogue sample and the model shapes built around it, shared by the demo, the tests and the benchmarks.

The folder holds 28 espeak-ng dialogues in moshi-finetune's format (`train.jsonl`, `eval.jsonl`, `dialogues/`), the
small Mimi that encodes them (`mimi/`) and their sentencepiece tokenizer (`tokenizer.model`); its README says how they
were made. [`sample_model_config`] is the tiny model the demo trains on them, [`moshiko_shaped_lm_kwargs`] moshiko's
layout at any size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..models.configuration_moshi_userpred import MoshiUserPredConfig

if TYPE_CHECKING:
    from ..training.trainer import MoshiUserPredTrainingArguments

SAMPLE_DIR = Path(__file__).resolve().parent
SAMPLE_MIMI = SAMPLE_DIR / "mimi"
SAMPLE_TOKENIZER = SAMPLE_DIR / "tokenizer.model"
SAMPLE_NUM_CODEBOOKS = 4  # per speaker, of the sample Mimi's 8
MOSHIKO_DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]  # text, then per speaker semantic 0, acoustic 1


def moshiko_shaped_lm_kwargs(
    *,
    dim: int,
    num_layers: int,
    num_heads: int,
    card: int,
    text_card: int,
    context: int,
    depformer_dim: int,
    depformer_num_heads: int,
    depformer_num_layers: int = 2,
) -> dict:
    """moshi `LMModel` kwargs with moshiko's layout at another size: 17 rows and moshiko's delays, rope, RMS norm in
    float32, SiLU-gated feed-forwards, an attention window, and a Depformer with one weight set and input projection
    per codebook step (the tests, benchmarks and examples each pick a size)."""
    return dict(
        dim=dim, text_card=text_card, existing_text_padding_id=3, n_q=16, dep_q=8, card=card, num_heads=num_heads,
        num_layers=num_layers, hidden_scale=4.125, causal=True, layer_scale=None, context=context, max_period=10000,
        gating="silu", norm="rms_norm_f32", positional_embedding="rope", depformer_dim=depformer_dim,
        depformer_dim_feedforward=int(4.125 * depformer_dim), depformer_num_heads=depformer_num_heads,
        depformer_num_layers=depformer_num_layers, depformer_layer_scale=None, depformer_multi_linear=True,
        depformer_context=8, depformer_max_period=10000, depformer_gating="silu", depformer_pos_emb="none",
        depformer_weights_per_step=True, delays=list(MOSHIKO_DELAYS),
    )


def sample_model_config(dim: int = 96, num_layers: int = 4, *, text_card: int = 200, card: int = 64,
                        num_codebooks: int = SAMPLE_NUM_CODEBOOKS, context: int = 100) -> MoshiUserPredConfig:
    """A tiny moshi-shaped model for the shipped sample: its 200-piece text vocabulary, 4 of its Mimi's codebooks
    per speaker (64 entries each), moshi's delays (semantic codebook 0, acoustic ones 1), an 8 s context. The
    keywords fit the same shape to another corpus (`demo --data`)."""
    speaker_delays = [0] + [1] * (num_codebooks - 1)
    return MoshiUserPredConfig(
        dim=dim, text_card=text_card, card=card, n_q=2 * num_codebooks, dep_q=num_codebooks, num_heads=4,
        num_layers=num_layers, hidden_scale=2, context=context, delays=[0] + 2 * speaker_delays,
        depformer_dim=dim // 2, depformer_num_heads=2, depformer_num_layers=1, depformer_dim_feedforward=dim,
        user_depformer_dim=dim // 2, user_depformer_num_heads=2, user_depformer_num_layers=1,
        user_depformer_dim_feedforward=dim,
    )


def sample_training_arguments(
    output_dir: str | os.PathLike, steps: int = 900, seed: int = 0, progress: bool = True, keep_best: bool = False
) -> MoshiUserPredTrainingArguments:
    """The demo's recipe for [`sample_model_config`] (the tests' learning bar trains with it): text and system
    audio alone for the first 6% of the steps, then the user loss at half weight, then at full weight (it is the
    task the demo is about); held-out losses six times during training. `keep_best`: evaluate twelve times, keep a
    checkpoint at each, and end with the one of the lowest held-out loss (a small corpus is learnt by heart long
    before a fixed number of steps ends)."""
    from ..training.trainer import MoshiUserPredTrainingArguments  # the Trainer stack only when training

    first, second = max(steps * 6 // 100, 1), max(steps * 12 // 100, 2)
    evaluations = 12 if keep_best else 6
    best = dict(save_strategy="steps", save_steps=max(steps // evaluations, 1), load_best_model_at_end=True,
                metric_for_best_model="loss", save_total_limit=2) if keep_best else dict(save_strategy="no")
    return MoshiUserPredTrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=6, segment_frames=64,
        learning_rate=3e-3, warmup_steps=min(20, steps // 10), lr_scheduler_type="constant_with_warmup",
        weight_decay=0.1, user_loss_stages=f"0:0.0,{first}:0.5,{second}:1.0", user_loss_stage_unit="step",
        logging_steps=max(steps // 45, 1), eval_strategy="steps", eval_steps=max(steps // evaluations, 1),
        per_device_eval_batch_size=8, report_to="none", use_cpu=True, disable_tqdm=not progress, seed=seed,
        data_seed=seed, **best,
    )


__all__ = ["MOSHIKO_DELAYS", "SAMPLE_DIR", "SAMPLE_MIMI", "SAMPLE_NUM_CODEBOOKS", "SAMPLE_TOKENIZER",
           "moshiko_shaped_lm_kwargs", "sample_model_config", "sample_training_arguments"]
