"""Drive a session over a whole input: frames in time order, each question at its time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # type hints only: playback drives a session it is handed
    from hermes_policy.session import Answer, StreamingSession


@dataclass
class TimedQuestion:
    """A question asked once the stream has passed ``at`` seconds (inf: at the end)."""

    question: str
    at: float = math.inf
    expected: str | None = None


def stream_with_questions(
    session: StreamingSession,
    frames: Any,
    timestamps: np.ndarray,
    questions: list[TimedQuestion],
    max_new_tokens: int | None = None,
) -> list[tuple[TimedQuestion, Answer]]:
    """Stream ``frames`` chunk by chunk and ask each question as soon as its time has come.

    A question at time ``t`` is asked after every frame with timestamp ``<= t`` has been
    ingested (a partial chunk is flushed first, as :meth:`StreamingSession.ask` does).
    """
    pending = sorted(questions, key=lambda q: q.at)
    results = []
    n = len(frames)
    index = 0
    while index < n:
        # ingest up to the next question's time, or everything
        limit = pending[0].at if pending else math.inf
        end = index
        while end < n and timestamps[end] <= limit:
            end += 1
        if end > index:
            session.add_frames(frames[index:end], timestamps=[float(t) for t in timestamps[index:end]])
            index = end
        while pending and (index >= n or timestamps[index] > pending[0].at):
            question = pending.pop(0)
            results.append((question, session.ask(question.question, max_new_tokens)))
        if not pending and index >= n:
            break
    for question in pending:  # questions after the end
        results.append((question, session.ask(question.question, max_new_tokens)))
    return results


def stream_chunks_with_questions(
    session: StreamingSession,
    chunks: Iterable[Any],
    questions: list[TimedQuestion],
    max_new_tokens: int | None = None,
    on_frames: Callable[[int], None] | None = None,
) -> list[tuple[TimedQuestion, Answer]]:
    """:func:`stream_with_questions` over lazily decoded chunks (objects with ``frames`` and
    ``timestamps``, e.g. from :func:`hermes_policy.inputs.video.iter_video_chunks`).

    One chunk is decoded ahead: a question is due within the current chunk when it comes
    before the next chunk's first frame, so every question is asked at the same point as
    with the whole video in memory, while memory holds two chunks, not the video.
    ``on_frames(n)`` is called after each chunk with the frames it held (for progress).
    """
    pending = sorted(questions, key=lambda q: q.at)
    results: list[tuple[TimedQuestion, Answer]] = []
    iterator = iter(chunks)
    current = next(iterator, None)
    while current is not None:
        upcoming = next(iterator, None)
        horizon = float(upcoming.timestamps[0]) if upcoming is not None else math.inf
        due = [q for q in pending if q.at < horizon]
        pending = pending[len(due):]
        results += stream_with_questions(session, current.frames, np.asarray(current.timestamps), due,
                                         max_new_tokens)
        if on_frames is not None:
            on_frames(len(current.frames))
        current = upcoming
    for question in pending:  # only when there were no frames at all
        results.append((question, session.ask(question.question, max_new_tokens)))
    return results
