"""A synthetic two-party conversation whose turn taking follows recorded conversation: turns decided by words and
melody, not by the length of the silence.

The timing ([`ConversationSettings`], every value settable, defaults with their sources):

- **Gaps** between turns: log-normal with a median of 200 ms (Stivers et al. 2009, PNAS: the gap mode sits near
  200 ms across ten languages); a share of the turn changes **overlap** the end of the previous turn by 100-600 ms
  (Heldner & Edlund 2010, J. Phonetics: about 40 % of between-speaker intervals are overlaps in Swedish, Scottish
  English and Dutch map-task and spontaneous dialogue; 30 % here, which keeps more shifts scorable).
- **Holds**, the pauses inside a turn: log-normal with a median of 500 ms, a third of them over 700 ms, 250 ms to 2 s
  (Heldner & Edlund 2010: pauses are longer than gaps on average; Ekstedt & Skantze 2022, the VAP paper, find a
  silence threshold useless for shift/hold for that reason). Holds and gaps overlap: no silence length decides.
- **Backchannels** ("mhm", "yeah", "right", "okay", ...) by the listener, inside the speaker's speech, at a rate per
  minute of the speaker's speech.
- **Barge-ins**: the user starts a turn inside a system IPU; the recorded system yields 200-600 ms later (its speech
  cut, fading out), except for a share of the time when it finishes its IPU over the user. Rarer system barge-ins
  over the user, who yields.
- **Voices**: each dialogue draws one espeak-ng voice per side from pools of five, and a speaking rate and pitch.

    settings = ConversationSettings()
    dialogue, log = make_conversation(random.Random(0), Espeak(), settings, seconds=90.0)
    log.holds, log.gaps, log.backchannels   # what was generated, in seconds / counts
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from .espeak import Espeak, Utterance
from .grammar import Grammar, Turn
from .timeline import SYSTEM, USER, Dialogue, Timeline

SYSTEM_VOICES = ("en-us+m3", "en+m1", "en-gb-scotland+m4", "en-029+m2", "en-us-nyc+f2")
USER_VOICES = ("en-gb-x-rp+f3", "en-us+f1", "en-gb-x-gbclan+m5", "en-gb-x-gbcwmd+f4", "en-us+m7")
MIN_SELF_GAP = 0.15  # seconds between two utterances of one speaker that are not a hold (a backchannel, a barge-in)
BACKCHANNEL_MARGIN = 0.35  # a backchannel ends this long before the speech it reacts to (more than a frame's blur)


@dataclass(frozen=True)
class ConversationSettings:
    """How a synthetic conversation is timed, spoken and composed (see the module's docstring for the sources)."""

    gap_median_s: float = 0.2
    gap_sigma: float = 0.5  # of the log-normal (natural log)
    gap_max_s: float = 1.5
    overlap_share: float = 0.3
    overlap_s: tuple[float, float] = (0.1, 0.6)
    hold_median_s: float = 0.5
    hold_sigma: float = 0.7
    hold_s: tuple[float, float] = (0.25, 2.0)  # 250 ms: two whole 80 ms frames of silence at least
    user_mean_holds: float = 0.8  # holds per user turn (geometric): about as many holds as scorable shifts
    system_mean_holds: float = 0.2
    finished_hold_share: float = 0.1  # holds after a finished sentence: the lexical cue is not certain
    question_share: float = 0.35  # turn endings: questions, tags, and statements for the rest
    tag_share: float = 0.15
    reaction_share: float = 0.4  # turns that start by reacting ("oh nice.") to a statement
    backchannels_per_minute: float = 8.0  # by the listener, per minute of the speaker's speech
    user_barge_in_share: float = 0.2  # of system turns at least `barge_in_min_turn_s` long
    system_barge_in_share: float = 0.05  # of such user turns
    barge_in_min_turn_s: float = 1.5
    yield_after_s: tuple[float, float] = (0.2, 0.6)
    barge_in_hold_on_share: float = 0.2  # the system finishes its IPU over the user instead of yielding
    speaking_rate_wpm: tuple[int, int] = (145, 195)
    pitch: tuple[int, int] = (30, 70)
    system_voices: tuple[str, ...] = SYSTEM_VOICES
    user_voices: tuple[str, ...] = USER_VOICES
    lead_in_s: tuple[float, float] = (0.2, 0.6)

    def __post_init__(self) -> None:
        for name in ("gap_median_s", "gap_sigma", "gap_max_s", "hold_median_s", "hold_sigma", "barge_in_min_turn_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("overlap_share", "finished_hold_share", "question_share", "tag_share", "reaction_share",
                     "user_barge_in_share", "system_barge_in_share", "barge_in_hold_on_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.question_share + self.tag_share > 1:
            raise ValueError(f"question_share + tag_share must be <= 1, got {self.question_share + self.tag_share}")
        for name in ("overlap_s", "hold_s", "yield_after_s", "speaking_rate_wpm", "pitch", "lead_in_s"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range 0 <= low <= high, got {getattr(self, name)}")
        for name in ("user_mean_holds", "system_mean_holds", "backchannels_per_minute"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if len(self.system_voices) < 1 or len(self.user_voices) < 1:
            raise ValueError("each side needs at least one voice")


@dataclass
class ConversationLog:
    """What a conversation holds, as generated: hold and gap durations in seconds per speaker who paused or
    handed over (gaps negative: overlaps), the hold cues, and event counts."""

    holds: dict[str, list[float]] = field(default_factory=lambda: {SYSTEM: [], USER: []})
    hold_cues: dict[str, list[str]] = field(default_factory=lambda: {SYSTEM: [], USER: []})
    gaps: dict[str, list[float]] = field(default_factory=lambda: {SYSTEM: [], USER: []})  # keyed by who handed over
    turn_endings: dict[str, list[str]] = field(default_factory=lambda: {SYSTEM: [], USER: []})
    backchannels: dict[str, int] = field(default_factory=lambda: {SYSTEM: 0, USER: 0})  # keyed by who said them
    barge_ins: dict[str, int] = field(default_factory=lambda: {SYSTEM: 0, USER: 0})  # keyed by who barged in
    held_on: int = 0  # user barge-ins the system talked through
    voices: dict[str, str] = field(default_factory=dict)


class _Speaker:
    """One side of a conversation: its voice and how it says things."""

    def __init__(self, espeak: Espeak, voice: str, rate: int, pitch: int) -> None:
        self.espeak, self.voice, self.rate, self.pitch = espeak, voice, rate, pitch

    def say(self, text: str, unfinished: bool = False) -> Utterance:
        """`text` spoken as one IPU; an `unfinished` IPU gets a comma for espeak-ng (the continuation rise of a clause
        that goes on), which is not a word."""
        if unfinished and text[-1] not in ",.?":
            text += ","
        if re.search(r"[,.?!].", text):
            raise ValueError(f"an IPU has punctuation inside, where espeak-ng would pause: {text!r}")
        return self.espeak.synthesize(text, self.voice, self.rate, self.pitch)


def _log_normal(rng: random.Random, median: float, sigma: float, low: float, high: float) -> float:
    """A log-normal draw within `[low, high]` (redrawn until it is)."""
    while True:
        value = median * math.exp(rng.gauss(0.0, sigma))
        if low <= value <= high:
            return value


class _Conversation:
    """Lays out turns on a [`Timeline`], logging what it generates."""

    def __init__(self, rng: random.Random, espeak: Espeak, settings: ConversationSettings) -> None:
        self.rng, self.settings = rng, settings
        self.grammar = Grammar(rng)
        self.timeline = Timeline()
        self.log = ConversationLog()
        self.speakers = {}
        for side, pool in ((SYSTEM, settings.system_voices), (USER, settings.user_voices)):
            voice = rng.choice(pool)
            self.speakers[side] = _Speaker(espeak, voice, rng.randint(*settings.speaking_rate_wpm),
                                           rng.randint(*settings.pitch))
            self.log.voices[side] = f"{voice} rate {self.speakers[side].rate} pitch {self.speakers[side].pitch}"

    @staticmethod
    def other(side: str) -> str:
        return USER if side == SYSTEM else SYSTEM

    def turn(self, side: str, answering: bool, react: bool) -> Turn:
        s = self.settings
        mean_holds = s.user_mean_holds if side == USER else s.system_mean_holds
        return self.grammar.turn(answering, mean_holds=mean_holds, finished_hold_share=s.finished_hold_share,
                                 question_share=s.question_share, tag_share=s.tag_share, react=react)

    def gap(self) -> float:
        """Seconds from the end of a turn to the next one's start, negative for an overlap."""
        s = self.settings
        if self.rng.random() < s.overlap_share:
            return -self.rng.uniform(*s.overlap_s)
        return _log_normal(self.rng, s.gap_median_s, s.gap_sigma, 0.0, s.gap_max_s)

    def hold(self) -> float:
        s = self.settings
        return _log_normal(self.rng, s.hold_median_s, s.hold_sigma, *s.hold_s)

    def backchannels(self, side: str, start: float, ipu: Utterance) -> None:
        """The listener's backchannels inside `side`'s IPU spoken from `start`: Poisson at the settable rate, each
        after a word of the IPU and ending `BACKCHANNEL_MARGIN` before it ends."""
        listener = self.other(side)
        expected = self.settings.backchannels_per_minute * ipu.duration / 60
        count = 0
        while self.rng.random() < expected / (1 + expected) and count < 2:  # geometric with that mean, at most 2
            count += 1
        for _ in range(count):
            backchannel = self.speakers[listener].say(self.grammar.backchannel())
            delay = self.rng.uniform(0.05, 0.2)
            latest = ipu.duration - BACKCHANNEL_MARGIN - backchannel.duration - delay
            earliest = max(0.3, self.timeline.free_at[listener] + MIN_SELF_GAP - start - delay)
            word_ends = [end for _, _, end in ipu.words[:-1] if earliest <= end <= latest]
            if word_ends:
                self.timeline.place(listener, start + self.rng.choice(word_ends) + delay, backchannel)
                self.log.backchannels[listener] += 1

    def barge_in_point(self, side: str, start: float, ipu: Utterance) -> float | None:
        """Where, inside `side`'s IPU spoken from `start`, the other may start over it (after a word, at least 0.5 s
        in and 0.8 s before its end), None if nowhere."""
        listener_free = self.timeline.free_at[self.other(side)] + MIN_SELF_GAP
        ends = [start + end for _, _, end in ipu.words[:-1]
                if 0.5 <= end <= ipu.duration - 0.8 and start + end >= listener_free]
        return self.rng.choice(ends) if ends else None

    def speak_turn(self, side: str, turn: Turn, start: float) -> tuple[float, float, float | None]:
        """Place `turn`'s IPUs from `start`, with holds between them, the listener's backchannels, and maybe a barge-in
        by the listener. Returns where `side`'s last IPU starts and ends, and where the listener barged in (None: it
        did not; then `side` spoke the whole turn and the listener answers after a gap)."""
        s = self.settings
        speaker = self.speakers[side]
        listener = self.other(side)
        barge_share = s.user_barge_in_share if side == SYSTEM else s.system_barge_in_share
        utterances = [speaker.say(text, unfinished=i < len(turn.ipus) - 1) for i, text in enumerate(turn.ipus)]
        total = sum(u.duration for u in utterances)
        barge_ipu = self.rng.randrange(len(utterances)) if (total >= s.barge_in_min_turn_s
                                                            and self.rng.random() < barge_share) else -1
        for index, ipu in enumerate(utterances):
            point = self.barge_in_point(side, start, ipu) if index == barge_ipu else None
            if point is not None:
                held_on = side == SYSTEM and self.rng.random() < s.barge_in_hold_on_share
                if not held_on:  # the interrupted speaker yields, fading out
                    ipu = ipu.cut(point - start + self.rng.uniform(*s.yield_after_s))
                self.log.held_on += held_on
                self.log.barge_ins[listener] += 1
                return start, self.timeline.place(side, start, ipu), point
            end = self.timeline.place(side, start, ipu)
            self.backchannels(side, start, ipu)
            if index < len(utterances) - 1:
                pause = self.hold()
                self.log.holds[side].append(pause)
                self.log.hold_cues[side].append(turn.hold_cues[index])
                start = end + pause
        self.log.turn_endings[side].append(turn.ending)
        return start, end, None

    def run(self, seconds: float) -> Dialogue:
        side = self.rng.choice([SYSTEM, USER])
        start = self.rng.uniform(*self.settings.lead_in_s)
        answering = react = barge = False
        while True:
            turn = self.grammar.barge_in() if barge else self.turn(side, answering, react)
            last_start, end, barged_at = self.speak_turn(side, turn, start)
            listener = self.other(side)
            if barged_at is not None:  # the listener already started, over this speech
                start, answering, react, barge = barged_at, False, False, True
            elif end > seconds:
                break
            else:  # an overlap starts within the last IPU, never in the hold before it
                start = max(end + self.gap(), last_start + 0.3, self.timeline.free_at[listener] + MIN_SELF_GAP)
                self.log.gaps[side].append(start - end)
                answering, barge = turn.asks, False
                react = not turn.asks and self.rng.random() < self.settings.reaction_share
            side = listener
        return self.timeline.render(end + self.rng.uniform(0.3, 0.6))


def make_conversation(rng: random.Random, espeak: Espeak, settings: ConversationSettings,
                      seconds: float) -> tuple[Dialogue, ConversationLog]:
    """One conversation of about `seconds` (it ends with the first turn that ends past `seconds`) and its log."""
    conversation = _Conversation(rng, espeak, settings)
    return conversation.run(seconds), conversation.log


__all__ = ["ConversationLog", "ConversationSettings", "make_conversation"]
