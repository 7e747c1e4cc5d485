"""Turn-taking events on a frame grid, from both speakers' voice activity: the user's pauses (a hold when the user
resumes, a shift when the system takes the turn) and the user's onsets over the system (a backchannel or a
barge-in). What the turn-taking evaluation ([`evaluate_turn_taking`]) and the dialogue-behaviour evaluation score at.

    events = dialogue_events(alignments, num_frames)
    events.shifts, events.holds, events.onsets
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data.voice_activity import activity_runs, voice_activity
from ..models.configuration_moshi_userpred import FRAME_RATE


@dataclass
class Pause:
    """The end of a user inter-pausal unit while the system is silent: `end_frame` is its last active frame,
    `start_frame` its first; `shift` the system speaks next (the user's turn ended), else the user resumes (hold);
    `silence_frames` the user's silence after it (None: to the end of the dialogue); `system_onset` the frame the
    system starts (None: it does not before the user resumes)."""

    start_frame: int
    end_frame: int
    shift: bool
    silence_frames: int | None
    system_onset: int | None


@dataclass
class Onset:
    """A user inter-pausal unit starting while the system speaks: a backchannel (short, the system keeps the
    floor) or a barge-in (the user takes the floor)."""

    start_frame: int
    end_frame: int
    backchannel: bool


@dataclass
class TurnTakingEvents:
    """One dialogue's [`Pause`]s and [`Onset`]s, with the voice activity they were found on (bool `[T]` each)."""

    pauses: list[Pause] = field(default_factory=list)
    onsets: list[Onset] = field(default_factory=list)
    user_activity: torch.Tensor | None = None
    system_activity: torch.Tensor | None = None

    def decidable_pauses(self, decision_delay: int = 0) -> list[Pause]:
        """The pauses a predictor can be scored at when it decides `decision_delay` frames after the user's last
        speech frame: the decision boundary lies inside the dialogue and before the system starts (at an earlier
        onset the teacher-forced system stream would give the answer away, and a real agent would be too late)."""
        T = self.user_activity.shape[0] if self.user_activity is not None else None
        decidable = []
        for pause in self.pauses:
            decide = pause.end_frame + 1 + decision_delay
            if (T is None or decide < T) and (pause.system_onset is None or pause.system_onset > decide):
                decidable.append(pause)
        return decidable

    @property
    def shifts(self) -> list[Pause]:
        return [p for p in self.pauses if p.shift]

    @property
    def holds(self) -> list[Pause]:
        return [p for p in self.pauses if not p.shift]


def find_events(
    user_activity: torch.Tensor, system_activity: torch.Tensor, *, min_pause_frames: int = 2,
    max_backchannel_frames: int = 12, context_frames: int = 3,
) -> TurnTakingEvents:
    """Turn-taking events on a frame grid, from the two speakers' voice activity (bool `[T]` each).

    - User inter-pausal units (IPUs): runs of user activity, gaps shorter than `min_pause_frames` merged.
    - **Pause** at the end of every user IPU after which the user is silent for at least `min_pause_frames`, the
      system silent at its last frame: a **shift** when the system starts speaking before the user speaks again
      (the user's turn ended), a **hold** when the user resumes first. An IPU end with neither after it (end of the
      dialogue) is no event.
    - **Onset** at every user IPU starting while the system speaks (active within the `context_frames` before
      it): a **backchannel** when it lasts at most `max_backchannel_frames` and the system still speaks within
      `context_frames` after it, otherwise a **barge-in**.
    """
    T = user_activity.shape[0]
    user_ipus = activity_runs(user_activity, min_pause_frames)
    events = TurnTakingEvents(user_activity=user_activity, system_activity=system_activity)
    for i, (first, last) in enumerate(user_ipus):
        next_user = user_ipus[i + 1][0] if i + 1 < len(user_ipus) else None
        if last + 1 < T and not bool(system_activity[last]):
            horizon_end = next_user if next_user is not None else T
            system_after = system_activity[last + 1 : horizon_end].nonzero().flatten()
            system_onset = last + 1 + int(system_after[0]) if system_after.numel() else None
            if system_onset is not None or next_user is not None:
                silence = None if next_user is None else next_user - last - 1
                if silence is None or silence >= min_pause_frames:
                    events.pauses.append(Pause(first, last, system_onset is not None, silence, system_onset))
        if bool(system_activity[max(first - context_frames, 0) : first + 1].any()):
            after = system_activity[last + 1 : last + 1 + context_frames]
            short = last - first + 1 <= max_backchannel_frames
            events.onsets.append(Onset(first, last, short and bool(after.any())))
    return events


def dialogue_events(
    alignments: Sequence[Sequence], num_frames: int, main_speaker: str = "SPEAKER_MAIN", *,
    frame_rate: float = FRAME_RATE, **find_events_kwargs: int,
) -> TurnTakingEvents:
    """[`find_events`] of one dialogue's word alignments over `num_frames` frames (both speakers' activity from
    [`voice_activity`], kept on the result as `user_activity` and `system_activity`)."""
    user = voice_activity(alignments, num_frames, main_speaker, user=True, frame_rate=frame_rate)
    system = voice_activity(alignments, num_frames, main_speaker, user=False, frame_rate=frame_rate)
    return find_events(user, system, **find_events_kwargs)


__all__ = ["Onset", "Pause", "TurnTakingEvents", "dialogue_events", "find_events"]
