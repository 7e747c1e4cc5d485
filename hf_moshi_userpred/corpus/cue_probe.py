"""Do a codec's codes carry the cues that decide the turn? A linear probe on the user's codes just before each of
their pauses, trained to tell a shift from a hold on the training dialogues and scored on the held-out ones.

The probe reads the codes through the codec's own code vectors: the latents `[hidden, frames]` they decode to
(`quantizer.decode`, the sum of each codebook's entry, projected). That is a linear function of the one-hot codes, so
it hears nothing the codes do not carry, but with `hidden` features per frame instead of `num_quantizers *
codebook_size` a few hundred pauses fit it without learning them by heart (a one-hot probe on the same pauses
scores about 0.1 lower, from overfitting).

A probe near chance means no model reading these codes can hear what ends a turn (the encoder is then too blind or
the codebooks too small); a probe well above it says the cues survive the codec, before any model is trained.

    clause_ending_probe(mimi, {"train": user_signals, "eval": ...}, {"train": alignments, "eval": ...})
    # {"frames": 3, "train_pauses": 812, "eval_pauses": 401, "balanced_accuracy": 0.7, "auc": 0.75}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import MimiModel

from ..evaluation.turn_taking_events import dialogue_events
from ..evaluation.turn_taking_metrics import binary_metrics
from .codec import encode


def pause_features(code_vectors: torch.Tensor, alignments: Sequence, frames: int) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """The code vectors `[pauses, hidden * frames]` of the `frames` frames that end at each decidable user pause's
    last speech frame, and the labels (True: shift), for one dialogue's decoded user codes `[hidden, T]`."""
    events = dialogue_events(alignments, code_vectors.shape[-1])
    rows, labels = [], []
    for pause in events.decidable_pauses():
        first = pause.end_frame + 1 - frames
        if first >= 0:
            rows.append(code_vectors[:, first : pause.end_frame + 1].flatten())
            labels.append(pause.shift)
    width = code_vectors.shape[0] * frames
    return (torch.stack(rows) if rows else torch.zeros(0, width)), torch.tensor(labels, dtype=torch.bool)


def clause_ending_probe(mimi: MimiModel, user_signals: Mapping[str, Sequence[torch.Tensor]],
                        alignments: Mapping[str, Sequence], frames: int = 3, steps: int = 300,
                        weight_decay: float = 1e-2) -> dict:
    """Logistic regression (class-balanced, L2, standardised features) from the code vectors before each user pause
    to shift/hold, fitted on `"train"` and scored (balanced accuracy at 0.5, AUC) on `"eval"`. `user_signals`: per
    split, the user channel of each dialogue (mono, 24 kHz) in the order of `alignments`.

    Raises:
        ValueError: the training split lacks pauses of either kind.
    """
    data = {}
    with torch.no_grad():
        for split in ("train", "eval"):
            pairs = [pause_features(mimi.quantizer.decode(codes[None])[0], words, frames)
                     for codes, words in zip(encode(mimi, list(user_signals[split])), alignments[split])]
            data[split] = (torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs]))
    x, y = data["train"]
    if x.shape[0] == 0 or y.all() or not y.any():
        raise ValueError("the probe needs training pauses of both kinds (holds and shifts)")
    mean, scale = x.mean(dim=0), x.std(dim=0) + 1e-6
    x = (x - mean) / scale
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
        scores = torch.sigmoid((data["eval"][0] - mean) / scale @ weight + bias)
    metrics = binary_metrics(scores.tolist(), data["eval"][1].tolist())
    return {"frames": frames, "train_pauses": int(x.shape[0]), "eval_pauses": int(data["eval"][0].shape[0]),
            "balanced_accuracy": None if metrics.balanced_accuracy is None else round(metrics.balanced_accuracy, 3),
            "auc": None if metrics.auc is None else round(metrics.auc, 3)}


__all__ = ["clause_ending_probe", "pause_features"]
