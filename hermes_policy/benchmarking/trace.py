"""Where the GPU waits: idle gaps in a torch-profiler trace, and the host code behind them.

The kernel table of a profile says how long kernels ran; it does not say how long the GPU
sat idle between them, waiting for the host to launch the next one or to read a result
back. On the streaming hot path that idle time is most of what separates the measured
ingest speed from the sum of kernel times. These functions read a Chrome trace exported by
``torch.profiler`` (``prof.export_chrome_trace``), take the union of device activity, and
charge every idle gap to the innermost host frame of ours that was running when it began.

:func:`sync_sites` complements this with torch's own synchronisation debugger: every call
that blocks the host on the GPU (a device-to-host read, a blocking host-to-device copy),
with the line of our code that made it.
"""

from __future__ import annotations

import json
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("python_function", "cpu_op", "user_annotation")


@dataclass
class Gap:
    """One stretch of GPU idleness: ``start`` and ``duration`` in microseconds."""

    start: float
    duration: float
    site: str = "?"
    ranges: tuple[str, ...] = ()


@dataclass
class IdleReport:
    """Device activity over the span of a trace (microseconds)."""

    span: float
    busy: float
    gaps: list[Gap] = field(default_factory=list)

    @property
    def idle(self) -> float:
        return self.span - self.busy

    def by_site(self) -> list[tuple[str, float, int]]:
        """``(site, idle microseconds, gaps)`` for gaps charged to each site, largest first."""
        total: Counter[str] = Counter()
        count: Counter[str] = Counter()
        for gap in self.gaps:
            total[gap.site] += gap.duration
            count[gap.site] += 1
        return [(site, total[site], count[site]) for site, _ in total.most_common()]

    def summary(self, rows: int = 15) -> str:
        lines = [
            f"span {self.span / 1e3:.2f} ms, device busy {self.busy / 1e3:.2f} ms, "
            f"idle {self.idle / 1e3:.2f} ms ({100 * self.idle / self.span if self.span else 0:.0f}%), "
            f"{len(self.gaps)} gaps counted"
        ]
        for site, micros, n in self.by_site()[:rows]:
            lines.append(f"  {micros / 1e3:7.2f} ms in {n:4d} gaps  {site}")
        return "\n".join(lines)


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of ``(start, end)`` intervals, sorted and non-overlapping."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def device_intervals(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(start, end)`` of every kernel, memcpy and memset in a trace's events."""
    return [
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES
    ]


def innermost_site(events: list[dict[str, Any]], at: float, prefer: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The innermost host frame running at time ``at`` whose name contains one of
    ``prefer`` (else the innermost of any), and the user ranges open then."""
    covering = [
        e
        for e in events
        if e.get("ph") == "X"
        and e.get("cat") in HOST_CATEGORIES
        and float(e["ts"]) <= at < float(e["ts"]) + float(e.get("dur", 0.0))
    ]
    ranges = tuple(e["name"] for e in sorted(covering, key=lambda e: e["ts"]) if e.get("cat") == "user_annotation")
    frames = [e for e in covering if e.get("cat") == "python_function"]
    preferred = [e for e in frames if any(p in e["name"] for p in prefer)]
    pool = preferred or frames or [e for e in covering if e.get("cat") == "cpu_op"]
    if not pool:
        return "?", ranges
    # innermost: the latest start (ties: the shortest)
    inner = max(pool, key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
    return inner["name"], ranges


def idle_report(
    events: list[dict[str, Any]],
    min_gap_us: float = 20.0,
    prefer: tuple[str, ...] = ("hermes_policy",),
    window: tuple[float, float] | None = None,
) -> IdleReport:
    """Device busy time, and the idle gaps longer than ``min_gap_us``, each charged to the
    host frame (of ``prefer``'d code where there is one) running when it began.

    ``window``: only this ``(start, end)`` span (default: first to last device event).
    """
    intervals = merge_intervals(device_intervals(events))
    if not intervals:
        return IdleReport(span=0.0, busy=0.0)
    lo, hi = window if window is not None else (intervals[0][0], intervals[-1][1])
    clipped = [(max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi]
    busy = sum(b - a for a, b in clipped)
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in HOST_CATEGORIES]
    gaps = []
    edges = [(lo, lo)] + clipped + [(hi, hi)]
    for (_, end), (start, _) in zip(edges, edges[1:], strict=False):
        if start - end >= min_gap_us:
            site, ranges = innermost_site(host, end, prefer)
            gaps.append(Gap(start=end, duration=start - end, site=site, ranges=ranges))
    return IdleReport(span=hi - lo, busy=busy, gaps=gaps)


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a Chrome trace written by ``torch.profiler`` (plain JSON, no pickle)."""
    data = json.loads(Path(path).read_text())
    return data["traceEvents"] if isinstance(data, dict) else data


def _our_frame(stack: list[traceback.FrameSummary], packages: tuple[str, ...]) -> str:
    for frame in reversed(stack):
        if any(p in frame.filename for p in packages):
            return f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} {frame.name}"
    frame = stack[-1]
    return f"{frame.filename}:{frame.lineno} {frame.name}"


@contextmanager
def sync_sites(
    packages: tuple[str, ...] = ("hermes_policy", "transformers"),
) -> Iterator[Counter[str]]:
    """Count the calls that synchronise the host with the GPU, by the line that made them.

    Uses ``torch.cuda.set_sync_debug_mode("warn")``; each warning is charged to the
    innermost frame from ``packages``. Yields the counter, filled when the block exits.
    """
    sites: Counter[str] = Counter()
    previous = torch.cuda.get_sync_debug_mode()
    original: Callable[..., None] = warnings.showwarning

    def record(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        if "synchronizing" in str(message).lower():
            sites[_our_frame(traceback.extract_stack()[:-1], packages)] += 1
        else:
            original(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            warnings.showwarning = original


def phase_timeline(marks: list[tuple[str, float, float, float, float]]) -> dict[str, dict[str, float]]:
    """Host time, GPU span and GPU idle before each phase, summed by phase name.

    Parameters
    ----------
    marks : ``(phase, host start s, host end s, GPU start ms, GPU end ms)`` in time order,
        the GPU times measured from one reference event (:class:`~hermes_policy.benchmarking.phases.PhaseEvents`
        with its events turned into elapsed milliseconds)

    Returns
    -------
    ``{phase: {"count", "host_ms", "gpu_ms", "gpu_wait_before_ms"}}``: the GPU span runs
    from the phase's first queued work to its last; ``gpu_wait_before_ms`` is the GPU
    time between the previous phase's end and this phase's start (what the host spent
    there while the GPU had nothing queued).
    """
    out: dict[str, dict[str, float]] = {}
    previous_end: float | None = None
    for name, host_begin, host_end, gpu_begin, gpu_end in marks:
        entry = out.setdefault(name, {"count": 0, "host_ms": 0.0, "gpu_ms": 0.0, "gpu_wait_before_ms": 0.0})
        entry["count"] += 1
        entry["host_ms"] += 1e3 * (host_end - host_begin)
        entry["gpu_ms"] += gpu_end - gpu_begin
        if previous_end is not None:
            entry["gpu_wait_before_ms"] += max(0.0, gpu_begin - previous_end)
        previous_end = gpu_end
    return out
