"""The summary of an evaluation: accuracy overall, per task and per video length; costs.

Accuracy counts only scored questions: multiple-choice ones (an unparseable output is
scored wrong) and open-ended ones with a reference answer (scored by the judge).
Open-ended questions without a reference are answered but not scored.

VideoMME length split
    VideoMME's own categories are short (< 2 min), medium (4-15 min) and long (30-60 min),
    with gaps between them. Here the classes are contiguous so that every video of any
    benchmark lands in one: **short < 4 min (240 s) <= medium < 30 min (1800 s) <= long**.
    Every VideoMME video falls in its official category under these thresholds. The video's
    ``duration`` comes from the annotation file; questions of videos without one are
    counted under ``unknown_duration``, and the split is omitted (null) when no video has a
    duration.

Perception / memory split
    A question is *perception* when the last few frames suffice to answer it, *memory* when
    it needs older ones; a rule that keeps only a recent window (``window``) can answer the
    first kind only. :func:`question_need` decides from the annotation: with an evidence
    span (``start_time``, asked at ``end_time``) by whether the span lies within the
    perception window before the question; a question asked mid-stream without a span is
    taken as a real-time question about what is on screen (perception); one asked after the
    whole video is memory unless the video is no longer than the window. The window
    defaults to SimpleStream's 4 frames at the run's frame rate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

SPLIT_THRESHOLDS_S = {"medium": 240.0, "long": 1800.0}
SUMMARY_SCHEMA = "hermes-eval-summary/1"


def duration_class(duration: float | None) -> str | None:
    """``short``, ``medium`` or ``long`` (see the module docstring); None without a duration."""
    if duration is None:
        return None
    if duration < SPLIT_THRESHOLDS_S["medium"]:
        return "short"
    if duration < SPLIT_THRESHOLDS_S["long"]:
        return "medium"
    return "long"


def question_need(
    start_time: float | None, end_time: float | None, duration: float | None, window_s: float
) -> str:
    """``"perception"`` or ``"memory"`` (see the module docstring)."""
    if start_time is not None and end_time is not None:
        return "perception" if end_time - start_time <= window_s else "memory"
    if end_time is not None:
        return "perception"
    return "perception" if duration is not None and duration <= window_s else "memory"


def _mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def accuracy_block(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and accuracy of a group of records."""
    scored = [r for r in records if r.get("correct") is not None]
    correct = sum(1 for r in scored if r["correct"])
    return {
        "questions": len(records),
        "scored": len(scored),
        "correct": correct,
        "accuracy": correct / len(scored) if scored else None,
        "unparseable": sum(1 for r in records if r.get("unparseable")),
    }


def summarize(
    records: list[dict[str, Any]],
    *,
    selected: int,
    config: dict[str, Any],
    failed: list[dict[str, Any]],
) -> dict[str, Any]:
    """The summary of ``records`` (the answered questions among ``selected`` ones)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record.get("task") or "untyped"].append(record)
    split = None
    if any(r.get("duration") is not None for r in records):
        groups: dict[str, list[dict[str, Any]]] = {"short": [], "medium": [], "long": []}
        unknown = 0
        for record in records:
            kind = duration_class(record.get("duration"))
            if kind is None:
                unknown += 1
            else:
                groups[kind].append(record)
        split = {
            "thresholds_s": {"short": f"< {SPLIT_THRESHOLDS_S['medium']:g}",
                             "medium": f"[{SPLIT_THRESHOLDS_S['medium']:g}, {SPLIT_THRESHOLDS_S['long']:g})",
                             "long": f">= {SPLIT_THRESHOLDS_S['long']:g}"},
            **{name: accuracy_block(group) for name, group in groups.items()},
            "unknown_duration": unknown,
        }
    peaks = [r.get("peak_memory_bytes") for r in records if r.get("peak_memory_bytes") is not None]
    return {
        "schema": SUMMARY_SCHEMA,
        "config": config,
        "selected_questions": selected,
        "answered": len(records),
        "not_answered": selected - len(records),
        **{k: v for k, v in accuracy_block(records).items() if k != "questions"},
        "per_task": {task: accuracy_block(group) for task, group in sorted(by_task.items())},
        "videomme_split": split,
        "by_need": {need: accuracy_block([r for r in records if r.get("need") == need])
                    for need in ("perception", "memory")},
        "ttft_ms_mean": _mean(r.get("ttft_ms") for r in records),
        "tpot_ms_mean": _mean(r.get("tpot_ms") for r in records),
        "peak_memory_bytes_max": max(peaks) if peaks else None,
        "peak_memory_bytes_mean": _mean(peaks),
        "tokens_kept_max": max((r.get("tokens_kept_max") or 0 for r in records), default=None),
        "failed_videos": failed,
    }
