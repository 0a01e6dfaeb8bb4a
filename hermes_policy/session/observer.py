"""Watching a session work, without the session measuring anything itself.

The session marks its ingest phases (``encode``, ``prefill``, ``guidance``, ``select``,
``gather``) by entering ``observer.phase(name)``; an observer decides what a phase costs to
watch. The default watches nothing (and never synchronises the GPU); the benchmarks'
timers (:mod:`hermes_policy.benchmarking.phases`) time phases with host clocks and CUDA
events. Every phase is also a named range in torch-profiler traces (``ingest:<name>``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

import torch


class SessionObserver(Protocol):
    """What a session tells an observer."""

    def phase(self, name: str) -> AbstractContextManager[object]:
        """A context around one ingest phase of ``name``."""
        ...


class NoObserver:
    """The default: nothing is watched, nothing waits."""

    def phase(self, name: str) -> AbstractContextManager[object]:
        return nullcontext()


@contextmanager
def observed_phase(observer: SessionObserver, name: str) -> Iterator[None]:
    """``observer.phase(name)`` inside a torch-profiler range of the same name (nearly free
    when no profiler runs)."""
    with torch.profiler.record_function(f"ingest:{name}"), observer.phase(name):
        yield
