"""Observers that time a session's ingest phases (see :mod:`hermes_policy.session.observer`).

:class:`PhaseTimer` synchronises the GPU around each phase and adds up its seconds: exact
per phase, but the waits change the pipeline it measures. :class:`PhaseEvents` records a
host clock and a CUDA event at both ends of each phase without waiting: compared
afterwards, they show where the GPU waited for the host (the efficiency benchmark's
pipelined compression share). :class:`Observers` hands each phase to several.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from hermes_policy.session.observer import SessionObserver


@dataclass
class PhaseTimer:
    """Seconds per phase, the GPU synchronised at both ends of each (``device``: the
    session's model device; on the CPU there is nothing to wait for)."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class PhaseEvents:
    """Per phase ``(name, host start, host end, CUDA event at start, at end)``, recorded
    without synchronising (CUDA only; nothing is recorded elsewhere). Read the events'
    times once the GPU has caught up (e.g. after ``add_frames``, which ends synchronised)."""

    marks: list[tuple[str, float, float, Any, Any]] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not torch.cuda.is_available():
            yield
            return
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        host_begin = time.perf_counter()
        try:
            yield
        finally:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.marks.append((name, host_begin, time.perf_counter(), begin, end))


@dataclass
class Observers:
    """Several observers watching the same phases."""

    members: list[SessionObserver]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with ExitStack() as stack:
            for member in self.members:
                stack.enter_context(member.phase(name))
            yield

