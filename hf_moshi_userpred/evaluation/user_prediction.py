"""How well the user branch predicts the user's next audio tokens, next to two baselines on the same positions.

`model(codes).user_logits[:, k, t]` scores `codes[:, model.user_rows][:, k, t]`; when it is computed the model has
seen that user codebook up to frame `t - L` (`L = config.user_prediction_lookahead`). Only the codebooks with
delay 0 (the semantic ones) are a real forecast; the delayed (acoustic) ones are predicted once the semantic token
of their frame is already in hand (docs/design.md §2), so the report gives them separately.

    report = evaluate_user_prediction(model, eval_dataset, reference=train_dataset, plot_dir="eval_plots")
    trainer.log(report.to_dict())
    print(report.to_markdown())
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..data.collator import DialogueSegments
from ..models.modeling_moshi_codes import ZERO_TOKEN_ID, check_codes
from ..models.modeling_moshi_userpred import MoshiUserPredForConditionalGeneration, shift_time
from .figures import save_figures
from .report_format import percent

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PREDICTORS = ("model", "repeat_last", "unigram")  # the order of the first axis of the counts


@dataclass
class PredictionMetrics:
    """Accuracies of one predictor over the positions where the model's `user_mask` is True.

    Args:
        accuracy: fraction of correct top-1 predictions over all user codebooks.
        delay0_accuracy: the same over the delay-0 codebooks (the forecast); None when there is none.
        delayed_accuracy: the same over the other codebooks; None when there is none.
        per_codebook_accuracy: one per user codebook (None where it has no scored position).
        top_k_accuracy: fraction of targets among the predictor's k best tokens.
        delay0_top_k_accuracy: the same over the delay-0 codebooks: the hit rate of k speculation candidates.
        sequence_accuracy: fraction of scored frames where every scored user codebook of the frame is right.
    """

    accuracy: float
    delay0_accuracy: float | None
    delayed_accuracy: float | None
    per_codebook_accuracy: list[float | None]
    top_k_accuracy: float
    delay0_top_k_accuracy: float | None
    sequence_accuracy: float


@dataclass
class ReliabilityBin:
    """One equal-width confidence bin `[lower, upper)` (the last one includes 1): mean confidence and accuracy of
    the model's top-1 predictions whose confidence falls in it (None for an empty bin)."""

    lower: float
    upper: float
    count: int
    confidence: float | None
    accuracy: float | None


@dataclass
class UserPredictionReport:
    """Result of [`evaluate_user_prediction`].

    Args:
        model, repeat_last, unigram: [`PredictionMetrics`] of the user branch and of the two baselines.
        ece, delay0_ece: the model's expected calibration error over all user codebooks / the delay-0 ones.
        reliability, delay0_reliability: the model's reliability curves ([`ReliabilityBin`] per bin).
        delay0_rows: indices `k` of the user codebooks with delay 0 (codes row `model.user_rows.start + k`).
        tokens_per_codebook: scored positions per user codebook; `num_tokens`, `num_delay0_tokens` their sums.
        num_frames: frames with at least one scored user token (the denominator of `sequence_accuracy`).
        top_k, lookahead: the `k` of the top-k accuracies and the model's `user_prediction_lookahead`.
        unigram_source: `"reference"` or `"evaluated dataset"` (what the unigram counts were taken on).
        plots: name -> path of the figures written to `plot_dir`.
    """

    model: PredictionMetrics
    repeat_last: PredictionMetrics
    unigram: PredictionMetrics
    ece: float
    delay0_ece: float | None
    reliability: list[ReliabilityBin]
    delay0_reliability: list[ReliabilityBin]
    delay0_rows: list[int]
    tokens_per_codebook: list[int]
    num_tokens: int
    num_delay0_tokens: int
    num_frames: int
    top_k: int
    lookahead: int
    unigram_source: str
    plots: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float | int]:
        """Flat scalars for `Trainer` metrics and JSON: `"user/accuracy"`, `"repeat_last/delay0_accuracy"`,
        `"unigram/codebook_3_accuracy"`, `"ece"`, `"num_tokens"`, ... (`user/` is the model). Undefined metrics
        (None) are left out."""
        out: dict[str, float | int | None] = {}
        for prefix, metrics in (("user", self.model), ("repeat_last", self.repeat_last), ("unigram", self.unigram)):
            for name, value in vars(metrics).items():
                if name == "per_codebook_accuracy":
                    out.update({f"{prefix}/codebook_{k}_accuracy": v for k, v in enumerate(value)})
                else:
                    out[f"{prefix}/{name}"] = value
        out.update(ece=self.ece, delay0_ece=self.delay0_ece, num_tokens=self.num_tokens,
                   num_delay0_tokens=self.num_delay0_tokens, num_frames=self.num_frames, top_k=self.top_k)
        return {key: value for key, value in out.items() if value is not None}

    def to_markdown(self) -> str:
        """A table of the model against the baselines, then the counts and the calibration."""
        k = self.top_k
        rows = [("accuracy", "accuracy"), ("delay-0 accuracy (forecast)", "delay0_accuracy"),
                ("delayed accuracy", "delayed_accuracy"), (f"top-{k} accuracy", "top_k_accuracy"),
                (f"delay-0 top-{k} accuracy", "delay0_top_k_accuracy"), ("sequence accuracy", "sequence_accuracy")]
        predictors = (self.model, self.repeat_last, self.unigram)
        lines = ["| | model | repeat_last | unigram |", "|---|---:|---:|---:|"]
        lines += [f"| {label} | " + " | ".join(percent(getattr(p, name)) for p in predictors) + " |"
                  for label, name in rows]
        for cb in range(len(self.tokens_per_codebook)):
            label = f"codebook {cb} ({'delay 0' if cb in self.delay0_rows else 'delayed'})"
            lines.append(f"| {label} | " + " | ".join(percent(p.per_codebook_accuracy[cb]) for p in predictors) + " |")
        delay0_ece = "-" if self.delay0_ece is None else f"{self.delay0_ece:.4f}"
        lines.append(f"\n{self.num_tokens} user tokens ({self.num_delay0_tokens} delay-0) over {self.num_frames} "
                     f"frames, lookahead {self.lookahead}; model ECE {self.ece:.4f} (delay-0: {delay0_ece}); "
                     f"unigram counted on the {self.unigram_source}.")
        return "\n".join(lines)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float | None:
    return float(numerator) / float(denominator) if denominator > 0 else None


@torch.no_grad()
def evaluate_user_prediction(
    model: MoshiUserPredForConditionalGeneration,
    dataset: Sequence[Mapping | torch.Tensor],
    *,
    batch_size: int = 8,
    window: int | None = None,
    top_k: int = 5,
    num_bins: int = 10,
    reference: Sequence[Mapping | torch.Tensor] | None = None,
    plot_dir: str | os.PathLike | None = None,
) -> UserPredictionReport:
    r"""Teacher-forced accuracy and calibration of the user branch, and of two baselines on the same positions.

    Each dialogue is cut into consecutive non-overlapping windows of `window` frames (the last one shorter), each
    scored by one forward pass (the model sees nothing before the window's start). Windows are batched only with
    windows of the same length, never padded, so every window is scored exactly as it would be alone. Positions
    count where `user_mask` is True: targets other than the zero token -1 that the model has a prediction for.

    Predictors, for the target `codes[row, t]` of user codebook `k`:
        - model: the argmax of `user_logits[:, k, t]`; top-k: its k best tokens; confidence: the softmax probability
          of the argmax.
        - repeat_last: `codes[row, t - L]` of the same window, the last frame of that row the model has seen
          (L = `config.user_prediction_lookahead`); the unigram token where that is the zero token or before the
          window. Its top-k is its top-1.
        - unigram: the most frequent token of codebook k; top-k: the k most frequent (ties: the lower id). Counted
          on `reference` (e.g. the training set) when given, else on `dataset` itself, which favours the baseline.

    Args:
        model: a [`MoshiUserPredForConditionalGeneration`] with a user branch; put in eval mode for the call.
        dataset: dialogues, each codes `torch.LongTensor` `[1 + n_q, T]` or a dict holding them as `"codes"`.
        batch_size: windows per forward pass.
        window: frames per window (default: `config.streaming_window`).
        top_k: k of the top-k accuracies, at most `card` (the audio vocabulary).
        num_bins: equal-width confidence bins of the reliability curves.
        reference: dialogues like `dataset` to count the unigram baseline on.
        plot_dir: if given, write `per_codebook_accuracy.png` and `reliability.png` there (needs matplotlib).

    Returns:
        [`UserPredictionReport`].

    Raises:
        ValueError: the model has no user branch, `top_k` exceeds `card`, the dataset is empty or has no scored
            position, or codes are malformed (`check_codes`).
    """
    if not model.config.predict_user_audio:
        raise ValueError("evaluate_user_prediction: the model has no user branch (predict_user_audio=False)")
    for name, value in (("batch_size", batch_size), ("top_k", top_k), ("num_bins", num_bins)):
        if value < 1:
            raise ValueError(f"evaluate_user_prediction: {name} must be >= 1, got {value}")
    if window is None:
        window = model.config.streaming_window
    if top_k > model.config.card:
        raise ValueError(f"evaluate_user_prediction: top_k={top_k} exceeds the audio vocabulary (card="
                         f"{model.config.card}): every token would count as a hit")
    ranking = _unigram_ranking(model, dataset if reference is None else reference, window)
    was_training = model.training
    model.eval()
    try:
        counts = _count_dataset(model, dataset, window, batch_size, ranking, top_k, num_bins)
    finally:
        model.train(was_training)
    report = _report(model, counts, top_k, "evaluated dataset" if reference is None else "reference")
    if plot_dir is not None:
        report.plots = plot_user_prediction(report, plot_dir)
    return report


def _windows(model: MoshiUserPredForConditionalGeneration, dataset: Sequence, window: int) -> Iterator[torch.Tensor]:
    """Validated windows `[1 + n_q, <=window]` of every dialogue, on the model's device."""
    for item in DialogueSegments(dataset, window):
        yield check_codes(item["codes"][None].to(model.device), model.config)[0]


def _unigram_ranking(model: MoshiUserPredForConditionalGeneration, dataset: Sequence, window: int) -> torch.Tensor:
    """Token ids of each user codebook, most frequent first (ties: lower id): `[user_dep_q, card]`."""
    c = model.config
    counts = torch.zeros(c.user_dep_q, c.card, dtype=torch.long, device=model.device)
    for codes in _windows(model, dataset, window):
        user = codes[model.user_rows]
        counts.scatter_add_(1, user.clamp_min(0), (user != ZERO_TOKEN_ID).long())
    return counts.sort(dim=1, descending=True, stable=True).indices


def _batches(windows: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack windows of equal length, `batch_size` at a time (the leftovers of each length at the end)."""
    pending: dict[int, list[torch.Tensor]] = {}
    for window in windows:
        group = pending.setdefault(window.shape[1], [])
        group.append(window)
        if len(group) == batch_size:
            yield torch.stack(pending.pop(window.shape[1]))
    for group in pending.values():
        yield torch.stack(group)


def _count_dataset(
    model: MoshiUserPredForConditionalGeneration, dataset: Sequence, window: int, batch_size: int,
    ranking: torch.Tensor, top_k: int, num_bins: int,
) -> dict[str, torch.Tensor]:
    """Sum of [`_count_batch`] over the windows of `dataset`."""
    total: dict[str, torch.Tensor] = {}
    for codes in _batches(_windows(model, dataset, window), batch_size):
        out = model(codes=codes)
        counts = _count_batch(out.user_logits, out.user_mask, codes[:, model.user_rows], ranking,
                              model.config.user_prediction_lookahead, top_k, num_bins)
        total = {name: total[name] + value for name, value in counts.items()} if total else counts
    if not total:
        raise ValueError("evaluate_user_prediction: the dataset holds no frame")
    if total["tokens"].sum() == 0:
        raise ValueError("evaluate_user_prediction: no user token to score (all zero tokens, or windows too short)")
    return {name: value.cpu() for name, value in total.items()}


def _count_batch(
    logits: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, ranking: torch.Tensor, lookahead: int,
    top_k: int, num_bins: int,
) -> dict[str, torch.Tensor]:
    """Counts of one batch.

    Args:
        logits: `user_logits` `[B, K, T, card]` (NaN where `mask` is False).
        mask: `user_mask` `[B, K, T]`.
        targets: the user rows of the codes `[B, K, T]`.
        ranking: unigram token ids `[K, card]`, most frequent first.

    Returns:
        `tokens` `[K]`; `correct`, `top_k_correct` `[3, K]` (model, repeat_last, unigram); `frames` `[]`,
        `frames_correct` `[3]`; the model's `bin_count`, `bin_confidence`, `bin_correct` `[K, num_bins]`.
    """
    B, K, T = targets.shape
    probs = logits.float().nan_to_num().softmax(-1)
    confidence, model_pred = probs.max(-1)
    previous, _ = shift_time(targets, [-lookahead] * K, T, ZERO_TOKEN_ID)
    unigram_pred = ranking[:, 0].view(1, K, 1).expand(B, K, T)
    repeat_pred = torch.where(previous == ZERO_TOKEN_ID, unigram_pred, previous)
    correct = torch.stack([model_pred, repeat_pred, unigram_pred]) == targets
    top_k_hit = torch.stack([
        (probs.topk(top_k, dim=-1).indices == targets[..., None]).any(-1),
        correct[1],
        (ranking[:, :top_k].view(1, K, 1, top_k) == targets[..., None]).any(-1),
    ])
    frames = mask.any(1)
    bins = (confidence * num_bins).long().clamp_max(num_bins - 1)
    slots = (torch.arange(K, device=mask.device).view(1, K, 1) * num_bins + bins)[mask]

    def per_bin(weights: torch.Tensor | None) -> torch.Tensor:
        return torch.bincount(slots, weights, minlength=K * num_bins).view(K, num_bins)

    return {
        "tokens": mask.sum((0, 2)),
        "correct": (correct & mask).sum((1, 3)),
        "top_k_correct": (top_k_hit & mask).sum((1, 3)),
        "frames": frames.sum(),
        "frames_correct": ((correct | ~mask).all(2) & frames).sum((1, 2)),
        "bin_count": per_bin(None),
        "bin_confidence": per_bin(confidence[mask].double()),
        "bin_correct": per_bin(correct[0][mask].double()),
    }


def _metrics(counts: dict[str, torch.Tensor], predictor: int, delay0: torch.Tensor) -> PredictionMetrics:
    """[`PredictionMetrics`] of predictor `predictor` (index in `PREDICTORS`); `delay0` `[K]` bool."""
    tokens, correct, top_k = counts["tokens"], counts["correct"][predictor], counts["top_k_correct"][predictor]
    return PredictionMetrics(
        accuracy=_ratio(correct.sum(), tokens.sum()),
        delay0_accuracy=_ratio(correct[delay0].sum(), tokens[delay0].sum()),
        delayed_accuracy=_ratio(correct[~delay0].sum(), tokens[~delay0].sum()),
        per_codebook_accuracy=[_ratio(c, n) for c, n in zip(correct, tokens)],
        top_k_accuracy=_ratio(top_k.sum(), tokens.sum()),
        delay0_top_k_accuracy=_ratio(top_k[delay0].sum(), tokens[delay0].sum()),
        sequence_accuracy=_ratio(counts["frames_correct"][predictor], counts["frames"]),
    )


def _reliability(counts: dict[str, torch.Tensor], rows: torch.Tensor) -> tuple[list[ReliabilityBin], float | None]:
    """Reliability curve and expected calibration error `sum_b |correct_b - confidence_b| / N` over codebooks `rows`."""
    count, confidence, correct = (counts[name][rows].sum(0) for name in ("bin_count", "bin_confidence", "bin_correct"))
    num_bins = count.numel()
    bins = [ReliabilityBin(b / num_bins, (b + 1) / num_bins, int(count[b]), _ratio(confidence[b], count[b]),
                           _ratio(correct[b], count[b])) for b in range(num_bins)]
    return bins, _ratio((correct - confidence).abs().sum(), count.sum())


def _report(
    model: MoshiUserPredForConditionalGeneration, counts: dict[str, torch.Tensor], top_k: int, unigram_source: str
) -> UserPredictionReport:
    delay0 = torch.tensor([d == 0 for d in model.config.delays[model.user_rows]])
    tokens = counts["tokens"]
    reliability, ece = _reliability(counts, torch.ones_like(delay0))
    delay0_reliability, delay0_ece = _reliability(counts, delay0)
    return UserPredictionReport(
        **{name: _metrics(counts, i, delay0) for i, name in enumerate(PREDICTORS)},
        ece=ece, delay0_ece=delay0_ece, reliability=reliability, delay0_reliability=delay0_reliability,
        delay0_rows=delay0.nonzero().flatten().tolist(), tokens_per_codebook=tokens.tolist(),
        num_tokens=int(tokens.sum()), num_delay0_tokens=int(tokens[delay0].sum()), num_frames=int(counts["frames"]),
        top_k=top_k, lookahead=model.config.user_prediction_lookahead, unigram_source=unigram_source,
    )


# Candidate temperatures of the calibration fit: 1.025 ** -121 .. 1.025 ** 121 (0.05 .. 20), neighbours 2.5 % apart
# (a finer step changes the ECE by less than its sampling noise on any held-out set we have); index 121 is 1.0.
CALIBRATION_TEMPERATURES = 1.025 ** torch.arange(-121, 122, dtype=torch.float64)
_UNCALIBRATED = 121


@dataclass
class CalibrationReport:
    """Result of [`calibrate_user_prediction`]: temperature scaling of the user branch (Guo et al. 2017).

    Args:
        temperature: one temperature per user codebook, fitted on all the given dialogues (what
            `config.user_logit_temperature` takes).
        nll_before, nll_after: mean negative log-likelihood (nats) per user codebook, raw and calibrated.
        ece_before, ece_after, delay0_ece_before, delay0_ece_after: expected calibration error over all user
            codebooks / the delay-0 ones, raw and with `temperature` (in-sample: fitted and measured on the same data).
        cross_fitted_ece, cross_fitted_delay0_ece: the same out of sample: the dialogues split in two halves
            (alternating), each half measured with the temperatures fitted on the other (None for one dialogue).
        num_tokens: scored user tokens.
    """

    temperature: list[float]
    nll_before: list[float]
    nll_after: list[float]
    ece_before: float
    ece_after: float
    delay0_ece_before: float | None
    delay0_ece_after: float | None
    cross_fitted_ece: float | None
    cross_fitted_delay0_ece: float | None
    num_tokens: int

    def to_dict(self) -> dict[str, float | int | list[float]]:
        return {key: value for key, value in vars(self).items() if value is not None}

    def to_markdown(self) -> str:
        def number(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        lines = ["| calibration of the user branch | raw | temperature-scaled | out of sample (2-fold) |",
                 "|---|---:|---:|---:|",
                 f"| ECE, all user codebooks | {number(self.ece_before)} | {number(self.ece_after)} | "
                 f"{number(self.cross_fitted_ece)} |",
                 f"| ECE, delay-0 codebooks | {number(self.delay0_ece_before)} | {number(self.delay0_ece_after)} | "
                 f"{number(self.cross_fitted_delay0_ece)} |"]
        lines += [f"| NLL codebook {k} (T = {t:.3f}) | {before:.4f} | {after:.4f} | |"
                  for k, (t, before, after) in enumerate(zip(self.temperature, self.nll_before, self.nll_after))]
        return "\n".join(lines)


@torch.no_grad()
def calibrate_user_prediction(
    model: MoshiUserPredForConditionalGeneration,
    dataset: Sequence[Mapping | torch.Tensor],
    *,
    batch_size: int = 8,
    window: int | None = None,
    num_bins: int = 10,
) -> CalibrationReport:
    r"""Fit one temperature per user codebook on `dataset` (held-out dialogues) by minimising the negative
    log-likelihood of the user targets (temperature scaling: argmaxes, hence accuracies, are unchanged), and measure
    the expected calibration error before and after, in sample and cross-fitted over two halves of the dialogues.

    The fit is one pass: the NLL of every candidate temperature (`CALIBRATION_TEMPERATURES`, 2.5 % apart) is
    accumulated batch by batch, so memory does not grow with the dataset. The model's own
    `config.user_logit_temperature` is ignored while fitting and left as it was: assign `report.temperature` to
    apply the result (`evaluate --calibrate` does, and saves it).

    Args:
        model, dataset, batch_size, window, num_bins: as [`evaluate_user_prediction`].

    Returns:
        [`CalibrationReport`].

    Raises:
        ValueError: as [`evaluate_user_prediction`].
    """
    if not model.config.predict_user_audio:
        raise ValueError("calibrate_user_prediction: the model has no user branch (predict_user_audio=False)")
    window = model.config.streaming_window if window is None else window
    dataset = list(dataset)
    ranking = _unigram_ranking(model, dataset, window)
    c, was_training, saved = model.config, model.training, model.config.user_logit_temperature
    delay0 = torch.tensor([d == 0 for d in c.delays[model.user_rows]])
    model.eval()
    try:
        c.user_logit_temperature = None
        # The NLL sums of the two halves are the whole set's: one pass fits the halves and the whole.
        folds = [dataset[0::2], dataset[1::2]] if len(dataset) > 1 else [dataset]
        fold_fits = [_temperature_nll(model, fold, window, batch_size) for fold in folds]
        nll, tokens = (sum(parts) for parts in zip(*fold_fits))
        if tokens.sum() == 0:
            raise ValueError("calibrate_user_prediction: no user token to score (all zero tokens, or windows too "
                             "short)")
        best = nll.argmin(dim=1)
        temperature = CALIBRATION_TEMPERATURES[best].tolist()
        raw = _count_dataset(model, dataset, window, batch_size, ranking, 1, num_bins)
        c.user_logit_temperature = temperature
        scaled = _count_dataset(model, dataset, window, batch_size, ranking, 1, num_bins)
        crossed: dict[str, torch.Tensor] = {}
        if len(folds) == 2:  # each half measured with the other half's fit
            for (fold_nll, _), measure_on in zip(fold_fits, folds[::-1]):
                c.user_logit_temperature = CALIBRATION_TEMPERATURES[fold_nll.argmin(dim=1)].tolist()
                counts = _count_dataset(model, measure_on, window, batch_size, ranking, 1, num_bins)
                crossed = {name: crossed[name] + value for name, value in counts.items()} if crossed else counts
    finally:
        c.user_logit_temperature = saved
        model.train(was_training)
    all_rows = torch.ones_like(delay0)
    mean_nll = nll / tokens.clamp_min(1)[:, None]
    return CalibrationReport(
        temperature=temperature,
        nll_before=mean_nll[:, _UNCALIBRATED].tolist(),
        nll_after=mean_nll.gather(1, best[:, None])[:, 0].tolist(),
        ece_before=_reliability(raw, all_rows)[1], ece_after=_reliability(scaled, all_rows)[1],
        delay0_ece_before=_reliability(raw, delay0)[1], delay0_ece_after=_reliability(scaled, delay0)[1],
        cross_fitted_ece=_reliability(crossed, all_rows)[1] if crossed else None,
        cross_fitted_delay0_ece=_reliability(crossed, delay0)[1] if crossed else None,
        num_tokens=int(tokens.sum()),
    )


def _temperature_nll(
    model: MoshiUserPredForConditionalGeneration, dataset: Sequence, window: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the user targets at every candidate temperature `[user_dep_q, len(CALIBRATION_TEMPERATURES)]`
    and the scored tokens per codebook `[user_dep_q]`."""
    K = model.config.user_dep_q
    temperatures = CALIBRATION_TEMPERATURES.to(model.device)
    nll = torch.zeros(K, len(temperatures), dtype=torch.float64, device=model.device)
    tokens = torch.zeros(K, dtype=torch.long, device=model.device)
    for codes in _batches(_windows(model, dataset, window), batch_size):
        out = model(codes=codes)
        targets = codes[:, model.user_rows]
        for k in range(K):
            mask = out.user_mask[:, k]
            logits, target = out.user_logits[:, k][mask].double(), targets[:, k][mask]
            if not len(target):
                continue
            tokens[k] += len(target)
            for start in range(0, len(temperatures), 16):  # [16, N, card] at a time: bounded memory
                chunk = temperatures[start : start + 16]
                log_probs = (logits[None] / chunk[:, None, None]).log_softmax(-1)
                nll[k, start : start + len(chunk)] -= log_probs.gather(
                    -1, target[None, :, None].expand(len(chunk), -1, 1))[..., 0].sum(-1)
    return nll.cpu(), tokens.cpu()


def plot_user_prediction(report: UserPredictionReport, plot_dir: str | os.PathLike) -> dict[str, str]:
    """Write `per_codebook_accuracy.png` (model / repeat_last / unigram per codebook, delay-0 codebooks shaded)
    and `reliability.png` (the model's reliability diagram with bin counts) to `plot_dir` (created if needed).

    Returns:
        `{"per_codebook_accuracy": path, "reliability": path}`.

    Raises:
        ImportError: matplotlib is missing (`pip install hf_moshi_userpred[plots]`).
    """
    return save_figures(plot_dir, {"per_codebook_accuracy": (lambda figure: _plot_per_codebook(report, figure), (8, 4)),
                                   "reliability": (lambda figure: _plot_reliability(report, figure), (5, 5))})


def _plot_per_codebook(report: UserPredictionReport, figure: Figure) -> Figure:
    ax = figure.subplots()
    num_codebooks = len(report.tokens_per_codebook)
    for k in report.delay0_rows:
        ax.axvspan(k - 0.5, k + 0.5, color="0.92", zorder=0)
    bars = {"model": report.model, "repeat_last": report.repeat_last, "unigram": report.unigram}
    for i, (name, metrics) in enumerate(bars.items()):
        values = [float("nan") if v is None else v for v in metrics.per_codebook_accuracy]
        ax.bar([k + (i - 1) * 0.27 for k in range(num_codebooks)], values, width=0.27, label=name)
    ax.set_xticks(range(num_codebooks))
    ax.set_xticklabels([f"{k}\n{'delay 0' if k in report.delay0_rows else ''}" for k in range(num_codebooks)])
    ax.set(xlabel="user codebook (shaded: delay 0, the forecast)", ylabel="top-1 accuracy", ylim=(0, 1),
           title=f"User-token accuracy per codebook (lookahead {report.lookahead})")
    ax.legend()
    figure.tight_layout()
    return figure


def _plot_reliability(report: UserPredictionReport, figure: Figure) -> Figure:
    ax = figure.subplots()
    filled = [b for b in report.reliability if b.count]
    ax.bar([(b.lower + b.upper) / 2 for b in filled], [b.accuracy for b in filled],
           width=filled[0].upper - filled[0].lower, color="C0", edgecolor="k", alpha=0.3, label="bin accuracy")
    for b in filled:
        ax.annotate(f"n={b.count}", ((b.lower + b.upper) / 2, b.accuracy + 0.01), ha="center", fontsize=7)
    for curve, style, label in ((report.reliability, "o-", "all codebooks"), (report.delay0_reliability, "s-",
                                                                              "delay-0 codebooks")):
        points = [(b.confidence, b.accuracy) for b in curve if b.count]
        if points:
            ax.plot(*zip(*points), style, label=f"{label} (mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set(xlabel="confidence (softmax probability of the argmax)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.05),
           title=f"Reliability of the user branch: ECE {report.ece:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


__all__ = [
    "CALIBRATION_TEMPERATURES",
    "CalibrationReport",
    "PredictionMetrics",
    "ReliabilityBin",
    "UserPredictionReport",
    "calibrate_user_prediction",
    "evaluate_user_prediction",
    "plot_user_prediction",
]
