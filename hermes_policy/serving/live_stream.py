"""One live stream: a source played by the clock, a session ingesting it, questions on demand.

Threads per stream: a *reader* releases sampled frames by the wall clock into a bounded
queue (frames that find it full are dropped and counted: a live source does not wait for a
slow model), and an *ingester* moves queued frames into the session one chunk at a time.
Every use of the model (ingest, answers, standing questions) holds the server's one
:class:`~hermes_policy.serving.model_lock.ModelLock`, so streams share the model one forward
at a time; ingest takes it per chunk and questions go before waiting ingest, so a question
waits at most for the one forward already running.

A question first ingests every frame released before it arrived (as
:meth:`StreamingSession.ask` flushes a partial chunk), then answers; its
:class:`ServedAnswer` says how long each part took. Once a stream's cache reaches its
budget, the answer path's CUDA graphs are captured between chunks
(:meth:`StreamingSession.warm_answers`), so the first question does not pay for them.
Standing questions are re-checked after every ingested chunk by comparing the model's
next-token scores of "Yes" and "No" after the question (one question prefill per standing
question per chunk); an event is emitted when the answer turns from no to yes.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from hermes_policy.errors import HermesError
from hermes_policy.serving.model_lock import INGEST, QUESTION, ModelLock
from hermes_policy.serving.sources import Frame, frame_to_jpeg, paced
from hermes_policy.session import Answer, StreamingSession

QUEUE_FRAMES = 64  # released frames waiting for ingest before the oldest are dropped
WARM_QUESTION_TOKENS = (16, 32, 64)  # question lengths whose answer graphs are captured ahead


@dataclass
class StandingQuestion:
    """A yes/no question re-checked after every chunk."""

    question: str
    answer_yes: bool = False


@dataclass
class StreamEvent:
    """A standing question's answer turned from no to yes at ``frame_time`` (media seconds)."""

    question: str
    frame_time: float
    frames_seen: int
    wall_time: float


@dataclass
class ServedAnswer:
    """An answer and where its time to first token went, from the question's arrival.

    ``wait_s``: waiting for the model (another stream's forward); ``catch_up_s``: ingesting
    the ``catch_up_frames`` frames released before the question arrived; then the answer's
    own time to first token (``answer.ttft_ms``: the question's prefill and first token).
    """

    answer: Answer
    wait_s: float
    catch_up_s: float
    catch_up_frames: int

    @property
    def ttft_ms(self) -> float:
        """From the question's arrival to its first token."""
        return (self.wait_s + self.catch_up_s) * 1e3 + self.answer.ttft_ms


@dataclass
class StreamStats:
    frames_seen: int = 0  # sampled from the source and released by the clock
    frames_ingested: int = 0
    frames_dropped: int = 0
    peak_device_memory_bytes: int | None = None  # CUDA: highest allocated during this stream's forwards
    last_media_time: float | None = None
    last_ingest_wall: float | None = None
    error: str | None = None
    finished: bool = False


class LiveStream:
    """A session fed by a paced source in the background (see the module docstring).

    Parameters
    ----------
    session : the streaming session (its rule decides what memory keeps)
    frames : the source's sampled frames ``(frame, media_seconds)``
    model_lock : the lock every use of the shared model holds
    standing : yes/no questions re-checked after every chunk
    realtime : pace the frames by the wall clock (False: as fast as ingest takes them)
    """

    def __init__(
        self,
        session: StreamingSession,
        frames: Iterator[tuple[Frame, float]],
        model_lock: ModelLock,
        *,
        standing: list[str] | None = None,
        realtime: bool = True,
        description: dict[str, Any] | None = None,
    ):
        self.id = uuid.uuid4().hex[:12]
        self.session = session
        self.model_lock = model_lock
        self.description = description or {}
        self.standing = [StandingQuestion(q) for q in standing or []]
        self.events: list[StreamEvent] = []
        self.stats = StreamStats()
        self.created = time.time()
        self._queue: deque[tuple[Frame, float, float]] = deque()
        self._queue_lock = threading.Lock()
        self._have_frames = threading.Condition(self._queue_lock)
        self._stop = threading.Event()
        self._event_listeners: list[Callable[[StreamEvent], None]] = []
        self.latest_frame: Frame | None = None
        self._frames = frames
        self._realtime = realtime
        self._reader = threading.Thread(target=self._read, name=f"reader-{self.id}", daemon=True)
        self._ingester = threading.Thread(target=self._ingest_loop, name=f"ingest-{self.id}", daemon=True)

    def start(self) -> LiveStream:
        self._reader.start()
        self._ingester.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._have_frames:
            self._have_frames.notify_all()
        for thread in (self._reader, self._ingester):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout)

    # -- background work ---------------------------------------------------------------
    def _read(self) -> None:
        frames = self._frames
        source = paced(frames, stopped=self._stop.is_set) if self._realtime else (
            (frame, media, time.monotonic()) for frame, media in frames
        )
        try:
            for frame, media, arrival in source:
                with self._have_frames:
                    if not self._realtime:
                        while len(self._queue) >= QUEUE_FRAMES and not self._stop.is_set():
                            self._have_frames.wait(0.05)  # a file played as fast as possible: no drops
                    if len(self._queue) >= QUEUE_FRAMES:
                        self._queue.popleft()
                        self.stats.frames_dropped += 1
                    self._queue.append((frame, media, arrival))
                    self.stats.frames_seen += 1
                    self.latest_frame = frame
                    self._have_frames.notify_all()
                if self._stop.is_set():
                    return
        except Exception as exc:  # noqa: BLE001 - a broken source ends this stream, reported in its stats
            self.stats.error = f"source: {exc}"
        finally:
            self.stats.finished = True
            with self._have_frames:
                self._have_frames.notify_all()

    def _take(self, until: float | None = None, limit: int | None = None) -> list[tuple[Frame, float, float]]:
        """Queued frames released up to ``until`` (all when None), oldest first, at most ``limit``."""
        with self._queue_lock:
            taken = []
            while self._queue and (until is None or self._queue[0][2] <= until) and (
                limit is None or len(taken) < limit
            ):
                taken.append(self._queue.popleft())
            if taken:
                self._have_frames.notify_all()
            return taken

    def _ingest(self, frames: list[tuple[Frame, float, float]]) -> bool:
        """Add frames to the session (the caller holds the model); True when a chunk was
        completed (prefilled, the rule applied). Frames are taken from the queue and added
        under one hold of the model, so they enter the session in order whoever adds them."""
        session = self.session
        chunks_before = session.frames_seen // session.chunk_frames
        report = session.add_frames([f for f, _, _ in frames], timestamps=[m for _, m, _ in frames])
        self._record_memory(report.peak_memory_bytes)
        self.stats.frames_ingested += len(frames)
        self.stats.last_media_time = frames[-1][1]
        self.stats.last_ingest_wall = frames[-1][2]
        return session.frames_seen // session.chunk_frames > chunks_before

    def _ingest_loop(self) -> None:
        session, chunk = self.session, self.session.chunk_frames
        while not self._stop.is_set():
            with self._have_frames:
                while len(self._queue) < chunk and not self.stats.finished and not self._stop.is_set():
                    self._have_frames.wait(0.1)
            if self._stop.is_set():
                return
            try:
                # one chunk per hold of the model: another stream's question waits for at most one
                with self.model_lock.hold(INGEST):
                    batch = self._take(limit=chunk - session.pending_frames)  # a question may have taken some
                    completed = bool(batch) and self._ingest(batch)
                    if completed and session.compressions > 0:
                        # at the budget the cache's size is steady: capture the answer graphs now
                        session.warm_answers(WARM_QUESTION_TOKENS)
                if completed and self.standing:
                    self.check_standing(batch[-1][1])
            except Exception as exc:  # noqa: BLE001 - reported in the stream's stats
                self.stats.error = f"ingest: {exc}"
                return
            if self.stats.finished and not self._queue:
                return

    def check_standing(self, media_time: float, held: bool = False) -> None:
        """Re-check the standing questions (each under its own hold of the model at ingest
        priority, unless ``held``) and emit an event for each that turned yes."""
        adapter = self.session.adapter
        yes, no = (adapter.encode_text(word)[0] for word in ("Yes", "No"))
        for item in self.standing:
            with nullcontext() if held else self.model_lock.hold(INGEST):
                logits = self.session.next_token_logits(f"{item.question} Answer yes or no.")
            now_yes = bool(logits[yes] > logits[no])
            if now_yes and not item.answer_yes:
                event = StreamEvent(item.question, media_time, self.session.frames_seen, time.time())
                self.events.append(event)
                for listener in list(self._event_listeners):
                    listener(event)
            item.answer_yes = now_yes

    # -- questions -----------------------------------------------------------------------
    def ask(
        self,
        question: str,
        max_new_tokens: int,
        on_token: Callable[[int], None] | None = None,
        arrival: float | None = None,
    ) -> ServedAnswer:
        """Answer from the memory as it is when the question arrives: frames released
        before ``arrival`` (``time.monotonic()``; default: now) are ingested first.

        The model is held at question priority from the catch-up to the last token.
        """
        arrival = time.monotonic() if arrival is None else arrival
        session = self.session
        with self.model_lock.hold(QUESTION):
            waited = time.monotonic() - arrival
            started = time.monotonic()
            caught_up = session.pending_frames
            while batch := self._take(until=arrival, limit=session.chunk_frames - session.pending_frames):
                caught_up += len(batch)
                if self._ingest(batch) and self.standing:
                    self.check_standing(batch[-1][1], held=True)
            session.flush()
            catch_up_s = time.monotonic() - started
            if session.frames_seen == 0:
                raise HermesError("the stream has no frames yet; ask again in a moment")
            answer = session.ask(question, max_new_tokens=max_new_tokens, on_token=on_token)
            self._record_memory(answer.peak_memory_bytes)
        return ServedAnswer(answer, waited, catch_up_s, caught_up)

    def _record_memory(self, peak_device_bytes: int | None) -> None:
        """Raise the device-memory high-water mark by a forward's peak (None off CUDA)."""
        if peak_device_bytes is not None:
            self.stats.peak_device_memory_bytes = max(self.stats.peak_device_memory_bytes or 0, peak_device_bytes)

    def add_listener(self, listener: Callable[[StreamEvent], None]) -> Callable[[], None]:
        self._event_listeners.append(listener)
        return lambda: self._event_listeners.remove(listener)

    # -- reporting ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        stats = self.stats
        session = self.session
        lag = self.lag_seconds()
        kept = session.tokens_kept
        return {
            "id": self.id,
            **self.description,
            "frames_seen": stats.frames_seen,
            "frames_ingested": stats.frames_ingested,
            "frames_dropped": stats.frames_dropped,
            "frames_waiting": len(self._queue) + session.pending_frames,
            "lag_seconds": lag,
            "media_time": stats.last_media_time,
            "tokens_kept_per_layer": kept,
            "kv_cache_bytes": session.store.nbytes(),
            # buffers grow to the most the stream has needed and never shrink: its peak KV
            "kv_allocated_bytes": session.store.cache.allocated_bytes(),
            **peak_memory(session.adapter.device.type == "cuda", stats.peak_device_memory_bytes),
            "host_memory_bytes": 0 if session.memory is None else session.memory.nbytes(),
            "compressions": session.compressions,
            "standing_questions": [{"question": s.question, "answer_yes": s.answer_yes} for s in self.standing],
            "events": len(self.events),
            "finished": stats.finished and not self._queue,
            "error": stats.error,
        }

    def lag_seconds(self) -> float:
        """How long the oldest frame of a full chunk has waited for ingest (0 while fewer
        frames than a chunk wait: filling a chunk is the stream's pace, not lag)."""
        with self._queue_lock:
            if len(self._queue) < self.session.chunk_frames:
                return 0.0
            return max(0.0, time.monotonic() - self._queue[0][2])

    def latest_jpeg(self) -> bytes | None:
        frame = self.latest_frame
        return None if frame is None else frame_to_jpeg(frame)


def peak_memory(on_cuda: bool, device_peak_bytes: int | None) -> dict[str, Any]:
    """The status's peak memory.

    On CUDA: the most memory allocated on the device during any of the stream's forwards
    (the weights and every stream's cache included, as the device holds them; None before
    its first forward). Elsewhere: the server process's peak resident memory, as no
    per-device figure exists (None where the platform has no ``resource`` module).
    """
    if on_cuda:
        return {"peak_memory_bytes": device_peak_bytes, "peak_memory_scope": "device, during this stream's forwards"}
    try:
        import resource  # POSIX only
    except ImportError:
        return {"peak_memory_bytes": None, "peak_memory_scope": "process resident"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024,
            "peak_memory_scope": "process resident"}
