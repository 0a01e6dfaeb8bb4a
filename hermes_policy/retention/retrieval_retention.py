"""``retrieval``: keep every chunk's KV in host memory, bring the relevant ones back per question (ReKV).

ReKV (ICLR 2025) streams a video through a sliding window of recent tokens on the GPU and
offloads every chunk's keys and values to host memory; at a question it retrieves the
chunks most relevant to the question back to the GPU. This is HERMES's opposite trade:
nothing is forgotten, and the work moves to question time. Our version:

- ingest: each chunk is prefilled on the system prefix plus the newest ``window`` stream
  tokens (the GPU cache is a fifo of that budget, so a chunk is encoded under a sliding
  window, as in ReKV); right after its prefill, its keys and values at every layer are
  copied to pinned host memory (asynchronously), and the mean of its keys per layer and KV
  head is kept on the GPU as the chunk's summary. Host memory is bounded by
  ``host_budget_bytes``; past it the stream stops with an error rather than swapping.
- question: the question is prefilled once on the GPU cache with its query states captured
  at every layer (the layer's own, rotated queries); per layer, each chunk that is no
  longer (entirely) on the GPU scores ``mean over heads and question tokens of q . k_mean``
  (grouped-query heads read their KV head's mean) and the top ``retrieve_chunks`` are
  copied back and appended to that layer's cache. Retrieval is per layer: layers may bring
  back different chunks. Then the question is answered on that cache and the retrieved
  tokens are dropped again. The extra question pass, the scoring and the copies are part
  of the time to first token.
- positions: tokens keep the positions they were encoded at (``reindex = "never"``), so
  retrieved keys need no rotation and the question sits after the newest token. Positions
  therefore grow with the stream, as under ``full``: past the model's position range the
  session warns (the model was not trained there); re-indexing would have to rotate every
  offloaded chunk as well.

Exactness: a chunk's keys and values are those its sliding-window prefill produced, so
retrieving every chunk equals ``full`` only when the window held the whole stream at
ingest; in general it equals attending over every chunk as encoded (tests check both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from hermes_policy.attention.capture import AttentionCapture
from hermes_policy.cache.kv_store import KVStore
from hermes_policy.errors import RetentionError
from hermes_policy.models.base import ModelAdapter, StreamPiece
from hermes_policy.retention.base import (
    BudgetedRule,
    LayerKeep,
    QuestionTimeMemory,
    ReindexMode,
    SelectContext,
    keep_newest,
)

GIB = 1 << 30


@dataclass
class RetrievalRetention(BudgetedRule):
    """A sliding window on the GPU, every chunk in host memory, top-k chunks per question.

    Parameters
    ----------
    budget : stream tokens kept on the GPU during ingest (the sliding window)
    retrieve_chunks : chunks brought back per layer at a question
    host_budget_bytes : host memory the offloaded chunks may take
    """

    name = "retrieval"
    budget: int = 2048
    retrieve_chunks: int = 4
    host_budget_bytes: int = 32 * GIB
    reindex: ReindexMode = "never"

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        return keep_newest(store, self.budget)  # the sliding window: a fifo on the GPU

    def validate(self, adapter: ModelAdapter) -> None:
        super().validate(adapter)
        if self.retrieve_chunks < 0:
            raise RetentionError(f"retrieve_chunks must be >= 0, got {self.retrieve_chunks}")
        if self.host_budget_bytes <= 0:
            raise RetentionError(f"the host budget must be positive, got {self.host_budget_bytes} bytes")

    def question_memory(self, adapter: ModelAdapter, chunk_frames: int) -> RetrievalMemory:
        return RetrievalMemory(self.retrieve_chunks, self.host_budget_bytes)


def chunk_scores(queries: torch.Tensor, key_means: torch.Tensor) -> torch.Tensor:
    """Relevance of each chunk to a question at one layer.

    Parameters
    ----------
    queries : ``(heads, head_dim)``: the question's query states, averaged over its tokens
    key_means : ``(chunks, kv_heads, head_dim)``: each chunk's mean key per KV head

    Returns
    -------
    ``(chunks,)``: mean over query heads of ``q_h . k_mean[kv_head(h)]``, where query head
    ``h`` reads KV head ``h // (heads / kv_heads)`` (grouped-query attention).
    """
    heads, kv_heads = queries.shape[0], key_means.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group onto {kv_heads} KV heads")
    grouped = queries.float().reshape(kv_heads, heads // kv_heads, -1).sum(dim=1)  # (kv_heads, dim)
    return torch.einsum("cgd,gd->c", key_means.float(), grouped) / heads


@dataclass
class HostChunk:
    """One chunk's tokens at every layer, in host memory.

    start, stop : the chunk's range in the stream's token count (all layers append the same)
    keys, values : per layer ``(batch, kv_heads, n, head_dim)``
    positions : per layer ``(axes, n)``
    frame_index : ``(n,)``
    """

    start: int
    stop: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: list[torch.Tensor]
    frame_index: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class QueryCapture(AttentionCapture):
    """Keep each layer's query states of a forward, averaged over its tokens ``(batch, heads, dim)``."""

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float, *args: Any, **kwargs: Any) -> None:
        self.patterns[self.hook_name(layer)] = query.float().mean(dim=2)
        self.calls += 1


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory; pinned and asynchronous when the tensor is on a GPU."""
    if tensor.device.type != "cuda":
        return tensor.clone()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


@dataclass
class RetrievalMemory(QuestionTimeMemory):
    """The offloaded chunks of one session and their key summaries."""

    per_question: ClassVar[bool] = True

    retrieve_chunks: int
    host_budget_bytes: int
    chunks: list[HostChunk] = field(default_factory=list)
    key_means: list[list[torch.Tensor]] = field(default_factory=list)  # per chunk, per layer (batch, kv_heads, dim)
    stream_tokens: int = 0  # tokens the stream has appended so far
    retrieved: list[list[int]] = field(default_factory=list)  # per layer, chunks of the last question
    _saved_lengths: list[int] | None = None
    _host_bytes: int = 0

    def after_chunk(self, store: KVStore, new_tokens: int) -> None:
        """Offload the ``new_tokens`` just appended to every layer of ``store``."""
        keys, values, positions, means = [], [], [], []
        for layer in range(store.num_layers):
            state = store.layer(layer)
            fresh_keys = state.keys[..., -new_tokens:, :]
            keys.append(_to_host(fresh_keys))
            values.append(_to_host(state.values[..., -new_tokens:, :]))
            positions.append(state.positions[:, -new_tokens:].clone())
            means.append(fresh_keys.float().mean(dim=-2))
        chunk = HostChunk(
            self.stream_tokens,
            self.stream_tokens + new_tokens,
            keys,
            values,
            positions,
            store.frame_index[0][-new_tokens:].clone(),
        )
        if self._host_bytes + chunk.nbytes() > self.host_budget_bytes:
            raise RetentionError(
                f"retrieval: the offloaded chunks would pass the host budget of "
                f"{self.host_budget_bytes / GIB:.1f} GiB after {len(self.chunks)} chunks; "
                "raise the host budget or use a bounded rule"
            )
        self.chunks.append(chunk)
        self.key_means.append(means)
        self._host_bytes += chunk.nbytes()
        self.stream_tokens += new_tokens

    def before_question(self, session: Any, question: StreamPiece) -> None:
        store = session.store
        self._saved_lengths = store.lengths()
        on_gpu_from = [self.stream_tokens - held for held in store.stream_lengths()]
        self.retrieved = [[] for _ in range(store.num_layers)]
        candidates = [c for c, chunk in enumerate(self.chunks) if chunk.start < min(on_gpu_from)]
        if not candidates or self.retrieve_chunks == 0:
            return
        capture = QueryCapture(session.adapter.attention_modules)
        session.probe_question(question, capture)
        appended = {}
        for layer in range(store.num_layers):
            queries = capture.patterns[capture.hook_name(layer)][0]  # (heads, dim)
            usable = [c for c in candidates if self.chunks[c].start < on_gpu_from[layer]]
            if not usable:
                continue
            means = torch.stack([self.key_means[c][layer][0] for c in usable]).to(queries.device)
            top = torch.topk(chunk_scores(queries, means), min(self.retrieve_chunks, len(usable))).indices
            picked = sorted(usable[i] for i in top.tolist())
            self.retrieved[layer] = picked
            appended[layer] = self._evicted_rows(picked, layer, on_gpu_from[layer], store.device)
        store.append_layers(appended)

    def _evicted_rows(
        self, picked: list[int], layer: int, on_gpu_from: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values, positions and frames of the picked chunks' tokens that are not on the GPU."""
        keys, values, positions, frames = [], [], [], []
        for c in picked:
            chunk = self.chunks[c]
            n = min(chunk.stop, on_gpu_from) - chunk.start  # its tokens before the GPU window
            keys.append(chunk.keys[layer][..., :n, :].to(device, non_blocking=True))
            values.append(chunk.values[layer][..., :n, :].to(device, non_blocking=True))
            positions.append(chunk.positions[layer][:, :n])
            frames.append(chunk.frame_index[:n])
        return torch.cat(keys, dim=-2), torch.cat(values, dim=-2), torch.cat(positions, dim=1), torch.cat(frames)

    def after_question(self, session: Any) -> None:
        if self._saved_lengths is not None:
            session.store.truncate(self._saved_lengths)
            self._saved_lengths = None

    def nbytes(self) -> int:
        return self._host_bytes
