"""Evaluation results files, their merge, the summary and the sharding context (no model)."""

from __future__ import annotations

import json

import pytest

from hermes_policy.evaluation import distributed
from hermes_policy.evaluation.results import (
    RESULTS_FILE,
    ResultsWriter,
    merge_results,
    read_all,
    read_records,
    shard_path,
)
from hermes_policy.evaluation.summary import duration_class, summarize


def rec(video, index, correct=True, task="t", duration=None, **extra):
    return {"video_id": video, "question_index": index, "task": task, "correct": correct,
            "unparseable": correct is False and extra.pop("unparseable", False), "duration": duration,
            "ttft_ms": 10.0, "tpot_ms": None, "peak_memory_bytes": None, "tokens_kept_max": 5, **extra}


def test_writer_appends_lines_and_cuts_a_torn_tail(tmp_path):
    path = tmp_path / RESULTS_FILE
    with ResultsWriter(path) as writer:
        writer.write(rec("v", 0))
        writer.write(rec("v", 1))
    with path.open("a") as handle:  # an interrupted write
        handle.write('{"video_id": "v", "question_ind')
    assert [r["question_index"] for r in read_records(path)] == [0, 1]
    with ResultsWriter(path) as writer:
        writer.write(rec("v", 2))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


def test_merge_folds_shards_in_benchmark_order(tmp_path):
    with ResultsWriter(tmp_path / RESULTS_FILE) as writer:
        writer.write(rec("b", 1))
    for rank, records in ((0, [rec("a", 1), rec("a", 0)]), (3, [rec("c", 0), rec("b", 0), rec("b", 1, correct=False)])):
        with ResultsWriter(shard_path(tmp_path, rank)) as writer:
            for record in records:
                writer.write(record)
    assert len(read_all(tmp_path)) == 5  # ("b", 1) twice: the results file wins
    merged = merge_results(tmp_path, ["a", "b"])
    assert [(r["video_id"], r["question_index"]) for r in merged] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0)]
    assert merged[3]["correct"] is True
    assert not list((tmp_path / "shards").glob("*.jsonl"))
    assert len(read_records(tmp_path / RESULTS_FILE)) == 5


def test_videomme_split_thresholds():
    assert [duration_class(d) for d in (None, 0, 119, 239.9, 240, 900, 1799, 1800, 3600, 7200)] == [
        None, "short", "short", "short", "medium", "medium", "medium", "long", "long", "long"]


def test_summary_counts_accuracy_per_task_and_split():
    records = [
        rec("a", 0, True, "color", 60.0, ttft_ms=10.0),
        rec("a", 1, False, "color", 60.0, unparseable=True, ttft_ms=20.0),
        rec("b", 0, True, "count", 600.0, ttft_ms=30.0, peak_memory_bytes=7),
        rec("c", 0, None, "open", 2400.0, ttft_ms=40.0, peak_memory_bytes=5),  # not scored
        rec("d", 0, False, None, None, ttft_ms=50.0),
    ]
    s = summarize(records, selected=7, config={"k": 1}, failed=[{"video_id": "e"}])
    assert (s["answered"], s["not_answered"], s["scored"], s["correct"]) == (5, 2, 4, 2)
    assert s["accuracy"] == 0.5 and s["unparseable"] == 1
    assert s["per_task"]["color"] == {"questions": 2, "scored": 2, "correct": 1, "accuracy": 0.5, "unparseable": 1}
    assert s["per_task"]["open"]["accuracy"] is None and s["per_task"]["untyped"]["questions"] == 1
    split = s["videomme_split"]
    assert split["short"]["questions"] == 2 and split["medium"]["accuracy"] == 1.0
    assert split["long"]["scored"] == 0 and split["unknown_duration"] == 1
    assert s["ttft_ms_mean"] == 30.0 and s["tpot_ms_mean"] is None and s["peak_memory_bytes_max"] == 7
    assert s["failed_videos"] == [{"video_id": "e"}] and s["config"] == {"k": 1}
    assert summarize([rec("a", 0)], selected=1, config={}, failed=[])["videomme_split"] is None


def test_shard_context_round_robin_and_environment(monkeypatch):
    items = list(range(7))
    shards = [distributed.DistContext(rank, 3).shard(items) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.env_world() == (0, 1, 0)
    assert distributed.init_distributed(distributed.resolve_device("cpu")) == distributed.DistContext()
    assert distributed.current() == distributed.DistContext()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(distributed.DistributedError, match="RANK=5"):
        distributed.env_world()
    monkeypatch.setenv("RANK", "1")
    assert distributed.resolve_device("cpu").type == "cpu"


def test_question_need_from_evidence_span_or_position():
    from hermes_policy.evaluation.summary import question_need

    assert question_need(28.0, 30.0, 600.0, window_s=8.0) == "perception"  # evidence 2 s before asking
    assert question_need(5.0, 30.0, 600.0, window_s=8.0) == "memory"  # evidence 25 s before
    assert question_need(None, 30.0, 600.0, window_s=8.0) == "perception"  # real-time, no span
    assert question_need(None, None, 600.0, window_s=8.0) == "memory"  # after the whole video
    assert question_need(None, None, 6.0, window_s=8.0) == "perception"  # ... shorter than the window
    assert question_need(None, None, None, window_s=8.0) == "memory"


def test_summary_splits_accuracy_by_need():
    from hermes_policy.evaluation.summary import summarize

    records = [
        {"need": "perception", "correct": True}, {"need": "perception", "correct": False},
        {"need": "memory", "correct": True}, {"need": "memory", "correct": True}, {"need": "memory", "correct": None},
    ]
    summary = summarize(records, selected=5, config={}, failed=[])
    assert summary["by_need"]["perception"] == {"questions": 2, "scored": 2, "correct": 1, "accuracy": 0.5,
                                               "unparseable": 0}
    assert summary["by_need"]["memory"]["accuracy"] == 1.0 and summary["by_need"]["memory"]["questions"] == 3
