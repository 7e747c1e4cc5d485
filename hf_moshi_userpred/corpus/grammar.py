"""What the speakers of a synthetic conversation say: turns made of inter-pausal units (IPUs) whose last words carry
the cue that decides the turn, as in speech.

- An IPU followed by a **hold** (the speaker pauses, then goes on) ends unfinished: on a conjunction ("and", "but",
  "because", "so"), a filler ("um", "uh"), a preposition or article ("with", "to", "the"), or a subordinate clause
  with a comma's continuation rise ("when we got home,").
- A turn's last IPU, followed by a **shift**, ends finished: a statement with a full stop (falling pitch), a question
  (rising) or a tag ("right?", "you know?").
- Questions get answers: a turn that ends with a question is answered by the next one.
- A settable share of holds follows a finished sentence (the speaker adds another one), so that the cue is strong but
  not certain, as in conversation.

Nothing is recalled: the slots below combine into millions of sentences, and `Grammar.sentence_overlap` measures how
many held-out sentences also occur in training.

    grammar = Grammar(random.Random(0))
    turn = grammar.turn(False, mean_holds=1.0, finished_hold_share=0.1, question_share=0.35, tag_share=0.15)
    turn.ipus   # ["yesterday my cousin took the bus to the harbour and", "I waited for", "the plumber."]
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SLOTS: dict[str, list[str]] = {
    "subject": [
        "I", "we", "my sister", "my brother", "my neighbour", "our manager", "the kids", "a friend of mine", "my dad",
        "my mum", "the teacher", "my cousin", "our landlord", "the doctor", "my grandmother", "the new guy at work",
        "my flatmate", "the whole team", "my uncle", "the baker", "a woman on the train", "our coach",
    ],
    "past_action": [
        "went to {place}", "called {person}", "fixed {thing}", "cooked {food}", "bought {thing}", "watched {show}",
        "read {book}", "lost {thing}", "found {thing}", "visited {person}", "painted {thing}", "cleaned {thing}",
        "planted {plant}", "missed the {vehicle}", "booked {trip}", "walked to {place}", "sold {thing}",
        "borrowed {thing}", "ordered {food}", "drove past {place}", "met {person} at {place}", "waited for {person}",
        "looked for {thing}", "tried {food}", "moved {thing}", "carried {thing} home", "forgot about {event}",
        "talked about {event}", "left {thing} at {place}", "took the {vehicle} to {place}",
    ],
    "future_action": [
        "go to {place}", "call {person}", "fix {thing}", "cook {food}", "buy {thing}", "watch {show}", "visit {person}",
        "paint {thing}", "clean {thing}", "plant {plant}", "book {trip}", "sell {thing}", "try {food}",
        "take the {vehicle} to {place}", "meet {person} at {place}", "look for {thing}", "move {thing}",
    ],
    "place": [
        "the market", "the station", "the beach", "the library", "the old bridge", "the museum", "the harbour",
        "the garden centre", "the dentist", "the office", "the stadium", "the bakery", "the river", "the hospital",
        "the airport", "the town hall", "the swimming pool", "the cinema", "the post office", "the hardware store",
        "the farm", "the castle", "the hotel", "the lake", "the school", "the car park",
    ],
    "person": [
        "my aunt", "the plumber", "an old friend", "my boss", "the neighbours", "my parents", "the vet", "a colleague",
        "my godson", "the mechanic", "our cousins", "the twins", "my partner", "the landlady", "my old teacher",
    ],
    "thing": [
        "the bike", "a new lamp", "the kitchen sink", "some shoes", "a blue jacket", "the old car", "a cheap laptop",
        "the fence", "the washing machine", "a wooden chair", "the front door", "my glasses", "the umbrella",
        "a big mirror", "the garden hose", "the printer", "a red scarf", "the bookshelf", "my keys", "the heater",
        "a second hand piano", "the roof", "a tiny radio", "the tent", "a pair of boots",
    ],
    "food": [
        "pasta", "soup", "rice", "a pizza", "a salad", "fresh bread", "fish", "noodles", "a curry", "pancakes",
        "a lemon cake", "some dumplings", "grilled vegetables", "a stew", "tacos", "an omelette",
    ],
    "show": ["a film", "the football", "a documentary", "the news", "a cooking show", "the tennis", "a play",
             "an old western", "the election debate", "a quiz show"],
    "book": ["a detective novel", "the newspaper", "a cookbook", "a history book", "some poems", "a travel guide",
             "a comic", "the manual"],
    "plant": ["tomatoes", "some roses", "an apple tree", "potatoes", "herbs", "tulips", "a hedge", "sunflowers"],
    "vehicle": ["bus", "train", "ferry", "tram", "night bus", "early train"],
    "trip": ["a trip to Spain", "a weekend away", "a cabin in the hills", "two nights in Paris", "a boat tour",
             "a camping trip", "a flight home", "a table for six"],
    "event": ["the wedding", "the meeting", "the party", "the match", "the concert", "the exam", "the interview",
              "the birthday dinner", "the move", "the holiday"],
    "time": ["yesterday", "last night", "this morning", "on Monday", "after work", "at lunch", "last weekend",
             "two days ago", "on Sunday", "last week", "in the afternoon", "before breakfast"],
    "future_time": ["tomorrow", "tonight", "next week", "on Friday", "this weekend", "after lunch", "in the morning",
                    "next month", "on Saturday", "later today"],
    "opinion": ["it was great", "it was a bit strange", "it was really expensive", "it took ages",
                "it was easier than I thought", "nobody was there", "it was absolutely packed", "it went quite well",
                "it was a disaster", "it was worth it", "everyone loved it", "it was freezing"],
    "reason": ["it was raining", "the shop was closed", "we ran out of milk", "my phone died", "the bus was late",
               "I was tired", "it was on sale", "nobody else could do it", "we had some time", "it was cheap",
               "the road was blocked", "I promised", "it was too hot", "the car broke down"],
    "feeling": ["tired", "happy", "nervous", "hungry", "lucky", "busy", "bored", "excited", "surprised", "relieved"],
    "reaction": ["oh nice", "oh really", "that's great", "oh no", "I see", "sounds good", "wow", "fair enough",
                 "oh dear", "good for you", "that makes sense", "ha I know"],
}

# A finished sentence: a statement, and the questions that ask for one.
STATEMENTS = [
    "{subject} {past_action} {time}", "{time} {subject} {past_action}", "{subject} {past_action}",
    "{opinion}", "I think {opinion}", "I was really {feeling}", "{subject} will {future_action} {future_time}",
    "we should {future_action} {future_time}", "I want to {future_action}", "{subject} {past_action} because {reason}",
]
QUESTIONS = [
    "what did you do {time}?", "did you {future_action} {time}?", "are you going to {future_action} {future_time}?",
    "have you been to {place}?", "what do you think about {event}?", "how was {event}?", "can you {future_action}?",
    "who did you see at {place}?", "why did {subject} {future_action}?", "do you want to {future_action}?",
    "where did you find {thing}?", "when are you going to {future_action}?", "was it {feeling} at {place}?",
]
TAGS = ["right?", "you know?", "don't you think?", "isn't it?", "wasn't it?", "okay?"]

# How an IPU ends before a hold: the unfinished part and what completes it after the pause.
HOLD_ENDINGS = {
    "conjunction": [("{statement} and", "{statement}"), ("{statement} but", "{statement}"),
                    ("{statement} because", "{reason}"), ("{statement} so", "{statement}"),
                    ("{statement} or", "{statement}")],
    "filler": [("{statement} um", "{statement}"), ("{subject} uh", "{past_action}"), ("and um", "{statement}"),
               ("well um", "{statement}"), ("so uh", "{statement}")],
    "preposition": [("{subject} went to", "{place}"), ("{subject} talked to", "{person}"),
                    ("we waited for", "{person}"), ("I was looking at", "{thing}"), ("{subject} came with", "{person}"),
                    ("I left it at", "{place}"), ("{subject} bought the", "{thing_noun}"),
                    ("it was near the", "{place_noun}"), ("I got it from", "{person}")],
    "comma": [("when {subject} {past_action},", "{statement}"), ("if {subject} {future_action},", "{statement}"),
              ("after {event},", "{statement}"), ("the thing is,", "{statement}"), ("{time},", "{statement}"),
              ("because {reason},", "{statement}")],
}
HOLD_CUES = tuple(HOLD_ENDINGS)
BACKCHANNELS = ["mhm", "yeah", "right", "okay", "uh huh", "mm hmm", "yes", "sure"]
BARGE_IN_OPENINGS = ["sorry but", "wait", "hang on", "no no", "actually", "but", "sorry", "excuse me"]


@dataclass
class Turn:
    """One speaker's turn: its IPUs in order, the hold cue that ends each IPU but the last (`"finished"` for a hold
    after a finished sentence), and how the last one ends (`"statement"`, `"question"` or `"tag"`)."""

    ipus: list[str]
    hold_cues: list[str]
    ending: str

    @property
    def asks(self) -> bool:
        return self.ending in ("question", "tag")


class Grammar:
    """Random sentences and turns from the slots above, drawn with `rng`."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def expand(self, template: str) -> str:
        """`template` with every `{slot}` filled, recursively (`{statement}`, `{thing_noun}`: a slot without its
        article)."""
        return re.sub(r"\{(\w+)\}", lambda match: self.expand(self._option(match.group(1))), template)

    def _option(self, slot: str) -> str:
        if slot == "statement":
            return self.rng.choice(STATEMENTS)
        if slot.endswith("_noun"):  # "the old car" -> "old car"
            return re.sub(r"^(the|a|an|some|my|our) ", "", self.rng.choice(SLOTS[slot[: -len("_noun")]]))
        return self.rng.choice(SLOTS[slot])

    def sentence(self, ending: str) -> str:
        """A finished sentence ending in `ending`: `"statement"` (a full stop), `"question"` or `"tag"` (a statement
        and a tag question: "..., right?", written without the comma so that espeak-ng does not pause before it)."""
        if ending == "question":
            return self.expand(self.rng.choice(QUESTIONS))
        statement = self.expand("{statement}")
        return f"{statement} {self.rng.choice(TAGS)}" if ending == "tag" else f"{statement}."

    def turn(self, answering: bool, *, mean_holds: float, finished_hold_share: float, question_share: float,
             tag_share: float, react: bool = False) -> Turn:
        """A turn of `1 + n` IPUs, `n` geometric with mean `mean_holds`. When `react` (and not `answering`) it opens
        with a short reaction to what was said; it ends with a question, a tag or a statement in the given shares.

        An IPU holds no punctuation inside (espeak-ng would pause there, making a pause no cue announces): the clause
        an IPU leaves unfinished is completed at the start of the next one, which goes on with a conjunction
        ("... the harbour and we waited for"); a turn whose last IPU completes a clause ends it with a full stop or a
        tag."""
        holds = 0
        while self.rng.random() < mean_holds / (1 + mean_holds):
            holds += 1
        ending = self.rng.choices(["question", "tag", "statement"],
                                  weights=[question_share, tag_share, 1 - question_share - tag_share])[0]
        ipus, cues, carry = [], [], ""  # carry: the template that completes the previous IPU
        for _ in range(holds):
            completion = self.expand(carry) if carry else ""
            if self.rng.random() < finished_hold_share:
                cue, text, carry = "finished", f"{completion}." if carry else self.sentence("statement"), ""
            else:
                cue = self.rng.choice(HOLD_CUES)
                unfinished, rest = self.rng.choice(HOLD_ENDINGS[cue])
                if carry and unfinished.startswith("{statement}"):
                    unfinished = completion + unfinished[len("{statement}"):]
                elif carry:
                    unfinished = f"{completion} and {unfinished}"
                text, carry = self.expand(unfinished), rest
            ipus.append(text)
            cues.append(cue)
        if carry:
            ending = "tag" if ending == "question" else ending
            completion = self.expand(carry)
            last = f"{completion}." if ending == "statement" else f"{completion} {self.rng.choice(TAGS)}"
        else:
            last = self.sentence(ending)
        ipus.append(last)
        if react and not answering:
            ipus[0] = f"{self.rng.choice(SLOTS['reaction']).rstrip('.?!')} {ipus[0]}"
        return Turn(ipus, cues, ending)

    def backchannel(self) -> str:
        return self.rng.choice(BACKCHANNELS)

    def barge_in(self) -> Turn:
        """A turn that starts over the other speaker: an opening ("wait,", "sorry, but") and a finished sentence."""
        ending = self.rng.choice(["question", "statement"])
        return Turn([f"{self.rng.choice(BARGE_IN_OPENINGS)} {self.sentence(ending)}"], [], ending)


def sentences(text: str) -> list[str]:
    """The sentences of `text`, lower-cased, without punctuation: what `Grammar.sentence_overlap` compares."""
    return [" ".join(re.findall(r"[a-z']+", part.lower())) for part in re.split(r"[.?!]", text) if part.strip()]


def sentence_overlap(train_lines: list[str], held_out_lines: list[str]) -> float:
    """The share of the held-out sentences (over all IPUs of `held_out_lines`) that also occur in training."""
    seen = {s for line in train_lines for s in sentences(line)}
    held_out = [s for line in held_out_lines for s in sentences(line)]
    return sum(s in seen for s in held_out) / max(len(held_out), 1)


__all__ = ["BACKCHANNELS", "HOLD_CUES", "Grammar", "Turn", "sentence_overlap"]
