"""The results files of an evaluation run: one JSON object per answered question.

Layout of an output folder::

    config.json          the settings the answers depend on (checked on resume)
    results.jsonl        every answered question, in benchmark order once a run finishes
    shards/rank<r>.jsonl one rank's answers while a distributed run is going on
    summary.json         accuracies and costs (see summary.py)

A record is identified by ``(video_id, question_index)``: the question's position among
its video's questions in time order (as :func:`~hermes_policy.inputs.annotations.load_annotations`
sorts them). Lines are appended and flushed (and fsynced) one at a time, so an interrupted
run loses at most the line being written; a torn last line is cut off when the file is next
opened for appending, and ignored when read.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
SHARD_DIR = "shards"

Key = tuple[str, int]


def record_key(record: dict[str, Any]) -> Key:
    return str(record["video_id"]), int(record["question_index"])


def shard_path(out_dir: Path, rank: int) -> Path:
    return out_dir / SHARD_DIR / f"rank{rank}.jsonl"


def shard_paths(out_dir: Path) -> list[Path]:
    """Shard files present in ``out_dir`` (from this run or an interrupted earlier one)."""
    folder = out_dir / SHARD_DIR
    return sorted(folder.glob("rank*.jsonl")) if folder.is_dir() else []


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of one JSONL file; a missing file is empty, unreadable lines are skipped."""
    if not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                record_key(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn line from an interrupted write
            records.append(record)
    return records


def read_all(out_dir: Path) -> dict[Key, dict[str, Any]]:
    """Every record of the results file and all shards; the first one of a key wins."""
    found: dict[Key, dict[str, Any]] = {}
    for path in [out_dir / RESULTS_FILE, *shard_paths(out_dir)]:
        for record in read_records(path):
            found.setdefault(record_key(record), record)
    return found


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line that has no newline (the write was interrupted)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        data = handle.read()
        handle.truncate(data.rfind(b"\n") + 1)


class ResultsWriter:
    """Appends records to one JSONL file, one flushed and fsynced line at a time."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(path)
        self._handle: IO[str] | None = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        assert self._handle is not None, "writer is closed"
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_text_atomic(path: Path, text: str) -> None:
    """Write next to the destination, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def merge_results(out_dir: Path, order: Iterable[str]) -> list[dict[str, Any]]:
    """Fold the shards into ``results.jsonl``, sorted by video (``order``) and question.

    The merged file replaces the old one atomically before the shards are removed, so an
    interruption at any point loses nothing. Videos not in ``order`` go last, by id.
    Returns the merged records.
    """
    rank = {video_id: i for i, video_id in enumerate(order)}
    records = list(read_all(out_dir).values())
    records.sort(key=lambda r: (rank.get(str(r["video_id"]), len(rank)), str(r["video_id"]),
                                int(r["question_index"])))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(out_dir / RESULTS_FILE, text)
    for path in shard_paths(out_dir):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # only when empty
        (out_dir / SHARD_DIR).rmdir()
    return records
