"""A transformers ``Cache`` whose layers live in preallocated buffers.

Every layer keeps its keys and values in one buffer ``(batch, kv_heads, capacity,
head_dim)`` with ``length`` valid tokens at the front. Appending writes in place; the
buffer grows (by half, in steps of :data:`GROWTH_QUANTUM` tokens) only when full, so once a
bounded retention rule reaches its steady state no KV memory is allocated again: eviction
gathers the kept tokens to the front of the same buffer, and a question's tokens are
written after ``length`` and dropped by not counting them.

Static mode (for CUDA graphs): inside :class:`StaticWrites`, ``update`` writes the new
tokens at slots given by a device tensor and returns the *whole* buffer, so every shape
and address in the forward is fixed; the attention function then masks by slot (see
``hermes_policy.attention.ragged``). The buffers' addresses change only when a layer grows; the
cache's :attr:`StreamCache.generation` counts that, so graphs know when to re-capture.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from hermes_policy.kernels import compaction_kernel

GROWTH_QUANTUM = 256


def grown_capacity(current: int, needed: int) -> int:
    """Capacity after growing a buffer of ``current`` slots to hold ``needed`` tokens.

    At least 1.5x the current capacity (amortised O(1) appends), rounded up to a multiple
    of :data:`GROWTH_QUANTUM` (aligned key lengths for the attention kernels).
    """
    target = max(needed, current + current // 2)
    return -(-target // GROWTH_QUANTUM) * GROWTH_QUANTUM


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in a buffer with spare capacity.

    ``keys`` and ``values`` are views ``(batch, kv_heads, length, head_dim)`` of the
    buffers; they are read-only attributes: use :meth:`set_contents`, :meth:`truncate`,
    :meth:`gather` or write into the views in place.
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._kv: torch.Tensor | None = None  # (2, ...) holding both, when their shapes match
        self.length = 0
        self.generation = 0
        self.static_slots: torch.Tensor | None = None
        self.static_window: int | None = None
        super().__init__()

    # transformers' base class assigns ``keys = values = None`` on init and reset.
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._k is None else self._k[..., : self.length, :]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("PreallocatedLayer.keys is a view; use set_contents() to replace it")

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._v is None else self._v[..., : self.length, :]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        if value is not None:
            raise AttributeError("PreallocatedLayer.values is a view; use set_contents() to replace it")

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else int(self._k.shape[-2])

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers ``(batch, kv_heads, capacity, head_dim)``."""
        if self._k is None or self._v is None:
            raise RuntimeError("the layer holds nothing yet")
        return self._k, self._v

    @property
    def kv_buffer(self) -> torch.Tensor | None:
        """Keys and values in one buffer ``(2, batch, kv_heads, capacity, head_dim)`` (their
        shapes match), or None."""
        return self._kv

    def allocated_bytes(self) -> int:
        if self._k is None or self._v is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    # -- transformers' layer protocol --------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def reserve(self, needed: int, like_keys: torch.Tensor, like_values: torch.Tensor | None = None) -> None:
        """Make room for ``needed`` tokens (copying what is held when the buffer moves)."""
        if needed <= self.capacity:
            return
        like_values = like_keys if like_values is None else like_values
        capacity = grown_capacity(self.capacity, needed)
        batch, heads, _, dim = like_keys.shape
        # Zeros, not empty: static-mode attention reads masked slots too, and a NaN bit
        # pattern there would survive the zero softmax weight (0 * NaN). Plain tensors
        # (not inference tensors), so a forward outside inference mode may still append
        # to a cache filled inside it.
        with torch.inference_mode(False):
            if like_values.shape[1] == heads and like_values.shape[-1] == dim and like_values.dtype == like_keys.dtype:
                # keys and values in one allocation: eviction gathers both with one kernel
                self._kv = like_keys.new_zeros(2, batch, heads, capacity, dim)
                new_k, new_v = self._kv[0], self._kv[1]
            else:
                self._kv = None
                new_k = like_keys.new_zeros(batch, heads, capacity, dim)
                new_v = like_values.new_zeros(batch, like_values.shape[1], capacity, like_values.shape[-1])
        if self.length:
            new_k[..., : self.length, :] = self._k[..., : self.length, :]
            new_v[..., : self.length, :] = self._v[..., : self.length, :]
        self._k, self._v = new_k, new_v
        self.generation += 1

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.static_slots is not None:
            self._k.index_copy_(-2, self.static_slots, key_states)
            self._v.index_copy_(-2, self.static_slots, value_states)
            window = self.static_window
            if window is None:
                return self._k, self._v
            return self._k[..., :window, :], self._v[..., :window, :]
        # The cache holds values, not autograd history.
        key_states, value_states = key_states.detach(), value_states.detach()
        new = key_states.shape[-2]
        self.reserve(self.length + new, key_states, value_states)
        self._k[..., self.length : self.length + new, :] = key_states
        self._v[..., self.length : self.length + new, :] = value_states
        self.length += new
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.length = 0

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        self.length = max(0, min(self.length, max_length))

    # -- ours ----------------------------------------------------------------------------
    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (the buffer is not touched)."""
        if length > self.length:
            raise ValueError(f"cannot truncate {self.length} tokens to {length}")
        self.length = length

    def set_contents(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace what the layer holds by ``keys`` / ``values`` ``(batch, kv_heads, n, head_dim)``."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        n = keys.shape[-2]
        self.reserve(n, keys, values)
        self._k[..., :n, :] = keys
        self._v[..., :n, :] = values
        self.length = n

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys`` / ``values`` ``(batch, kv_heads, n, head_dim)`` after the held tokens."""
        start, n = self.length, keys.shape[-2]
        self.reserve(start + n, self._k, self._v)
        self._k[..., start : start + n, :] = keys.to(self._k)
        self._v[..., start : start + n, :] = values.to(self._v)
        self.length = start + n

    def gather(self, indices: torch.Tensor, extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Keep only the tokens at ``indices`` (in that order), then append ``extra``.

        ``indices`` LongTensor ``(n,)`` on the buffer's device; ``extra`` one token's key and
        value ``(batch, kv_heads, 1, head_dim)``.
        """
        n = indices.shape[0]
        # index_select makes a copy, so gathering within one buffer is safe
        for buffer in [self._kv] if self._kv is not None else [self._k, self._v]:
            words = as_words(buffer)
            words[..., :n, :] = words[..., : self.length, :].index_select(-2, indices)
        self.length = n
        if extra is not None:
            key, value = extra
            self.reserve(n + 1, self._k, self._v)
            self._k[..., n : n + 1, :] = key.to(self._k)
            self._v[..., n : n + 1, :] = value.to(self._v)
            self.length = n + 1


def as_words(buffer: torch.Tensor) -> torch.Tensor:
    """The same memory with each token's row ``(..., tokens, head_dim)`` read as 8-byte
    words where its bytes allow (``head_dim`` 128 in bf16: 32 words).

    On CUDA, ``index_select`` over a sliced buffer runs as an element-wise gather: moving a
    token's row as 32 words instead of 128 half-precision numbers makes the eviction
    gathers ~4x shorter, bit for bit the same data.
    """
    row_bytes = buffer.shape[-1] * buffer.element_size()
    if buffer.stride(-1) != 1 or row_bytes % 8 or buffer.element_size() >= 8:
        return buffer
    return buffer.view(torch.int64)


class StreamCache(Cache):
    """The streaming session's cache: one :class:`PreallocatedLayer` per decoder layer."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[PreallocatedLayer() for _ in range(num_layers)])

    def gather_layers(
        self, decisions: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]
    ) -> None:
        """:meth:`PreallocatedLayer.gather` for several layers: ``{layer: (indices, extra)}``
        with indices on the layers' device (sorted, distinct: kept tokens in order).

        On a GPU, all of them in one kernel (:mod:`~hermes_policy.kernels.compaction_kernel`) where
        the layers allow it (keys and values in one buffer each, one shape); layer by layer
        otherwise.
        """
        layers = [self.layers[layer] for layer in decisions]
        buffers = [layer.kv_buffer for layer in layers]
        if all(buffer is not None for buffer in buffers):
            indices = [kept for kept, _ in decisions.values()]
            summaries = [
                None if extra is None else tuple(t.to(buffer.dtype).contiguous() for t in extra)
                for (_, extra), buffer in zip(decisions.values(), buffers, strict=True)
            ]
            if compaction_kernel.compact_layers(buffers, indices, summaries):
                for layer, kept, summary in zip(layers, indices, summaries, strict=True):
                    layer.length = kept.shape[0] + (summary is not None)
                return
        for layer, (kept, extra) in zip(layers, decisions.values(), strict=True):
            layer.gather(kept, extra)

    @property
    def generation(self) -> tuple[int, ...]:
        """Changes whenever any layer's buffers move (captured graphs are then stale)."""
        return tuple(layer.generation for layer in self.layers)

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)


class StaticWrites:
    """Within this context, every layer writes new tokens at fixed device-side slots.

    Parameters
    ----------
    cache : the stream cache
    slots : LongTensor ``(layers, q)`` on the cache's device: where layer ``l`` writes the
        ``q`` new tokens (its length plus an offset; the values may change between graph
        replays, the tensor itself must not)
    window : attention sees the first ``window`` slots of every buffer (default: all of
        it); every slot written must lie below it
    """

    def __init__(self, cache: StreamCache, slots: torch.Tensor, window: int | None = None):
        self._cache = cache
        self._slots = slots
        self._window = window

    def __enter__(self) -> StaticWrites:
        for layer, cache_layer in enumerate(self._cache.layers):
            slots = self._slots[layer]
            # a model split over GPUs keeps each layer's cache on that layer's GPU
            device = getattr(cache_layer, "device", slots.device) if cache_layer.is_initialized else slots.device
            cache_layer.static_slots = slots if slots.device == device else slots.to(device)
            cache_layer.static_window = self._window
        return self

    def __exit__(self, *exc: object) -> None:
        for cache_layer in self._cache.layers:
            cache_layer.static_slots = None
            cache_layer.static_window = None
