"""The lock every use of the server's one model holds, with questions served before ingest.

Streams share one model one forward at a time. A plain lock hands itself to whichever
waiting thread the scheduler wakes, so a question could wait behind several chunks of
other streams' ingest. :class:`ModelLock` lets waiting questions go first: an ingest
forward starts only when no question waits, so a question waits at most for the one
forward already running. Ingest is not starved for long: questions are rare next to
frames, and each holds the model for one answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

QUESTION = "question"
INGEST = "ingest"


class ModelLock:
    """A lock with two priorities: holders of :data:`QUESTION` go before :data:`INGEST`.

    Use ``with lock.hold(QUESTION):`` / ``with lock.hold(INGEST):``. :attr:`last_wait` is how long the calling thread's latest
    :meth:`hold` waited (seconds).
    """

    def __init__(self) -> None:
        self._free = threading.Condition(threading.Lock())
        self._held = False
        self._questions_waiting = 0
        self._local = threading.local()

    @contextmanager
    def hold(self, priority: str = INGEST) -> Iterator[None]:
        if priority not in (QUESTION, INGEST):
            raise ValueError(f"priority must be {QUESTION!r} or {INGEST!r}, got {priority!r}")
        start = time.perf_counter()
        with self._free:
            if priority == QUESTION:
                self._questions_waiting += 1
                try:
                    while self._held:
                        self._free.wait()
                finally:
                    self._questions_waiting -= 1
            else:
                while self._held or self._questions_waiting:
                    self._free.wait()
            self._held = True
        self._local.last_wait = time.perf_counter() - start
        try:
            yield
        finally:
            with self._free:
                self._held = False
                self._free.notify_all()

    @property
    def last_wait(self) -> float:
        """Seconds the calling thread's latest :meth:`hold` waited (0 before any)."""
        return getattr(self._local, "last_wait", 0.0)
