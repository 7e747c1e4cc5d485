"""The output limiter: every sample within the ceiling, quiet audio untouched, streaming equal to whole-file, slots
independent, bad settings named."""

import numpy as np
import pytest

from hf_moshi_userpred.serving.audio_limiter import AudioLimiter

RATE, FRAME = 24000, 1920
CEILING = 10 ** (-1 / 20)


def loud_babble(seconds: float, peak: float, seed: int = 0) -> np.ndarray:
    """An untrained decoder's kind of output: noise with a slow envelope, peaking near `peak`."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    envelope = 0.5 + 0.5 * np.sin(np.linspace(0, 6 * np.pi, n))
    noise = rng.standard_normal(n)
    return (peak * envelope * noise / np.abs(noise).max()).astype(np.float32)


def test_loud_audio_is_brought_under_the_ceiling_at_a_sane_loudness():
    audio = loud_babble(4.0, peak=76.0)
    out = AudioLimiter(1, RATE).limit_all(audio, FRAME)
    assert out.dtype == np.float32 and out.shape == audio.shape
    assert np.abs(out).max() <= CEILING
    rms = np.sqrt(np.mean(out**2))
    assert 0.05 < rms < 0.5  # audible, not crushed to silence nor a square wave
    assert np.mean(np.abs(out) > 0.99 * CEILING) < 0.01  # not clipped flat: almost no sample sits at the ceiling


def test_quiet_audio_passes_unchanged():
    audio = 0.5 * np.sin(2 * np.pi * 220 * np.arange(RATE) / RATE).astype(np.float32)
    np.testing.assert_array_equal(AudioLimiter(1, RATE).limit_all(audio, FRAME), audio)


def test_the_gain_recovers_slowly_after_a_loud_burst():
    quiet = 0.5 * np.ones(FRAME, dtype=np.float32)
    limiter = AudioLimiter(1, RATE, release_db_per_s=6.0)
    limiter(10.0 * np.ones(FRAME, dtype=np.float32))
    after = [limiter(quiet).max() for _ in range(30)]  # 2.4 s
    assert after[0] < 0.2  # the gain stays low right after the burst (no pumping)
    assert all(b >= a for a, b in zip(after, after[1:]))  # and rises back monotonically
    assert after[-1] == pytest.approx(0.5 * 10 ** (6.0 * 2.4 / 20) * CEILING / 10, rel=1e-3)


def test_streaming_equals_whole_and_channels_are_independent():
    a, b = loud_babble(1.0, 40.0, seed=1), loud_babble(1.0, 0.3, seed=2)
    whole_a = AudioLimiter(1, RATE).limit_all(a, FRAME)
    whole_b = AudioLimiter(1, RATE).limit_all(b, FRAME)
    batched = AudioLimiter(2, RATE)
    chunks = [batched(np.stack([a[s : s + FRAME], b[s : s + FRAME]])) for s in range(0, len(a), FRAME)]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), np.stack([whole_a, whole_b]))
    np.testing.assert_array_equal(whole_b, b)  # the quiet slot never feels the loud one

    # a subset of the channels, and a reset slot starting afresh
    limiter = AudioLimiter(3, RATE)
    limiter(np.stack([a[:FRAME], a[:FRAME]]), channels=[0, 2])
    assert limiter.gain[1] == 1.0 and limiter.gain[0] == limiter.gain[2] < 1.0
    limiter.reset(2)
    assert limiter.gain[2] == 1.0 and limiter.gain[0] < 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"ceiling_db": 3.0}, "ceiling_db must be in"), ({"knee": 1.0}, "knee must be in"),
     ({"release_db_per_s": 0.0}, "must be positive")],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AudioLimiter(1, RATE, **kwargs)


def test_non_finite_or_mis_shaped_chunks_are_refused():
    limiter = AudioLimiter(2, RATE)
    with pytest.raises(ValueError, match="must be finite"):
        limiter(np.array([[0.0, np.nan], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="3 rows for 2 limiter channels"):
        limiter(np.zeros((3, 4)))
