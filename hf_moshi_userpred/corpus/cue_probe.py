"""Do a codec's codes carry the cues that decide the turn? A linear probe on the user's codes just before each of
their pauses, trained to tell a shift from a hold on the training dialogues and scored on the held-out ones.

The probe reads the codes through the codec's own code vectors: the latents `[hidden, frames]` they decode to
(`quantizer.decode`, the sum of each codebook's entry, projected). That is a linear function of the one-hot codes, so
it hears nothing the codes do not carry, but with `hidden` features per frame instead of `num_quantizers *
codebook_size` a few hundred pauses fit it without learning them by heart (a one-hot probe on the same pauses
scores about 0.1 lower, from overfitting).

A probe near chance means no model reading these codes can hear what ends a turn (the encoder is then too blind or
the codebooks too small); a probe well above it says the cues survive the codec, before any model is trained.

A linear read-out of 3 frames understates the codes: the decisive cue is mostly the last word and the melody over it,
which a classifier must hear across a second or two. The sequence probe is a small GRU over the 2 s (25 frames) that
end at each pause, trained on the label with early stopping on a tenth of the training dialogues: what a model
reading these codes can reach at best on this data (on the 3 h corpus about 0.77 against 0.65 for the linear probe).

    clause_ending_probe(mimi, {"train": user_signals, "eval": ...}, {"train": alignments, "eval": ...})
    # {"frames": 3, "train_pauses": 812, "eval_pauses": 401, "balanced_accuracy": 0.65, "auc": 0.7,
    #  "sequence": {"frames": 25, "train_pauses": ..., "balanced_accuracy": 0.77, "auc": 0.84}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MimiModel

from ..evaluation.turn_taking_events import dialogue_events
from ..evaluation.turn_taking_metrics import binary_metrics
from .codec import encode

SEQUENCE_FRAMES = 25  # 2 s at 12.5 Hz: the last word and its melody, and the one before


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
                        weight_decay: float = 1e-2, sequence_frames: int = SEQUENCE_FRAMES, seed: int = 0) -> dict:
    """Logistic regression (class-balanced, L2, standardised features) from the code vectors before each user pause
    to shift/hold, fitted on `"train"` and scored (balanced accuracy at 0.5, AUC) on `"eval"`; and under `"sequence"`,
    the GRU probe over `sequence_frames` (0: none) on the pauses with that much history (`sequence_probe`; with its
    reason under `"not_fitted"` when the corpus is too small to fit it).
    `user_signals`: per split, the user channel of each dialogue (mono, 24 kHz) in the order of `alignments`.

    Raises:
        ValueError: the training split lacks pauses of either kind.
    """
    with torch.no_grad():
        vectors = {split: [mimi.quantizer.decode(codes[None])[0] for codes in encode(mimi, list(user_signals[split]))]
                   for split in ("train", "eval")}
    data = {}
    for split in ("train", "eval"):
        pairs = [pause_features(v, words, frames) for v, words in zip(vectors[split], alignments[split])]
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
    result = {"frames": frames, "train_pauses": int(x.shape[0]), "eval_pauses": int(data["eval"][0].shape[0]),
              **_scores(scores, data["eval"][1])}
    if sequence_frames:
        try:
            result["sequence"] = sequence_probe(vectors, alignments, sequence_frames, seed)
        except ValueError as error:  # a corpus of a few minutes: too few pauses to fit it
            result["sequence"] = {"frames": sequence_frames, "balanced_accuracy": None, "auc": None,
                                  "not_fitted": str(error)}
    return result


def _scores(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    metrics = binary_metrics(scores.tolist(), labels.tolist())
    return {"balanced_accuracy": None if metrics.balanced_accuracy is None else round(metrics.balanced_accuracy, 3),
            "auc": None if metrics.auc is None else round(metrics.auc, 3)}


class _PauseGRU(nn.Module):
    """Per-frame code vectors `[B, T, hidden]` -> a 1x1 projection -> GRU -> the shift logit at the last frame."""

    def __init__(self, features: int, width: int = 64):
        super().__init__()
        self.project = nn.Sequential(nn.Dropout(0.1), nn.Linear(features, width), nn.GELU())
        self.gru = nn.GRU(width, width, batch_first=True)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.project(x))[0][:, -1])[:, 0]


def sequence_probe(code_vectors: Mapping[str, Sequence[torch.Tensor]], alignments: Mapping[str, Sequence],
                   frames: int = SEQUENCE_FRAMES, seed: int = 0, max_epochs: int = 80, patience: int = 12) -> dict:
    """A GRU (64 wide) over the code vectors of the `frames` frames that end at each user pause (the pauses with that
    much history), trained on shift/hold with class-balanced BCE and AdamW; the epoch kept is the best AUC on the
    pauses of a tenth of the training dialogues (never the held-out ones), then scored on `"eval"`.

    Args:
        code_vectors: per split, each dialogue's decoded user codes `[hidden, T]`, in the order of `alignments`.

    Raises:
        ValueError: the training or validation pauses lack either kind.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for split in ("train", "eval"):
        dialogue_rows = [pause_features(v, words, frames) for v, words in zip(code_vectors[split], alignments[split])]
        hidden = code_vectors[split][0].shape[0]
        x = torch.cat([x.view(-1, hidden, frames).transpose(1, 2) for x, _ in dialogue_rows])  # [pauses, T, hidden]
        dialogue = torch.cat([torch.full((len(y),), i) for i, (_, y) in enumerate(dialogue_rows)])
        rows[split] = (x, torch.cat([y for _, y in dialogue_rows]), dialogue)
    x, y, dialogue = rows["train"]
    held = torch.randperm(len(code_vectors["train"]), generator=generator)[: max(1, len(code_vectors["train"]) // 10)]
    validation = torch.isin(dialogue, held)
    for name, labels in (("training", y[~validation]), ("validation", y[validation])):
        if labels.all() or not labels.any():
            raise ValueError(f"the sequence probe needs {name} pauses of both kinds (holds and shifts)")
    mean, scale = x[~validation].mean(dim=(0, 1)), x[~validation].std(dim=(0, 1)) + 1e-5
    inputs = {"train": (x[~validation] - mean) / scale, "validation": (x[validation] - mean) / scale,
              "eval": (rows["eval"][0] - mean) / scale}
    targets = y[~validation].float()
    torch.manual_seed(seed)
    model = _PauseGRU(x.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    positive_weight = (1 - targets).sum() / targets.sum()

    def predict(features: torch.Tensor) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return torch.sigmoid(model(features))

    best_auc, best_state, waited = -1.0, None, 0
    for _ in range(max_epochs):
        model.train()
        for batch in torch.randperm(len(targets), generator=generator).split(32):
            loss = F.binary_cross_entropy_with_logits(model(inputs["train"][batch]), targets[batch],
                                                      pos_weight=positive_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        auc = binary_metrics(predict(inputs["validation"]).tolist(), y[validation].tolist()).auc
        if auc > best_auc:
            best_auc, best_state, waited = auc, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    return {"frames": frames, "train_pauses": int((~validation).sum()), "validation_pauses": int(validation.sum()),
            "eval_pauses": len(rows["eval"][1]), **_scores(predict(inputs["eval"]), rows["eval"][1])}


__all__ = ["clause_ending_probe", "pause_features", "sequence_probe"]
