"""Do a codec's codes carry the cues that decide the turn? A linear probe on the user's codes just before each of
their pauses, trained to tell a shift from a hold on the training dialogues and scored on the held-out ones.

A probe near chance means no model reading these codes can hear what ends a turn (the codebooks are then too small
or the encoder too blind); a probe well above it says the cues survive the codec, before any model is trained.

    clause_ending_probe(mimi, {"train": user_signals, "eval": ...}, {"train": alignments, "eval": ...})
    # {"frames": 3, "train_pauses": 812, "eval_pauses": 401, "balanced_accuracy": 0.83}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import MimiModel

from ..evaluation.turn_taking_events import dialogue_events
from ..evaluation.turn_taking_metrics import binary_metrics
from .codec import encode


def pause_features(codes: torch.Tensor, alignments: Sequence, frames: int, card: int) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """One-hot codes `[pauses, n_q * frames * card]` of the `frames` frames that end at each decidable user pause's
    last speech frame, and the labels (True: shift), for one dialogue's user codes `[n_q, T]`."""
    events = dialogue_events(alignments, codes.shape[-1])
    rows, labels = [], []
    for pause in events.decidable_pauses():
        first = pause.end_frame + 1 - frames
        if first < 0:
            continue
        window = codes[:, first : pause.end_frame + 1]
        rows.append(torch.nn.functional.one_hot(window.long(), card).flatten().float())
        labels.append(pause.shift)
    width = codes.shape[0] * frames * card
    return (torch.stack(rows) if rows else torch.zeros(0, width)), torch.tensor(labels, dtype=torch.bool)


def clause_ending_probe(mimi: MimiModel, user_signals: Mapping[str, Sequence[torch.Tensor]],
                        alignments: Mapping[str, Sequence], frames: int = 3, steps: int = 300,
                        weight_decay: float = 1e-3) -> dict:
    """Logistic regression (class-balanced, L2) from the one-hot codes before each user pause to shift/hold, fitted
    on `"train"` and scored (balanced accuracy at 0.5) on `"eval"`. `user_signals`: per split, the user channel of
    each dialogue (mono, 24 kHz) in the order of `alignments`."""
    card = mimi.config.codebook_size
    data = {}
    with torch.no_grad():
        for split in ("train", "eval"):
            pairs = [pause_features(codes, words, frames, card)
                     for codes, words in zip(encode(mimi, list(user_signals[split])), alignments[split])]
            data[split] = (torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))
    x, y = data["train"]
    if x.shape[0] == 0 or y.all() or not y.any():
        raise ValueError("the probe needs training pauses of both kinds (holds and shifts)")
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    positive_weight = (~y).sum() / y.sum()  # balance the classes
    optimizer = torch.optim.Adam([weight, bias], lr=0.05, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y.float(),
                                                                    pos_weight=positive_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = torch.sigmoid(data["eval"][0] @ weight + bias)
    metrics = binary_metrics(scores.tolist(), data["eval"][1].tolist())
    return {"frames": frames, "train_pauses": int(x.shape[0]), "eval_pauses": int(data["eval"][0].shape[0]),
            "balanced_accuracy": None if metrics.balanced_accuracy is None else round(metrics.balanced_accuracy, 3),
            "auc": None if metrics.auc is None else round(metrics.auc, 3)}


__all__ = ["clause_ending_probe", "pause_features"]
