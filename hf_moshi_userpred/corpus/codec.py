"""A small Mimi codec for a synthetic corpus: transformers' `MimiModel` at the real one's sample and frame rates with
narrow layers, its encoder random (the shipped sample) or trained (`encoder_fit.py`, `synthesize`), its codebooks
fitted by k-means on the corpus' audio (a fresh Mimi has all-zero codebooks and would give code 0 everywhere); its
decoder is fitted afterwards (`decoder_fit.py`).

    mimi = build_mimi(signals, codebook_size=64, iterations=30, seed=0)   # signals: mono float32 at 24 kHz
    codes = encode(mimi, signals)                                        # [num_quantizers, frames] each
"""

from __future__ import annotations

import torch
from transformers import MimiConfig, MimiModel

from .encoder_fit import EncoderFit, fit_encoder
from .espeak import SILENCE_LEVEL

# A small Mimi: the real one's sample rate and frame rate (12.5 Hz), narrow layers, few small codebooks.
MIMI_CONFIG = dict(
    hidden_size=64,
    num_filters=4,
    num_residual_layers=1,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    intermediate_size=128,
    codebook_dim=32,
    vector_quantization_hidden_dimension=32,
    upsample_groups=64,
    num_quantizers=8,
    num_semantic_quantizers=1,
)


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` centroids of ``points`` ``[N, D]``: k-means++ seeding from the data, then Lloyd iterations."""
    centroids = points[torch.randint(len(points), (1,), generator=generator)]
    nearest = torch.cdist(points, centroids)[:, 0] ** 2
    for _ in range(1, k):
        if nearest.sum() > 0:
            index = torch.multinomial(nearest / nearest.sum(), 1, generator=generator)
        else:  # fewer distinct points than centroids
            index = torch.randint(len(points), (1,), generator=generator)
        centroids = torch.cat([centroids, points[index]])
        nearest = torch.minimum(nearest, torch.cdist(points, points[index])[:, 0] ** 2)
    for _ in range(iterations):
        assignment = torch.cdist(points, centroids).argmin(dim=1)
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
        empty = (counts == 0).nonzero()[:, 0]
        if len(empty):  # re-seed empty clusters on the worst-represented points
            error = (points - centroids[assignment]).norm(dim=1)
            centroids[empty] = points[error.topk(len(empty)).indices]
    return centroids


@torch.no_grad()
def calibrate_codebooks(model: MimiModel, signals: list[torch.Tensor], iterations: int, seed: int) -> None:
    """Fit every codebook of ``model`` by k-means on the latents of ``signals`` (mono, 24 kHz).

    The semantic and the acoustic residual quantizers both quantize the encoder latents, each in its own
    projected space; within one, layer ``i`` is fitted on what layers ``< i`` leave unexplained.
    """
    generator = torch.Generator().manual_seed(seed)
    latents = torch.cat([model.encoder(signal[None, None]).latents for signal in signals], dim=-1)
    quantizer = model.quantizer
    for rvq in (quantizer.semantic_residual_vector_quantizer, quantizer.acoustic_residual_vector_quantizer):
        projected = latents if rvq.input_proj is None else rvq.input_proj(latents)
        residual = projected[0].T
        for layer in rvq.layers:
            codebook = layer.codebook
            centroids = kmeans(residual, codebook.codebook_size, iterations, generator)
            codebook.cluster_usage.fill_(1.0)
            codebook.embed_sum.copy_(centroids)  # embed = embed_sum / cluster_usage
            codebook.initialized.fill_(1.0)
            codebook._embed = None  # drop the cached codebook (transformers computes it lazily)
            residual = residual - centroids[torch.cdist(residual, centroids).argmin(dim=1)]


@torch.no_grad()
def encode(model: MimiModel, signals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Codes ``[num_quantizers, frames]`` of each mono 24 kHz signal."""
    n_q = model.config.num_quantizers
    return [model.encode(s[None, None], num_quantizers=n_q).audio_codes[0] for s in signals]


def entropy(codes: torch.Tensor, codebook_size: int) -> float:
    """Entropy in bits of the empirical distribution of ``codes``."""
    probs = torch.bincount(codes, minlength=codebook_size).double() / len(codes)
    probs = probs[probs > 0]
    return round(-(probs * probs.log2()).sum().item(), 2)


def code_report(
    codes: list[torch.Tensor], signals: list[torch.Tensor], frame_size: int, codebook_size: int
) -> list[dict]:
    """Per codebook: entries used, entropy (bits) over all frames and over speech, silence stability.

    A frame is silent when it and the three frames before it (more than the encoder's receptive field) hold
    only zeros (the first three frames of a signal, which also see the encoder's start-up padding, are never
    silent), and speech when its RMS exceeds 0.01. Stability is the share of silent frames carrying the most
    common silent code.
    """
    silent, speech = [], []
    for code, signal in zip(codes, signals):
        padding = code.shape[-1] * frame_size - len(signal)
        frames = torch.nn.functional.pad(signal, (0, padding)).view(-1, frame_size)
        quiet = frames.abs().amax(dim=1) < SILENCE_LEVEL
        silent.append(torch.cat([torch.zeros(3, dtype=torch.bool), quiet]).unfold(0, 4, 1).all(dim=1))
        speech.append(frames.pow(2).mean(dim=1).sqrt() > 0.01)
    all_codes = torch.cat(codes, dim=-1)
    silent_mask, speech_mask = torch.cat(silent), torch.cat(speech)
    report = []
    for k, row in enumerate(all_codes):
        silent_codes = row[silent_mask]
        report.append(
            dict(
                codebook=k,
                used=int(row.unique().numel()),
                entropy_bits=entropy(row, codebook_size),
                speech_entropy_bits=entropy(row[speech_mask], codebook_size),
                silence_stability=round((silent_codes == silent_codes.mode().values).double().mean().item(), 3),
            )
        )
    return report


def initial_mimi(codebook_size: int, seed: int) -> MimiModel:
    """The small Mimi with its random initial weights (all-zero codebooks), the same for a given seed."""
    torch.manual_seed(seed)
    return MimiModel(MimiConfig(**MIMI_CONFIG, codebook_size=codebook_size)).eval()


def build_mimi(signals: list[torch.Tensor], codebook_size: int, iterations: int, seed: int,
               encoder_fit: EncoderFit | None = None) -> MimiModel:
    """A small Mimi whose codebooks are calibrated on ``signals``; its encoder random, or first trained on them
    with ``encoder_fit`` (``encoder_fit.py``)."""
    model = initial_mimi(codebook_size, seed)
    if encoder_fit is not None:
        fit_encoder(model, signals, encoder_fit, seed)
    calibrate_codebooks(model, signals, iterations, seed)
    return model


__all__ = ["MIMI_CONFIG", "build_mimi", "code_report", "encode", "initial_mimi"]
