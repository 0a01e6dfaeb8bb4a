"""Deterministic synthetic streams whose answers are known by construction.

Two kinds of stream, both reproducible from a seed:

* :func:`shapes_video`: coloured shapes (circle, square, triangle) moving on a plain
  background, drawn with numpy alone. One shape appears partway through, another changes
  colour later; questions about colours, counts, positions and the appearance follow from
  the drawn content.
* :func:`text_stream`: one scene-description sentence per "frame" for text-only LLMs, with
  planted facts (a code word, a name, a number, a hiding place, a repeated event) and
  questions whose answers are those facts.

:func:`write_synthetic_benchmark` writes shapes videos as mp4 plus a streaming-QA
annotation JSON in the common format (docs/annotations.md), to exercise benchmark code
without downloading anything.

Question timing: a question about the content of frame ``j`` gets
``end_time = (j + 0.5) / fps``, half a frame after that frame, so readers that keep frames
with ``timestamp <= end_time`` and those that keep ``timestamp < end_time`` both see frame
``j`` and not frame ``j + 1``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hermes_policy.fileio.atomic import write_text_atomic

SHAPES = ("circle", "square", "triangle")

# Saturated, well-separated colours so they survive yuv420p video compression and can be
# told apart by nearest-colour matching.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
BACKGROUND = (235, 235, 235)
LANES = ("top", "middle", "bottom")


@dataclass
class SyntheticQuestion:
    """A question with a known answer about a synthetic stream.

    Attributes
    ----------
    question : str
        The question text.
    answer : str
        The right answer; for multiple choice it is one of ``choices`` verbatim.
    choices : list[str] | None
        Options for multiple choice, None for an open-ended question.
    end_time : float
        Seconds: ask once the stream has been seen up to this time.
    kind : str
        Question type (``color``, ``count``, ``appear``, ``position``, ``color_change`` for
        videos; ``code_word``, ``name``, ``number``, ``place``, ``count`` for text).
    frame : int
        Index of the last frame the answer depends on (``end_time`` is half a frame later).
    subject : str | None
        The shape (video) or fact (text) the question is about.
    """

    question: str
    answer: str
    choices: list[str] | None
    end_time: float
    kind: str
    frame: int = 0
    subject: str | None = None

    def to_conversation(self) -> dict[str, Any]:
        """This question as one entry of a streaming-QA annotation's ``conversations``."""
        entry: dict[str, Any] = {"question": self.question}
        if self.choices is not None:
            entry["choices"] = list(self.choices)
        entry["answer"] = self.answer
        entry["end_time"] = round(self.end_time, 6)
        entry["task"] = self.kind
        return entry


@dataclass
class ShapeState:
    """Where one object is and how it looks in one frame (pixel coordinates)."""

    shape: str
    color: str
    center: tuple[int, int]  # (y, x)
    radius: int
    visible: bool
    lane: str


@dataclass
class _Track:
    """One object's script: fixed lane, bouncing horizontal motion, optional events."""

    shape: str
    color: str
    lane: int
    x0: float
    speed: float  # pixels per frame, signed
    appear_frame: int = 0
    change_frame: int | None = None
    new_color: str | None = None

    def color_at(self, frame: int) -> str:
        if self.change_frame is not None and frame >= self.change_frame:
            assert self.new_color is not None
            return self.new_color
        return self.color


@dataclass
class SyntheticVideo:
    """A rendered shapes video with its script and questions.

    Attributes
    ----------
    frames : np.ndarray
        ``(T, H, W, 3)`` uint8 RGB.
    timestamps : np.ndarray
        ``(T,)`` float64 seconds, ``i / fps``.
    fps : float
        Frame rate.
    questions : list[SyntheticQuestion]
        Questions sorted by ``end_time`` (the order a streaming benchmark asks them).
    seed : int
        Seed the video was generated from.
    appear_frame : int
        First frame in which the late shape is visible.
    change_frame : int
        First frame in which the colour-changing shape has its new colour.
    """

    frames: np.ndarray
    timestamps: np.ndarray
    fps: float
    questions: list[SyntheticQuestion]
    seed: int
    appear_frame: int
    change_frame: int
    _tracks: list[_Track] = field(repr=False, default_factory=list)

    @property
    def duration(self) -> float:
        """Length in seconds (``T / fps``)."""
        return self.frames.shape[0] / self.fps

    def objects_at(self, frame: int) -> list[ShapeState]:
        """The state of every object in ``frame`` (hidden ones have ``visible=False``)."""
        height, width = self.frames.shape[1:3]
        return [_state(tr, frame, height, width) for tr in self._tracks]


def _geometry(height: int, width: int) -> tuple[int, float, float]:
    """Object radius and the horizontal range its centre may travel, ``(r, lo, hi)``.

    Each object lives in its own third of the height, so objects never overlap and the
    colour under an object's centre is always that object's colour.
    """
    radius = max(2, int(min(height / 6, width / 6) * 0.8))
    return radius, float(radius + 1), float(width - radius - 2)


def _bounce(x0: float, speed: float, frame: int, lo: float, hi: float) -> float:
    """Position after ``frame`` steps of constant speed, reflecting off ``lo`` and ``hi``."""
    span = hi - lo
    if span <= 0:
        return lo
    u = (x0 - lo + speed * frame) % (2 * span)
    return lo + (u if u <= span else 2 * span - u)


def _state(track: _Track, frame: int, height: int, width: int) -> ShapeState:
    radius, lo, hi = _geometry(height, width)
    cy = int(round(height * (2 * track.lane + 1) / 6))
    cx = int(round(_bounce(track.x0, track.speed, frame, lo, hi)))
    return ShapeState(
        shape=track.shape,
        color=track.color_at(frame),
        center=(cy, cx),
        radius=radius,
        visible=frame >= track.appear_frame,
        lane=LANES[track.lane],
    )


def shape_mask(
    shape: str, center: tuple[int, int], radius: int, height: int, width: int
) -> np.ndarray:
    """Boolean ``(H, W)`` mask of a shape; the centre pixel is always inside.

    The triangle points up, apex ``radius`` above the centre, base ``radius`` below and
    ``2 * radius`` wide; the square has half-side ``0.85 * radius`` so its area is close to
    the circle's.
    """
    yy, xx = np.ogrid[:height, :width]
    cy, cx = center
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= radius * radius
    if shape == "square":
        half = 0.85 * radius
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "triangle":
        # Half-width grows linearly from 0 at the apex (dy = -r) to r at the base (dy = r).
        return (dy >= -radius) & (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_frame(states: list[ShapeState], height: int, width: int) -> np.ndarray:
    """Draw visible objects on the background: ``(H, W, 3)`` uint8 RGB."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for st in states:
        if st.visible:
            img[shape_mask(st.shape, st.center, st.radius, height, width)] = PALETTE[st.color]
    return img


def _choices(
    rng: np.random.Generator,
    answer: str,
    pool: list[str],
    n: int = 4,
    include: tuple[str, ...] = (),
) -> list[str]:
    """``n`` options: ``answer``, the ``include`` distractors, the rest drawn from ``pool``.

    Returned in shuffled order, so the answer's position carries no information.
    """
    others = [p for p in pool if p != answer and p not in include]
    picked = [others[i] for i in rng.permutation(len(others))[: n - 1 - len(include)]]
    options = [answer, *include, *picked]
    return [options[i] for i in rng.permutation(len(options))]


def _end_time(frame: int, fps: float) -> float:
    return (frame + 0.5) / fps


def shapes_video(
    num_frames: int,
    height: int = 224,
    width: int = 224,
    fps: float = 1.0,
    seed: int = 0,
) -> SyntheticVideo:
    """Render a video of three moving shapes with two scripted events.

    A circle, a square and a triangle each move left and right (bouncing) in their own
    horizontal lane (top, middle, bottom). Their colours, lanes, start positions and speeds
    come from ``seed``. One shape is hidden until ``appear_frame = max(1, T // 3)``;
    another turns to a colour no other shape has at ``change_frame = max(appear_frame + 1,
    2 * T // 3)``.

    Parameters
    ----------
    num_frames
        ``T``, at least 3 (one frame before each event).
    height, width
        Frame size in pixels; both at least 24 (and even, to be writable as yuv420p video).
    fps
        Frame rate; frame ``i`` is at ``i / fps`` seconds.
    seed
        Same seed, identical video and questions.

    Returns
    -------
    SyntheticVideo
        ``frames`` ``(T, H, W, 3)`` uint8, ``timestamps`` ``(T,)`` and the questions.
    """
    if num_frames < 3:
        raise ValueError(f"shapes_video needs at least 3 frames for its events, got {num_frames}")
    if height < 24 or width < 24:
        raise ValueError(f"frames must be at least 24x24 pixels, got {height}x{width}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    rng = np.random.default_rng(seed)
    _, lo, hi = _geometry(height, width)

    names = list(PALETTE)
    colour_order = [names[i] for i in rng.permutation(len(names))]
    # Three starting colours, plus a fourth, unused one to change to.
    base_colours, change_to = colour_order[:3], colour_order[3]
    lanes = rng.permutation(3)
    tracks = [
        _Track(
            shape=shape,
            color=base_colours[i],
            lane=int(lanes[i]),
            x0=float(rng.uniform(lo, hi)),
            speed=float(rng.uniform(0.04, 0.12) * width * rng.choice([-1, 1])),
        )
        for i, shape in enumerate(SHAPES)
    ]
    appear_frame = max(1, num_frames // 3)
    change_frame = max(appear_frame + 1, (2 * num_frames) // 3)
    late, changer, steady = (int(i) for i in rng.permutation(3))
    tracks[late].appear_frame = appear_frame
    tracks[changer].change_frame = change_frame
    tracks[changer].new_color = change_to

    frames = np.stack(
        [
            render_frame([_state(tr, f, height, width) for tr in tracks], height, width)
            for f in range(num_frames)
        ]
    )
    video = SyntheticVideo(
        frames=frames,
        timestamps=np.arange(num_frames, dtype=np.float64) / fps,
        fps=float(fps),
        questions=[],
        seed=seed,
        appear_frame=appear_frame,
        change_frame=change_frame,
        _tracks=tracks,
    )
    video.questions = _shape_questions(
        video, rng, tracks[late], tracks[changer], tracks[steady], appear_frame, change_frame
    )
    return video


def _shape_questions(
    video: SyntheticVideo,
    rng: np.random.Generator,
    late: _Track,
    changer: _Track,
    steady: _Track,
    appear_frame: int,
    change_frame: int,
) -> list[SyntheticQuestion]:
    """Questions whose answers are read off the script, sorted by ``end_time``."""
    fps, last = video.fps, video.frames.shape[0] - 1
    colours, numbers = list(PALETTE), ["1", "2", "3", "4"]

    def q(
        text: str, answer: str, choices: list[str] | None, frame: int, kind: str, subject: str
    ) -> SyntheticQuestion:
        return SyntheticQuestion(text, answer, choices, _end_time(frame, fps), kind, frame, subject)

    steady_state = video.objects_at(0)[SHAPES.index(steady.shape)]
    questions = [
        q(
            f"What color is the {steady.shape}?",
            steady.color,
            _choices(rng, steady.color, colours),
            0,
            "color",
            steady.shape,
        ),
        q(
            f"Is the {steady.color} {steady.shape} at the top, middle or bottom of the frame?",
            steady_state.lane,
            list(LANES),
            0,
            "position",
            steady.shape,
        ),
        q("How many shapes are on screen now?", "2", numbers, appear_frame - 1, "count", None),
        q(
            f"What color is the {changer.shape} now?",
            changer.color,
            _choices(rng, changer.color, colours),
            change_frame - 1,
            "color",
            changer.shape,
        ),
        q(
            "Which shape appeared after the video had started?",
            late.shape,
            list(SHAPES),
            min(appear_frame + 1, last),
            "appear",
            late.shape,
        ),
        q("How many shapes are on screen now?", "3", numbers, last, "count", None),
        q(
            f"What color is the {changer.shape} now?",
            changer.color_at(last),
            _choices(rng, changer.color_at(last), colours),
            last,
            "color",
            changer.shape,
        ),
        q(
            f"What color was the {changer.shape} before it changed color?",
            changer.color,
            # The current colour is offered too: answering it means the past was forgotten.
            _choices(rng, changer.color, colours, include=(changer.color_at(last),)),
            last,
            "color_change",
            changer.shape,
        ),
    ]
    # Stable sort: questions sharing an end_time keep the order written above.
    return sorted(questions, key=lambda x: x.end_time)


# ---------------------------------------------------------------------------------------
# Text streams
# ---------------------------------------------------------------------------------------

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


def _scene(rng: np.random.Generator, capital: bool = True) -> str:
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
            _choices(rng, woman, list(_WOMEN)),
        ),
        (
            "number",
            f"Exactly {boxes} green boxes are stacked by the front door.",
            str(boxes),
            "How many green boxes were stacked by the front door?",
            _choices(rng, str(boxes), [str(n) for n in range(3, 10)]),
        ),
        (
            "place",
            f"{man} hides the silver key {place}.",
            place,
            f"Where did {man} hide the silver key?",
            _choices(rng, place, list(_HIDING_PLACES)),
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
            SyntheticQuestion(question, answer, choices, _end_time(frame, 1.0), kind, frame, kind)
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
                _end_time(kite_frames[-1], 1.0),
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
            frames.append(f"Second {i}: {_scene(rng)} {_pick(rng, _DETAILS)}")
        else:
            # The fact comes first so that truncating the frame to N tokens keeps it.
            frames.append(f"Second {i}: {fact.sentence} Meanwhile, {_scene(rng, capital=False)}")
    return SyntheticTextStream(
        frames=frames,
        timestamps=np.arange(num_frames, dtype=np.float64),
        questions=[questions[0], *sorted(questions[1:], key=lambda x: x.end_time)],
        facts=sorted(facts, key=lambda f: f.frame),
        seed=seed,
    )


# ---------------------------------------------------------------------------------------
# Benchmark files
# ---------------------------------------------------------------------------------------


def write_synthetic_benchmark(
    folder: str | os.PathLike[str],
    num_videos: int = 2,
    num_frames: int = 12,
    fps: float = 1.0,
    height: int = 224,
    width: int = 224,
    seed: int = 0,
) -> Path:
    """Write shapes videos and a streaming-QA annotation file.

    Layout: ``folder/videos/synthetic_000.mp4``, ... and ``folder/annotations.json``, a
    JSON list with one entry per video::

        {"video_id": "synthetic_000", "video_path": "videos/synthetic_000.mp4",
         "duration": T / fps,
         "conversations": [{"question": ..., "choices": [...] (multiple choice only),
                            "answer": ..., "end_time": seconds, "task": kind}, ...]}

    ``video_path`` is relative to the folder holding the annotation file. Conversations
    are in time order. Video ``i`` uses seed ``seed + i``. Every file is written
    atomically (temporary name, then ``os.replace``).

    Parameters
    ----------
    folder
        Output folder (created if missing).
    num_videos
        Number of videos.
    num_frames, fps, height, width
        Passed to :func:`shapes_video` (``height`` and ``width`` even).
    seed
        Seed of the first video.

    Returns
    -------
    Path
        The annotation file.
    """
    from hermes_policy.inputs.video import write_video

    if num_videos < 1:
        raise ValueError(f"num_videos must be at least 1, got {num_videos}")
    root = Path(folder)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(num_videos):
        video = shapes_video(num_frames, height=height, width=width, fps=fps, seed=seed + i)
        video_id = f"synthetic_{i:03d}"
        rel = f"videos/{video_id}.mp4"
        write_video(root / rel, video.frames, fps)
        entries.append(
            {
                "video_id": video_id,
                "video_path": rel,
                "duration": round(video.duration, 6),
                "conversations": [q.to_conversation() for q in video.questions],
            }
        )
    annotation = root / "annotations.json"
    write_text_atomic(annotation, json.dumps(entries, indent=2) + "\n")
    return annotation
