"""``attention-only``: SnapKV-style, every layer keeps what the pseudo-query attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hermes_policy.cache.kv_store import KVStore
from hermes_policy.errors import RetentionError
from hermes_policy.policy import Guidance
from hermes_policy.retention.base import (
    BudgetedRule,
    GuidanceRequest,
    LayerKeep,
    ReindexMode,
    SelectContext,
)
from hermes_policy.retention.scoring import top_indices


def pooled(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool scores over a window of ``kernel`` neighbours (SnapKV keeps clusters)."""
    if kernel <= 1 or scores.shape[0] < 2:
        return scores
    return F.max_pool1d(scores[None, None].float(), kernel, stride=1, padding=kernel // 2)[0, 0][: scores.shape[0]]


@dataclass
class AttentionRetention(BudgetedRule):
    """Score every layer by the same pseudo-query's attention at that layer; no recency, no smoothing.

    Parameters
    ----------
    budget : stream tokens per layer
    prompt : the pseudo-query (default: the paper's global guidance prompt)
    kernel : max-pooling window over token scores (odd)
    """

    name = "attention-only"
    prompt: str = Guidance().global_
    kernel: int = 7
    reindex: ReindexMode = "eager"

    def guidance(self, store: KVStore, history: list[tuple[str, str]]) -> GuidanceRequest:
        return GuidanceRequest(prompts=(self.prompt,), layer_prompt=(0,) * store.num_layers)

    def select(self, store: KVStore, context: SelectContext) -> dict[int, LayerKeep]:
        if context.attention is None:
            raise RetentionError("attention-only needs the pseudo-query attention")
        decisions = {}
        prefix = store.prefix_len
        # per-layer scoring of short vectors is cheaper on the host than a launch per op
        attention = [None if a is None else a.cpu() for a in context.attention]
        for layer, stream in enumerate(store.stream_lengths()):
            if stream <= self.budget:
                continue
            kept = top_indices(pooled(attention[layer], self.kernel), self.budget) + prefix
            decisions[layer] = LayerKeep(torch.cat([torch.arange(prefix, device=kept.device), kept]))
        return decisions
