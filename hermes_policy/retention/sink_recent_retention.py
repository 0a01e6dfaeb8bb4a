"""``sink+recent``: StreamingLLM-style; the first stream tokens (attention sinks) plus the newest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hermes_policy.cache.kv_store import KVStore
from hermes_policy.errors import RetentionError
from hermes_policy.models.base import ModelAdapter
from hermes_policy.retention.base import BudgetedRule, LayerKeep, ReindexMode, SelectContext


@dataclass
class SinkRecentRetention(BudgetedRule):
    """Keep ``sink`` oldest stream tokens and the newest ``budget - sink``.

    Parameters
    ----------
    budget : stream tokens per layer
    sink : how many of the oldest stream tokens never leave
    """

    name = "sink+recent"
    sink: int = 4
    reindex: ReindexMode = "eager"

    def validate(self, adapter: ModelAdapter) -> None:
        super().validate(adapter)
        if not 0 <= self.sink < self.budget:
            raise RetentionError(f"sink ({self.sink}) must be between 0 and the budget ({self.budget})")

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        decisions = {}
        prefix = store.prefix_len
        for layer, length in enumerate(store.lengths()):
            if length - prefix <= self.budget:
                continue
            recent = torch.arange(length - (self.budget - self.sink), length)
            sinks = torch.arange(prefix, prefix + self.sink)
            decisions[layer] = LayerKeep(torch.cat([torch.arange(prefix), sinks, recent]))
        return decisions
