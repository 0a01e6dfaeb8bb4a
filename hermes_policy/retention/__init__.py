"""Retention rules: one small dataclass per file, all behind :class:`RetentionRule`."""

from __future__ import annotations

from ..errors import RetentionError
from .attention_retention import AttentionRetention
from .base import (
    GuidanceRequest,
    LayerKeep,
    RetentionRule,
    SelectContext,
    SummaryToken,
    newest_indices,
)
from .fifo_retention import FifoRetention
from .full_retention import FullRetention
from .hermes_retention import HermesRetention
from .sink_recent_retention import SinkRecentRetention
from .uniform_retention import UniformRetention

RULES: dict[str, type[RetentionRule]] = {
    rule.name: rule
    for rule in (
        FullRetention,
        FifoRetention,
        SinkRecentRetention,
        UniformRetention,
        AttentionRetention,
        HermesRetention,
    )
}


def make_rule(name: str, budget: int | None = None, policy=None) -> RetentionRule:
    """Build a rule by registry name.

    ``budget`` goes to rules that take one; ``hermes`` needs ``policy`` (a
    :class:`~hermes_policy.policy.Policy`).
    """
    if name not in RULES:
        raise RetentionError(f"unknown retention rule {name!r}; choose one of {', '.join(RULES)}")
    cls = RULES[name]
    if cls is HermesRetention:
        return HermesRetention(policy=policy)
    if budget is not None and "budget" in cls.__dataclass_fields__:
        return cls(budget=budget)
    return cls()


__all__ = [
    "RULES",
    "AttentionRetention",
    "FifoRetention",
    "FullRetention",
    "GuidanceRequest",
    "HermesRetention",
    "LayerKeep",
    "RetentionRule",
    "SelectContext",
    "SinkRecentRetention",
    "SummaryToken",
    "UniformRetention",
    "make_rule",
    "newest_indices",
]
