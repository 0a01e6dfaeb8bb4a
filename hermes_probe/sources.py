"""What the probe streams: the built-in synthetic stream, video files, or an annotation file.

A :class:`ProbeStream` decodes its frames only when probed, so a folder of long videos is
never held in memory at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hermes_policy.errors import VideoInputError
from hermes_policy.inputs.annotations import load_annotations
from hermes_policy.inputs.synthetic_shapes import shapes_video
from hermes_policy.inputs.synthetic_text import text_stream
from hermes_policy.inputs.video import read_video
from hermes_policy.models.base import ModelAdapter

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")


@dataclass
class ProbeStream:
    """One stream to probe.

    Attributes
    ----------
    name : unique name (used to resume interrupted runs)
    load : returns ``(frames, timestamps)``; frames are ``(T, H, W, 3)`` uint8 or text frames
    questions : ``(ask after seconds, question)``; ``inf`` = after the whole stream
    """

    name: str
    load: Callable[[], tuple[Any, np.ndarray]]
    questions: list[tuple[float, str]] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.identity:
            self.identity = {"name": self.name}

    @property
    def key(self) -> str:
        """What a resumed run compares: the same file given by another path (relative,
        absolute, through a link) has the same key, a file changed since has another."""
        return json.dumps(self.identity, sort_keys=True)


def file_identity(path: Path) -> dict[str, Any]:
    """A video file's identity: resolved path, size and modification time."""
    resolved = path.resolve()
    try:
        stat = resolved.stat()
    except OSError as exc:
        raise VideoInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def synthetic_streams(adapter: ModelAdapter, num_frames: int, seed: int = 0) -> list[ProbeStream]:
    """The built-in stream: text frames for text-only models, moving shapes otherwise."""
    if adapter.is_text_only:
        def load_text() -> tuple[Any, np.ndarray]:
            stream = text_stream(num_frames, seed=seed)
            return stream.frames, np.asarray(stream.timestamps, dtype=np.float64)

        return [ProbeStream(f"synthetic-text-{num_frames}-seed{seed}", load_text)]

    def load_video() -> tuple[Any, np.ndarray]:
        video = shapes_video(num_frames, seed=seed)
        return video.frames, np.asarray(video.timestamps, dtype=np.float64)

    return [ProbeStream(f"synthetic-shapes-{num_frames}-seed{seed}", load_video)]


def _video_loader(path: Path, fps: float) -> Callable[[], tuple[Any, np.ndarray]]:
    def load() -> tuple[Any, np.ndarray]:
        video = read_video(path, fps=fps, cap_at_source_rate=True)
        return video.frames, np.asarray(video.timestamps, dtype=np.float64)

    return load


def video_streams(path: str | Path, fps: float) -> list[ProbeStream]:
    """A video file, or every video in a folder (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not files:
            raise VideoInputError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) in folder {path}")
    elif path.is_file():
        files = [path]
    else:
        raise VideoInputError(f"video path not found: {path}")
    return [ProbeStream(str(f), _video_loader(f, fps), identity=file_identity(f)) for f in files]


def annotation_streams(path: str | Path, fps: float, video_root: str | Path | None = None) -> list[ProbeStream]:
    """One stream per annotated video, probed with the dataset's own questions at their times."""
    streams = []
    for entry in load_annotations(path, video_root):
        questions = [(q.ask_after, q.question) for q in entry.questions]
        video_path = Path(entry.video_path)
        identity = {"video_id": entry.video_id}
        if video_path.is_file():  # a missing video fails when probed, with its reason
            identity.update(file_identity(video_path))
        streams.append(ProbeStream(entry.video_id, _video_loader(video_path, fps), questions, identity))
    return streams


def question_due(ask_after: float, now: float, finished: bool) -> bool:
    return finished if math.isinf(ask_after) else ask_after <= now
