"""``fifo``: keep the system prefix and the newest ``budget`` stream tokens per layer."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RetentionError
from ..kv_store import KVStore
from ..models.base import ModelAdapter
from .base import LayerKeep, ReindexMode, RetentionRule, SelectContext, newest_indices


@dataclass
class FifoRetention(RetentionRule):
    """First in, first out, with positions re-indexed contiguous after each eviction.

    This is the cache the paper's mechanistic analysis used (METHOD.md section 2).

    Parameters
    ----------
    budget : stream (video) tokens each layer may keep
    """

    name = "fifo"
    budget: int = 6000
    reindex: ReindexMode = "eager"

    def budget_of(self, layer: int) -> int:
        return self.budget

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        decisions = {}
        for layer, length in enumerate(store.lengths()):
            if length - store.prefix_len > self.budget:
                decisions[layer] = LayerKeep(newest_indices(length, store.prefix_len, self.budget))
        return decisions

    def validate(self, adapter: ModelAdapter) -> None:
        tokens_per_frame = adapter.tokens_per_frame
        if self.budget < tokens_per_frame:
            raise RetentionError(
                f"budget of {self.budget} tokens is smaller than one frame ({tokens_per_frame} tokens)"
            )
