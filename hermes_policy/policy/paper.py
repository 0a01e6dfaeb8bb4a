"""The paper's setting for any model (METHOD.md sections 3-6): tiers 10 / 60 / 30 %, the
recency weights and forgetting rates by depth, and layer-dependent budgets."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from hermes_policy.errors import PolicyError
from hermes_policy.policy.document import Guidance, LayerPolicy, ModelInfo, Policy

# Paper constants (METHOD.md sections 3-4).
PAPER_TIER_FRACTIONS = (0.1, 0.6, 0.3)
PAPER_SMOOTHING = {"sensory": 0.1, "working": 0.3, "long_term": 0.4}
PAPER_FORGETTING_SHALLOW = 20.0
PAPER_FORGETTING_MIDDLE_END = 8.0
PAPER_W0, PAPER_G = 0.75, 0.6


def paper_tiers(num_layers: int) -> dict[str, tuple[int, int]]:
    """The paper's 10% / 60% / 30% split, each tier at least one layer."""
    if num_layers < 3:
        raise PolicyError(f"a model needs at least 3 layers for three tiers, got {num_layers}")
    n_sensory = max(1, round(PAPER_TIER_FRACTIONS[0] * num_layers))
    n_long = max(1, round(PAPER_TIER_FRACTIONS[2] * num_layers))
    n_long = min(n_long, num_layers - n_sensory - 1)
    first_long = num_layers - n_long
    return {
        "sensory": (0, n_sensory - 1),
        "working": (n_sensory, first_long - 1),
        "long_term": (first_long, num_layers - 1),
    }


def split_budget(weights: list[float], per_layer: int) -> list[int]:
    """Layer-dependent budgets (METHOD.md section 6).

    ``m_l = floor(w_l / sum(w) * per_layer * L)``; the rounding remainder goes to the last
    layer, so the total is exactly ``per_layer * L``.
    """
    total = per_layer * len(weights)
    weight_sum = float(sum(weights))
    if weight_sum <= 0 or any(w < 0 for w in weights):
        raise ValueError("budget weights must be non-negative with a positive sum")
    budgets = [math.floor(w / weight_sum * total) for w in weights]
    budgets[-1] += total - sum(budgets)
    return budgets


def paper_default(
    model: ModelInfo,
    budget: int = 4000,
    reindex: str = "lazy",
    budget_weights: list[float] | None = None,
) -> Policy:
    """The paper's setting for any layer count (METHOD.md sections 3-5).

    Sensory layers: pure recency (w = 1, k = 20). Working layers: w falls linearly from
    w0 = 0.75 to w0 - g = 0.15 across the tier (the paper's formula) and k from 20 to 8
    (the official code's Qwen setting, whose w endpoints match the paper's). Long-term
    layers: pure attention (w = 0) with a summary token. Smoothing 0.1 / 0.3 / 0.4. With
    ``budget_weights`` (one per layer) the total ``budget * layers`` is split by weight
    (METHOD.md section 6).
    """
    tiers = paper_tiers(model.num_layers)
    if budget_weights is not None and len(budget_weights) != model.num_layers:
        raise PolicyError(f"{len(budget_weights)} budget weights for {model.num_layers} layers")
    budgets = split_budget(budget_weights, budget) if budget_weights else [budget] * model.num_layers
    w_start, w_end = tiers["working"]
    layers = []
    for index in range(model.num_layers):
        tier = next(name for name, (a, b) in tiers.items() if a <= index <= b)
        if tier == "sensory":
            w, k = 1.0, PAPER_FORGETTING_SHALLOW
        elif tier == "working":
            frac = 0.0 if w_end == w_start else (index - w_start) / (w_end - w_start)
            w = PAPER_W0 - PAPER_G * frac
            k = PAPER_FORGETTING_SHALLOW + (PAPER_FORGETTING_MIDDLE_END - PAPER_FORGETTING_SHALLOW) * frac
        else:
            w, k = 0.0, PAPER_FORGETTING_MIDDLE_END
        layers.append(
            LayerPolicy(
                index=index, tier=tier, recency_weight=round(w, 6), forgetting_rate=round(k, 6),
                smoothing=PAPER_SMOOTHING[tier], budget=budgets[index], summary_token=tier == "long_term",
            )
        )
    provenance = {
        "created_by": "hermes-probe 0.1.0",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": "paper-default",
    }
    return Policy(model, budget, tiers, layers, Guidance(), reindex, provenance)
