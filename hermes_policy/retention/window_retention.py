"""``window``: no memory at all; each question re-prefills the last N frames (SimpleStream).

SimpleStream (arXiv 2604.02317) argues that a recent window, prefilled fresh at each
question, is a strong baseline for streaming video QA. Between questions frames are only
buffered (the last N, nothing is prefilled); when a question arrives the cache is cut back
to the system prefix and the buffered frames are encoded and prefilled on it, in the
stream's own chunks (frames ``c * chunk_frames ... (c + 1) * chunk_frames - 1`` form one
piece, so a window covering the whole stream is prefilled exactly as ``full`` prefilled
it), at positions starting right after the prefix. The window's tokens then stay until
frames arrive and the next question rebuilds them, so repeated questions on an unchanged
stream pay the prefill once. The vision encoding and the prefill are part of the
question's time to first token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from hermes_policy.cache.kv_store import KVStore
from hermes_policy.errors import RetentionError
from hermes_policy.models.base import ModelAdapter, StreamPiece
from hermes_policy.retention.base import (
    LayerKeep,
    QuestionTimeMemory,
    ReindexMode,
    RetentionRule,
    SelectContext,
)


@dataclass
class WindowRetention(RetentionRule):
    """Re-prefill the last ``frames`` frames at every question.

    Parameters
    ----------
    frames : frames in the window (SimpleStream's headline uses 4)
    reuse : keep the window's prefill for the next question when no frame arrived since;
        False re-prefills at every question, as on a live stream where frames keep
        arriving between questions (the efficiency benchmark measures that case)
    """

    name = "window"
    frames: int = 4
    reuse: bool = True
    reindex: ReindexMode = "never"

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        return {}  # nothing is prefilled between questions, so nothing is ever evicted

    def validate(self, adapter: ModelAdapter) -> None:
        if self.frames < 1:
            raise RetentionError(f"the window needs at least 1 frame, got {self.frames}")

    def question_memory(self, adapter: ModelAdapter, chunk_frames: int) -> WindowMemory:
        return WindowMemory(self.frames, chunk_frames, self.reuse)


def window_chunks(indices: list[int], chunk_frames: int) -> list[tuple[int, int]]:
    """Split consecutive frame indices at the stream's chunk boundaries.

    Returns ``(start, stop)`` positions into ``indices`` of each piece, in order.
    """
    pieces: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] // chunk_frames != indices[start] // chunk_frames:
            pieces.append((start, i))
            start = i
    return pieces


class WindowMemory(QuestionTimeMemory):
    """The last ``size`` frames, with their timestamps and stream indices."""

    buffers_frames = True

    def __init__(self, size: int, chunk_frames: int, reuse: bool = True):
        self.chunk_frames = chunk_frames
        self.reuse = reuse
        self._frames: deque[tuple[Any, float | None, int]] = deque(maxlen=size)
        self._built_for: int | None = None  # frames seen when the cache was last built

    def buffer_frames(self, frames: list, times: list[float | None], first_frame: int) -> None:
        for offset, (frame, time) in enumerate(zip(frames, times)):
            self._frames.append((frame, time, first_frame + offset))

    def before_question(self, session: Any, question: StreamPiece) -> None:
        if self.reuse and self._built_for == session.frames_seen:
            return
        store = session.store
        store.truncate([store.prefix_len] * store.num_layers)
        buffered = list(self._frames)
        indices = [index for _, _, index in buffered]
        for start, stop in window_chunks(indices, self.chunk_frames):
            part = buffered[start:stop]
            session.prefill_frames([f for f, _, _ in part], [t for _, t, _ in part], part[0][2])
        self._built_for = session.frames_seen

    def nbytes(self) -> int:
        return sum(getattr(frame, "nbytes", 0) for frame, _, _ in self._frames)
