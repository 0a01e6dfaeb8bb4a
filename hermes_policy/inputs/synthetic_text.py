"""A synthetic text stream for text-only LLMs: one scene-description sentence per "frame",
with planted facts (a code word, a name, a number, a hiding place, a repeated event) and
questions whose answers are those facts. Reproducible from a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hermes_policy.inputs.synthetic_questions import (
    SyntheticQuestion,
    end_time_after,
    multiple_choice,
)

# Vocabulary of filler sentences. It shares no word with the planted facts (code words,
# names, boxes, key, kite, hiding places), so an answer can only come from its fact frame.
_SUBJECTS = (
    "a red ball",
    "a small dog",
    "a grey cat",
    "an old man in a long coat",
    "a little girl",
    "a delivery robot",
    "a tall waiter",
    "a young cyclist",
    "a nurse in a white uniform",
    "a brown rabbit",
    "a group of tourists",
    "a street musician",
)
_ACTIONS = (
    "walks slowly past",
    "rolls toward",
    "waits quietly beside",
    "runs in circles around",
    "stops for a moment near",
    "stares curiously at",
    "leans against",
    "hurries past",
)
_THINGS = (
    "door",
    "window",
    "bookshelf",
    "dining table",
    "staircase",
    "floor lamp",
    "sofa",
    "fountain",
    "mailbox",
    "bicycle rack",
    "vending machine",
    "coat stand",
)
_ADJECTIVES = ("blue", "red", "white", "black", "wooden", "glass", "metal", "dusty")
_ROOMS = (
    "kitchen",
    "hallway",
    "back yard",
    "garage",
    "library",
    "train station",
    "market square",
    "hotel lobby",
    "office",
    "city park",
)
_AMBIENTS = (
    "soft music plays from a radio in the corner",
    "rain taps gently against the tall windows",
    "a clock ticks steadily on the far wall",
    "the ceiling lights flicker once and then hold steady",
    "a phone rings somewhere in the distance",
    "people chat quietly at a table nearby",
    "a light breeze moves the curtains back and forth",
    "the smell of fresh bread drifts through the air",
)
_DETAILS = (
    "Nothing else in the scene changes for a while, and the room stays calm.",
    "The camera holds still for a moment before panning slowly to the left.",
    "A few dry leaves blow slowly across the floor and settle in a corner.",
    "Somebody laughs briefly off screen, and then it is quiet again.",
    "The shadows on the ground grow a little longer as the afternoon passes.",
    "A car passes by outside with its headlights on and its radio playing.",
)

_CODE_WORDS = ("lantern", "harbor", "violet", "compass", "meadow", "saffron", "glacier", "ember")
_WOMEN = ("Priya", "Ingrid", "Amara", "Mei", "Sofia", "Keiko")
_MEN = ("Tomas", "Kofi", "Rafael", "Dmitri", "Arjun", "Luca")
_HIDING_PLACES = (
    "under the flowerpot",
    "under the doormat",
    "under the piano",
    "under the garden bench",
)


@dataclass
class PlantedFact:
    """A fact written into one frame of a text stream.

    Attributes
    ----------
    frame : int
        Index of the frame holding the fact.
    kind : str
        ``code_word``, ``name``, ``number``, ``place`` or ``count`` (one of several repeats).
    sentence : str
        The fact as written, right after the frame's ``"Second i: "`` label.
    answer : str
        The answer a question about it expects.
    """

    frame: int
    kind: str
    sentence: str
    answer: str


@dataclass
class SyntheticTextStream:
    """Text frames with planted facts.

    Attributes
    ----------
    frames : list[str]
        ``T`` sentences; frame ``i`` starts with ``"Second i: "``.
    timestamps : np.ndarray
        ``(T,)`` float64 seconds, ``i`` (one frame per second, matching the labels).
    questions : list[SyntheticQuestion]
        ``questions[0]`` is the easy open-ended recall question "What is the secret code
        word?"; the rest follow sorted by ``end_time``.
    facts : list[PlantedFact]
        Every planted fact sentence, sorted by frame.
    seed : int
        Seed the stream was generated from.
    """

    frames: list[str]
    timestamps: np.ndarray
    questions: list[SyntheticQuestion]
    facts: list[PlantedFact]
    seed: int
    fps: float = 1.0

    def __len__(self) -> int:
        return len(self.frames)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def scene_sentence(rng: np.random.Generator, capital: bool = True) -> str:
    """One filler sentence: who does what, where, and what happens around it."""
    subject = _pick(rng, _SUBJECTS)
    if capital:
        subject = subject[0].upper() + subject[1:]
    return (
        f"{subject} {_pick(rng, _ACTIONS)} the {_pick(rng, _ADJECTIVES)} "
        f"{_pick(rng, _THINGS)} in the {_pick(rng, _ROOMS)}, while {_pick(rng, _AMBIENTS)}."
    )


def text_stream(num_frames: int, seed: int = 0) -> SyntheticTextStream:
    """Generate a text stream with planted facts and questions about them.

    Every frame is ``"Second i: "`` followed by either a fact sentence and a scene, or a
    scene and a closing detail. Filler frames run to roughly 40-60 tokens of a typical
    BPE tokenizer (about 48 on average with SmolLM2's), so a model adapter that cuts or
    pads each frame to ``N`` tokens mostly fills them with real text. A fact sentence
    comes right after the label and ends within the first 24 tokens of its frame (at most
    19 with SmolLM2's tokenizer for frame labels up to 9999), so cutting frames to any
    ``N >= 24`` tokens never cuts a fact.

    Planted facts, in order of priority when frames are scarce: the secret code word
    (always, placed in the first quarter so that asking at the end tests long-range
    memory), a woman's name, a number of boxes, a hiding place, and a yellow kite seen
    2-4 times (a counting question). Each takes its own frame; those that do not fit in
    ``num_frames`` are left out with their questions.

    Parameters
    ----------
    num_frames
        ``T >= 1``.
    seed
        Same seed, identical stream.

    Returns
    -------
    SyntheticTextStream
        Frames, timestamps ``(T,)``, facts and questions.
    """
    if num_frames < 1:
        raise ValueError(f"text_stream needs at least 1 frame, got {num_frames}")
    rng = np.random.default_rng(seed)

    code = _pick(rng, _CODE_WORDS)
    woman, man = _pick(rng, _WOMEN), _pick(rng, _MEN)
    boxes = int(rng.integers(3, 10))
    place = _pick(rng, _HIDING_PLACES)
    kites = int(rng.integers(2, 5))

    # (kind, sentence, answer, question, choices) in priority order.
    singles: list[tuple[str, str, str, str, list[str] | None]] = [
        (
            "code_word",
            f"The secret code word is '{code}'.",
            code,
            "What is the secret code word?",
            None,
        ),
        (
            "name",
            f"A woman named {woman} waves from the balcony.",
            woman,
            "What is the name of the woman who waved from the balcony?",
            multiple_choice(rng, woman, list(_WOMEN)),
        ),
        (
            "number",
            f"Exactly {boxes} green boxes are stacked by the front door.",
            str(boxes),
            "How many green boxes were stacked by the front door?",
            multiple_choice(rng, str(boxes), [str(n) for n in range(3, 10)]),
        ),
        (
            "place",
            f"{man} hides the silver key {place}.",
            place,
            f"Where did {man} hide the silver key?",
            multiple_choice(rng, place, list(_HIDING_PLACES)),
        ),
    ]
    singles = singles[: min(len(singles), num_frames)]
    use_kites = num_frames >= len(singles) + kites

    # Code word in the first quarter; every other planted sentence anywhere else.
    code_frame = int(rng.integers(max(1, num_frames // 4)))
    rest = [f for f in rng.permutation(num_frames).tolist() if f != code_frame]
    n_other = len(singles) - 1 + (kites if use_kites else 0)
    slots = [code_frame, *rest[:n_other]]

    facts: list[PlantedFact] = []
    questions: list[SyntheticQuestion] = []
    for (kind, sentence, answer, question, choices), frame in zip(singles, slots, strict=False):
        facts.append(PlantedFact(frame, kind, sentence, answer))
        questions.append(
            SyntheticQuestion(question, answer, choices, end_time_after(frame, 1.0), kind, frame, kind)
        )
    if use_kites:
        kite_frames = sorted(slots[len(singles) :])
        for frame in kite_frames:
            facts.append(
                PlantedFact(frame, "count", "A yellow kite drifts across the sky.", str(kites))
            )
        questions.append(
            SyntheticQuestion(
                "How many times did a yellow kite drift across the sky?",
                str(kites),
                ["1", "2", "3", "4", "5"],
                end_time_after(kite_frames[-1], 1.0),
                "count",
                kite_frames[-1],
                "count",
            )
        )

    by_frame = {f.frame: f for f in facts}
    frames = []
    for i in range(num_frames):
        fact = by_frame.get(i)
        if fact is None:
            frames.append(f"Second {i}: {scene_sentence(rng)} {_pick(rng, _DETAILS)}")
        else:
            # The fact comes first so that truncating the frame to N tokens keeps it.
            frames.append(f"Second {i}: {fact.sentence} Meanwhile, {scene_sentence(rng, capital=False)}")
    return SyntheticTextStream(
        frames=frames,
        timestamps=np.arange(num_frames, dtype=np.float64),
        questions=[questions[0], *sorted(questions[1:], key=lambda x: x.end_time)],
        facts=sorted(facts, key=lambda f: f.frame),
        seed=seed,
    )
