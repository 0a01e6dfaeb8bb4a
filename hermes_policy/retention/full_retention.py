"""``full``: keep every token (the unbounded reference every other rule is compared to)."""

from __future__ import annotations

from dataclasses import dataclass

from ..kv_store import KVStore
from .base import LayerKeep, ReindexMode, RetentionRule


@dataclass
class FullRetention(RetentionRule):
    """Keep everything. Positions grow with the stream; memory grows without bound."""

    name = "full"
    reindex: ReindexMode = "lazy"

    def select(self, store: KVStore) -> dict[int, LayerKeep]:
        return {}
