"""StreamingSession: frames in, answers out, on a per-layer KV store of bounded size.

Data flow of one session::

    add_frames(frames) -> chunks of `chunk_frames` -> adapter.frames_piece -> prefill on the
    KV store at each layer's next free position (with the rule's pseudo-queries in the same
    forward when this chunk triggers compression) -> retention rule -> keep / re-index

    ask(question) -> prefill the question after the store's tokens -> greedy decode with
    explicit positions (CUDA graphs on a GPU) -> the Q/A tokens are not kept -> Answer

Questions never trigger retention work: everything the rule needs happens at ingestion.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from hermes_policy.attention.ragged import (
    AttentionCapture,
    PerLayerRotary,
    QueryBlocks,
    block_rows_needed,
)
from hermes_policy.cache.kv_store import KVStore
from hermes_policy.cache.transfer import upload
from hermes_policy.errors import StreamError
from hermes_policy.graphs.answer_graphs import AnswerGraphs
from hermes_policy.graphs.chunk_graphs import ChunkGraphs
from hermes_policy.models.base import DEFAULT_SYSTEM_PROMPT, ModelAdapter, StreamPiece
from hermes_policy.options import ANSWER_PATHS, RuntimeOptions, apply
from hermes_policy.retention import FullRetention, GuidanceRequest, RetentionRule, SelectContext


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


@dataclass(frozen=True)
class GuidanceLayout:
    """The shape of the last pseudo-query pass (what its cost scales with).

    Attributes
    ----------
    lead : rows prefilled before the prompts in the same forward (a chunk: fused guidance)
    prompt_tokens : each prompt's own tokens
    prompt_rows : each prompt's rows, padding included (``PROMPT_QUANTUM``)
    captured : ``(layer, start, stop)`` of the rows captured at each layer that captures
        (the forward's graph key holds the same)
    layers : decoder layers of the forward
    """

    lead: int
    prompt_tokens: tuple[int, ...]
    prompt_rows: tuple[int, ...]
    captured: tuple[tuple[int, int, int], ...]
    layers: int

    @property
    def layer_rows(self) -> tuple[int, ...]:
        """Per layer, the rows an ingest forward computes there: the lead plus the blocks
        still read at that layer or later (:func:`~hermes_policy.attention.ragged.block_rows_needed`).
        Derived when read, not on every compressing chunk."""
        picked = [range(0)] * self.layers
        for layer, start, stop in self.captured:
            picked[layer] = range(start, stop)
        return tuple(block_rows_needed(self.lead, list(self.prompt_rows), picked))

    @property
    def row_share(self) -> float:
        """The prompts' share of the rows through the decoder layers: the share of the
        forward's linear-layer arithmetic they take when every row costs the same."""
        rows = self.layer_rows
        total = sum(rows)
        return (total - self.lead * len(rows)) / total if total else 0.0


@dataclass
class Turn:
    question: str
    answer: str
    frames_seen: int


def _stack_frames(frames: list[Any]) -> Any:
    first = frames[0]
    if isinstance(first, str):
        return list(frames)
    shapes = {tuple(np.shape(f)) for f in frames}
    if len(shapes) > 1:
        raise StreamError(f"frames of one chunk must share one shape, got {sorted(shapes)}")
    if isinstance(first, torch.Tensor):
        return torch.stack(frames)
    return np.stack(frames)


# pseudo-query prompts are padded to a multiple of this many tokens: a question changes a
# compressing chunk's graph shape only when a prompt crosses a multiple (one capture, then
# replays), while every padding row runs through the layers on every compressing chunk
# (at 16, ~12% of the prompts' rows after a question were padding; at 8, ~6%)
PROMPT_QUANTUM = 8


def pad_piece(piece: StreamPiece, quantum: int) -> StreamPiece:
    """``piece`` followed by copies of its last token, to a multiple of ``quantum`` tokens.

    The padding continues the positions (every axis one past the piece's largest) and
    belongs to no frame; prefilled causally after the piece, it changes nothing the
    piece's own tokens compute.
    """
    n = len(piece)
    extra = -(-n // quantum) * quantum - n
    if extra == 0 or n == 0:
        return piece
    start = piece.extent
    ids, positions, frames = piece.input_ids.numpy(), piece.positions.numpy(), piece.frame_index.numpy()
    padding = np.broadcast_to(np.arange(start, start + extra, dtype=positions.dtype), (positions.shape[0], extra))
    # numpy: each small torch operation on the CPU has a fixed cost, paid on every compressing chunk
    return StreamPiece(
        input_ids=torch.from_numpy(np.concatenate([ids, np.repeat(ids[-1:], extra)])),
        positions=torch.from_numpy(np.concatenate([positions, padding], axis=1)),
        frame_index=torch.from_numpy(np.concatenate([frames, np.full(extra, -1, dtype=frames.dtype)])),
        model_inputs=piece.model_inputs,
    )


def _split_frames(frames: Any) -> list[Any]:
    if isinstance(frames, str):
        return [frames]
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        return list(frames)
    return list(frames)


@contextmanager
def paused_collection(pause: bool = True) -> Iterator[Callable[[], None]]:
    """Within this context Python's garbage collector does not run (when ``pause``, and it
    was running); the yielded function resumes it early. Restored on exit either way."""
    paused = pause and gc.isenabled()
    if paused:
        gc.disable()

    def resume() -> None:
        if paused:
            gc.enable()

    try:
        yield resume
    finally:
        resume()


class StreamingSession:
    """A live stream through one model under one retention rule.

    Parameters
    ----------
    adapter : the model adapter (its model must use the ``hermes_ragged`` attention;
        :func:`hermes_policy.models.load_adapter` sets that up)
    retention : the retention rule (default: keep everything)
    chunk_frames : frames encoded and prefilled together
    fps : frame rate of the incoming frames, used for timestamps (optional)
    system_prompt : text of the fixed system prefix
    reindex_margin : lazy re-indexing compacts positions once they come within this many
        positions of the model's limit (capped at a quarter of the limit)
    max_new_tokens : default answer length limit
    history_limit : question/answer pairs kept as text (the HERMES guidance prompts use the
        last one); older ones are dropped so a session never grows
    fuse_guidance : run a rule's pseudo-queries in the same forward as the chunk that
        triggers compression (one pass over the weights instead of two; the result is
        the same up to rounding)
    options : the speed paths (:class:`~hermes_policy.options.RuntimeOptions`; default:
        :meth:`RuntimeOptions.from_env`, the defaults with the environment's overrides).
        ``options.answer_path`` is how :meth:`ask` runs the model: ``"graphs"`` (fixed
        shapes replayed as CUDA graphs, see :mod:`hermes_policy.graphs.answer_graphs`; the
        default on CUDA), ``"static"`` (the same fixed-shape code without graphs; the
        default for a model split over several GPUs) or ``"eager"`` (one ordinary forward
        per token; the default elsewhere). ``options.ingest_graphs`` replays recurring
        ingest forwards (a bounded rule's steady state) as CUDA graphs (see
        :mod:`hermes_policy.graphs.chunk_graphs`); default: where answers use graphs. The
        kernel switches are process-wide: the session applies them
        (:func:`hermes_policy.options.apply`), for every session in the process.
        :attr:`options` holds them with the automatic choices resolved.
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        retention: RetentionRule | None = None,
        *,
        chunk_frames: int = 8,
        fps: float | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        reindex_margin: int = 1024,
        max_new_tokens: int = 64,
        history_limit: int = 16,
        fuse_guidance: bool = True,
        options: RuntimeOptions | None = None,
    ):
        if chunk_frames < 1:
            raise StreamError(f"chunk_frames must be at least 1, got {chunk_frames}")
        if options is None:
            options = RuntimeOptions.from_env()
        if not isinstance(options, RuntimeOptions):
            raise StreamError(f"options must be RuntimeOptions, got {type(options).__name__}")
        answer_path, ingest_graphs = options.answer_path, options.ingest_graphs
        split = adapter.spans_devices
        if answer_path is None:
            if adapter.device.type == "cuda":
                answer_path = "static" if split else "graphs"
            else:
                answer_path = "eager"
        if answer_path not in ANSWER_PATHS:
            raise StreamError(f"answer_path must be one of {ANSWER_PATHS}, got {answer_path!r}")
        if answer_path == "graphs" and (adapter.device.type != "cuda" or split):
            raise StreamError("answer_path='graphs' needs the whole model on one CUDA device")
        self.answer_path = answer_path
        if ingest_graphs is None:
            ingest_graphs = answer_path == "graphs"
        if ingest_graphs and (adapter.device.type != "cuda" or split):
            raise StreamError("ingest_graphs needs the whole model on one CUDA device")
        self.options = replace(options, answer_path=answer_path, ingest_graphs=bool(ingest_graphs))
        apply(self.options)
        self.fuse_guidance = fuse_guidance
        self._prompt_pieces: dict[str, StreamPiece] = {}
        self._row_weights: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # (weights, real length)
        self.time_phases = False
        self.phase_seconds: dict[str, float] = {}
        # (phase, host start, host end, CUDA event at start, at end) when set to a list
        self.phase_marks: list[tuple[str, float, float, Any, Any]] | None = None
        self._answer_graphs: AnswerGraphs | None = None
        self.adapter = adapter
        self.retention = retention if retention is not None else FullRetention()
        self.retention.validate(adapter)
        # the state of a rule that works at question time (window, retrieval), else None
        self.memory = self.retention.question_memory(adapter, chunk_frames)
        self.chunk_frames = chunk_frames
        self.fps = fps
        self.system_prompt = system_prompt
        self.reindex_margin = min(reindex_margin, adapter.max_positions // 4)
        self.max_new_tokens = max_new_tokens
        self.history: deque[Turn] = deque(maxlen=history_limit)
        self.frames_seen = 0
        self.compressions = 0
        self.guidance_passes = 0
        self.fused_guidance_passes = 0
        self.guidance_layout: GuidanceLayout | None = None  # of the last pseudo-query pass
        self._pending: list[Any] = []
        self._pending_times: list[float | None] = []
        self._warned_positions = False
        self.store = KVStore(adapter.num_layers, adapter.position_axes, adapter.text_config)
        self.chunk_graphs = ChunkGraphs(adapter, self.store) if ingest_graphs else None
        with torch.inference_mode():
            self._prefill(adapter.prefix_piece(system_prompt))
        self.store.mark_prefix()

    # -- public API ------------------------------------------------------------------
    def add_frames(self, frames: Any, timestamps: Sequence[float] | None = None) -> IngestReport:
        """Ingest frames: every full chunk is prefilled and the retention rule applied.

        Parameters
        ----------
        frames : uint8 array ``(T, H, W, 3)`` (video models) or a list of strings /
            LongTensor ``(T, N)`` (text-frame models)
        timestamps : seconds of each frame; default ``index / fps`` when ``fps`` is set

        Frames that do not fill a chunk wait until more arrive or a question is asked.
        """
        items = _split_frames(frames)
        if timestamps is not None and len(timestamps) != len(items):
            raise StreamError(f"{len(timestamps)} timestamps for {len(items)} frames")
        start = time.perf_counter()
        self._reset_peak_memory()
        if self.memory is not None and self.memory.buffers_frames:
            return self._buffer_frames(items, timestamps, start)
        for i, item in enumerate(items):
            self._pending.append(item)
            if timestamps is not None:
                self._pending_times.append(float(timestamps[i]))
            elif self.fps:
                self._pending_times.append((self.frames_seen + len(self._pending) - 1) / self.fps)
            else:
                self._pending_times.append(None)
        chunks = compressions = 0
        with torch.inference_mode():
            encoded = self._encode_next_chunk()
            while encoded is not None:
                attention = self._prefill_encoded(*encoded)
                # the next chunk is encoded while the GPU runs this one's forward: the
                # compression step below waits for the GPU once (its kept indices), and the
                # video processor's host work would otherwise follow that wait with the
                # GPU idle
                encoded = self._encode_next_chunk()
                compressions += self._apply_retention(attention)
                chunks += 1
        self._sync()
        return IngestReport(
            frames=len(items),
            chunks=chunks,
            seconds=time.perf_counter() - start,
            compressions=compressions,
            tokens_kept=self.store.stream_lengths(),
            peak_memory_bytes=self._peak_memory(),
        )

    def _buffer_frames(self, items: list[Any], timestamps: Sequence[float] | None, start: float) -> IngestReport:
        """Hand frames to a memory that keeps them for the next question (nothing is prefilled)."""
        if timestamps is not None:
            times: list[float | None] = [float(t) for t in timestamps]
        elif self.fps:
            times = [(self.frames_seen + i) / self.fps for i in range(len(items))]
        else:
            times = [None] * len(items)
        self.memory.buffer_frames(items, times, self.frames_seen)
        self.frames_seen += len(items)
        return IngestReport(
            frames=len(items),
            chunks=0,
            seconds=time.perf_counter() - start,
            compressions=0,
            tokens_kept=self.store.stream_lengths(),
            peak_memory_bytes=self._peak_memory(),
        )

    def prefill_frames(self, frames: list[Any], times: list[float | None], first_frame: int) -> None:
        """Encode frames as one piece and prefill it at each layer's next free position.

        For question-time memories (:class:`~hermes_policy.retention.base.QuestionTimeMemory`);
        the retention rule is not applied.
        """
        with torch.inference_mode():
            piece = self.adapter.frames_piece(_stack_frames(frames), first_frame, None if None in times else times)
            self._prefill(piece)

    def probe_question(self, question: StreamPiece, capture: AttentionCapture) -> None:
        """Prefill a question piece under ``capture`` and take it back out of the cache."""
        saved_lengths = self.store.lengths()
        try:
            with torch.inference_mode(), capture:
                self._prefill(question, last_only=True)
        finally:
            self.store.truncate(saved_lengths)

    @contextmanager
    def _question_memory(self, question: StreamPiece) -> Iterator[None]:
        """Around a question: let a question-time memory assemble the cache, then undo it."""
        memory = self.memory
        if memory is None:
            yield
            return
        with torch.inference_mode():
            memory.before_question(self, question)
        try:
            yield
        finally:
            memory.after_question(self)

    def flush(self) -> int:
        """Ingest frames still waiting for a full chunk; returns how many there were."""
        n = len(self._pending)
        if n:
            with torch.inference_mode():
                self._ingest_chunk(n)
        return n

    def ask(
        self, question: str, max_new_tokens: int | None = None, on_token: Callable[[int], None] | None = None
    ) -> Answer:
        """Answer a question about everything streamed so far, then forget the Q/A tokens.

        The question is prefilled on the cache, the answer decoded greedily with explicit
        positions, and the cache truncated back to its state before the question. The
        Q/A text is kept in :attr:`history`. No retention work happens here.

        ``on_token`` is called with each answer token id as soon as it is known (stop token
        included), for callers that stream the answer.
        """
        if not question or not question.strip():
            raise StreamError("the question is empty")
        # the peak-memory counter is instrumentation of this answer, reset before it arrives
        self._reset_peak_memory()
        arrival = time.perf_counter()
        # no garbage-collection pause between the question and its first token on the graph
        # path (a collection takes up to a millisecond); collection resumes at that token
        with paused_collection(self.answer_path != "eager") as resume_gc:
            pending = self.flush()
            if self.frames_seen == 0:
                raise StreamError("a question was asked before any frame was streamed")
            limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
            stops = self.adapter.stop_token_ids
            piece = self.adapter.question_piece(question)
            with self._question_memory(piece):
                kept = self.store.stream_lengths()
                kv_bytes = self.store.nbytes()
                tokens, first_token_at = self._answer_tokens(piece, limit, stops, resume_gc, on_token)
            done = time.perf_counter()
        answer_ids = [t for t in tokens if t not in stops]
        text = self.adapter.decode(answer_ids)
        self.history.append(Turn(question, text, self.frames_seen))
        return Answer(
            question=question,
            text=text,
            token_ids=answer_ids,
            ttft_ms=(first_token_at - arrival) * 1e3,
            tpot_ms=(done - first_token_at) * 1e3 / (len(tokens) - 1) if len(tokens) > 1 else None,
            tokens_kept=kept,
            peak_memory_bytes=self._peak_memory(),
            kv_cache_bytes=kv_bytes,
            frames_seen=self.frames_seen,
            pending_frames=pending,
            host_memory_bytes=0 if self.memory is None else self.memory.nbytes(),
        )

    def _answer_tokens(
        self,
        piece: StreamPiece,
        limit: int,
        stops: set[int],
        resume_gc: Callable[[], None],
        on_token: Callable[[int], None] | None = None,
    ) -> tuple[list[int], float]:
        """Greedy answer tokens of a question piece on the cache as it is, and the time the
        first one was known; the cache is left as it was."""
        if self.answer_path != "eager":
            marks: list[float] = []

            def first_token() -> None:
                marks.append(time.perf_counter())
                resume_gc()

            with torch.inference_mode():
                tokens = self.answer_graphs.answer(piece, limit, stops, on_first_token=first_token, on_token=on_token)
            return tokens, marks[0]
        saved_lengths = self.store.lengths()
        tokens: list[int] = []
        try:
            with torch.inference_mode():
                hidden = self._prefill(piece, last_only=True)
                token = int(self.adapter.logits(hidden[:, -1:]).argmax(-1))
                self._sync()
                first_token_at = time.perf_counter()
                tokens.append(token)
                if on_token is not None:
                    on_token(token)
                while token not in stops and len(tokens) < limit:
                    hidden = self._prefill(StreamPiece.text([token], self.adapter.position_axes))
                    token = int(self.adapter.logits(hidden[:, -1:]).argmax(-1))
                    tokens.append(token)
                    if on_token is not None:
                        on_token(token)
                self._sync()
        finally:
            self.store.truncate(saved_lengths)
        return tokens, first_token_at

    def next_token_logits(self, question: str) -> torch.Tensor:
        """Logits ``(vocab,)`` of the first answer token, leaving the cache untouched.

        Used to compare retention rules against the full cache (KL divergence,
        log-probability of known answers) without decoding.
        """
        hidden = self.run_query(question)
        with torch.inference_mode():
            return self.adapter.logits(hidden)[0, -1].float()

    def answer_logprob(self, question: str, answer: str) -> float:
        """Log-probability of ``answer`` (teacher-forced) after ``question``; cache untouched.

        Used to compare retention rules on known answers without decoding.
        """
        answer_ids = self.adapter.encode_text(answer)
        if not answer_ids:
            raise StreamError("the answer is empty")
        self.flush()
        if self.frames_seen == 0:
            raise StreamError("a question was asked before any frame was streamed")
        axes = self.adapter.position_axes
        piece = self.adapter.question_piece(question)
        with self._question_memory(piece):
            saved_lengths = self.store.lengths()
            try:
                with torch.inference_mode():
                    first = self._prefill(piece, last_only=True)
                    rest = self._prefill(StreamPiece.text(answer_ids[:-1], axes)) if len(answer_ids) > 1 else None
                    hidden = first if rest is None else torch.cat([first, rest], dim=1)
                    logprobs = torch.log_softmax(self.adapter.logits(hidden)[0].float(), dim=-1)
                    return float(logprobs[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].sum())
            finally:
                self.store.truncate(saved_lengths)

    def continuation_logprobs(
        self, prompt: list[int], continuation: list[int], capture: AttentionCapture | None = None
    ) -> torch.Tensor:
        """Log-probabilities at each token of ``continuation`` teacher-forced after ``prompt``.

        ``prompt`` and ``continuation`` are token ids prefilled as plain text right after
        the cache's tokens (the caller adds any chat-template text); the cache is left as
        it was. With ``capture``, the attention of every prefilled row is handed over.

        Returns
        -------
        FloatTensor ``(len(continuation), vocab)``: row ``j`` is the log-softmax of the
        distribution that predicts ``continuation[j]``.
        """
        return self.batch_continuation_logprobs([(prompt, continuation)], capture)[0]

    def batch_continuation_logprobs(
        self, items: Sequence[tuple[list[int], list[int]]], capture: AttentionCapture | None = None
    ) -> list[torch.Tensor]:
        """:meth:`continuation_logprobs` of several (prompt, continuation) pairs in one forward.

        Each pair is an independent query block (:class:`~hermes_policy.attention.ragged.QueryBlocks`):
        it sees the cache and, causally, itself only, at the layer's next free position,
        exactly as if it had been run alone. The cache is left as it was.

        Returns
        -------
        per pair, FloatTensor ``(len(continuation), vocab)`` on the CPU
        """
        if not items or any(not p or not c for p, c in items):
            raise StreamError("every prompt and continuation must hold tokens")
        self.flush()
        if self.frames_seen == 0:
            raise StreamError("a question was asked before any frame was streamed")
        axes = self.adapter.position_axes
        if self.memory is not None and self.memory.per_question and len(items) > 1:
            # what the memory brings back depends on the question: one pair at a time
            return [out for item in items for out in self.batch_continuation_logprobs([item], capture)]
        with self._question_memory(StreamPiece.text(list(items[0][0]), axes)):
            return self._continuation_logprobs(items, capture)

    def _continuation_logprobs(
        self, items: Sequence[tuple[list[int], list[int]]], capture: AttentionCapture | None
    ) -> list[torch.Tensor]:
        saved_lengths = self.store.lengths()
        axes = self.adapter.position_axes
        blocks = [list(p) + list(c[:-1]) for p, c in items]
        ids = np.concatenate([np.asarray(b, dtype=np.int64) for b in blocks])
        positions = np.concatenate([np.arange(len(b), dtype=np.int64) for b in blocks])
        merged = StreamPiece(
            input_ids=torch.from_numpy(ids),
            positions=torch.from_numpy(np.tile(positions, (axes, 1))),
            frame_index=torch.from_numpy(np.full(len(ids), -1, dtype=np.int64)),
        )
        out = []
        try:
            blocked = QueryBlocks(self.adapter.attention_modules, [len(b) for b in blocks]) if len(blocks) > 1 else nullcontext()
            with torch.inference_mode(), blocked, capture or nullcontext():
                hidden = self._prefill(merged)
                start = 0
                for (prompt, _continuation), block in zip(items, blocks, strict=True):
                    rows = hidden[:, start + len(prompt) - 1 : start + len(block)]
                    out.append(torch.log_softmax(self.adapter.logits(rows)[0].float(), dim=-1).cpu())
                    start += len(block)
            return out
        finally:
            self.store.truncate(saved_lengths)

    def run_query(self, text: str, capture: AttentionCapture | None = None) -> torch.Tensor:
        """Prefill a question on the cache and take it back out; returns its last hidden state.

        Parameters
        ----------
        text : the question (formatted as :meth:`ask` formats it)
        capture : an attention capture active during the prefill (probing, pseudo-queries)

        Returns
        -------
        Tensor ``(1, 1, hidden)``
        """
        self.flush()
        if self.frames_seen == 0:
            raise StreamError("a question was asked before any frame was streamed")
        piece = self.adapter.question_piece(text)
        with self._question_memory(piece):
            saved_lengths = self.store.lengths()
            try:
                with torch.inference_mode(), capture or nullcontext():
                    return self._prefill(piece, last_only=True)
            finally:
                self.store.truncate(saved_lengths)

    @property
    def answer_graphs(self) -> AnswerGraphs:
        """The fixed-shape answering machinery (built on first use)."""
        if self._answer_graphs is None:
            self._answer_graphs = AnswerGraphs(
                self.adapter, self.store, use_graphs=self.answer_path == "graphs"
            )
        return self._answer_graphs

    @property
    def pending_frames(self) -> int:
        """Frames received but not yet prefilled (waiting to fill a chunk)."""
        return len(self._pending)

    @property
    def tokens_kept(self) -> list[int]:
        """Stream tokens currently held per layer."""
        return self.store.stream_lengths()

    # -- internals -------------------------------------------------------------------
    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Accumulate the time of one ingest phase in :attr:`phase_seconds`.

        Only when :attr:`time_phases` is set: it synchronises the GPU at both ends, which
        the hot path otherwise avoids.
        """
        # a named range in torch-profiler traces (nearly free when no profiler runs)
        with torch.profiler.record_function(f"ingest:{name}"):
            if self.phase_marks is not None and self.adapter.device.type == "cuda":
                # host clock and a CUDA event at both ends, no synchronisation: comparing
                # them afterwards shows where the GPU waited for the host
                begin = torch.cuda.Event(enable_timing=True)
                begin.record()
                host_begin = time.perf_counter()
                try:
                    yield
                finally:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                    self.phase_marks.append((name, host_begin, time.perf_counter(), begin, end))
                return
            if not self.time_phases:
                yield
                return
            self._sync()
            start = time.perf_counter()
            try:
                yield
            finally:
                self._sync()
                self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - start

    def _ingest_chunk(self, n: int) -> int:
        piece, n = self._encode_pending(n)
        return self._apply_retention(self._prefill_encoded(piece, n))

    def _encode_next_chunk(self) -> tuple[StreamPiece, int] | None:
        """:meth:`_encode_pending` of a full chunk, or None while fewer frames wait."""
        return self._encode_pending(self.chunk_frames) if len(self._pending) >= self.chunk_frames else None

    def _encode_pending(self, n: int) -> tuple[StreamPiece, int]:
        """The first ``n`` pending frames as a piece; they stay queued until prefilled
        (:meth:`_prefill_encoded`), so a failure in between loses no frame. Frames that
        cannot be encoded (bad input) are dropped with the error: the session stays usable."""
        times = self._pending_times[:n]
        try:
            with self._phase("encode"):
                piece = self.adapter.frames_piece(
                    _stack_frames(self._pending[:n]), self.frames_seen, None if None in times else times
                )
        except Exception:
            self._pending, self._pending_times = self._pending[n:], self._pending_times[n:]
            raise
        return piece, n

    def _prefill_encoded(self, piece: StreamPiece, n: int) -> list[torch.Tensor | None] | None:
        """Prefill the encoded first ``n`` pending frames, then dequeue them; returns the
        pseudo-query attention that rode along, if any."""
        with self._phase("prefill"):
            attention = self._prefill_chunk(piece, recurring=n == self.chunk_frames and self._at_budget())
        self._pending, self._pending_times = self._pending[n:], self._pending_times[n:]
        self.frames_seen += n
        if self.memory is not None:
            self.memory.after_chunk(self.store, len(piece))
        return attention

    def _prefill_chunk(self, piece: StreamPiece, recurring: bool = False) -> list[torch.Tensor | None] | None:
        """Prefill a chunk; when the rule will compress after it, run its pseudo-queries too.

        ``recurring``: the forward's shape will recur (a full chunk on a cache at its
        budget), so its CUDA graph is captured now (:class:`~hermes_policy.graphs.chunk_graphs.ChunkGraphs`).

        The pseudo-queries ride in the same forward as the chunk (after it, each seeing the
        cache, the chunk and itself; :class:`~hermes_policy.attention.ragged.QueryBlocks` with a
        lead), which saves a second pass over the weights per compression step. Returns
        their per-layer attention, or None when no pseudo-query ran.
        """
        rule = self.retention
        if self.fuse_guidance and rule.needs_compression(self.store, upcoming=len(piece)):
            request = rule.guidance(self.store, [(t.question, t.answer) for t in self.history])
            if request is not None:
                prompts = [self._prompt_piece(p) for p in request.prompts]
                reach = piece.extent + max(p.extent for p in prompts) + PROMPT_QUANTUM  # padding
                near_limit = rule.reindex == "lazy" and self._near_position_limit(reach)
                if near_limit:
                    # compacted now, not inside the chunk's prefill: the pseudo-queries still
                    # ride with the chunk (a separate pass reads the weights a second time)
                    self._reindex_all()
                    near_limit = self._near_position_limit(reach)
                if not near_limit:
                    self.fused_guidance_passes += 1
                    return self.guidance_attention(request, lead=piece, prompt_pieces=prompts, recurring=recurring)
        self._prefill(piece, ingest=True, recurring=recurring)
        return None

    def _prompt_piece(self, prompt: str) -> StreamPiece:
        """A guidance prompt as a piece, tokenised once: the prompts change only with the
        conversation, and every compressing chunk asks for them."""
        cached = self._prompt_pieces.get(prompt)
        if cached is None:
            if len(self._prompt_pieces) >= 8:  # the prompts of earlier questions
                self._prompt_pieces.clear()
            cached = self._prompt_pieces[prompt] = self.adapter.question_piece(prompt)
        return cached

    def layer_positions(self, piece: StreamPiece) -> list[torch.Tensor]:
        """Absolute positions of a piece in each layer: that layer's next free position + relative."""
        relative = piece.positions.numpy()
        return [
            torch.from_numpy(self.store.next_position(layer) + relative) for layer in range(self.store.num_layers)
        ]

    def _prefill(
        self,
        piece: StreamPiece,
        last_only: bool = False,
        ingest: bool = False,
        context: tuple = (),
        collected: list[Any] | None = None,
        recurring: bool = False,
    ) -> torch.Tensor | None:
        """Run a piece on top of the store; returns hidden states (all, or the last one),
        or None for ingest run from fixed buffers (nothing downstream reads them).

        ``ingest``: the piece is stream input or a pseudo-query (not a question or answer),
        so lazy re-indexing may run first if the piece would reach the position limit, and
        a recurring shape may be replayed from a CUDA graph; ``context`` describes the
        attention contexts active around the call and ``collected`` is the list their
        callbacks fill, and ``recurring`` whether the shape is known to recur (all three for
        :class:`~hermes_policy.graphs.chunk_graphs.ChunkGraphs`).
        """
        if ingest and self.retention.reindex == "lazy" and self._near_position_limit(piece.extent):
            self._reindex_all()
        positions = self.layer_positions(piece)
        self._check_position_limit(positions)
        if (
            ingest
            and self.chunk_graphs is not None
            and self.chunk_graphs.prefill(piece, positions, context, collected, recurring=recurring)
        ):
            self.store.record_appended(positions, piece.frame_index)
            return None  # ingest keeps no hidden states
        uniform = all(np.array_equal(positions[0].numpy(), p.numpy()) for p in positions[1:])
        if uniform:
            hidden = self.adapter.forward(piece, positions[0], self.store.cache)
        else:
            embeddings = self._rotary_per_layer(positions)
            with PerLayerRotary(self.adapter.decoder_layers, embeddings):
                hidden = self.adapter.forward(piece, positions[0], self.store.cache)
        self.store.record_appended(positions, piece.frame_index)
        return hidden[:, -1:] if last_only else hidden

    def _rotary_per_layer(self, positions: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from hermes_policy.cache.positions import to_model_position_ids

        device, dtype = self.adapter.device, self.adapter.dtype
        probe = torch.zeros(1, dtype=dtype, device=device)
        computed: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        out = []
        for pos in positions:
            key = pos.numpy().tobytes()
            if key not in computed:
                computed[key] = self.adapter.rotary_emb(probe, to_model_position_ids(upload(pos, device)))
            out.append(computed[key])
        return out

    def _apply_retention(self, attention: list[torch.Tensor | None] | None = None) -> int:
        """One compression step (after a chunk): returns 1 when anything was evicted.

        ``attention``: the pseudo-query attention already computed with the chunk (fused);
        when None and the rule asks for guidance, a separate pass runs here.
        """
        rule = self.retention
        rotary = self.adapter.rotary_emb
        decisions = {}
        if rule.needs_compression(self.store):
            if attention is None:
                request = rule.guidance(self.store, [(t.question, t.answer) for t in self.history])
                with self._phase("guidance"):
                    attention = self.guidance_attention(request) if request is not None else None
            with self._phase("select"):
                decisions = rule.select(self.store, SelectContext(attention=attention, rotary_emb=rotary))
        with self._phase("gather") if decisions else nullcontext():
            self.store.keep_layers(
                {
                    layer: (keep.indices, None if keep.summary is None else keep.summary.as_extra())
                    for layer, keep in decisions.items()
                }
            )
            if rule.reindex == "eager":
                for layer in decisions:
                    self.store.reindex(layer, rotary)
        if decisions:
            self.compressions += 1
        if rule.reindex == "lazy" and self._near_position_limit():
            self._reindex_all()
        return int(bool(decisions))

    def _reindex_all(self) -> None:
        for layer in range(self.store.num_layers):
            self.store.reindex(layer, self.adapter.rotary_emb)

    def guidance_attention(
        self,
        request: GuidanceRequest,
        lead: StreamPiece | None = None,
        prompt_pieces: list[StreamPiece] | None = None,
        recurring: bool = False,
    ) -> list[torch.Tensor | None]:
        """Run pseudo-queries on the cache and return each layer's attention over its stream.

        All prompts go through one forward: each is a block that sees the cache and,
        causally, itself only (:class:`~hermes_policy.attention.ragged.QueryBlocks`), placed at
        the layer's next free position, exactly as if it had been asked alone. Only the
        layers and rows a rule asked for are captured; the prompts leave no trace.

        Parameters
        ----------
        request : the rule's pseudo-queries
        lead : a piece to prefill (and keep) in the same forward before the prompts, which
            then see it as part of the cache (a chunk of frames: fused guidance)
        prompt_pieces : the prompts already turned into pieces (default: from ``request``)
        recurring : this forward's shape will recur (see :meth:`_prefill_chunk`)

        Returns
        -------
        per layer, FloatTensor ``(stream_len,)`` on the model's device (mean over heads and
        the prompt's tokens of the attention on stream tokens, the lead included), or None
        where no prompt was requested. Kept there: no host sync inside the forward.
        """
        self.guidance_passes += 1
        pieces = prompt_pieces or [self.adapter.question_piece(p) for p in request.prompts]
        # each prompt padded to a multiple of PROMPT_QUANTUM tokens: a forward's shape then
        # changes only when a prompt crosses a multiple (its CUDA graph is reused across
        # questions); the padding comes after the prompt's tokens, which do not see it
        real_lengths = [len(p) for p in pieces]
        pieces = [pad_piece(p, PROMPT_QUANTUM) for p in pieces]
        lead_len = len(lead) if lead is not None else 0
        starts = [lead_len]
        for piece in pieces:
            starts.append(starts[-1] + len(piece))
        # Prompts start where the lead ends (the layer's next free position after it).
        shift = lead.extent if lead is not None else 0
        parts = ([lead] if lead is not None else []) + pieces
        # joined in numpy (the host's work here is on every compressing chunk's path)
        merged = StreamPiece(
            input_ids=torch.from_numpy(np.concatenate([p.input_ids.numpy() for p in parts])),
            positions=torch.from_numpy(
                np.concatenate([p.positions.numpy() + (shift if p is not lead else 0) for p in parts], axis=1)
            ),
            frame_index=torch.from_numpy(np.concatenate([p.frame_index.numpy() for p in parts])),
            model_inputs=lead.model_inputs if lead is not None else {},
        )
        # each layer's whole padded prompt block: the rows are part of a CUDA graph's shape,
        # which then stays the same across questions whose prompts pad to the same length
        # (the padding rows weigh 0 in the mean over the rows, see _prompt_row_weights)
        rows = {
            layer: slice(starts[idx], starts[idx + 1])
            for layer, idx in enumerate(request.layer_prompt)
            if idx is not None
        }
        result: list[torch.Tensor | None] = [None] * self.store.num_layers
        prefix = self.store.prefix_len
        lengths = [n + lead_len for n in self.store.lengths()]
        # each prompt's rows weighed 1/n for its n tokens and 0 for its padding: the capture
        # hands over the mean over them (and over heads), computed with the probabilities
        weights = [
            self._prompt_row_weights(idx, real, len(piece))
            for idx, (real, piece) in enumerate(zip(real_lengths, pieces, strict=True))
        ]

        def keep_stream(layer: int, probs: torch.Tensor) -> None:
            # (stream,): the mean over heads and the prompt's tokens; stays on the device
            result[layer] = probs[0, 0, 0, prefix : lengths[layer]].float()

        capture = AttentionCapture(
            self.adapter.attention_modules,
            query_rows=rows,
            callback=keep_stream,
            head_mean=True,
            row_weights={layer: weights[idx] for layer, idx in enumerate(request.layer_prompt) if idx is not None},
        )
        sizes = [len(p) for p in pieces]
        blocks = QueryBlocks(self.adapter.attention_modules, sizes, lead=lead_len)
        # what shapes this forward besides its length and the cache lengths (graph keys)
        captured = tuple(sorted((k, v.start, v.stop) for k, v in rows.items()))
        context = ("guidance", lead_len, tuple(sizes), captured)
        self.guidance_layout = GuidanceLayout(lead_len, tuple(real_lengths), tuple(sizes), captured, len(result))
        with blocks, capture, torch.inference_mode():
            self._prefill(merged, ingest=True, context=context, collected=result, recurring=recurring)
        self.store.truncate(lengths)
        return result

    def _prompt_row_weights(self, index: int, real: int, padded: int) -> torch.Tensor:
        """Weights ``(padded,)`` of prompt ``index``'s rows: ``1 / real`` for its tokens, 0
        for its padding. One device tensor per prompt and padded length, refilled (queued
        before the forward) only when the prompt's length changes: a CUDA graph captured
        with it reads the values of the replay's own prompts."""
        key = (index, padded)
        held, held_real = self._row_weights.get(key, (None, None))
        if held_real == real:
            return held
        values = np.zeros(padded, dtype=np.float32)
        values[:real] = 1.0 / real
        with torch.inference_mode():  # made and refilled as an inference tensor, wherever called from
            if held is None:
                held = torch.empty(padded, dtype=torch.float32, device=self.adapter.device)
            held.copy_(upload(torch.from_numpy(values), held.device))
        self._row_weights[key] = (held, real)
        return held

    def _at_budget(self) -> bool:
        """True when every layer holds exactly its budget of stream tokens: a full chunk then
        brings each layer over it, and the compression back to it, so the next chunk meets
        the same cache lengths (the steady state whose forwards recur)."""
        rule = self.retention
        budgets = [rule.budget_of(layer) for layer in range(self.store.num_layers)]
        return None not in budgets and self.store.stream_lengths() == budgets

    def _near_position_limit(self, upcoming: int = 0) -> bool:
        """True when positions (plus ``upcoming`` new ones) come within the margin of the limit."""
        return self.store.max_position() + upcoming >= self.adapter.max_positions - self.reindex_margin

    def _check_position_limit(self, positions: list[torch.Tensor]) -> None:
        highest = max(int(p.numpy().max()) for p in positions) if positions[0].numel() else 0
        if highest >= self.adapter.max_positions and not self._warned_positions:
            self._warned_positions = True
            warnings.warn(
                f"positions reached {highest}, beyond the model's limit of {self.adapter.max_positions}: "
                f"the '{self.retention.name}' rule keeps more tokens than the model was trained on",
                stacklevel=3,
            )

    def _reset_peak_memory(self) -> None:
        if self.adapter.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.adapter.device)

    def _peak_memory(self) -> int | None:
        if self.adapter.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.adapter.device))
        return None

    def _sync(self) -> None:
        if self.adapter.device.type == "cuda":
            torch.cuda.synchronize(self.adapter.device)
