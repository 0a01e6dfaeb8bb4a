"""Streaming-QA annotation files (the format used by StreamingBench, OVO-Bench, RVS, ...).

A JSON list of videos::

    [{"video_id": "...", "video_path": "...mp4", "duration": 120.0,
      "conversations": [{"question": "...", "choices": ["..", ".."], "answer": "..",
                         "end_time": 30.0, "start_time": 0.0, "task": ".."}]}]

``choices`` only for multiple choice (then ``answer`` is the text of the right choice, or
its letter); ``end_time`` absent means "ask after the whole video"; ``question_type`` is
accepted for ``task``. Relative video paths are resolved against ``video_root`` when given,
else against the annotation file's folder. Every problem raises :class:`AnnotationError`
naming the entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes_policy.errors import HermesError
from hermes_policy.fileio.json_input import load_json_file


class AnnotationError(HermesError):
    """An annotation file is missing, not JSON, or has a malformed entry."""


@dataclass(frozen=True)
class Question:
    question: str
    answer: str | None
    choices: tuple[str, ...] | None = None
    end_time: float | None = None
    start_time: float | None = None
    task: str | None = None

    @property
    def ask_after(self) -> float:
        """Stream time after which the question is asked (inf = after the whole video)."""
        return math.inf if self.end_time is None else self.end_time


@dataclass(frozen=True)
class VideoEntry:
    video_id: str
    video_path: Path
    duration: float | None
    questions: tuple[Question, ...]


def _text(value: Any, where: str, key: str, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise AnnotationError(f"{where} is missing {key!r}")
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise AnnotationError(f"{where}: {key!r} must be text")
    return str(value)


def _time(value: Any, where: str, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
        raise AnnotationError(f"{where}: {key!r} must be a non-negative number of seconds, got {value!r}")
    return float(value)


def parse_entry(entry: Any, index: int, base: Path) -> VideoEntry:
    where = f"entry {index}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where} must be an object")
    video_id = _text(entry.get("video_id", entry.get("id")), where, "video_id")
    where = f"entry {index} (video_id {video_id!r})"
    path_text = _text(entry.get("video_path", entry.get("video")), where, "video_path")
    path = Path(path_text)
    if not path.is_absolute():
        path = base / path
    conversations = entry.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise AnnotationError(f"{where} needs a non-empty list 'conversations'")
    questions = []
    for j, conv in enumerate(conversations):
        at = f"{where}, conversation {j}"
        if not isinstance(conv, dict):
            raise AnnotationError(f"{at} must be an object")
        choices = conv.get("choices", conv.get("options"))
        if choices is not None:
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise AnnotationError(f"{at}: 'choices' must be a list of at least two strings")
            choices = tuple(choices)
        question = Question(
            question=_text(conv.get("question"), at, "question"),
            answer=_text(conv.get("answer"), at, "answer", required=False),
            choices=choices,
            end_time=_time(conv.get("end_time"), at, "end_time"),
            start_time=_time(conv.get("start_time"), at, "start_time"),
            task=_text(conv.get("task", conv.get("question_type")), at, "task", required=False),
        )
        if not question.question.strip():
            raise AnnotationError(f"{at}: 'question' is empty")
        questions.append(question)
    return VideoEntry(
        video_id=video_id,
        video_path=path,
        duration=_time(entry.get("duration"), where, "duration"),
        questions=tuple(sorted(questions, key=lambda q: q.ask_after)),
    )


def load_annotations(path: str | Path, video_root: str | Path | None = None) -> list[VideoEntry]:
    """Parse and validate an annotation file; questions of each video sorted by time."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    data = load_json_file(path, error=AnnotationError)
    if isinstance(data, dict) and isinstance(data.get("videos"), list):
        data = data["videos"]
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: expected a JSON list of videos")
    if not data:
        raise AnnotationError(f"{path} holds no videos")
    base = Path(video_root) if video_root is not None else path.parent
    try:
        return [parse_entry(entry, i, base) for i, entry in enumerate(data)]
    except AnnotationError as exc:
        raise AnnotationError(f"{path}: {exc}") from None
