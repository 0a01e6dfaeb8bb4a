"""Answering on fixed shapes: the question prefill and the decode step as CUDA graphs.

A question's prefill and each decode step are memory-bound: they read the weights once,
which takes a few milliseconds on a current GPU, while launching the ~20 kernels of each
of ~30 layers from Python takes longer than that. So both run on fixed shapes and are
captured once as CUDA graphs, then replayed:

- the question is padded to a bucket length (16, 32, 64, ...), one graph per bucket;
- keys and values are written straight into the stream cache's preallocated buffers at
  slots ``length + i`` of each layer (:class:`~hermes_policy.cache.stream_cache.StaticWrites`)
  and attention sees a fixed window of the buffer (the slots the answer can reach,
  rounded up to 256; one graph per window, so a stream at its budget uses one), masked
  by slot (:func:`~hermes_policy.attention.static.static_attention`); nothing is appended, so the
  cache is back to its state before the question when the answer is done;
- each layer's rotary cos/sin is computed inside the graph from device-side positions;
- the decode graph reads the previous token from a device buffer, writes the next one
  there and advances its own offset, so the host only replays and reads one integer.

Everything the graphs read lives in buffers filled by one host-to-device copy per
question. Graphs are re-captured when a layer's buffer moves (it grew).

``use_graphs=False`` runs the same fixed-shape code eagerly (CPU, tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hermes_policy.attention.context import AttentionContext
from hermes_policy.attention.static import static_masks
from hermes_policy.cache.kv_store import KVStore
from hermes_policy.cache.stream_cache import StaticWrites
from hermes_policy.graphs.chunk_graphs import batch_axis, per_layer_text_forward
from hermes_policy.graphs.static_forward import (
    prepare_static_forward,
    static_text_forward,
    supports_static_forward,
)
from hermes_policy.models.base import ModelAdapter, StreamPiece

BUCKETS = (16, 32, 64, 128, 256, 512)
WINDOW_QUANTUM = 256  # key windows are multiples of this many slots
MAX_GRAPHS = 24  # captured graphs kept (each holds a memory pool); beyond it, start over
MAX_CAPTURE_ATTEMPTS = 2  # failed captures of one graph before answers run without graphs for good


def bucket_length(n: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket holding ``n`` tokens (multiples of the largest beyond it)."""
    for size in buckets:
        if n <= size:
            return size
    top = buckets[-1]
    return -(-n // top) * top


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None
    body: Callable[[], None]

    def run(self) -> None:
        if self.graph is None:
            self.body()
        else:
            self.graph.replay()


class AnswerGraphs:
    """Question prefill and greedy decode on fixed shapes, over a session's KV store.

    Parameters
    ----------
    adapter : the model adapter
    store : the session's KV store (its cache must be a ``StreamCache``)
    use_graphs : capture CUDA graphs (needs a CUDA device); False runs the same code eagerly
    fewer_kernels : run Llama/Qwen2-form text models through
        :func:`~hermes_policy.graphs.static_forward.static_text_forward` (fused projections, fewer
        kernels per layer; fuses the model's projection weights in place); other models, a
        model split over several GPUs, or False, run the transformers forward
    """

    def __init__(self, adapter: ModelAdapter, store: KVStore, use_graphs: bool = True, fewer_kernels: bool = True):
        if use_graphs and (adapter.device.type != "cuda" or adapter.spans_devices):
            raise ValueError("CUDA graphs need the whole model on one CUDA device")
        self.adapter = adapter
        self.store = store
        self.use_graphs = use_graphs
        self.captures = 0
        self._axes = adapter.position_axes
        self._layers = adapter.num_layers
        self._device = adapter.device
        self._batch_axis = batch_axis(adapter.rotary_emb, self._axes, self._device, adapter.dtype)
        self._graphs: dict[tuple[int | str, int], _Graph] = {}
        self._attempts: dict[tuple[int | str, int], int] = {}  # failed captures per key
        self._generation: tuple[int, ...] | None = None
        self._inputs: dict[int, torch.Tensor] = {}
        self._head_masks: tuple[torch.Tensor | None, ...] | None = None  # of the answer under way
        self._host_inputs: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        # decode state shared by all buckets
        self._token = torch.zeros(1, dtype=torch.long, device=self._device)
        self._offset = torch.zeros(1, dtype=torch.long, device=self._device)
        self._slot_base = torch.zeros(self._layers, dtype=torch.long, device=self._device)
        self._pos_base = torch.zeros(self._layers, self._axes, dtype=torch.long, device=self._device)
        # (one device: the model's own forward moves activations between GPUs of a split model)
        self.fewer_kernels = fewer_kernels and not adapter.spans_devices and supports_static_forward(adapter)
        if self.fewer_kernels:
            prepare_static_forward(adapter)

    # -- public --------------------------------------------------------------------------
    def answer(
        self,
        piece: StreamPiece,
        max_new_tokens: int,
        stop_ids: set[int],
        on_first_token: Callable[[], None] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Greedy answer tokens for a question piece (stop token included when hit).

        The store is left as it was: the question and answer tokens are written after
        each layer's length and never counted. ``on_token`` sees each token as it is read.
        """
        # per-head retention: the masks change with every compression, so a masked store
        # answers with this code run eagerly (nothing captured) and its masks in each layer
        self._head_masks = self.store.head_masks()
        q_real = len(piece)
        bucket = bucket_length(q_real)
        lengths = self.store.lengths()
        window = self._window(max(lengths) + bucket + max_new_tokens)
        self._load_inputs(piece, bucket, lengths)
        prefill = self._graph((bucket, window))
        prefill.run()
        token = int(self._token)
        if on_first_token is not None:
            on_first_token()
        if on_token is not None:
            on_token(token)
        tokens = [token]
        if token in stop_ids or max_new_tokens <= 1:
            return tokens
        decode = self._graph(("decode", window))
        while len(tokens) < max_new_tokens:
            decode.run()
            token = int(self._token)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop_ids:
                break
        return tokens

    def warm(self, question_lengths: tuple[int, ...], max_new_tokens: int) -> int:
        """Capture now the graphs that questions of these token lengths, answered with at
        most ``max_new_tokens`` tokens, would capture on the store as it is; returns how many
        were captured (0 when they exist already, without graphs, or on a per-head store).

        The store is left as it was (like :meth:`answer`); a live server calls this once a
        stream's cache has reached its steady size, so its first question does not pay the
        captures. The graphs stay valid while the cache's buffers do not move.
        """
        if not self.use_graphs or self.store.head_masks() is not None:
            return 0
        self._head_masks = None
        before = self.captures
        lengths = self.store.lengths()
        for bucket in sorted({bucket_length(n) for n in question_lengths}):
            window = self._window(max(lengths) + bucket + max_new_tokens)
            keys = ((bucket, window), ("decode", window))
            if all(key in self._graphs for key in keys):
                continue
            self._load_inputs(StreamPiece.text([0] * bucket, self._axes), bucket, lengths)
            for key in keys:
                self._graph(key)
        return self.captures - before

    # -- inputs ----------------------------------------------------------------------------
    def _window(self, needed: int) -> int:
        """Reserve ``needed`` slots in every layer; the key window the graphs attend over."""
        self._reserve(needed)
        capacity = min(layer.capacity for layer in self.store.cache.layers)
        return min(-(-needed // WINDOW_QUANTUM) * WINDOW_QUANTUM, capacity)

    def _reserve(self, needed: int) -> None:
        for layer in self.store.cache.layers:
            layer.reserve(needed, *layer.buffers)
        generation = self.store.cache.generation
        if generation != self._generation:
            self._graphs.clear()
            self._generation = generation

    def _load_inputs(self, piece: StreamPiece, bucket: int, lengths: list[int]) -> None:
        """One host-to-device copy of everything the graphs read for this question.

        Written in place into a host buffer per bucket (pinned on CUDA, so the copy does
        not block the host), laid out as :meth:`_views` reads it.
        """
        q_real, axes, layers = len(piece), self._axes, self._layers
        size = bucket + axes * bucket + layers + layers * axes + 2
        host, copied = self._host_inputs.get(bucket, (None, None))
        if host is None:
            host = torch.empty(size, dtype=torch.long, pin_memory=self._device.type == "cuda")
        elif copied is not None:
            copied.synchronize()  # the last question's copy from this buffer (long done)
        # numpy on the host: small torch operations on the CPU each have a fixed cost
        values = host.numpy()
        ids, rel = values[:bucket], values[bucket : bucket + axes * bucket].reshape(axes, bucket)
        ids[:q_real] = piece.input_ids.numpy()
        ids[q_real:] = 0
        rel[:, :q_real] = piece.positions.numpy()
        last = int(rel[:, :q_real].max()) if q_real else -1
        rel[:, q_real:] = np.arange(last + 1, last + 1 + bucket - q_real)
        start = bucket + axes * bucket
        values[start : start + layers] = lengths
        start += layers
        values[start : start + layers * axes].reshape(layers, axes)[:] = np.asarray(
            [self.store.next_position(layer) for layer in range(layers)], dtype=np.int64
        )[:, None]
        values[-2:] = (q_real, last + 1)  # the question's length and extent
        staging = self._inputs.get(bucket)
        if staging is None:
            staging = self._inputs[bucket] = torch.empty(size, dtype=torch.long, device=self._device)
        staging.copy_(host, non_blocking=True)
        done = None
        if self._device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self._device))
        self._host_inputs[bucket] = (host, done)

    def _views(self, bucket: int) -> tuple[torch.Tensor, ...]:
        staging = self._inputs[bucket]
        axes, layers = self._axes, self._layers
        sizes = [bucket, axes * bucket, layers, layers * axes, 2]
        ids, rel, lengths, next_pos, tail = staging.split(sizes)
        return ids[None], rel.view(axes, bucket), lengths, next_pos.view(layers, axes), tail

    # -- the fixed-shape forward -------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, window: int) -> torch.Tensor:
        """Text-model forward of ``ids (1, q)`` at per-layer ``positions (layers, axes, q)``.

        Writes keys/values at ``slots (layers, q)``, attends over the first ``window`` slots;
        returns hidden states ``(1, q, hidden)``.
        """
        if self.fewer_kernels:
            return static_text_forward(self.adapter, ids, positions, slots, window, self.store.cache, self._head_masks)
        head_dim = self.adapter.attention_modules[0].head_dim
        attention = AttentionContext(
            static_limits=slots, static_blocked=static_masks(slots, window, head_dim), head_masks=self._head_masks
        )
        with StaticWrites(self.store.cache, slots, window):
            return per_layer_text_forward(
                self.adapter, positions, self.store.cache, self._batch_axis, attention, input_ids=ids
            )

    def _prefill_body(self, bucket: int, window: int) -> Callable[[], None]:
        ids, rel, lengths, next_pos, tail = self._views(bucket)
        arange = torch.arange(bucket, device=self._device)

        def body() -> None:
            slots = lengths[:, None] + arange  # (layers, bucket)
            positions = next_pos[:, :, None] + rel[None]  # (layers, axes, bucket)
            hidden = self._forward(ids, positions, slots, window)
            last = hidden.index_select(1, tail[0:1].to(hidden.device) - 1)
            self._token.copy_(self.adapter.logits(last).argmax(-1).view(1))
            # decode continues after the question: slot length + q, position next + extent
            self._offset.copy_(tail[0:1])
            self._slot_base.copy_(lengths)
            self._pos_base.copy_(next_pos + tail[1] - tail[0])

        return body

    def _decode_body(self, window: int) -> Callable[[], None]:
        def body() -> None:
            slots = (self._slot_base + self._offset)[:, None]  # (layers, 1)
            positions = (self._pos_base + self._offset)[:, :, None]  # (layers, axes, 1)
            hidden = self._forward(self._token.view(1, 1), positions, slots, window)
            self._token.copy_(self.adapter.logits(hidden).argmax(-1).view(1))
            self._offset.add_(1)

        return body

    # -- capture -------------------------------------------------------------------------------
    def _graph(self, key: tuple[int | str, int]) -> _Graph:
        """The graph of ``(bucket, window)`` or ``("decode", window)``, captured on first use."""
        if self._head_masks is not None:  # masked: never captured (see answer)
            kind, window = key
            return _Graph(None, self._decode_body(window) if kind == "decode" else self._prefill_body(int(kind), window))
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= MAX_GRAPHS:
                self._graphs.clear()
            kind, window = key
            body = self._decode_body(window) if kind == "decode" else self._prefill_body(int(kind), window)
            if not self.use_graphs:
                graph = self._graphs[key] = _Graph(None, body)
            else:
                graph = self._captured(key, body)
        return graph

    def _captured(self, key: tuple[int | str, int], body: Callable[[], None]) -> _Graph:
        """The graph of ``body``, kept under ``key``; after a failed capture, ``body`` run
        eagerly for this answer and captured again at the key's next use (a failure can be
        one-off), and after :data:`MAX_CAPTURE_ATTEMPTS` failures of one key
        (a forward that syncs with the host) no graphs at all."""
        try:
            graph = self._capture(body)
        except Exception as error:
            attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
            if attempts >= MAX_CAPTURE_ATTEMPTS:
                self.use_graphs = False
                warnings.warn(f"CUDA graph capture failed ({error}); answering without graphs", stacklevel=5)
            else:
                warnings.warn(
                    f"CUDA graph capture failed ({error}); this step runs without a graph, captured again at its next use",
                    stacklevel=5,
                )
            return _Graph(None, body)
        self._graphs[key] = graph
        return graph

    def _capture(self, body: Callable[[], None]) -> _Graph:
        """Warm up on a side stream, then capture; the decode state is restored after both
        (after a failed capture too, which is raised)."""
        saved = (self._token.clone(), self._offset.clone())
        try:
            stream = torch.cuda.Stream(self._device)
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    body()
            torch.cuda.current_stream(self._device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                body()
            self.captures += 1
        finally:
            self._token.copy_(saved[0])
            self._offset.copy_(saved[1])
        return _Graph(graph, body)
