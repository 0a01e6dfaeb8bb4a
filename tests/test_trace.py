"""Trace analysis of the profiling tools (where the GPU waits), on synthetic traces."""

from __future__ import annotations

import json

import torch

from hermes_policy.benchmarking.trace import (
    idle_report,
    load_trace,
    merge_intervals,
    phase_timeline,
)
from hermes_policy.cache.transfer import upload


def _event(cat: str, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_merge_intervals_unions_overlaps():
    assert merge_intervals([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert merge_intervals([]) == []


def test_idle_gaps_are_charged_to_the_innermost_host_frame(tmp_path):
    events = [
        _event("kernel", "gemm", 0, 100),
        _event("kernel", "gemm", 50, 100),  # overlaps the first: busy 0..150
        _event("kernel", "softmax", 400, 50),  # idle 150..400
        _event("gpu_memcpy", "copy", 460, 40),  # idle 450..460 (under the threshold)
        _event("kernel", "gather", 900, 100),  # idle 500..900
        _event("python_function", "session.py(1): add_frames", 0, 1000),
        _event("python_function", "hermes_policy/retention/x.py(3): select", 140, 300),
        _event("python_function", "torch/ops.py(9): sort", 145, 20),  # innermost, but not ours
        _event("user_annotation", "ingest:select", 140, 300),
        _event("python_function", "hermes_policy/cache/kv_store.py(5): keep_layers", 480, 500),
    ]
    report = idle_report(events, min_gap_us=20)
    assert report.span == 1000 and report.busy == 150 + 50 + 40 + 100
    assert [(g.start, g.duration) for g in report.gaps] == [(150, 250), (500, 400)]
    assert report.gaps[0].site.endswith("select") and report.gaps[0].ranges == ("ingest:select",)
    assert report.by_site()[0] == ("hermes_policy/cache/kv_store.py(5): keep_layers", 400, 1)
    assert "idle" in report.summary()
    # a window clips the span and the busy time
    windowed = idle_report(events, window=(100, 500))
    assert windowed.span == 400 and windowed.busy == 50 + 50 + 40
    # the exported trace format: a dict with traceEvents
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert load_trace(path) == events


def test_phase_timeline_sums_host_gpu_and_waits():
    marks = [
        ("encode", 0.000, 0.002, 0.0, 1.0),
        ("prefill", 0.002, 0.050, 3.0, 80.0),  # GPU waited 2 ms for the host before it
        ("select", 0.050, 0.070, 80.0, 84.0),
        ("encode", 0.070, 0.072, 90.0, 91.0),
    ]
    out = phase_timeline(marks)
    assert out["encode"]["count"] == 2 and round(out["encode"]["host_ms"], 6) == 4.0
    assert out["prefill"]["gpu_ms"] == 77.0 and out["prefill"]["gpu_wait_before_ms"] == 2.0
    assert out["select"]["gpu_wait_before_ms"] == 0.0 and out["encode"]["gpu_wait_before_ms"] == 6.0


def test_upload_keeps_values_and_device():
    x = torch.arange(6).view(2, 3)[:, 1:]  # a strided view
    moved = upload(x, "cpu")
    assert torch.equal(moved, x) and moved.device.type == "cpu"
