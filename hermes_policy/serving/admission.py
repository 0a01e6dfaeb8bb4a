"""Admitting a new stream: the KV memory it may grow to, next to what the running ones hold.

A stream's keys and values live in per-layer buffers that grow by half when too small and
never shrink (:func:`~hermes_policy.cache.stream_cache.grown_capacity`). Its rule bounds
the tokens kept, but the buffers must also hold a chunk before the rule compresses it, a
question and its answer, and whatever the rule adds while compressing (HERMES's
pseudo-queries, sized by the conversation so far). :func:`kv_bound_bytes` bounds the first
three before the stream runs; the registry then counts each running stream at the larger
of that bound and its real buffers, and bounds a new stream by the real buffers of a running
one with the same settings when those are larger. On CUDA the device's free memory is
checked too, so a stream that would not fit is refused with a reason, not run out of memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hermes_policy.cache.stream_cache import GROWTH_QUANTUM

if TYPE_CHECKING:
    from hermes_policy.serving.live_stream import LiveStream
    from hermes_policy.session import StreamingSession

QUESTION_TOKENS = 256  # room for a question's tokens (the answer path pads them to a bucket)


def capacity_bound(needed: int) -> int:
    """The most slots a buffer can end with after growing to hold ``needed`` tokens.

    A buffer grows only when too small (from at most ``needed - 1`` slots), to the larger of
    the need and half again its size, rounded up to :data:`GROWTH_QUANTUM`.
    """
    smaller = max(needed - 1, 0)
    target = max(needed, smaller + smaller // 2)
    return -(-target // GROWTH_QUANTUM) * GROWTH_QUANTUM


def kv_bound_bytes(session: StreamingSession, max_new_tokens: int) -> int | None:
    """Bytes of key and value buffers ``session`` can grow to, every layer at
    ``capacity_bound(prefix + budget + one chunk + a question + max_new_tokens)``; None when
    its rule keeps every frame (no bound). Tokens a rule adds while compressing are not
    counted (see the module docstring)."""
    rule, adapter = session.retention, session.adapter
    config = adapter.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // adapter.num_heads
    per_token = 2 * adapter.num_kv_heads * head_dim * adapter.dtype.itemsize
    budgets = [rule.budget_of(layer) for layer in range(adapter.num_layers)]
    if any(b is None for b in budgets):
        return None
    transient = session.chunk_frames * adapter.tokens_per_frame + QUESTION_TOKENS + max_new_tokens
    prefix = session.store.prefix_len
    return sum(capacity_bound(prefix + budget + transient) for budget in budgets) * per_token


def device_free_bytes(device: torch.device) -> int | None:
    """Memory a new stream's tensors could still take on ``device``: what the driver reports
    free plus what torch's allocator holds unused; None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def settings_of(description: dict[str, Any]) -> tuple:
    """What decides a stream's buffer sizes: its rule, budget and chunk."""
    return tuple(description.get(key) for key in ("policy", "budget", "chunk_frames"))


@dataclass
class StreamRegistry:
    """The server's streams, bounded by a count and a KV memory budget."""

    max_streams: int
    kv_budget_bytes: int
    streams: dict[str, LiveStream] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def counted_bytes(stream: LiveStream) -> int:
        """A running stream's KV memory: its bound, or its real buffers when larger."""
        return max(stream.description.get("kv_bound_bytes", 0), stream.session.store.cache.allocated_bytes())

    def held_bytes(self) -> int:
        return sum(self.counted_bytes(stream) for stream in self.streams.values())

    def bound_for(self, bound: int, description: dict[str, Any]) -> int:
        """A new stream's KV bound: ``bound``, or the real buffers of a running stream with
        the same settings when larger (what the formula cannot see, e.g. pseudo-queries)."""
        same = [self.counted_bytes(s) for s in self.streams.values()
                if settings_of(s.description) == settings_of(description)]
        return max([bound, *same])

    def admit(self, bound: int, free_bytes: int | None = None) -> str | None:
        """None when a stream needing ``bound`` bytes fits (the budget, and ``free_bytes``
        of the device when given), else the reason it does not."""
        if len(self.streams) >= self.max_streams:
            return f"the server holds its maximum of {self.max_streams} streams; delete one first"
        held = self.held_bytes()
        if held + bound > self.kv_budget_bytes:
            return (f"a new stream needs up to {bound / 2**20:.0f} MiB of KV cache, and "
                    f"{held / 2**20:.0f} of {self.kv_budget_bytes / 2**20:.0f} MiB are taken")
        if free_bytes is not None and bound > free_bytes:
            return (f"a new stream needs up to {bound / 2**20:.0f} MiB of KV cache, and the device has "
                    f"{free_bytes / 2**20:.0f} MiB free")
        return None
