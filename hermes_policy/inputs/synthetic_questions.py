"""Questions with answers known by construction, shared by the synthetic streams.

Question timing: a question about the content of frame ``j`` gets
``end_time = (j + 0.5) / fps``, half a frame after that frame, so readers that keep frames
with ``timestamp <= end_time`` and those that keep ``timestamp < end_time`` both see frame
``j`` and not frame ``j + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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


def multiple_choice(
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


def end_time_after(frame: int, fps: float) -> float:
    """Half a frame after frame ``frame``: when a question about it is asked."""
    return (frame + 0.5) / fps
