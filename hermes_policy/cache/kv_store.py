"""Per-layer KV store: every layer has its own length, positions and frame indices.

The keys and values live in a :class:`~hermes_policy.cache.stream_cache.StreamCache` (a
transformers ``Cache`` over preallocated buffers, so the model's attention modules update
it as usual and memory stays put once a rule reaches its budget); this class keeps,
beside it, what the cache does not know:
each cached token's position (``(axes, seq)`` per layer) and the frame it came from. The
first ``prefix_len`` tokens of every layer are the fixed system prefix, never evicted.

Per-head retention adds, per layer, an optional head mask ``(kv_heads, width)`` on the
cache's device: which of the layer's first ``width`` tokens each KV head may attend (tokens
after them: every head). The buffers hold the union of what the heads keep, so the memory
(:meth:`KVStore.nbytes`) is the union's; :meth:`KVStore.effective_tokens` counts what the
heads see. Eviction and truncation carry the masks along
(:mod:`~hermes_policy.attention.head_masks`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hermes_policy.attention.head_masks import visible_counts
from hermes_policy.cache.positions import compact_positions, next_free_position, rerotate_keys
from hermes_policy.cache.stream_cache import StreamCache
from hermes_policy.cache.transfer import Download, StagingBuffers, upload


@dataclass
class LayerState:
    """A read-only view of one layer's cache.

    Attributes
    ----------
    keys, values : Tensor ``(batch, kv_heads, seq, head_dim)``, RoPE applied to keys
    positions : LongTensor ``(axes, seq)``
    frame_index : LongTensor ``(seq,)``; -1 for tokens not from a frame (prefix, text)
    prefix_len : number of leading tokens that are the fixed system prefix
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    frame_index: torch.Tensor
    prefix_len: int

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    @property
    def stream_length(self) -> int:
        """Number of stream (video) tokens: everything after the prefix."""
        return self.length - self.prefix_len


class KVStore:
    """The streaming KV cache: a ``StreamCache`` plus per-layer positions and frame indices.

    Parameters
    ----------
    num_layers : number of decoder layers
    position_axes : 1 for 1D RoPE, 3 for multimodal RoPE
    config : the text config (unused; kept for callers that pass it)
    """

    def __init__(self, num_layers: int, position_axes: int, config: object | None = None):
        self.num_layers = num_layers
        self.position_axes = position_axes
        self.cache = StreamCache(num_layers)
        self._positions = [torch.zeros(position_axes, 0, dtype=torch.long) for _ in range(num_layers)]
        self._frame_index = [torch.zeros(0, dtype=torch.long) for _ in range(num_layers)]
        self.prefix_len = 0
        # next free position per layer, with the positions tensor it was computed from
        # (every change assigns a new tensor, so identity tells whether it is current)
        self._next_positions: list[tuple[torch.Tensor, int] | None] = [None] * num_layers
        self._prefetched: tuple[list[torch.Tensor], Download] | None = None  # see prefetch()
        # where this store's copies back land: its own, because the deferred bookkeeping
        # reads them after other stores (other sessions of the process) may have downloaded
        self._staging = StagingBuffers()
        # the host's bookkeeping of the last keep_layers, not done yet (see keep_layers):
        # the work, and meanwhile each changed layer's length and next free position
        self._pending: Callable[[], None] | None = None
        self._pending_lengths: dict[int, int] = {}
        self._pending_next: dict[int, int] = {}
        # per layer, which of its first tokens each KV head sees (None: all see all)
        self._head_masks: list[torch.Tensor | None] = [None] * num_layers
        self._mask_counts: dict[int, tuple[torch.Tensor, list[int]]] = {}  # see visible_stream_tokens

    # -- positions and frames (the bookkeeping a compression leaves is done on first read)
    @property
    def positions(self) -> list[torch.Tensor]:
        """Per layer, LongTensor ``(axes, seq)``: each token's position."""
        self._settle()
        return self._positions

    @positions.setter
    def positions(self, value: list[torch.Tensor]) -> None:
        self._settle()
        self._positions = value

    @property
    def frame_index(self) -> list[torch.Tensor]:
        """Per layer, LongTensor ``(seq,)``: each token's frame (-1: not from a frame)."""
        self._settle()
        return self._frame_index

    @frame_index.setter
    def frame_index(self, value: list[torch.Tensor]) -> None:
        self._settle()
        self._frame_index = value

    def _settle(self) -> None:
        """Do the bookkeeping :meth:`keep_layers` left, if any."""
        work = self._pending
        if work is None:
            return
        self._pending = None
        try:
            work()
        finally:
            self._pending_lengths.clear()
            self._pending_next.clear()

    # -- reading ---------------------------------------------------------------------
    def length(self, layer: int) -> int:
        pending = self._pending_lengths.get(layer)
        return pending if pending is not None else int(self._positions[layer].shape[1])

    def lengths(self) -> list[int]:
        return [self.length(layer) for layer in range(self.num_layers)]

    def stream_lengths(self) -> list[int]:
        """Stream (video) tokens per layer, prefix excluded."""
        return [n - self.prefix_len for n in self.lengths()]

    @property
    def device(self) -> torch.device:
        """Where the keys and values live (CPU before anything is stored)."""
        first = self.cache.layers[0]
        return first.device if first.is_initialized else torch.device("cpu")

    def next_position(self, layer: int) -> int:
        pending = self._pending_next.get(layer)
        if pending is not None:
            return pending
        positions = self._positions[layer]
        cached = self._next_positions[layer]
        if cached is not None and cached[0] is positions:
            return cached[1]
        value = next_free_position(positions)
        self._next_positions[layer] = (positions, value)
        return value

    def max_position(self) -> int:
        return max(self.next_position(layer) for layer in range(self.num_layers)) - 1

    def layer(self, layer: int) -> LayerState:
        cache_layer = self.cache.layers[layer]
        return LayerState(
            keys=cache_layer.keys,
            values=cache_layer.values,
            positions=self.positions[layer],
            frame_index=self.frame_index[layer],
            prefix_len=self.prefix_len,
        )

    def nbytes(self) -> int:
        """Bytes held by keys and values of all layers."""
        total = 0
        for cache_layer in self.cache.layers[: self.num_layers]:
            if cache_layer.keys is not None and cache_layer.keys.numel():
                total += cache_layer.keys.numel() * cache_layer.keys.element_size() * 2
        return total

    # -- per-head visibility ------------------------------------------------------------
    def head_masks(self) -> tuple[torch.Tensor | None, ...] | None:
        """Per layer, BoolTensor ``(kv_heads, width)``: which of its first ``width`` tokens
        each KV head may attend (later tokens: every head), or None where every head sees
        every token; None when no layer has a mask (what the forward's context carries)."""
        if all(mask is None for mask in self._head_masks):
            return None
        return tuple(self._head_masks)

    def set_head_masks(self, masks: dict[int, torch.Tensor | None]) -> None:
        """Set (or, with None, clear) layers' head masks ``(kv_heads, width <= length)``."""
        for layer, mask in masks.items():
            if mask is not None:
                length = self.cache.layers[layer].keys.shape[-2]
                if mask.dim() != 2 or mask.dtype != torch.bool or mask.shape[1] > length:
                    raise ValueError(
                        f"layer {layer}: a head mask is a bool (kv_heads, width <= {length}) tensor, "
                        f"got {tuple(mask.shape)} {mask.dtype}"
                    )
                # every head sees every token: no mask (the layer keeps its fast paths)
                mask = None if bool(mask.all()) else mask.to(self.cache.layers[layer].keys.device)
            self._head_masks[layer] = mask

    def visible_stream_tokens(self, layer: int) -> list[int]:
        """Stream tokens of ``layer`` each KV head sees (``(kv_heads,)`` ints; host sync)."""
        mask = self._head_masks[layer]
        length = self.length(layer)
        if mask is None:
            return visible_counts(None, self.cache.layers[layer].keys.shape[1], length, self.prefix_len)
        counted = self._mask_counts.get(layer)
        if counted is None or counted[0] is not mask:  # once per mask: the count waits for the GPU
            counted = self._mask_counts[layer] = (mask, visible_counts(mask, mask.shape[0], mask.shape[1], self.prefix_len))
        return [n + max(0, length - max(mask.shape[1], self.prefix_len)) for n in counted[1]]

    def effective_tokens(self) -> int:
        """Stream tokens summed over layers and KV heads, each counted where a head sees it:
        what per-head methods compare at (``num_kv_heads x`` the stream tokens held when no
        layer has a mask)."""
        return sum(sum(self.visible_stream_tokens(layer)) for layer in range(self.num_layers))

    def allocated_bytes(self) -> int:
        """Bytes of the key/value buffers, spare capacity included."""
        return self.cache.allocated_bytes()

    # -- writing ---------------------------------------------------------------------
    def record_appended(self, positions: list[torch.Tensor], frame_index: torch.Tensor) -> None:
        """Record metadata for tokens the model just appended to every layer's cache.

        Parameters
        ----------
        positions : per layer, LongTensor ``(axes, new)`` (absolute positions used)
        frame_index : LongTensor ``(new,)``
        """
        # numpy on the host: torch's CPU ops have a large fixed cost per call on a many-core GPU host
        frames = frame_index.cpu().numpy()
        for layer in range(self.num_layers):
            self.positions[layer] = torch.from_numpy(
                np.concatenate([self.positions[layer].numpy(), positions[layer].cpu().numpy()], axis=1)
            )
            self.frame_index[layer] = torch.from_numpy(np.concatenate([self.frame_index[layer].numpy(), frames]))
        self._check_consistent()

    def mark_prefix(self) -> None:
        """Declare everything currently stored as the fixed, never-evicted prefix."""
        lengths = set(self.lengths())
        if len(lengths) != 1:
            raise RuntimeError("the prefix must be marked while all layers hold the same tokens")
        self.prefix_len = lengths.pop()

    def truncate(self, lengths: list[int]) -> None:
        """Cut every layer back to the given length (drops the newest tokens)."""
        for layer, n in enumerate(lengths):
            self.cache.layers[layer].truncate(n)
            self.positions[layer] = self.positions[layer][:, :n]
            self.frame_index[layer] = self.frame_index[layer][:n]
            mask = self._head_masks[layer]
            if mask is not None and mask.shape[1] > n:
                self._head_masks[layer] = mask[:, :n]

    def append_layers(
        self, contents: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> None:
        """Append tokens to some layers: ``{layer: (keys, values, positions, frame_index)}``.

        keys / values ``(batch, kv_heads, n, head_dim)`` with RoPE already applied at
        ``positions`` ``(axes, n)``; ``frame_index`` ``(n,)``. Attention does not depend on
        the order of cached tokens (each carries its own position), so tokens older than
        the ones held may be appended after them; :meth:`truncate` takes them out again.
        """
        for layer, (keys, values, positions, frames) in contents.items():
            self.cache.layers[layer].append(keys, values)
            self.positions[layer] = torch.cat([self.positions[layer], positions.cpu()], dim=1)
            self.frame_index[layer] = torch.cat([self.frame_index[layer], frames.cpu()])
        self._check_consistent()

    def keep(
        self,
        layer: int,
        indices: torch.Tensor,
        extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
    ) -> None:
        """Keep only ``indices`` (sorted, prefix included) of a layer, then append ``extra``.

        Parameters
        ----------
        indices : LongTensor ``(n,)`` into the layer's current tokens
        extra : optional ``(key, value, position, frame)`` of one token to append after the
            kept ones (a summary token): key/value ``(batch, kv_heads, 1, head_dim)``,
            position ``(axes, 1)``
        """
        self.keep_layers({layer: (indices, extra)})

    # the host's bookkeeping after a compression waits for the first read of positions or
    # frames (see keep_layers); False: done inside keep_layers
    defer_bookkeeping = True

    def prefetch(self, tensors: list[torch.Tensor]) -> None:
        """Queue now the device-to-host copy the next :meth:`keep_layers` makes of
        ``tensors``: every decision's indices, then each summary token's position, in the
        decisions' order.

        A rule calls this as soon as its indices are computed, before the GPU work it still
        queues (summary tokens): :meth:`keep_layers` then waits for a copy that ran earlier,
        and the host's bookkeeping overlaps that work as well as the gathers. Used only when
        :meth:`keep_layers` is given the very same tensor objects; otherwise it copies again.
        """
        self._settle()  # its host arrays view a staging buffer that downloads reuse
        tensors = list(tensors)
        self._prefetched = (tensors, Download(tensors, self._staging))

    def keep_layers(
        self,
        decisions: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None]],
    ) -> None:
        """:meth:`keep` for several layers: ``{layer: (indices, extra)}``.

        Indices (and a summary token's position) may live on the host or on the cache's
        device. The gathers are queued first, with indices already on the device used as
        they are and host ones copied there in one transfer per device; the host-side
        metadata is then updated from one device-to-host copy of whatever lived on a GPU,
        the only point where this waits for the GPU. That copy is queued before the
        gathers.

        The host's bookkeeping (each layer's positions and frames gathered to the kept
        tokens) then waits for the first read of :attr:`positions` or :attr:`frame_index`
        where a layer's next free position can be known without it (one position axis):
        in a stream, until the next chunk's forward is queued, so that the GPU runs it
        meanwhile (with every gather one kernel, the GPU would otherwise finish first and
        wait). :meth:`length`, :meth:`lengths` and :meth:`next_position` answer from what
        is known before; everything else reads the finished bookkeeping.
        """
        self._settle()  # the last compression's bookkeeping, before these indices into it
        # -- the GPU's work: every layer's gather
        pending: dict[torch.device, list[int]] = {}
        for layer, (indices, _) in decisions.items():
            target = self.cache.layers[layer].device
            if indices.device != target:
                pending.setdefault(target, []).append(layer)
        on_device: dict[int, torch.Tensor] = {layer: indices for layer, (indices, _) in decisions.items()}
        for device, layers in pending.items():
            host = [decisions[layer][0].cpu().numpy() for layer in layers]
            moved = upload(torch.from_numpy(np.concatenate(host)), device)
            on_device.update(zip(layers, moved.split([len(h) for h in host]), strict=True))
        # the indices back to the host, queued before the gathers: the host's bookkeeping
        # below then overlaps the GPU's gathering instead of following it
        extras = {layer: extra for layer, (_, extra) in decisions.items() if extra is not None}
        wanted = [indices for indices, _ in decisions.values()] + [extra[2] for extra in extras.values()]
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and len(prefetched[0]) == len(wanted) and all(map(operator.is_, prefetched[0], wanted)):
            download = prefetched[1]  # queued earlier (prefetch)
        else:
            download = Download(wanted, self._staging)
        # head masks follow their layers' kept tokens (columns past a mask: visible, as the
        # summary token after the kept ones), before the gathers change the lengths
        for layer in decisions:
            mask = self._head_masks[layer]
            if mask is not None:
                length = self.cache.layers[layer].keys.shape[-2]
                if mask.shape[1] < length:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], length - mask.shape[1])], dim=1)
                self._head_masks[layer] = mask.index_select(1, on_device[layer].to(mask.device))
        self.cache.gather_layers(
            {layer: (on_device[layer], None if extra is None else (extra[0], extra[1])) for layer, (_, extra) in decisions.items()}
        )
        # -- the host's metadata (numpy: torch's CPU indexing has a large fixed cost per call
        # on a many-core GPU host), from one copy back of what lives on a GPU
        host = download.wait()
        staged_at = self._staging.taken
        summary_positions = dict(zip(extras, host[len(decisions) :], strict=True))
        kept_by_layer = dict(zip(decisions, host[: len(decisions)], strict=True))

        def bookkeeping() -> None:
            if self._staging.taken - staged_at >= self._staging.slots:
                # cannot happen while every download of this store settles first (prefetch,
                # keep_layers): the arrays below view a staging buffer reused since
                raise RuntimeError("KV store bookkeeping read a reused staging buffer")
            for layer, host_indices in kept_by_layer.items():
                # np.take, not fancy indexing plus a contiguous copy: 3x less host time
                # (benchmarks/eviction_bookkeeping.py)
                positions = np.take(self._positions[layer].numpy(), host_indices, axis=1)
                frames = np.take(self._frame_index[layer].numpy(), host_indices)
                if layer in extras:
                    positions = np.concatenate([positions, summary_positions[layer]], axis=1)
                    frames = np.append(frames, extras[layer][3])
                self._positions[layer] = torch.from_numpy(positions)  # C-contiguous (np.take)
                self._frame_index[layer] = torch.from_numpy(frames)
            for layer, expected in self._pending_next.items():
                if next_free_position(self._positions[layer]) != expected:
                    raise RuntimeError(f"KV store positions out of order at layer {layer}: deferred bookkeeping disagrees")

        ahead = self._next_positions_ahead(kept_by_layer, summary_positions) if self.defer_bookkeeping else None
        if ahead is None:
            bookkeeping()
            return
        # Left for the first read of positions or frames: in a stream, after the next
        # chunk's forward is queued, so the GPU runs it meanwhile instead of waiting.
        # What that chunk needs before (each layer's length and next free position) is
        # known now.
        self._pending = bookkeeping
        self._pending_lengths = {layer: len(kept) + (layer in extras) for layer, kept in kept_by_layer.items()}
        self._pending_next = ahead

    def _next_positions_ahead(
        self, kept_by_layer: dict[int, np.ndarray], summary_positions: dict[int, np.ndarray]
    ) -> dict[int, int] | None:
        """Each changed layer's next free position after keeping ``kept_by_layer``, without
        gathering its positions; None where that needs the gather (more than one position
        axis, or nothing kept).

        With one axis a layer's positions never decrease along its tokens (appended in
        order, kept in order, re-indexed by rank, a summary token after the kept ones), so
        the kept tokens' largest position is the last kept one's (the deferred bookkeeping
        checks that it agrees).
        """
        if self.position_axes != 1:
            return None
        ahead = {}
        for layer, kept in kept_by_layer.items():
            if not len(kept):
                return None
            highest = int(self._positions[layer].numpy()[0, kept[-1]])
            if layer in summary_positions:
                highest = max(highest, int(summary_positions[layer].max()))
            ahead[layer] = highest + 1
        return ahead

    def reindex(self, layer: int, rotary_emb: torch.nn.Module) -> bool:
        """Left-compact one layer's stream positions and rotate its keys to match.

        Returns True when any position changed.
        """
        old = self.positions[layer]
        new = compact_positions(old, self.prefix_len)
        if torch.equal(old, new):
            return False
        cache_layer = self.cache.layers[layer]
        cache_layer.keys.copy_(rerotate_keys(cache_layer.keys, old, new, rotary_emb))
        self.positions[layer] = new
        return True

    def _check_consistent(self) -> None:
        for layer in range(self.num_layers):
            stored = self.cache.layers[layer].keys.shape[-2]
            if stored != self.positions[layer].shape[1]:
                raise RuntimeError(
                    f"KV store out of sync at layer {layer}: {stored} keys, "
                    f"{self.positions[layer].shape[1]} positions"
                )
