"""What a session hands back: answers, ingest reports, and the conversation's turns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Answer:
    """One answered question with its costs.

    Attributes
    ----------
    ttft_ms : question arrival to first output token (includes ingesting frames still
        waiting to fill a chunk, reported in ``pending_frames``, and a question-time
        rule's work: the window's prefill, retrieval and its copies)
    tpot_ms : mean time per output token after the first (None for one-token answers)
    tokens_kept : stream tokens per layer the question saw
    peak_memory_bytes : peak GPU memory during the call (None on CPU)
    kv_cache_bytes : bytes of keys and values the question saw
    host_memory_bytes : bytes a question-time rule holds outside the cache (offloaded
        chunks, buffered frames)
    """

    question: str
    text: str
    token_ids: list[int]
    ttft_ms: float
    tpot_ms: float | None
    tokens_kept: list[int]
    peak_memory_bytes: int | None
    kv_cache_bytes: int
    frames_seen: int
    pending_frames: int = 0
    host_memory_bytes: int = 0


@dataclass
class IngestReport:
    """What one ``add_frames`` call did."""

    frames: int
    chunks: int
    seconds: float
    compressions: int
    tokens_kept: list[int]
    peak_memory_bytes: int | None


@dataclass
class Turn:
    question: str
    answer: str
    frames_seen: int
