"""A streaming peak limiter: every audio the package emits stays within [-1, 1] at a listenable loudness.

A Mimi decoder is free to produce any amplitude: a checkpoint being fine-tuned, or an untrained decoder, can decode
to peaks of 50-80x full scale, which a sound card clips into a harsh square wave at full volume (even the sample's
small Mimi, whose decoder is fitted, peaks a little over full scale). So the
system's audio passes through this limiter wherever it leaves the package (the `stream` WAVs, the server's Opus,
the demo), and the page clamps what it plays as a last guard.

How it works, on each chunk (one Mimi frame, 80 ms, in the live path):
- the chunk's peak sets the gain that brings it to the ceiling (-1 dBFS by default); the gain never exceeds 1, so
  audio that is already within bounds passes unchanged;
- a louder chunk lowers the gain from its first sample (the chunk is the limiter's look-ahead), a quieter one lets
  it recover slowly, gliding across the chunk (release: `release_db_per_s`), so the loudness does not pump from
  frame to frame;
- a soft clip above `knee` of the ceiling is the last guard: with the gain set from the chunk's own peak no sample
  should reach it, and it bounds the output whatever the rounding.
Chunked and whole-file processing give the same samples for the same chunking ([`AudioLimiter.limit_all`] walks
the file in frame-sized chunks), so a `stream` WAV sounds like what `serve` sends.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CEILING_DB = -1.0


class AudioLimiter:
    """Peak limiter over a batch of independent channels (one per conversation slot), keeping state per channel.

    Args:
        channels: independent signals processed side by side (each has its own gain).
        sample_rate: samples per second, for the release rate.
        ceiling_db: the highest absolute sample value out, in dBFS (must be in [-20, 0]).
        release_db_per_s: how fast the gain recovers once the audio gets quieter.
        knee: the share of the ceiling below which samples are never shaped by the soft clip (in (0, 1)).
    """

    def __init__(
        self,
        channels: int = 1,
        sample_rate: int = 24000,
        ceiling_db: float = DEFAULT_CEILING_DB,
        release_db_per_s: float = 6.0,
        knee: float = 0.8,
    ) -> None:
        if not -20.0 <= ceiling_db <= 0.0:
            raise ValueError(f"ceiling_db must be in [-20, 0] dBFS, got {ceiling_db}")
        if not 0.0 < knee < 1.0:
            raise ValueError(f"knee must be in (0, 1), got {knee}")
        if release_db_per_s <= 0 or sample_rate <= 0 or channels <= 0:
            raise ValueError(
                f"channels, sample_rate and release_db_per_s must be positive, got {channels}, {sample_rate}, "
                f"{release_db_per_s}"
            )
        # the float32 just under the ceiling: the float32 samples out round to at most it
        self.ceiling = float(np.nextafter(np.float32(10.0 ** (ceiling_db / 20.0)), np.float32(0.0)))
        self.knee = knee
        self.sample_rate = sample_rate
        self.release_db_per_s = release_db_per_s
        self.gain = np.ones(channels, dtype=np.float64)
        self._ramp = np.zeros((1, 0))

    def reset(self, channel: int | None = None) -> None:
        """Forgets the loudness history of one channel (a new conversation in its slot), or of all."""
        if channel is None:
            self.gain[:] = 1.0
        else:
            self.gain[channel] = 1.0

    def __call__(self, chunk: np.ndarray, channels: list[int] | None = None) -> np.ndarray:
        """Limits one chunk.

        Args:
            chunk: `[channels, samples]` float samples (or `[samples]` for a single-channel limiter); non-finite
                samples are refused, they would poison the gain.
            channels: which of the limiter's channels the rows of `chunk` are (all, in order, by default).
        Returns:
            float32 `[channels, samples]` (or `[samples]`) within ±ceiling.
        """
        samples = np.asarray(chunk, dtype=np.float64)
        flat = samples.ndim == 1
        rows = samples[None] if flat else samples
        index = np.arange(len(self.gain)) if channels is None else np.asarray(channels, dtype=np.int64)
        if rows.shape[0] != len(index):
            raise ValueError(f"chunk has {rows.shape[0]} rows for {len(index)} limiter channels")
        if not np.isfinite(rows).all():
            raise ValueError("audio to limit must be finite (got NaN or infinity)")
        n = rows.shape[1]
        if n == 0:
            return rows.astype(np.float32)[0] if flat else rows.astype(np.float32)
        peak = np.abs(rows).max(axis=1)
        wanted = np.minimum(1.0, self.ceiling / np.maximum(peak, 1e-12))
        previous = self.gain[index]
        recovered = previous * 10.0 ** (self.release_db_per_s * n / self.sample_rate / 20.0)
        target = np.minimum(wanted, np.minimum(recovered, 1.0))
        # the whole chunk is in hand before any of it leaves (a look-ahead of one chunk): a louder chunk takes its
        # gain from its first sample, a quieter one glides up to its gain across the chunk
        if self._ramp.shape[1] != n:  # the engine's chunks are all one frame long: built once, not every 80 ms
            self._ramp = np.linspace(0.0, 1.0, n, endpoint=True)[None]
        ramp = self._ramp
        start = np.minimum(previous, target)
        gains = start[:, None] + (target - start)[:, None] * ramp
        limited = self._soft_clip(rows * gains)
        self.gain[index] = target
        out = limited.astype(np.float32)
        return out[0] if flat else out

    def limit_all(self, audio: np.ndarray, chunk_samples: int) -> np.ndarray:
        """Limits a whole signal `[samples]` (single channel) or `[channels, samples]` chunk by chunk, as a live
        stream of `chunk_samples`-long chunks would be."""
        samples = np.asarray(audio, dtype=np.float32)
        pieces = [self(samples[..., start : start + chunk_samples]) for start in range(0, samples.shape[-1], chunk_samples)]
        return np.concatenate(pieces, axis=-1) if pieces else samples.copy()

    def _soft_clip(self, samples: np.ndarray) -> np.ndarray:
        """Identity below `knee * ceiling`; above it a tanh curve with slope 1 at the knee that never reaches the
        ceiling."""
        threshold = self.knee * self.ceiling
        span = self.ceiling - threshold
        magnitude = np.abs(samples)
        over = magnitude > threshold
        shaped = threshold + span * np.tanh((magnitude - threshold) / span)
        return np.where(over, np.sign(samples) * shaped, samples)
