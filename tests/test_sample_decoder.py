"""The shipped sample Mimi's decoder is trained (`scripts/make_dialogue_sample.py`, `fit_decoder`): on a held-out
dialogue it plays sound where the speech is, about as loud, 160 ms late, and near silence where the speaker is silent,
far closer to the original than an untrained decoder; and the fit left the encoder and the codebooks, hence every
code, as they were.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import soundfile
import soxr
import torch
from safetensors.numpy import load_file
from transformers import MimiModel
from transformers.audio_utils import mel_filter_bank

from hf_moshi_userpred.sample import SAMPLE_DIR, SAMPLE_MIMI

RATE, FRAME = 24_000, 1920
DELAY = 2 * FRAME  # the fit's target delay: 160 ms
# sha256 of every tensor that encoding uses (all but the decoder side), names sorted, as k-means left them: the codes of
# the sample, of every test and of every model trained on the sample's codes depend on nothing else
CODEC_SHA256 = "733a07d24ad96cfb7c3fd80504c6586776a781e8c4fd0de180af2470a8b1783d"
DECODER_KEYS = ("decoder.", "decoder_transformer.", "upsample.",
                "quantizer.semantic_residual_vector_quantizer.output_proj.",
                "quantizer.acoustic_residual_vector_quantizer.output_proj.")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread per module


@pytest.fixture(scope="module")
def held_out() -> list[torch.Tensor]:
    """Both channels of the first held-out dialogue, 24 kHz, as the package reads them."""
    path = json.loads((SAMPLE_DIR / "eval.jsonl").read_text().splitlines()[0])["path"]
    audio, rate = soundfile.read(SAMPLE_DIR / path, dtype="float32", always_2d=True)
    audio = soxr.resample(audio, rate, RATE)
    return [torch.from_numpy(np.ascontiguousarray(audio[:, c])) for c in range(2)]


@pytest.fixture(scope="module")
def mimi() -> MimiModel:
    return MimiModel.from_pretrained(SAMPLE_MIMI).eval()


def log_mels(audio: torch.Tensor) -> list[torch.Tensor]:
    """The fit's log-mel spectrograms: STFT sizes 512/1024/2048, Hann, hop a quarter, n_fft/16 Slaney bands of peak 1,
    magnitudes over the window's sum, ln(mel + 1e-4)."""
    mels = []
    for n_fft in (512, 1024, 2048):
        window = torch.hann_window(n_fft)
        bank = torch.from_numpy(mel_filter_bank(n_fft // 2 + 1, n_fft // 16, 0.0, RATE / 2, RATE, mel_scale="slaney"))
        magnitude = torch.stft(audio, n_fft, n_fft // 4, window=window, return_complex=True).abs() / window.sum()
        mels.append((bank.float().T @ magnitude + 1e-4).log())
    return mels


def log_mel_distance(decoded: torch.Tensor, original: torch.Tensor) -> float:
    """Mean |log-mel difference|, the decoded audio taken `DELAY` early."""
    decoded, original = decoded[DELAY:], original[: len(decoded) - DELAY]
    return float(sum((a - b).abs().mean() for a, b in zip(log_mels(decoded), log_mels(original))) / 3)


@torch.no_grad()
def rebuild(mimi: MimiModel, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded audio and the original zero-padded to the codes' length (whole frames)."""
    codes = mimi.encode(signal[None, None], num_quantizers=mimi.config.num_quantizers).audio_codes
    decoded = mimi.decode(codes).audio_values[0, 0]
    return decoded, torch.nn.functional.pad(signal, (0, len(decoded) - len(signal)))


def test_the_fit_left_the_encoder_and_codebooks_as_they_were():
    tensors = load_file(SAMPLE_MIMI / "model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(n for n in tensors if not n.startswith(DECODER_KEYS)):
        digest.update(name.encode() + tensors[name].tobytes())
    assert digest.hexdigest() == CODEC_SHA256
    assert all(t.dtype == np.float32 for t in tensors.values())


def test_held_out_speech_comes_back_at_its_loudness_and_late_by_160_ms(mimi, held_out):
    for channel, signal in enumerate(held_out):
        decoded, original = rebuild(mimi, signal)
        peak, original_peak = decoded.abs().max().item(), original.abs().max().item()
        assert peak <= 1.5 and original_peak / 2 <= peak <= 2 * original_peak, (channel, peak, original_peak)
        rms, original_rms = decoded.square().mean().sqrt().item(), original.square().mean().sqrt().item()
        assert original_rms / 4 <= rms <= 2 * original_rms, (channel, rms, original_rms)
        # where the speaker is silent for a while (0.32 s and more) the decoder is nearly silent too
        frames = original.view(-1, FRAME).abs().amax(dim=1) < 1e-3
        quiet = torch.cat([torch.zeros(3, dtype=torch.bool), frames]).unfold(0, 4, 1).all(dim=1)
        late = torch.roll(quiet, DELAY // FRAME) & quiet  # the decoded frames that play those silences
        silence_rms = decoded.view(-1, FRAME)[late].square().mean().sqrt().item()
        assert late.sum() >= 10 and silence_rms < 0.05 * original_rms, (channel, silence_rms)
        # the envelopes line up 160 ms apart (10 ms hops)
        envelope = [x.view(-1, 240).square().mean(dim=1).sqrt() for x in (decoded, original)]
        envelope = [e - e.mean() for e in envelope]
        lags = range(-30, 31)
        best = max(lags, key=lambda lag: float((envelope[0][max(lag, 0):len(envelope[0]) + min(lag, 0)]
                                                * envelope[1][max(-lag, 0):len(envelope[1]) - max(lag, 0)]).sum()))
        assert 140 <= best * 10 <= 200, (channel, best * 10)


def test_held_out_speech_is_far_closer_than_an_untrained_decoder_gets(mimi, held_out):
    untrained = MimiModel.from_pretrained(SAMPLE_MIMI).eval()
    torch.manual_seed(0)
    fresh = MimiModel(untrained.config).eval()  # random decoder weights, as before the fit
    untrained.decoder.load_state_dict(fresh.decoder.state_dict())
    for name in ("semantic_residual_vector_quantizer", "acoustic_residual_vector_quantizer"):
        output_proj = getattr(fresh.quantizer, name).output_proj
        getattr(untrained.quantizer, name).output_proj.load_state_dict(output_proj.state_dict())
    for signal in held_out:
        trained = log_mel_distance(*rebuild(mimi, signal))
        before = log_mel_distance(*rebuild(untrained, signal))
        assert trained < 0.8 and trained < before / 5, (trained, before)
