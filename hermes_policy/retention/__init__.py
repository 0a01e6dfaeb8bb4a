"""Retention rules: one small dataclass per file, all behind :class:`RetentionRule`."""

from __future__ import annotations

from hermes_policy.errors import RetentionError
from hermes_policy.retention.attention_retention import AttentionRetention
from hermes_policy.retention.base import (
    GuidanceRequest,
    LayerKeep,
    QuestionTimeMemory,
    RetentionRule,
    SelectContext,
    SummaryToken,
    newest_indices,
)
from hermes_policy.retention.fifo_retention import FifoRetention
from hermes_policy.retention.full_retention import FullRetention
from hermes_policy.retention.hermes_retention import HermesRetention
from hermes_policy.retention.per_head_retention import PerHeadRetention
from hermes_policy.retention.retrieval_retention import RetrievalRetention
from hermes_policy.retention.sink_recent_retention import SinkRecentRetention
from hermes_policy.retention.uniform_retention import UniformRetention
from hermes_policy.retention.window_retention import WindowRetention

RULES: dict[str, type[RetentionRule]] = {
    rule.name: rule
    for rule in (
        FullRetention,
        FifoRetention,
        SinkRecentRetention,
        UniformRetention,
        AttentionRetention,
        HermesRetention,
        PerHeadRetention,
        WindowRetention,
        RetrievalRetention,
    )
}


def make_rule(name: str, budget: int | None = None, policy=None, **options) -> RetentionRule:
    """Build a rule by registry name.

    ``budget`` goes to rules that take one; ``hermes`` needs ``policy`` (a
    :class:`~hermes_policy.policy.Policy`), ``hermes-heads`` a schema-2 one; ``options`` are other fields of the rule's
    dataclass (``frames`` of ``window``, ``retrieve_chunks`` of ``retrieval``); an option
    the rule does not have is an error, an option given as None is left at its default.
    """
    if name not in RULES:
        raise RetentionError(f"unknown retention rule {name!r}; choose one of {', '.join(RULES)}")
    cls = RULES[name]
    options = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(options) - set(cls.__dataclass_fields__))
    if unknown:
        raise RetentionError(f"the {name} rule has no option {', '.join(unknown)}")
    if cls in (HermesRetention, PerHeadRetention):
        return cls(policy=policy, **options)
    if budget is not None and "budget" in cls.__dataclass_fields__:
        options["budget"] = budget
    return cls(**options)


__all__ = [
    "RULES",
    "AttentionRetention",
    "FifoRetention",
    "FullRetention",
    "GuidanceRequest",
    "HermesRetention",
    "LayerKeep",
    "PerHeadRetention",
    "QuestionTimeMemory",
    "RetentionRule",
    "RetrievalRetention",
    "SelectContext",
    "SinkRecentRetention",
    "SummaryToken",
    "UniformRetention",
    "WindowRetention",
    "make_rule",
    "newest_indices",
]
