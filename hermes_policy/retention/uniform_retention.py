"""``uniform``: keep stream tokens evenly spaced in time (always including the newest)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hermes_policy.cache.kv_store import KVStore
from hermes_policy.retention.base import BudgetedRule, LayerKeep, ReindexMode, SelectContext


def evenly_spaced(length: int, keep: int) -> torch.Tensor:
    """``keep`` distinct indices spread evenly over ``range(length)``, ending at ``length - 1``."""
    if keep >= length:
        return torch.arange(length)
    return torch.linspace(0, length - 1, keep).round().long().unique()


@dataclass
class UniformRetention(BudgetedRule):
    """A uniform temporal subsample of the stream (a frame-rate-reduction baseline)."""

    name = "uniform"
    reindex: ReindexMode = "eager"

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        decisions = {}
        prefix = store.prefix_len
        for layer, stream in enumerate(store.stream_lengths()):
            if stream <= self.budget:
                continue
            kept = evenly_spaced(stream, self.budget) + prefix
            decisions[layer] = LayerKeep(torch.cat([torch.arange(prefix), kept]))
        return decisions
