"""Fitting a small Mimi's decoder to turn the codes of a corpus' audio back into it, and measuring how well it does.

What decoding uses and encoding does not is trained: the quantizer's output projections (codes -> latents), the
upsampling, the decoder transformer and the SEANet decoder. Everything else (encoder, codebooks) stays as it was, so
the codes of any audio are the same before and after the fit.

    seconds = fit_decoder(mimi, train_signals, DecoderFit(steps=1000), seed=0)
    decoder_quality(mimi, held_out_signals, delay_frames=2)["decoded"]["log_mel_distance"]
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from transformers import MimiModel
from transformers.audio_utils import mel_filter_bank

from .codec import encode, initial_mimi

logger = logging.getLogger(__name__)

DECODER_PREFIXES = (
    "decoder.",
    "quantizer.semantic_residual_vector_quantizer.output_proj.",
    "quantizer.acoustic_residual_vector_quantizer.output_proj.",
)
MEL_FFT_SIZES = (512, 1024, 2048)  # STFT sizes of the multi-resolution mel loss (hop: a quarter; n_fft / 16 bands)
MEL_FLOOR = 1e-4  # added to the mel magnitudes (a sinusoid's amplitude) before the log: about 40 dB under speech
VOICED_RMS = 0.02  # a 40 ms frame louder than this whose normalised autocorrelation peaks over 0.5 is voiced
PITCH_RANGE_HZ = (60.0, 400.0)


@dataclass(frozen=True)
class DecoderFit:
    """How the decoder is fitted (the defaults made the shipped one): Adam on random segments of the training audio,
    linear warm-up then cosine decay, gradients clipped to norm 1. The target is the audio ``delay_frames`` later:
    the codes of this (untrained) encoder summarise the audio before them, and a causal decoder rebuilds it better
    late (a trial of 800 steps on time: held-out log-mel distance 0.57 against 0.45, with more noise in the silences
    around speech; 1 frame late: 0.50)."""

    steps: int = 1000
    batch_size: int = 8
    segment_frames: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    delay_frames: int = 2
    waveform_weight: float = 1.0  # L1 on the samples
    convergence_weight: float = 1.0  # spectral convergence of the mel magnitudes, beside the log-mel distance


class MelSpectrograms:
    """Magnitude mel spectrograms of ``[B, T]`` audio at the ``MEL_FFT_SIZES``: Hann window, a quarter hop, Slaney
    bands of peak 1, magnitudes divided by the window's sum (a full-scale sinusoid reads 0.5)."""

    def __init__(self, sampling_rate: int) -> None:
        self.resolutions = []
        for n_fft in MEL_FFT_SIZES:
            bank = mel_filter_bank(
                n_fft // 2 + 1, n_fft // 16, 0.0, sampling_rate / 2, sampling_rate, mel_scale="slaney"
            )
            self.resolutions.append((n_fft, torch.hann_window(n_fft), torch.from_numpy(bank).float()))

    def __call__(self, audio: torch.Tensor) -> list[torch.Tensor]:
        mels = []
        for n_fft, window, bank in self.resolutions:
            spectrum = torch.stft(audio, n_fft, n_fft // 4, window=window, return_complex=True)
            magnitude = (spectrum.real.square() + spectrum.imag.square() + 1e-12).sqrt() / window.sum()
            mels.append(torch.einsum("fm,bft->bmt", bank, magnitude))
        return mels


def log_mel_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Mean |ln(mel_a + floor) - ln(mel_b + floor)| over bands and frames, averaged over the resolutions."""
    return sum(((x + MEL_FLOOR).log() - (y + MEL_FLOOR).log()).abs().mean() for x, y in zip(a, b)) / len(a)


def spectral_convergence(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """||mel_a - mel_b|| / ||mel_b|| (Frobenius, over the batch), averaged over the resolutions: unlike the log
    distance, it weighs the loud parts, which keeps the decoder from playing speech too quietly."""
    return sum((x - y).norm() / (y.norm() + MEL_FLOOR * y.numel() ** 0.5) for x, y in zip(a, b)) / len(a)


def decoder_parameters(model: MimiModel) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.startswith(DECODER_PREFIXES)}


def codec_state(model: MimiModel) -> dict[str, torch.Tensor]:
    """Copies of every tensor that encoding uses (all but the decoder's)."""
    return {name: t.clone() for name, t in model.state_dict().items() if not name.startswith(DECODER_PREFIXES)}


def reset_decoder(model: MimiModel, seed: int) -> None:
    """Put the decoder of a Mimi built by ``build_mimi`` back to its initial random weights, so that refitting it gives
    what the full build gives; refuses a Mimi whose encoder is not this seed's."""
    fresh = initial_mimi(model.config.codebook_size, seed)
    fresh_state, state = fresh.state_dict(), model.state_dict()
    encoder = [name for name in state if name.startswith(("encoder.",))]
    if state.keys() != fresh_state.keys() or not all(torch.equal(state[n], fresh_state[n]) for n in encoder):
        raise ValueError(f"this Mimi was not built by `build_mimi` with seed {seed}: its encoder differs")
    with torch.no_grad():
        for name, parameter in decoder_parameters(model).items():
            parameter.copy_(fresh_state[name])


def pad_to_codes(signal: torch.Tensor, num_frames: int, frame_size: int, delay: int = 0) -> torch.Tensor:
    """``signal`` delayed by ``delay`` samples, cut or zero-padded to ``num_frames`` frames."""
    return torch.nn.functional.pad(signal, (delay, num_frames * frame_size - len(signal) - delay))


def fit_decoder(model: MimiModel, signals: list[torch.Tensor], fit: DecoderFit = DecoderFit(), seed: int = 0) -> float:
    """Train the decoder side of ``model`` (``DECODER_PREFIXES``) to rebuild ``signals`` (mono, 24 kHz) from their
    codes, ``fit.delay_frames`` late; the encoder and the codebooks are frozen (checked). Returns the seconds it took.

    Loss: L1 on the waveform + log-mel distance + spectral convergence (``MelSpectrograms``). The decoder's last
    convolution is first scaled so that its output has the loudness of ``signals``: an untrained decoder is hundreds of
    times louder, and bringing that down by gradient first teaches it silence, which it does not unlearn.
    """
    start = time.perf_counter()
    frozen = codec_state(model)
    parameters = decoder_parameters(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(name in parameters)
    frame = model.config.frame_size
    codes = encode(model, signals)
    targets = [pad_to_codes(s, c.shape[-1], frame, fit.delay_frames * frame) for s, c in zip(signals, codes)]
    mels = MelSpectrograms(model.config.sampling_rate)

    with torch.no_grad():
        decoded = torch.cat([model.decode(c[None]).audio_values.flatten() for c in codes])
        gain = torch.cat(targets).square().mean().sqrt() / decoded.square().mean().sqrt()
        last = model.decoder.decoder_seanet.layers[-1].conv
        last.weight.mul_(gain)
        last.bias.mul_(gain)

    optimizer = torch.optim.Adam(parameters.values(), lr=fit.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / fit.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / fit.steps)),
    )
    generator = torch.Generator().manual_seed(seed)
    length = fit.segment_frames
    for step in range(fit.steps):
        batch_codes, batch_targets = [], []
        for index in torch.randint(len(signals), (fit.batch_size,), generator=generator).tolist():
            first = int(torch.randint(codes[index].shape[-1] - length + 1, (1,), generator=generator))
            batch_codes.append(codes[index][:, first : first + length])
            batch_targets.append(targets[index][first * frame : (first + length) * frame])
        audio, target = model.decode(torch.stack(batch_codes)).audio_values[:, 0], torch.stack(batch_targets)
        audio_mels, target_mels = mels(audio), mels(target)
        log_mel = log_mel_distance(audio_mels, target_mels)
        loss = (
            fit.waveform_weight * (audio - target).abs().mean()
            + log_mel
            + fit.convergence_weight * spectral_convergence(audio_mels, target_mels)
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters.values(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == fit.steps - 1:
            logger.info("decoder step %d: loss %.3f, log-mel %.3f", step, loss.item(), log_mel.item())

    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad[name])
    state = model.state_dict()
    if not all(torch.equal(state[name], tensor) for name, tensor in frozen.items()):
        raise RuntimeError("fitting the decoder changed the encoder or the codebooks")
    return time.perf_counter() - start


def envelope_delay(decoded: torch.Tensor, original: torch.Tensor, hop: int, max_lag: int) -> int:
    """The lag (in ``hop`` samples, positive: ``decoded`` is late) that best correlates the two RMS envelopes."""
    n = min(len(decoded), len(original)) // hop
    a = decoded[: n * hop].view(n, hop).square().mean(dim=1).sqrt()
    b = original[: n * hop].view(n, hop).square().mean(dim=1).sqrt()
    a, b = a - a.mean(), b - b.mean()

    def correlation(lag: int) -> float:
        return float((a[max(lag, 0) : n + min(lag, 0)] * b[max(-lag, 0) : n - max(lag, 0)]).sum())

    return max(range(-max_lag, max_lag + 1), key=correlation)


def median_pitch(signals: list[torch.Tensor], sampling_rate: int) -> int | None:
    """Median F0 (Hz) of the voiced 40 ms frames of ``signals``, None without any. The period is the shortest lag
    within ``PITCH_RANGE_HZ`` where the normalised autocorrelation has a local maximum within 15% of its highest
    (not the highest itself, which is as often twice the period)."""
    size = round(0.04 * sampling_rate)
    shortest, longest = round(sampling_rate / PITCH_RANGE_HZ[1]), round(sampling_rate / PITCH_RANGE_HZ[0])
    periods = []
    for signal in signals:
        frames = signal[: len(signal) // size * size].view(-1, size).double()
        frames = frames[frames.square().mean(dim=1).sqrt() > VOICED_RMS]
        if not len(frames):
            continue
        frames = frames - frames.mean(dim=1, keepdim=True)
        correlation = torch.fft.irfft(torch.fft.rfft(frames, 2 * size).abs().square(), 2 * size)
        correlation = correlation[:, shortest - 1 : longest + 2] / correlation[:, :1]
        inner = correlation[:, 1:-1]
        peak = inner.max(dim=1, keepdim=True).values
        candidates = (inner >= 0.85 * peak) & (inner >= correlation[:, :-2]) & (inner >= correlation[:, 2:])
        voiced = peak[:, 0] > 0.5
        periods.append(candidates[voiced].double().argmax(dim=1) + shortest)  # argmax: the first True
    every = sampling_rate / torch.cat(periods or [torch.zeros(0)]).double()
    return round(every.median().item()) if len(every) else None


@torch.no_grad()
def decoder_quality(model: MimiModel, signals: list[torch.Tensor], delay_frames: int) -> dict:
    """How ``model`` rebuilds ``signals`` (mono 24 kHz, alternately left and right channels) from their codes, the
    decoded audio taken ``delay_frames`` early: log-mel distance (mean over signals), peak, RMS, measured delay (median
    over signals, envelope correlation at 10 ms), median pitch per channel; the same for the original audio."""
    frame, rate = model.config.frame_size, model.config.sampling_rate
    mels = MelSpectrograms(rate)
    delay = delay_frames * frame
    distances, delays, decoded, originals = [], [], [], []
    for signal, codes in zip(signals, encode(model, signals)):
        audio = model.decode(codes[None]).audio_values[0, 0]
        original = pad_to_codes(signal, codes.shape[-1], frame)
        delays.append(envelope_delay(audio, original, rate // 100, 50) * 10)
        audio = audio[delay:]
        original = original[: len(audio)]
        distances.append(log_mel_distance(mels(audio[None]), mels(original[None])).item())
        decoded.append(audio)
        originals.append(original)
    result = {}
    for name, audio in (("decoded", decoded), ("original", originals)):
        every = torch.cat(audio)
        result[name] = dict(
            peak=round(every.abs().max().item(), 2),
            rms=round(every.square().mean().sqrt().item(), 3),
            pitch_left_hz=median_pitch(audio[0::2], rate),
            pitch_right_hz=median_pitch(audio[1::2], rate),
        )
    result["decoded"]["log_mel_distance"] = round(sum(distances) / len(distances), 2)
    result["decoded"]["delay_ms"] = sorted(delays)[len(delays) // 2]
    return result


__all__ = ["DecoderFit", "decoder_quality", "fit_decoder", "log_mel_distance", "reset_decoder"]
