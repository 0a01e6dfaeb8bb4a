"""``full``: keep every token (the unbounded reference every other rule is compared to)."""

from __future__ import annotations

from dataclasses import dataclass

from hermes_policy.cache.kv_store import KVStore
from hermes_policy.retention.base import LayerKeep, ReindexMode, RetentionRule, SelectContext


@dataclass
class FullRetention(RetentionRule):
    """Keep everything. Positions grow with the stream; memory grows without bound."""

    name = "full"
    # nothing is ever evicted, so there is nothing to re-index
    reindex: ReindexMode = "eager"

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        return {}
