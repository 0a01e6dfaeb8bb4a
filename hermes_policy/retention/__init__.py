"""Retention rules: one small dataclass per file, all behind :class:`RetentionRule`."""

from __future__ import annotations

from ..errors import RetentionError
from .base import LayerKeep, RetentionRule, SummaryToken, newest_indices
from .fifo_retention import FifoRetention
from .full_retention import FullRetention

RULES: dict[str, type[RetentionRule]] = {
    FullRetention.name: FullRetention,
    FifoRetention.name: FifoRetention,
}


def make_rule(name: str, budget: int | None = None) -> RetentionRule:
    """Build a rule by registry name; ``budget`` is passed to rules that take one."""
    if name not in RULES:
        raise RetentionError(f"unknown retention rule {name!r}; choose one of {', '.join(RULES)}")
    cls = RULES[name]
    if budget is not None and "budget" in cls.__dataclass_fields__:
        return cls(budget=budget)
    return cls()


__all__ = [
    "RULES",
    "FifoRetention",
    "FullRetention",
    "LayerKeep",
    "RetentionRule",
    "SummaryToken",
    "make_rule",
    "newest_indices",
]
