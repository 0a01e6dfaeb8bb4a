"""Ingest on fixed shapes: a chunk's pass through the text model replayed as a CUDA graph.

Once a bounded rule has reached its budget, every chunk runs the same shapes: the same
number of new tokens on the same per-layer cache lengths, with the same pseudo-query
blocks when it compresses. Launching the ~40 kernels of each decoder layer from Python
takes about as long as the GPU takes to run them (a trace showed the GPU waiting between
kernels; docs/performance.md), so after a shape has recurred ``after`` times (or at once, when
the session knows it will: a full chunk on a cache at its budget) the text-model part of
the prefill is captured once and then replayed; the capture's warm-up run is that chunk's
own forward:

- the chunk's input embeddings (vision features already merged, computed eagerly by
  :meth:`~hermes_policy.models.base.ModelAdapter.input_embeddings`) and the per-layer
  positions are copied into static buffers the graph reads;
- rotary cos/sin are computed per layer inside the graph from those positions;
- for Llama/Qwen2-form layers the decoder runs in about half the kernels of the
  transformers forward (:func:`~hermes_policy.graphs.static_forward.chunk_text_forward`: fused
  projections, rotary with key/value packing, residual adds with the next norm); other
  layers run the transformers forward;
- the model writes keys and values as usual, at each layer's current length: the lengths
  are part of the graph's key, and after a replay each layer's length is advanced by hand
  (the host-side counter is not part of the graph);
- attention runs the kernels it runs eagerly on a recurring shape (the split cuDNN path:
  the body's context is :attr:`~hermes_policy.attention.context.AttentionContext.steady`),
  pseudo-query blocks and their captured probabilities included;
- what the forward collected (e.g. per-layer pseudo-query attention) lives in the graph's
  memory and is handed back by reference: valid until the next replay. Ingest keeps no
  hidden states, so the fewer-kernel decoder stops after the last layer's keys and values
  (and its captured attention).

Graphs share one memory pool, at most :data:`MAX_GRAPHS` are kept (the least recently
used goes first), and all are dropped when a layer's buffer moves (grew). A shape whose capture fails
runs eagerly, and is captured again when it recurs, up to :data:`MAX_CAPTURE_ATTEMPTS`
failures; then eagerly from then on.
``use_graphs=False`` runs the same fixed-buffer code eagerly (CPU, tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hermes_policy.attention.context import AttentionContext, attention_kwargs
from hermes_policy.attention.rotary import PerLayerRotary
from hermes_policy.attention.shapes import ShapeCounter
from hermes_policy.cache.kv_store import KVStore
from hermes_policy.cache.transfer import upload
from hermes_policy.graphs.static_forward import (
    chunk_text_forward,
    prepare_static_forward,
    supports_static_forward,
)
from hermes_policy.models.base import ModelAdapter, StreamPiece, cache_kwargs

MAX_GRAPHS = 3
# captures of one shape tried before it runs eagerly for good: a capture can fail on work
# done only the first time a shape is met (a plan, a compiled variant) that the next
# attempt, after the eager run, no longer does
MAX_CAPTURE_ATTEMPTS = 2
# eager runs of a shape before it is captured: a shape seen again is a bounded rule's
# steady state (a growing cache never repeats one); the capture's own warm-up run builds
# the kernels' plans and workspaces
RECUR_AFTER = 1

Outputs = tuple[torch.Tensor | None, tuple[Any, ...]]


def batch_axis(rotary_emb: torch.nn.Module, axes: int, device: torch.device, dtype: torch.dtype) -> int:
    """The axis of the rotary module's output that indexes the batch of position rows.

    Found by running the module on batches of 1 and 2 (output layouts differ between
    1D RoPE and the multimodal variants).
    """
    probe = torch.zeros(1, dtype=dtype, device=device)
    shapes = []
    for batch in (1, 2):
        ids = torch.zeros(batch, 3, dtype=torch.long, device=device)
        if axes > 1:
            ids = ids[None].expand(axes, -1, -1)
        shapes.append(rotary_emb(probe, ids)[0].shape)
    differing = [i for i, (a, b) in enumerate(zip(*shapes, strict=True)) if a != b]
    if len(differing) != 1:
        raise RuntimeError(f"cannot locate the batch axis of rotary outputs {shapes}")
    return differing[0]


def per_layer_text_forward(
    adapter: ModelAdapter,
    positions: torch.Tensor,
    cache: Any,
    rotary_batch_axis: int,
    attention: AttentionContext | None = None,
    **inputs: torch.Tensor,
) -> torch.Tensor:
    """Text-model forward with each layer's rotary cos/sin computed from its own positions.

    Parameters
    ----------
    positions : LongTensor ``(layers, axes, q)`` on the model's device
    rotary_batch_axis : see :func:`batch_axis`
    attention : the forward's attention context
    inputs : ``input_ids (1, q)`` or ``inputs_embeds (1, q, hidden)``

    Returns
    -------
    hidden states ``(1, q, hidden)``. Every shape is fixed by ``positions``' shape: the
    body of a CUDA graph.
    """
    axes, layers = positions.shape[1], positions.shape[0]
    if axes == 1:
        batched = positions[:, 0, :]  # (layers, q)
        layer0 = positions[0]  # (1, q)
    else:
        batched = positions.permute(1, 0, 2)  # (axes, layers, q)
        layer0 = positions[0][:, None, :]  # (axes, 1, q)
    probe = torch.zeros((), dtype=adapter.dtype, device=positions.device)
    cos, sin = adapter.rotary_emb(probe, batched)
    per_layer = [
        (cos.narrow(rotary_batch_axis, layer, 1), sin.narrow(rotary_batch_axis, layer, 1)) for layer in range(layers)
    ]
    text_model = adapter.text_model
    with PerLayerRotary(adapter.decoder_layers, per_layer):
        out = text_model(
            position_ids=layer0, **inputs, **cache_kwargs(text_model, cache), **attention_kwargs(attention)
        )
    return out.last_hidden_state


def _given_embeddings(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The embeddings themselves, computed before the graph (see ChunkGraphs.prefill)."""
    return inputs["embeds"]


@dataclass
class _ChunkGraph:
    graph: torch.cuda.CUDAGraph | None
    body: Callable[[], Outputs]
    inputs: dict[str, torch.Tensor]  # static buffers the body embeds from
    positions: torch.Tensor
    collected: list[Any] | None = None  # the calling forward's list (see ChunkGraphs.prefill)
    attention: AttentionContext | None = None  # the calling forward's context (eager bodies read it)
    outputs: Outputs | None = None

    def run(self) -> Outputs:
        if self.graph is None:
            return self.body()
        self.graph.replay()
        assert self.outputs is not None
        return self.outputs


class ChunkGraphs:
    """Replays a session's recurring ingest forwards as CUDA graphs.

    Parameters
    ----------
    adapter : the model adapter (whole model on one device)
    store : the session's KV store
    use_graphs : capture CUDA graphs (needs a CUDA device); False runs the same fixed-buffer
        code eagerly (tests)
    after : eager runs of a shape before it is captured
    fewer_kernels : run Llama/Qwen2-form text models through
        :func:`~hermes_policy.graphs.static_forward.chunk_text_forward` (others, and False: the
        transformers forward)
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        store: KVStore,
        use_graphs: bool = True,
        after: int = RECUR_AFTER,
        fewer_kernels: bool = True,
    ):
        if use_graphs and (adapter.device.type != "cuda" or adapter.spans_devices):
            raise ValueError("CUDA graphs need the whole model on one CUDA device")
        self.fewer_kernels = fewer_kernels and not adapter.spans_devices and supports_static_forward(adapter)
        # the embedding step (vision tower included) inside the graph where the adapter can
        # (ModelAdapter.embedding_graph_inputs); turned off if such a capture ever fails
        self.embeddings_in_graph = True
        if self.fewer_kernels:
            prepare_static_forward(adapter)  # fusing allocates: not inside a capture
        self.adapter = adapter
        self.store = store
        self.use_graphs = use_graphs
        self.after = after
        self.captures = 0
        self.replays = 0
        self.failed: set[tuple] = set()  # shapes that run eagerly for good
        self._attempts: dict[tuple, int] = {}  # failed captures per shape
        self._shapes = ShapeCounter(after=after)
        self._graphs: dict[tuple, _ChunkGraph] = {}
        self._generation: tuple[int, ...] | None = None
        self._pool: Any = None
        self._batch_axis = batch_axis(adapter.rotary_emb, adapter.position_axes, adapter.device, adapter.dtype)

    def prefill(
        self,
        piece: StreamPiece,
        positions: list[torch.Tensor],
        attention: AttentionContext | None = None,
        collected: list[Any] | None = None,
        recurring: bool = False,
    ) -> bool:
        """Run ``piece`` through the text model from a graph; False: the caller runs it eagerly.

        A shape (its length, every layer's length, and what else shapes the forward: the
        attention context's block layout and captured rows) is captured on its ``after + 1``-th call, or
        on its first when the caller knows it will recur (``recurring``: a full chunk on a
        cache at its budget, which the chunk's compression brings back to the same lengths).
        The capture's warm-up run is the call's own forward (its keys, values and collected
        attention are kept; the graph records the same work without running it), so a
        capture costs one forward and the recording, not an extra replay.

        Parameters
        ----------
        positions : per layer, LongTensor ``(axes, q)``: absolute positions
        attention : the forward's attention context (pseudo-query blocks, their capture)
        collected : a list the forward fills (an attention capture's callback); after a
            replay it holds what the captured forward put there (graph memory)
        recurring : capture this shape now if it is not yet

        Returns
        -------
        True when the piece ran from fixed buffers (keys and values written, ``collected``
        filled; no hidden states are kept: ingest needs none), False when it did not (not
        captured yet, or this shape cannot be)
        """
        store = self.store
        self._drop_stale()
        lengths = tuple(store.lengths())
        graph_inputs = self.adapter.embedding_graph_inputs(piece) if self.embeddings_in_graph else None
        signature = None if graph_inputs is None else tuple((k, tuple(v.shape), v.dtype) for k, v in graph_inputs.items())
        context = () if attention is None else attention.graph_key(store.num_layers, len(piece))
        key = (len(piece), lengths, store.prefix_len, context, None if collected is None else len(collected), signature)
        graph = self._graphs.pop(key, None)
        if graph is None and (key in self.failed or not (self._shapes.recurring(key) or recurring)):
            return False
        if graph_inputs is None:  # embedded before the graph, which reads the embeddings
            embeds = self.adapter.input_embeddings(piece)
            if embeds is None:
                self.failed.add(key)
                return False
            inputs, embed = {"embeds": embeds}, _given_embeddings
        else:
            inputs, embed = graph_inputs, self.adapter.embeddings_from_inputs
        ran: Outputs | None = None  # the outputs of a capture's warm-up, which was this call's forward
        if graph is None:
            self._reserve(lengths, len(piece))
            built = self._build(key, inputs, embed, positions, collected, _steady(attention))
            if built is None:
                return False
            graph, ran = built
        else:
            self._load(graph, inputs, positions)
        self._graphs[key] = graph  # (re)inserted last: the least recently used goes first
        graph.collected = collected
        graph.attention = _steady(attention)
        _, extra = graph.run() if ran is None else ran
        self.replays += 1  # forwards run from the fixed buffers (a capture's warm-up included)
        self._advance(lengths, len(piece))
        if collected is not None:
            collected[:] = list(extra)
        return True

    # -- internals ---------------------------------------------------------------------------
    def _drop_stale(self) -> None:
        """Forget every graph once a layer's buffer moved (graphs hold the old addresses);
        the answer graphs' reservations can move them between two chunks."""
        generation = self.store.cache.generation
        if generation != self._generation:
            self._graphs.clear()
            self._generation = generation

    def _reserve(self, lengths: tuple[int, ...], new: int) -> None:
        for layer, n in zip(self.store.cache.layers, lengths, strict=True):
            layer.reserve(n + new, *layer.buffers)
        self._drop_stale()

    def _load(self, graph: _ChunkGraph, inputs: dict[str, torch.Tensor], positions: list[torch.Tensor]) -> None:
        device = graph.positions.device
        for name, value in inputs.items():
            graph.inputs[name].copy_(upload(value, device))
        # stacked in numpy: torch's CPU ops have a large fixed cost per call on a many-core GPU host
        stacked = torch.from_numpy(np.stack([p.numpy() for p in positions]))
        graph.positions.copy_(upload(stacked, graph.positions.device))

    def _advance(self, lengths: tuple[int, ...], new: int) -> None:
        """Each layer's length after the forward appended ``new`` tokens at ``lengths``
        (a replay writes the keys and values but cannot move the host-side counters)."""
        for layer, n in zip(self.store.cache.layers, lengths, strict=True):
            if n + new > layer.capacity:
                raise RuntimeError(f"a chunk graph wrote past a layer's capacity ({n + new} > {layer.capacity})")
            layer.length = n + new

    def _build(
        self,
        key: tuple,
        inputs: dict[str, torch.Tensor],
        embed: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        positions: list[torch.Tensor],
        collected: list[Any] | None,
        attention: AttentionContext,
    ) -> tuple[_ChunkGraph, Outputs | None] | None:
        """The graph of ``key`` (None: its capture failed), and the outputs of the forward
        its capture already ran (None without graphs: nothing ran yet)."""
        device = self.adapter.device
        lengths = key[1]
        static_inputs = {name: torch.empty(v.shape, dtype=v.dtype, device=device) for name, v in inputs.items()}
        static_positions = torch.empty((len(positions), *positions[0].shape), dtype=torch.long, device=device)
        adapter, cache, axis = self.adapter, self.store.cache, self._batch_axis

        def body() -> Outputs:
            for layer, n in zip(cache.layers, lengths, strict=True):  # every run writes at the same slots
                layer.truncate(n)
            static_embeds = embed(static_inputs)
            if self.fewer_kernels:
                hidden = chunk_text_forward(
                    adapter, static_embeds, static_positions, cache, lengths, need_output=False, attention=graph.attention
                )
            else:
                hidden = per_layer_text_forward(
                    adapter, static_positions, cache, axis, graph.attention, inputs_embeds=static_embeds
                )
            # what the forward's callbacks put in the calling forward's list (when run eagerly)
            return hidden, tuple(graph.collected) if graph.collected is not None else ()

        graph = _ChunkGraph(None, body, static_inputs, static_positions, collected=collected, attention=attention)
        self._load(graph, inputs, positions)
        ran = None
        if self.use_graphs:
            while len(self._graphs) >= MAX_GRAPHS:  # the least recently used goes
                self._graphs.pop(next(iter(self._graphs)))
            try:
                graph.graph, graph.outputs, ran = self._capture(body)
            except Exception as error:  # a forward that syncs with the host, an uncapturable kernel
                if embed is not _given_embeddings:
                    # the embedding step is the likelier culprit: embed before the graph from now on
                    self.embeddings_in_graph = False
                    warnings.warn(
                        f"CUDA graph capture of an ingest forward with its embedding step failed ({error}); "
                        "the embeddings are computed before the graph from now on",
                        stacklevel=4,
                    )
                    self.failed.add(key)
                else:
                    attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
                    final = attempts >= MAX_CAPTURE_ATTEMPTS
                    if final:
                        self.failed.add(key)
                    then = "this shape runs eagerly" if final else "this chunk runs eagerly; the shape is captured again when it recurs"
                    warnings.warn(f"CUDA graph capture of an ingest forward failed ({error}); {then}", stacklevel=4)
                for layer, n in zip(cache.layers, lengths, strict=True):
                    layer.truncate(n)
                return None
            self.captures += 1
        self._graphs[key] = graph
        return graph, ran

    def _capture(self, body: Callable[[], Outputs]) -> tuple[torch.cuda.CUDAGraph, Outputs, Outputs]:
        """Warm up on a side stream (plans and workspaces for the steady kernels), then
        capture; returns the graph, its output buffers, and the warm-up's outputs.

        The warm-up is a real run of the forward (it writes the chunk's keys and values and
        its captured attention); recording the graph runs nothing, so the caller keeps the
        warm-up's results instead of replaying the graph once more.
        """
        device = self.adapter.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        current = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            warm = body()
        current.wait_stream(stream)
        for tensor in (warm[0], *warm[1]):
            if isinstance(tensor, torch.Tensor):
                # allocated on the side stream, read on this one: not reused before that is done
                tensor.record_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = body()
        except Exception:
            # a capture that fails midway leaves its memory pool marked as being recorded
            # to (seen with torch 2.11: every later capture into it then fails with
            # "already recording to mempool_id"); later graphs share a fresh pool
            self._pool = None
            raise
        return graph, outputs, warm


def _steady(attention: AttentionContext | None) -> AttentionContext:
    """A graph body's context: the caller's, its shapes marked as recurring."""
    return AttentionContext(steady=True) if attention is None else attention.with_changes(steady=True)
