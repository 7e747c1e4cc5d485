"""Streaming Mimi (`MimiStreamingCodec`): streamed equals one-shot, per-slot reset, batched equals solo, bad inputs.

Two codecs: the sample Mimi shipped with the package (24 kHz, 1920-sample frames, a 250-step attention window) on
speech from the sample dialogues, and a random tiny Mimi whose 5-step window, two attention layers, grouped-query
attention and convolution shortcuts are all exercised within a few frames.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import soundfile
import soxr
import torch
from transformers import MimiConfig, MimiModel
from transformers.models.mimi.modeling_mimi import MimiEuclideanCodebook

import hf_moshi_userpred
from hf_moshi_userpred.serving.mimi_streaming import MimiStreamingCodec

SAMPLE = Path(hf_moshi_userpred.__file__).parent / "sample"
# float32 rounding, relative to the peak of the output: the tiny Mimi's untrained decoder peaks near 70, where a
# float32 ulp is 7.6e-6, so an absolute 1e-5 would be about one ulp; the sample Mimi's fitted decoder peaks near 1 on
# random codes. Measured: streamed vs one-shot 3.9e-7 to 6.9e-7 (max |diff| 2.9e-5 to 5.5e-5 untrained, 6.3e-7 to
# 6.6e-7 fitted), batched vs solo 4.2e-7 to 7.9e-7; one-shot float32 itself is as far from float64 as streaming is.
RELATIVE_TOLERANCE = 2e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread per module


@pytest.fixture(scope="module")
def sample_mimi() -> MimiModel:
    return MimiModel.from_pretrained(SAMPLE / "mimi").eval()


@pytest.fixture(scope="module")
def tiny_mimi() -> MimiModel:
    config = MimiConfig(
        hidden_size=32, num_filters=4, upsampling_ratios=[4, 2], kernel_size=5, last_kernel_size=3,
        num_residual_layers=2, use_conv_shortcut=True, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, sliding_window=5, layer_scale_initial_scale=1.0,
        codebook_size=16, codebook_dim=16, vector_quantization_hidden_dimension=16, num_quantizers=4,
        upsample_groups=32,
    )
    torch.manual_seed(0)
    mimi = MimiModel(config).eval()
    for module in mimi.modules():
        if isinstance(module, MimiEuclideanCodebook):  # initialised to zeros: every code would be 0
            module.embed_sum.normal_()
            module._embed = None
    return mimi


@pytest.fixture(params=["sample", "tiny"])
def mimi(request) -> MimiModel:
    return request.getfixturevalue(f"{request.param}_mimi")


def speech(num_frames: int, frame_size: int = 1920) -> torch.Tensor:
    """`[6, num_frames * frame_size]` at 24 kHz: both channels of the first three sample dialogues."""
    channels = []
    for path in sorted((SAMPLE / "dialogues").glob("*.flac"))[:3]:
        audio, rate = soundfile.read(path, dtype="float32", always_2d=True)  # stereo 16 kHz
        audio = soxr.resample(audio, rate, 24_000)[: num_frames * frame_size]
        assert audio.shape[0] == num_frames * frame_size, "the sample dialogues are 7 to 8 s long"
        channels += [torch.from_numpy(audio[:, 0].copy()), torch.from_numpy(audio[:, 1].copy())]
    return torch.stack(channels)


def signal(batch_size: int, num_samples: int, seed: int) -> torch.Tensor:
    """`[batch_size, num_samples]`: a few sines plus noise, different per row."""
    generator = torch.Generator().manual_seed(seed)
    time = torch.arange(num_samples) / 24_000
    frequencies = 80 + 2000 * torch.rand(batch_size, 3, 1, generator=generator)
    tones = torch.sin(2 * torch.pi * frequencies * time).sum(1) / 3
    return 0.5 * tones + 0.1 * torch.randn(batch_size, num_samples, generator=generator)


def random_codes(mimi: MimiModel, batch_size: int, num_frames: int, seed: int) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, mimi.config.num_quantizers, num_frames)
    return torch.randint(0, mimi.config.codebook_size, shape, generator=generator)


def stream_encode(codec: MimiStreamingCodec, audio: torch.Tensor) -> torch.LongTensor:
    """`[B, T * frame_size]` -> `[B, num_codebooks, T]`, one frame per call."""
    return torch.cat([codec.encode(frame) for frame in audio.split(codec.frame_size, dim=-1)], dim=-1)


def stream_decode(codec: MimiStreamingCodec, codes: torch.LongTensor) -> torch.Tensor:
    """`[B, num_codebooks, T]` -> `[B, T * frame_size]`, one frame per call."""
    return torch.cat([codec.decode(frame) for frame in codes.split(1, dim=-1)], dim=-1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, relative: float = RELATIVE_TOLERANCE) -> None:
    """Asserts max |actual - expected| <= relative * max |expected|."""
    assert actual.shape == expected.shape
    ratio = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert ratio <= relative, f"max |diff| / peak = {ratio:.3g} > {relative}"


def test_frame_size(sample_mimi, tiny_mimi):
    assert MimiStreamingCodec(sample_mimi, 1).frame_size == 1920  # 24 kHz / 12.5 Hz
    assert MimiStreamingCodec(tiny_mimi, 1).frame_size == 16  # ratios 4 * 2, latent stride 2
    for mimi in (sample_mimi, tiny_mimi):
        config = mimi.config
        assert MimiStreamingCodec(mimi, 1).frame_size == config.sampling_rate / config.frame_rate


@pytest.mark.parametrize("num_frames", [20, 140])  # 140 frames = 280 steps: past the sample's 250-step window
def test_streamed_decode_equals_one_shot(mimi, num_frames):
    codes = random_codes(mimi, 3, num_frames, seed=num_frames)
    codec = MimiStreamingCodec(mimi, 3)
    streamed = stream_decode(codec, codes)
    with torch.no_grad():
        one_shot = mimi.decode(codes).audio_values[:, 0]
    # causal throughout, no padding to trim: T frames decode to exactly T * frame_size samples either way
    assert one_shot.shape == (3, num_frames * codec.frame_size)
    assert_close(streamed, one_shot)


def test_eager_attention():
    """The per-slot mask is additive, which eager attention needs as much as sdpa (the default) takes it."""
    mimi = MimiModel.from_pretrained(SAMPLE / "mimi", attn_implementation="eager").eval()
    codes = random_codes(mimi, 3, 20, seed=3)
    with torch.no_grad():
        one_shot = mimi.decode(codes).audio_values[:, 0]
    assert_close(stream_decode(MimiStreamingCodec(mimi, 3), codes), one_shot)  # measured 5.2e-7
    audio = speech(20)[:3]
    with torch.no_grad():
        expected = mimi.encode(audio[:, None]).audio_codes
    assert torch.equal(stream_encode(MimiStreamingCodec(mimi, 3), audio), expected)


def test_streamed_equals_one_shot_in_float64(mimi):
    """In float64 the float32 differences vanish: the streaming is exact, not merely close."""
    mimi = copy.deepcopy(mimi).double()
    for module in mimi.modules():
        if isinstance(module, MimiEuclideanCodebook):  # drop the float32 centroids cached by earlier tests
            module._embed = None
    codes = random_codes(mimi, 3, 30, seed=1)
    with torch.no_grad():
        one_shot = mimi.decode(codes).audio_values[:, 0]
    assert_close(stream_decode(MimiStreamingCodec(mimi, 3), codes), one_shot, relative=1e-12)  # measured 0.8e-15 to 1.4e-15
    audio = signal(3, 30 * MimiStreamingCodec(mimi, 1).frame_size, seed=1).double()
    with torch.no_grad():
        expected = mimi.encode(audio[:, None]).audio_codes
    assert torch.equal(stream_encode(MimiStreamingCodec(mimi, 3), audio), expected)


def test_streamed_encode_equals_one_shot_on_speech(sample_mimi):
    audio = speech(50)[::2]  # 4 s of the system's voice in three dialogues
    streamed = stream_encode(MimiStreamingCodec(sample_mimi, 3), audio)
    with torch.no_grad():
        one_shot = sample_mimi.encode(audio[:, None]).audio_codes
    # a whole number of frames: one-shot gives the same 50 frames (a partial last frame would be zero-padded and
    # encoded by one-shot, while streaming waits for it to be complete)
    assert one_shot.shape == streamed.shape == (3, 8, 50)
    assert torch.equal(streamed, one_shot)  # 100 % of the 1200 codes


def test_streamed_encode_equals_one_shot_tiny(tiny_mimi):
    codec = MimiStreamingCodec(tiny_mimi, 3, num_codebooks=3)
    audio = signal(3, 40 * codec.frame_size, seed=2)  # 80 steps through a 5-step window
    streamed = stream_encode(codec, audio)
    with torch.no_grad():
        one_shot = tiny_mimi.encode(audio[:, None], num_quantizers=3).audio_codes
    assert streamed.shape == (3, 3, 40)
    assert torch.equal(streamed, one_shot)


def test_reset_restarts_only_the_masked_slots(mimi):
    frame_size = MimiStreamingCodec(mimi, 1).frame_size
    # long enough for the tiny Mimi: its window has wrapped and its positions are large enough (600) to round
    # differently from 0, so that a slot restarting at the wrong position would show
    before, after = (8, 12) if frame_size == 1920 else (300, 12)
    audio = speech(before + after)[:4] if frame_size == 1920 else signal(4, (before + after) * frame_size, seed=3)
    audio, new_audio = audio[:3], audio[3:, before * frame_size :]  # slot 1's next session: another voice
    codes, new_codes = random_codes(mimi, 3, before + after, seed=4), random_codes(mimi, 1, after, seed=5)
    mask = torch.tensor([False, True, False])

    encoder, decoder = MimiStreamingCodec(mimi, 3), MimiStreamingCodec(mimi, 3)
    first_codes = stream_encode(encoder, audio[:, : before * frame_size])
    first_audio = stream_decode(decoder, codes[..., :before])
    encoder.reset(mask)
    decoder.reset(mask)
    fed_audio = audio[:, before * frame_size :].clone()
    fed_audio[1] = new_audio[0]
    fed_codes = codes[..., before:].clone()
    fed_codes[1] = new_codes[0]
    later_codes, later_audio = stream_encode(encoder, fed_audio), stream_decode(decoder, fed_codes)

    uninterrupted_codes = stream_encode(MimiStreamingCodec(mimi, 3), audio)
    uninterrupted_audio = stream_decode(MimiStreamingCodec(mimi, 3), codes)
    kept = torch.tensor([0, 2])
    assert torch.equal(torch.cat([first_codes, later_codes], -1)[kept], uninterrupted_codes[kept])
    assert torch.equal(torch.cat([first_audio, later_audio], -1)[kept], uninterrupted_audio[kept])
    assert torch.equal(later_codes[1:2], stream_encode(MimiStreamingCodec(mimi, 1), new_audio))
    assert_close(later_audio[1:2], stream_decode(MimiStreamingCodec(mimi, 1), new_codes))
    # bit for bit what a fresh codec of the same batch size computes: same positions, same (empty) past
    assert torch.equal(later_codes[1], stream_encode(MimiStreamingCodec(mimi, 3), fed_audio)[1])
    assert torch.equal(later_audio[1], stream_decode(MimiStreamingCodec(mimi, 3), fed_codes)[1])


def test_reset_recovers_a_slot_fed_nan(mimi):
    """NaN audio poisons its slot's caches (keys included, which a reset must clear, not just mask) and only its."""
    codec = MimiStreamingCodec(mimi, 3)
    audio = signal(3, 10 * codec.frame_size, seed=12)
    poisoned = audio.clone()
    poisoned[1, : 4 * codec.frame_size] = float("nan")
    codes = stream_encode(codec, poisoned[:, : 4 * codec.frame_size])
    codec.reset(torch.tensor([False, True, False]))
    codes = torch.cat([codes, stream_encode(codec, poisoned[:, 4 * codec.frame_size :])], dim=-1)
    clean = stream_encode(MimiStreamingCodec(mimi, 3), audio)
    assert torch.equal(codes[[0, 2]], clean[[0, 2]])
    restarted = stream_encode(MimiStreamingCodec(mimi, 3), poisoned[:, 4 * codec.frame_size :])
    assert torch.equal(codes[1, :, 4:], restarted[1])


def test_reset_all_equals_a_fresh_codec(mimi):
    codec = MimiStreamingCodec(mimi, 2)
    audio = signal(2, 6 * codec.frame_size, seed=6)
    codes = random_codes(mimi, 2, 6, seed=7)
    stream_encode(codec, signal(2, 4 * codec.frame_size, seed=8))
    stream_decode(codec, random_codes(mimi, 2, 4, seed=9))
    codec.reset()
    fresh = MimiStreamingCodec(mimi, 2)
    assert torch.equal(stream_encode(codec, audio), stream_encode(fresh, audio))
    assert torch.equal(stream_decode(codec, codes), stream_decode(fresh, codes))


def test_batched_equals_solo(mimi):
    codec = MimiStreamingCodec(mimi, 3)
    audio = signal(3, 12 * codec.frame_size, seed=10)
    codes = random_codes(mimi, 3, 12, seed=11)
    batched_codes, batched_audio = stream_encode(codec, audio), stream_decode(codec, codes)
    for slot in range(3):
        solo = MimiStreamingCodec(mimi, 1)
        assert torch.equal(batched_codes[slot : slot + 1], stream_encode(solo, audio[slot : slot + 1]))
        assert_close(batched_audio[slot : slot + 1], stream_decode(solo, codes[slot : slot + 1]))


def test_masked_slots_keep_their_state(mimi):
    """A slot left out of a call (a live session whose frame is late) carries on later as if that call never was,
    from the very first call on; the slots in the call are unaffected."""
    codec = MimiStreamingCodec(mimi, 2)
    audio = signal(2, 10 * codec.frame_size, seed=20)
    codes = random_codes(mimi, 2, 10, seed=21)
    runs = [[True, False], [True, True], [True, False], [True, False], [True, True], [False, True], [True, True],
            [True, True], [False, True], [True, True]]
    taken = [0, 0]  # frames consumed so far per slot
    encoded, decoded = [[], []], [[], []]
    for run in runs:
        frames = torch.stack([audio[slot].split(codec.frame_size)[taken[slot]] for slot in range(2)])
        frame_codes = torch.stack([codes[slot, :, taken[slot] : taken[slot] + 1] for slot in range(2)])
        mask = torch.tensor(run)
        out_codes = codec.encode(frames, mask)
        garbage = frame_codes.clone()
        garbage[~mask] = -2  # a held slot's codes are not read
        out_audio = codec.decode(garbage, mask)
        for slot in range(2):
            if run[slot]:
                encoded[slot].append(out_codes[slot, :, 0])
                decoded[slot].append(out_audio[slot])
                taken[slot] += 1
    for slot in range(2):
        solo = MimiStreamingCodec(mimi, 1)
        frames = audio[slot : slot + 1, : taken[slot] * codec.frame_size]
        assert torch.equal(torch.stack(encoded[slot], dim=-1)[None], stream_encode(solo, frames))
        assert_close(torch.cat(decoded[slot])[None], stream_decode(solo, codes[slot : slot + 1, :, : taken[slot]]))
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        codec.encode(audio[:, : codec.frame_size], torch.tensor([1, 0]))


@pytest.mark.parametrize("dropped", ["encoder", "decoder"])
def test_one_half(tiny_mimi, dropped):
    """A Mimi loaded without its encoder (or decoder) still streams the other half."""
    config = copy.deepcopy(tiny_mimi.config)
    setattr(config, f"{dropped}_config", None)
    half = MimiModel(config).eval()
    half.load_state_dict(tiny_mimi.state_dict(), strict=False)
    codec, full = MimiStreamingCodec(half, 2), MimiStreamingCodec(tiny_mimi, 2)
    codec.reset(torch.tensor([True, False]))  # resets only the half that is there
    audio, codes = signal(2, 8 * codec.frame_size, seed=14), random_codes(tiny_mimi, 2, 8, seed=15)
    if dropped == "encoder":
        assert torch.equal(stream_decode(codec, codes), stream_decode(full, codes))
        with pytest.raises(ValueError, match="no encoder"):
            codec.encode(audio[:, : codec.frame_size])
    else:
        assert torch.equal(stream_encode(codec, audio), stream_encode(full, audio))
        with pytest.raises(ValueError, match="no decoder"):
            codec.decode(codes[..., :1])


def test_bad_inputs(sample_mimi):
    codec = MimiStreamingCodec(sample_mimi, 3)
    audio, codes = torch.zeros(3, 1920), torch.zeros(3, 8, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[3, 1920\], got \(3, 1919\)"):
        codec.encode(audio[:, :-1])
    with pytest.raises(ValueError, match=r"got \(2, 1920\)"):
        codec.encode(audio[:2])
    with pytest.raises(ValueError, match="got torch.float64"):
        codec.encode(audio.double())
    with pytest.raises(ValueError, match="got torch.int16"):
        codec.encode(audio.to(torch.int16))
    with pytest.raises(ValueError, match="got ndarray"):
        codec.encode(audio.numpy())
    with pytest.raises(ValueError, match=r"\[3, 8, 1\], got \(3, 8, 2\)"):
        codec.decode(torch.zeros(3, 8, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got \(3, 4, 1\)"):
        codec.decode(codes[:, :4])
    with pytest.raises(ValueError, match=r"got \(1, 8, 1\)"):
        codec.decode(codes[:1])
    with pytest.raises(ValueError, match="got torch.float32"):
        codec.decode(codes.float())
    for bad in (64, -1):
        out_of_range = codes.clone()
        out_of_range[2, 5, 0] = bad
        with pytest.raises(ValueError, match=rf"\[0, 64\), got {bad} \(slot 2\)"):
            codec.decode(out_of_range)
    with pytest.raises(ValueError, match=r"got torch.int64 \[3\]"):
        codec.reset(torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"shape \[3\], got torch.bool \[2\]"):
        codec.reset(torch.tensor([True, False]))
    for bad in (0, 9):
        with pytest.raises(ValueError, match=rf"\[1, 8\], got {bad}"):
            MimiStreamingCodec(sample_mimi, 3, num_codebooks=bad)
    with pytest.raises(ValueError, match="got True"):
        MimiStreamingCodec(sample_mimi, 3, num_codebooks=True)
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match=f"got {bad}"):
            MimiStreamingCodec(sample_mimi, bad)
    with pytest.raises(ValueError, match="got MimiConfig"):
        MimiStreamingCodec(sample_mimi.config, 3)
    flex = copy.deepcopy(sample_mimi)
    flex.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="'flex_attention'"):
        MimiStreamingCodec(flex, 3)
    # the codec is untouched by rejected calls: it still streams as a fresh one
    assert torch.equal(codec.encode(audio), MimiStreamingCodec(sample_mimi, 3).encode(audio))
