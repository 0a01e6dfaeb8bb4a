"""``fifo``: keep the system prefix and the newest ``budget`` stream tokens per layer."""

from __future__ import annotations

from dataclasses import dataclass

from hermes_policy.cache.kv_store import KVStore
from hermes_policy.retention.base import (
    BudgetedRule,
    LayerKeep,
    ReindexMode,
    SelectContext,
    keep_newest,
)


@dataclass
class FifoRetention(BudgetedRule):
    """First in, first out, with positions re-indexed contiguous after each eviction.

    This is the cache the paper's mechanistic analysis used (METHOD.md section 2).

    Parameters
    ----------
    budget : stream (video) tokens each layer may keep
    """

    name = "fifo"
    reindex: ReindexMode = "eager"

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        return keep_newest(store, self.budget)

