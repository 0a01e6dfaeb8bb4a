"""The session's ingest half and its state: frames buffered into chunks, each chunk
prefilled (with the rule's pseudo-queries when it triggers compression), the rule applied.
The question half is mixed in from :mod:`hermes_policy.session.questions`."""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from hermes_policy.attention.context import AttentionContext
from hermes_policy.attention.rotary import PerLayerRotary
from hermes_policy.cache.kv_store import KVStore
from hermes_policy.cache.transfer import upload
from hermes_policy.errors import StreamError
from hermes_policy.graphs.answer_graphs import AnswerGraphs
from hermes_policy.graphs.chunk_graphs import ChunkGraphs
from hermes_policy.models.base import DEFAULT_SYSTEM_PROMPT, ModelAdapter, StreamPiece
from hermes_policy.options import ANSWER_PATHS, RuntimeOptions, apply
from hermes_policy.retention import FullRetention, GuidanceRequest, RetentionRule, SelectContext
from hermes_policy.retention.guidance import GuidanceLayout, GuidancePlanner
from hermes_policy.session.frames import split_frames, stack_frames
from hermes_policy.session.observer import NoObserver, SessionObserver, observed_phase
from hermes_policy.session.questions import SessionQuestions
from hermes_policy.session.results import IngestReport, Turn


class StreamingSession(SessionQuestions):
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
    observer : watches the ingest phases (:mod:`hermes_policy.session.observer`; default:
        nothing is watched); may be replaced between calls (:attr:`observer`)
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
        observer: SessionObserver | None = None,
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
        if ingest_graphs is None:
            ingest_graphs = answer_path == "graphs"
        if ingest_graphs and (adapter.device.type != "cuda" or split):
            raise StreamError("ingest_graphs needs the whole model on one CUDA device")
        self.options = replace(options, answer_path=answer_path, ingest_graphs=bool(ingest_graphs))
        apply(self.options)
        self.fuse_guidance = fuse_guidance
        self.observer: SessionObserver = observer or NoObserver()
        self.planner = GuidancePlanner(adapter)  # the rule's pseudo-query passes
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

    @property
    def answer_path(self) -> str:
        """How :meth:`ask` runs the model (``options.answer_path``, resolved)."""
        return self.options.answer_path

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
        items = split_frames(frames)
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
            piece = self.adapter.frames_piece(stack_frames(frames), first_frame, None if None in times else times)
            self._prefill(piece)

    def flush(self) -> int:
        """Ingest frames still waiting for a full chunk; returns how many there were."""
        n = len(self._pending)
        if n:
            with torch.inference_mode():
                self._ingest_chunk(n)
        return n

    @property
    def pending_frames(self) -> int:
        """Frames received but not yet prefilled (waiting to fill a chunk)."""
        return len(self._pending)

    @property
    def tokens_kept(self) -> list[int]:
        """Stream tokens currently held per layer."""
        return self.store.stream_lengths()

    # -- internals -------------------------------------------------------------------
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
            with observed_phase(self.observer, "encode"):
                piece = self.adapter.frames_piece(
                    stack_frames(self._pending[:n]), self.frames_seen, None if None in times else times
                )
        except Exception:
            self._pending, self._pending_times = self._pending[n:], self._pending_times[n:]
            raise
        return piece, n

    def _prefill_encoded(self, piece: StreamPiece, n: int) -> list[torch.Tensor | None] | None:
        """Prefill the encoded first ``n`` pending frames, then dequeue them; returns the
        pseudo-query attention that rode along, if any."""
        with observed_phase(self.observer, "prefill"):
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
        cache, the chunk and itself; :attr:`~hermes_policy.attention.context.AttentionContext.blocks` with a
        lead), which saves a second pass over the weights per compression step. Returns
        their per-layer attention, or None when no pseudo-query ran.
        """
        rule = self.retention
        if self.fuse_guidance and rule.needs_compression(self.store, upcoming=len(piece)):
            request = rule.guidance(self.store, [(t.question, t.answer) for t in self.history])
            if request is not None:
                prompts = [self.planner.prompt_piece(p) for p in request.prompts]
                reach = piece.extent + max(p.extent for p in prompts) + self.planner.quantum  # padding
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
        attention: AttentionContext | None = None,
        collected: list[Any] | None = None,
        recurring: bool = False,
    ) -> torch.Tensor | None:
        """Run a piece on top of the store; returns hidden states (all, or the last one),
        or None for ingest run from fixed buffers (nothing downstream reads them).

        ``ingest``: the piece is stream input or a pseudo-query (not a question or answer),
        so lazy re-indexing may run first if the piece would reach the position limit, and
        a recurring shape may be replayed from a CUDA graph; ``attention`` is the forward's
        attention context (captures, query blocks), ``collected`` the list its capture's
        callback fills, and ``recurring`` whether the shape is known to recur (the last two
        for :class:`~hermes_policy.graphs.chunk_graphs.ChunkGraphs`).
        """
        if ingest and self.retention.reindex == "lazy" and self._near_position_limit(piece.extent):
            self._reindex_all()
        positions = self.layer_positions(piece)
        self._check_position_limit(positions)
        head_masks = self.store.head_masks()  # per-head retention: which tokens each KV head sees
        if head_masks is not None:
            attention = (attention or AttentionContext()).with_changes(head_masks=head_masks)
        if (
            ingest
            and head_masks is None  # (a captured graph would keep the masks of its capture)
            and self.chunk_graphs is not None
            and self.chunk_graphs.prefill(piece, positions, attention, collected, recurring=recurring)
        ):
            self.store.record_appended(positions, piece.frame_index)
            return None  # ingest keeps no hidden states
        uniform = all(np.array_equal(positions[0].numpy(), p.numpy()) for p in positions[1:])
        if uniform:
            hidden = self.adapter.forward(piece, positions[0], self.store.cache, attention)
        else:
            embeddings = self._rotary_per_layer(positions)
            with PerLayerRotary(self.adapter.decoder_layers, embeddings):
                hidden = self.adapter.forward(piece, positions[0], self.store.cache, attention)
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
                with observed_phase(self.observer, "guidance"):
                    attention = self.guidance_attention(request) if request is not None else None
            with observed_phase(self.observer, "select"):
                decisions = rule.select(self.store, SelectContext(attention=attention, rotary_emb=rotary))
        with observed_phase(self.observer, "gather") if decisions else nullcontext():
            self.store.keep_layers(
                {
                    layer: (keep.indices, None if keep.summary is None else keep.summary.as_extra())
                    for layer, keep in decisions.items()
                }
            )
            masks = {layer: keep.head_mask for layer, keep in decisions.items() if keep.head_mask is not None}
            if masks:
                self.store.set_head_masks(masks)
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
        """Run a rule's pseudo-queries on the cache (one forward, planned by
        :class:`~hermes_policy.retention.guidance.GuidancePlanner`); returns each layer's
        attention over its stream, FloatTensor ``(stream_len,)`` on the model's device, or
        None where no prompt was requested. The prompts leave no trace; ``lead`` (a chunk:
        fused guidance) is prefilled and kept; ``recurring``: see :meth:`_prefill_chunk`.
        """
        self.guidance_passes += 1
        planned = self.planner.plan(request, self.store.lengths(), self.store.prefix_len, lead, prompt_pieces)
        self.guidance_layout = planned.layout
        with torch.inference_mode():
            self._prefill(
                planned.piece,
                ingest=True,
                attention=planned.attention,
                collected=planned.attention_by_layer,
                recurring=recurring,
            )
        self.store.truncate(planned.lengths)
        return planned.attention_by_layer

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
