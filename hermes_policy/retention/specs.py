"""Rules from command-line specs: a policy file, ``paper-default``, or a rule name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hermes_policy.models.base import ModelAdapter
from hermes_policy.policy import ModelInfo, Policy, paper_default
from hermes_policy.retention import (
    RULES,
    HermesRetention,
    PerHeadRetention,
    RetentionRule,
    make_rule,
)

DEFAULT_BUDGET = 4000


def rule_from_spec(spec: str, adapter: ModelAdapter, budget: int | None = None, **options: Any) -> RetentionRule:
    """A rule from a command-line spec: a policy file (``hermes``, or ``hermes-heads`` for a
    ``hermes-policy/2`` file), ``paper-default`` (also ``hermes``), or a rule name.

    ``budget`` is stream tokens per layer; None means the policy file's own budget, or
    :data:`DEFAULT_BUDGET` for rules and the paper default. Given with a policy file it
    overrides the file's budgets (see :meth:`Policy.with_budget`), never silently ignored.
    ``options`` go to rules that have them (``frames`` of ``window``; ``retrieve_chunks``
    and ``host_budget_bytes`` of ``retrieval``); None values and options of other rules are
    ignored, so a command line can pass every option whatever the rule.
    """
    if spec in ("paper-default", "hermes"):
        return HermesRetention(policy=paper_default(ModelInfo.of(adapter), budget=budget or DEFAULT_BUDGET))
    if spec.endswith(".json") or Path(spec).is_file():
        policy = Policy.load(spec)
        policy = policy if budget is None else policy.with_budget(budget)
        # a schema-2 policy keeps tokens per KV head (hermes-heads); schema 1 per layer
        return PerHeadRetention(policy=policy) if policy.per_head else HermesRetention(policy=policy)
    fields = RULES[spec].__dataclass_fields__ if spec in RULES else {}
    return make_rule(spec, budget or DEFAULT_BUDGET, **{k: v for k, v in options.items() if k in fields})


def rule_budget(rule: RetentionRule, num_layers: int) -> int | list[int] | None:
    """The stream tokens per layer a rule keeps: one number when every layer has the same,
    a list per layer otherwise, None when unbounded (what the results record)."""
    budgets = [rule.budget_of(layer) for layer in range(num_layers)]
    if any(b is None for b in budgets):
        return None
    return budgets[0] if len(set(budgets)) == 1 else budgets
