"""How the efficiency benchmark measures compression inside a stream.

Two measurements, both reported (see :mod:`hermes_policy.benchmarking.efficiency`):
the session's synchronised phase timers on one chunk in :data:`TIMED_EVERY`, and, on the
other chunks, CUDA events at the phase boundaries (:func:`compression_span_seconds`,
:func:`pipelined_share`); plus the marginal cost of pseudo-queries fused into a chunk's
forward (:func:`fused_guidance_overhead`) and the shape of the last pseudo-query pass
(:func:`guidance_shape`). A :class:`Segment` accumulates the chunks between two checkpoints.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hermes_policy.retention.guidance import GuidanceLayout
from hermes_policy.session import StreamingSession


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory() -> None:
    gc.collect()  # sessions and captured graphs hold models and buffers in reference cycles
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fused_guidance_overhead(session: StreamingSession, frames: Any, pairs: int = 8) -> float | None:
    """Seconds the pseudo-queries add to one chunk's forward when fused with it.

    Times the same chunk prefilled alone and with the rule's pseudo-queries, in ``pairs``
    back-to-back pairs after one untimed pair (which captures the graphs), the order
    alternating from pair to pair (the cache restored after every run). Two consecutive
    pairs, one of each order, average out a steady drift of the machine's speed, which
    two separate series would each absorb; the median over those averages sets aside a
    stall that hits one run. None when the rule has no pseudo-queries.
    """
    request = session.retention.guidance(session.store, [(t.question, t.answer) for t in session.history])
    if request is None:
        return None
    adapter, store = session.adapter, session.store
    with torch.inference_mode():
        piece = adapter.frames_piece(frames, session.frames_seen)
        prompts = [session.planner.prompt_piece(p) for p in request.prompts]  # as the stream tokenised them
    lengths = store.lengths()
    passes = session.guidance_passes

    def seconds(run: Callable[[], object]) -> float:
        sync_device(adapter.device)
        start = time.perf_counter()
        with torch.inference_mode():
            run()
        sync_device(adapter.device)
        store.truncate(lengths)
        return time.perf_counter() - start

    # both as a steady chunk runs in the stream: replayed from a CUDA graph where the
    # session has them (the untimed pair captures them), so neither side pays the eager
    # forward's host time the other does not
    def plain() -> object:
        return session._prefill(piece, ingest=True, recurring=True)

    def fused() -> object:
        return session.guidance_attention(request, lead=piece, prompt_pieces=prompts, recurring=True)

    seconds(plain)
    seconds(fused)
    differences = []
    for index in range(pairs):
        if index % 2:
            alone = seconds(plain)
            differences.append(seconds(fused) - alone)
        else:
            with_prompts = seconds(fused)
            differences.append(with_prompts - seconds(plain))
    session.guidance_passes = passes
    balanced = [(a + b) / 2 for a, b in zip(differences[::2], differences[1::2])]
    return max(0.0, statistics.median(balanced))


def guidance_shape(layout: GuidanceLayout | None) -> dict[str, Any]:
    """Row fields of the last pseudo-query pass: each prompt's tokens and padded rows, and
    the prompts' share of the rows through the decoder layers (their share of the
    forward's linear-layer arithmetic, which its matrix products take in proportion)."""
    if layout is None:
        return {"guidance_prompt_tokens": None, "guidance_prompt_rows": None, "guidance_row_share": None}
    return {
        "guidance_prompt_tokens": list(layout.prompt_tokens),
        "guidance_prompt_rows": list(layout.prompt_rows),
        "guidance_row_share": layout.row_share,
    }


TIMED_EVERY = 4  # one chunk in this many runs with the session's synchronised phase timers
COMPRESSION_PHASES = ("guidance", "select", "gather")


@dataclass
class Segment:
    """Ingest of the chunks between two checkpoints.

    Phase timers synchronise the GPU at every phase boundary, which stalls the pipeline
    (the host can no longer queue work ahead): chunks with timers on give the compression
    share, the others the ingest speed.
    """

    frames: int = 0
    seconds: float = 0.0
    timed_frames: int = 0
    timed_seconds: float = 0.0
    fused_timed: int = 0
    fused_untimed: int = 0
    gpu_compression_seconds: float | None = None  # phase spans of the untimed chunks (CUDA events)
    chunk_seconds: list[float] = field(default_factory=list)  # each untimed chunk's seconds

    def fps(self) -> float | None:
        if self.frames:
            return self.frames / self.seconds
        return self.timed_frames / self.timed_seconds if self.timed_seconds > 0 else None

    def median_chunk_fps(self, chunk: int) -> float | None:
        """Frames per second of the median untimed chunk: the speed once the segment's
        one-off costs (a graph capture, a shape's first eager run) are set aside."""
        return chunk / statistics.median(self.chunk_seconds) if self.chunk_seconds else None


def compression_span_seconds(marks: list[tuple[str, float, float, Any, Any]]) -> float:
    """Seconds of GPU timeline the compression phases spanned, from
    :attr:`PhaseEvents.marks <hermes_policy.benchmarking.phases.PhaseEvents.marks>`
    (``(phase, host start, host end, start event, end event)``, events complete)."""
    return sum(begin.elapsed_time(end) for name, _, _, begin, end in marks if name in COMPRESSION_PHASES) / 1e3


def pipelined_share(segment: Segment, fused_overhead_s: float | None) -> float | None:
    """Share of the untimed chunks' ingest time spent compressing: the phases' GPU spans
    plus each fused pseudo-query pass's measured cost. None without event timings."""
    if segment.gpu_compression_seconds is None or segment.seconds <= 0:
        return None
    spent = segment.gpu_compression_seconds + segment.fused_untimed * (fused_overhead_s or 0.0)
    return spent / segment.seconds
