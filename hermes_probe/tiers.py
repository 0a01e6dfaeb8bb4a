"""From measurements to memory tiers and per-layer retention parameters.

Role score. Each layer gets ``u_l`` in [0, 1], 0 = sensory (recency), 1 = long-term
(anchors)::

    rho_l = clip((recency_share_l - 0.1) / 0.9, 0, 1)   # 0 = no recency bias, 1 = only recent
    u_l   = clip((1 - rho_l + periodicity_l) / 2, 0, 1)

A layer with neither recency nor rhythm lands at 0.5 (working memory).

Contiguous tiers. As in the paper, the layers are split into three contiguous tiers
(sensory, working, long-term). We choose the split that best fits ``u`` by a step function
with one level per tier (least squares over all splits, levels ordered sensory <= working
<= long-term) and report its R^2. A layer's own role is the tier whose fitted level is
nearest to its ``u``; layers whose role differs from their tier are listed as mismatches
(real models need not be ordered like the paper's).

Per-layer parameters (the policy's ``layers`` entries, authoritative over the tiers):

- ``recency_weight w_l = 1 - u_l``: a pure recency layer scores by recency only (w = 1),
  a pure anchor layer by attention only (w = 0);
- ``forgetting_rate k_l = kappa_l * (B - 1)``: the measured per-token decay rate expressed
  in the runtime's normalised distance ``dt / (T - 1)`` for a budget ``B``, clipped to
  [0, 50];
- ``smoothing lambda_l = 0.1 + 0.3 u_l``: the paper's 0.1 (sensory) to 0.4 (long-term);
- ``summary_token``: for layers in the long-term tier.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hermes_policy.policy import TIERS, LayerPolicy

from .metrics import ProfileMetrics

UNIFORM_RECENT_SHARE = 0.1
MAX_FORGETTING_RATE = 50.0


def recency_strength(recency_share: np.ndarray) -> np.ndarray:
    share = np.nan_to_num(recency_share, nan=UNIFORM_RECENT_SHARE)
    return np.clip((share - UNIFORM_RECENT_SHARE) / (1 - UNIFORM_RECENT_SHARE), 0.0, 1.0)


def role_scores(metrics: ProfileMetrics) -> np.ndarray:
    """``u_l`` per layer (see module docstring)."""
    rho = recency_strength(metrics.recency_share)
    periodicity = np.clip(np.nan_to_num(metrics.periodicity), 0.0, 1.0)
    return np.clip((1 - rho + periodicity) / 2, 0.0, 1.0)


@dataclass
class TierFit:
    """The best contiguous three-tier split of a model's layers."""

    scores: np.ndarray
    tiers: dict[str, tuple[int, int]]
    levels: dict[str, float]
    r2: float
    roles: list[str] = field(default_factory=list)

    @property
    def tier_of_layer(self) -> list[str]:
        return [name for name in TIERS for _ in range(self.tiers[name][0], self.tiers[name][1] + 1)]

    @property
    def mismatches(self) -> list[int]:
        """Layers whose own role differs from the contiguous tier they were put in."""
        return [i for i, (tier, role) in enumerate(zip(self.tier_of_layer, self.roles)) if tier != role]


def best_contiguous_split(scores: np.ndarray) -> TierFit:
    """Least-squares three-level step fit of ``scores`` with ordered levels."""
    n = scores.shape[0]
    if n < 3:
        raise ValueError(f"three tiers need at least 3 layers, got {n}")
    prefix = np.concatenate([[0.0], np.cumsum(scores)])
    prefix_sq = np.concatenate([[0.0], np.cumsum(scores**2)])

    def sse(i: int, j: int) -> tuple[float, float]:
        count = j - i
        total = prefix[j] - prefix[i]
        mean = total / count
        return float(prefix_sq[j] - prefix_sq[i] - total * mean), float(mean)

    best = None
    for a in range(1, n - 1):
        for b in range(a + 1, n):
            parts = [sse(0, a), sse(a, b), sse(b, n)]
            means = [m for _, m in parts]
            if not (means[0] <= means[1] + 1e-12 and means[1] <= means[2] + 1e-12):
                continue
            err = sum(e for e, _ in parts)
            if best is None or err < best[0] - 1e-12:
                best = (err, a, b, means)
    if best is None:  # no ordered split exists (scores decrease): fall back to the paper's shape
        a, b = max(1, round(0.1 * n)), n - max(1, round(0.3 * n))
        parts = [sse(0, a), sse(a, b), sse(b, n)]
        best = (sum(e for e, _ in parts), a, b, [m for _, m in parts])
    err, a, b, means = best
    total = float(((scores - scores.mean()) ** 2).sum())
    r2 = 1.0 - err / total if total > 1e-12 else 1.0
    levels = dict(zip(TIERS, means))
    roles = [min(TIERS, key=lambda t, s=s: abs(levels[t] - s)) for s in scores]
    tiers = {"sensory": (0, a - 1), "working": (a, b - 1), "long_term": (b, n - 1)}
    return TierFit(scores=scores, tiers=tiers, levels=levels, r2=r2, roles=roles)


def layer_parameters(metrics: ProfileMetrics, fit: TierFit, budget: int) -> list[LayerPolicy]:
    """Per-layer retention parameters derived from each layer's own measurements."""
    layers = []
    for index, (u, tier) in enumerate(zip(fit.scores, fit.tier_of_layer)):
        kappa = float(np.nan_to_num(metrics.decay_rate[index], nan=0.0))
        k = float(np.clip(kappa * (budget - 1), 0.0, MAX_FORGETTING_RATE))
        layers.append(
            LayerPolicy(
                index=index,
                tier=tier,
                recency_weight=round(float(1.0 - u), 4),
                forgetting_rate=round(k, 4),
                smoothing=round(float(0.1 + 0.3 * u), 4),
                budget=budget,
                summary_token=tier == "long_term",
            )
        )
    return layers
