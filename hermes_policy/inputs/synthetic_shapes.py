"""A synthetic video whose answers are known by construction: coloured shapes (circle,
square, triangle) moving on a plain background, drawn with numpy alone.

One shape appears partway through, another changes colour later; questions about colours,
counts, positions and the appearance follow from the drawn content
(:class:`~hermes_policy.inputs.synthetic_questions.SyntheticQuestion`). Reproducible from
a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hermes_policy.inputs.synthetic_questions import (
    SyntheticQuestion,
    end_time_after,
    multiple_choice,
)

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
        return SyntheticQuestion(text, answer, choices, end_time_after(frame, fps), kind, frame, subject)

    steady_state = video.objects_at(0)[SHAPES.index(steady.shape)]
    questions = [
        q(
            f"What color is the {steady.shape}?",
            steady.color,
            multiple_choice(rng, steady.color, colours),
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
            multiple_choice(rng, changer.color, colours),
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
            multiple_choice(rng, changer.color_at(last), colours),
            last,
            "color",
            changer.shape,
        ),
        q(
            f"What color was the {changer.shape} before it changed color?",
            changer.color,
            # The current colour is offered too: answering it means the past was forgotten.
            multiple_choice(rng, changer.color, colours, include=(changer.color_at(last),)),
            last,
            "color_change",
            changer.shape,
        ),
    ]
    # Stable sort: questions sharing an end_time keep the order written above.
    return sorted(questions, key=lambda x: x.end_time)
