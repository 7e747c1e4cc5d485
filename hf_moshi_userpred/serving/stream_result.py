"""What a `stream` run produced ([`StreamResult`]) and the statistics of its per-frame records: speculation hits,
critical-path latencies, the user branch's prediction accuracy (see [`stream_user_audio`] for the run itself)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.generation_moshi_step_output import SpeculationStats


@dataclass
class StreamResult:
    r"""What [`stream_user_audio`] produced. Per-frame lists have one entry per user frame streamed.

    Args:
        output_dir (`Path`): where the files were written; `files` maps each output (`system_audio`,
            `dialogue_audio`, `text`, `frames`, `summary`) to its path.
        text (`str`): the system's text (its word tokens' ids, space-separated, without a tokenizer).
        text_tokens (`torch.LongTensor` `[T - max(delays)]`): the text stream, padding included, frame-aligned
            with `audio_codes`.
        audio_codes (`torch.LongTensor` `[dep_q, T - max(delays)]`): the system's Mimi codes.
        user_codes (`torch.LongTensor` `[n_q - dep_q, T]`): the user's Mimi codes that were streamed.
        frame_rate (`float`): frames per second (user frame `t` starts at `t / frame_rate` s).
        statuses (`list[str]`): per frame, "hit" (the step precomputed for a guessed user token was committed),
            "miss" (the guesses were wrong: a normal step ran) or "not_tried" (frame 0, or speculation off).
        critical_ms (`list[float]`): per frame, milliseconds from the frame's arrival to the system's tokens.
        correct (`list[bool | None]`): per frame, whether the user branch's prediction (made one frame earlier) of
            the frame's delay-0 user tokens was right; None where there was no prediction.
        confidence (`list[float | None]`): per frame, the user branch's probability of that prediction (the
            product over the predicted delay-0 codebooks); None where there was none.
        hits, misses (`int`): frames whose speculation was committed / failed; `hit_rate = hits / (hits + misses)`.
        critical_ms_mean, critical_ms_p95 (`float`): mean and 95th percentile of `critical_ms`.
        critical_ms_hit_mean, critical_ms_hit_p95 (`float`, *optional*): the same over the hit frames.
        critical_ms_normal_mean, critical_ms_normal_p95 (`float`, *optional*): the same over the other frames
            (a normal step ran).
        saved_ms (`float`): critical-path time speculation saved in all (the session's `SpeculationStats.saved_s`).
        delay0_accuracy (`float`, *optional*): fraction of the predicted delay-0 user tokens that were right.
        wall_s (`float`): wall-clock seconds of the streaming loop, reading and Mimi-encoding each frame included
            (paced by the frame rate when `realtime`).
        settings (`dict`): the inputs and sampling settings of the run, as recorded in summary.json.
    """

    output_dir: Path
    text: str
    text_tokens: torch.Tensor
    audio_codes: torch.Tensor
    user_codes: torch.Tensor
    frame_rate: float
    statuses: list[str]
    critical_ms: list[float]
    correct: list[bool | None]
    confidence: list[float | None]
    hits: int
    misses: int
    hit_rate: float
    critical_ms_mean: float
    critical_ms_p95: float
    critical_ms_hit_mean: float | None
    critical_ms_hit_p95: float | None
    critical_ms_normal_mean: float | None
    critical_ms_normal_p95: float | None
    saved_ms: float
    delay0_accuracy: float | None
    wall_s: float
    settings: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return self.user_codes.shape[1]

    def to_dict(self) -> dict:
        """The summary written to summary.json (the per-frame lists are in frames.jsonl), JSON-serialisable."""
        return {
            "frames": self.num_frames,
            "seconds": self.num_frames / self.frame_rate,
            "system_frames": self.audio_codes.shape[1],
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "hit_frames": self.statuses.count("hit"),
            "normal_frames": self.num_frames - self.statuses.count("hit"),
            **{name: getattr(self, name) for name in (
                "critical_ms_mean", "critical_ms_p95", "critical_ms_hit_mean", "critical_ms_hit_p95",
                "critical_ms_normal_mean", "critical_ms_normal_p95", "saved_ms", "delay0_accuracy", "wall_s", "text",
                "settings",
            )},
            "files": {name: path.name for name, path in self.files.items()},
        }

    def describe(self) -> str:
        """A few lines for a terminal: frames, speculation, latency, prediction accuracy, text and files."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} ms"

        accuracy = "-" if self.delay0_accuracy is None else f"{100 * self.delay0_accuracy:.1f}%"
        lines = [
            f"streamed {self.num_frames} frames ({self.num_frames / self.frame_rate:.2f} s of user audio) in "
            f"{self.wall_s:.2f} s",
            f"speculation: {self.hits} hits, {self.misses} misses (hit rate {100 * self.hit_rate:.1f}%), "
            f"saved {self.saved_ms:.1f} ms of critical path",
            f"critical path per frame: {ms(self.critical_ms_hit_mean)} on hits, {ms(self.critical_ms_normal_mean)} "
            f"on normal steps; all: {ms(self.critical_ms_mean)} mean, {ms(self.critical_ms_p95)} p95",
            f"user's next delay-0 tokens predicted right: {accuracy}",
            f"text: {self.text}",
            "wrote " + ", ".join(str(path) for path in self.files.values()),
        ]
        return "\n".join(lines)


def frame_statistics(records: list[dict], stats: SpeculationStats) -> dict:
    """The [`StreamResult`] fields summarising a run: from its frames.jsonl records (one per frame, with
    `speculative`, `critical_ms`, `predicted`, `user_tokens`, `correct` and `probability`) and the session's
    [`SpeculationStats`] `stats`."""
    statuses = [record["speculative"] for record in records]
    critical = [record["critical_ms"] for record in records]
    # predicted delay-0 tokens, right or wrong (predicted rows are a prefix of the delay-0 rows: zip pairs them)
    scored = [p == u for r in records if r["predicted"] for p, u in zip(r["predicted"], r["user_tokens"])]
    mean, p95 = _mean_p95(critical)
    hit_mean, hit_p95 = _mean_p95([ms for ms, status in zip(critical, statuses) if status == "hit"])
    normal_mean, normal_p95 = _mean_p95([ms for ms, status in zip(critical, statuses) if status != "hit"])
    return {
        "statuses": statuses,
        "critical_ms": critical,
        "correct": [record["correct"] for record in records],
        "confidence": [None if r["probability"] is None else math.prod(r["probability"]) for r in records],
        "hits": stats.hits,
        "misses": stats.misses,
        "hit_rate": stats.hit_rate,
        "critical_ms_mean": mean,
        "critical_ms_p95": p95,
        "critical_ms_hit_mean": hit_mean,
        "critical_ms_hit_p95": hit_p95,
        "critical_ms_normal_mean": normal_mean,
        "critical_ms_normal_p95": normal_p95,
        "saved_ms": 1000 * stats.saved_s,
        "delay0_accuracy": sum(scored) / len(scored) if scored else None,
    }


def _mean_p95(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), values.quantile(0.95).item()


__all__ = ["StreamResult", "frame_statistics"]
