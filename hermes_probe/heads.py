"""Head roles: the probe's per-layer measurements made per KV head, a role for each head, and
the per-head entries of a ``hermes-policy/2`` policy. Pure functions on arrays.

Grouped-query attention. Roles and budgets apply to KV heads: a KV head's cached tokens are
read by every query head of its group, so whatever the head keeps, all of them see. Query
head ``h`` reads KV head ``h // (H / K)`` (``H`` query heads, ``K`` KV heads; transformers'
``repeat_kv`` layout), and a KV head's profile is the *mean* of its query heads' profiles:
the attention the group as a whole puts on each cached token, which is what a keep set
shared by the group must serve. Entropy and top-1% mass are per-query-head means over the
group (they are recorded per probe and cannot be recomputed for the group's mean).

Measurements per KV head are :mod:`hermes_probe.metrics`' own functions on the group's
profile (recency share, newest-frame ratio, decay rate, periodicity, anchor offset and
strength), plus two recalls from the distance profile:

- ``budget_recall``: the share of the head's attention (within the probe's window) on the
  newest ``budget`` tokens, i.e. what a plain recent window of the policy's budget keeps
  (1 when the budget covers the whole probe window);
- ``needed_window``: the fewest whole frames of newest tokens holding
  :data:`WINDOW_RECALL` of it (the window a streaming head needs).

Roles. Three kinds of evidence in [0, 1] per head::

    streaming  s = clip((recency_share - 0.1) / 0.9, 0, 1)       # as the layer's rho
    anchor     a = clip(periodicity, 0, 1)                          # per-frame rhythm
    retrieval  r = (1 - s) (1 - a) clip((top_mass - 0.01) / (0.3 - 0.01), 0, 1)

Retrieval is attention that neither recency nor a frame rhythm explains and that is
concentrated on few tokens (top-1% mass 0.01 is uniform, 0.3 is the report's "sparse").
The role is the largest evidence (ties go to retrieval, the per-layer behaviour); the
confidence is its margin over the second largest. A head with no structure (flat
attention: every evidence near 0) is labelled retrieval with confidence near 0: it is
then treated as the per-layer policy would treat it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from hermes_policy.policy import HeadPolicy, LayerPolicy, ModelInfo

from .metrics import (
    anchor,
    decay_rate,
    folded_periodicity,
    newest_frame_ratio,
    recency_share,
    valid_window,
)
from .profiles import AttentionProfile
from .tiers import MAX_FORGETTING_RATE, recency_strength

WINDOW_RECALL = 0.9  # a streaming head's window holds this share of its attention
UNIFORM_TOP_MASS = 0.01  # top-1% mass of a uniform spread
SPARSE_TOP_MASS = 0.3  # the report's "sparse" (30x uniform)
# Order of the evidence columns; argmax ties go to the first, retrieval (see module docstring).
EVIDENCE_ORDER = ("retrieval", "streaming", "anchor")


def kv_head_of(num_heads: int, num_kv_heads: int) -> np.ndarray:
    """KV head read by each query head, ``(num_heads,)`` ints.

    Raises ValueError when the query heads do not group evenly onto the KV heads.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group onto {num_kv_heads} KV heads")
    return np.arange(num_heads) // (num_heads // num_kv_heads)


def group_mean(values: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """Mean over the query heads of each KV group.

    Parameters
    ----------
    values : ``(layers, heads, ...)``
    num_kv_heads : ``K``; ``heads`` must be a multiple of it

    Returns
    -------
    ``(layers, K, ...)``
    """
    values = np.asarray(values, dtype=np.float64)
    kv_head_of(values.shape[1], num_kv_heads)  # validates the grouping
    group = values.shape[1] // num_kv_heads
    return values.reshape(values.shape[0], num_kv_heads, group, *values.shape[2:]).mean(axis=2)


def window_recall(a: np.ndarray, tokens: int) -> float:
    """Share of a distance profile ``a`` ``(W,)`` on its newest ``tokens`` entries."""
    total = float(a.sum())
    if a.shape[0] == 0 or total <= 0:
        return float("nan")
    return float(a[: max(tokens, 0)].sum() / total)


def needed_window(a: np.ndarray, period: int, target: float = WINDOW_RECALL) -> int:
    """Fewest whole frames of newest tokens whose recall reaches ``target``, in tokens.

    ``a`` is a distance profile ``(W,)``; the answer is at least one frame and at most the
    window rounded up to whole frames (a head whose attention is spread over the window
    needs all of it).
    """
    total = float(a.sum())
    if a.shape[0] == 0 or total <= 0:
        return period
    reached = np.cumsum(a) / total >= target - 1e-12
    tokens = int(np.argmax(reached)) + 1 if reached.any() else a.shape[0]
    return max(1, -(-tokens // period)) * period


@dataclass
class HeadMetrics:
    """Per-KV-head measurements, every array ``(layers, kv_heads)`` (module docstring)."""

    period: int
    window: int
    budget: int
    group_size: int
    recency_share: np.ndarray
    newest_frame_ratio: np.ndarray
    decay_rate: np.ndarray
    periodicity: np.ndarray
    anchor_phase: np.ndarray
    anchor_strength: np.ndarray
    entropy: np.ndarray
    top_mass: np.ndarray
    budget_recall: np.ndarray
    needed_window: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.periodicity.shape  # type: ignore[return-value]


def head_metrics(profile: AttentionProfile, num_kv_heads: int, budget: int) -> HeadMetrics:
    """Measure every KV head of ``profile`` (query heads grouped, see module docstring).

    Parameters
    ----------
    profile : the recorded profile, ``num_heads`` query heads
    num_kv_heads : the model's KV heads
    budget : the policy's stream tokens per layer (for ``budget_recall``)
    """
    distance = group_mean(profile.distance_profile(), num_kv_heads)  # (L, K, D)
    phase = group_mean(profile.phase_profile(), num_kv_heads)  # (L, K, P)
    layers, period = profile.num_layers, profile.period
    shape = (layers, num_kv_heads)
    out = {
        name: np.zeros(shape)
        for name in (
            "recency_share",
            "newest_frame_ratio",
            "decay_rate",
            "periodicity",
            "anchor_strength",
            "budget_recall",
        )
    }
    out["anchor_phase"] = np.zeros(shape, dtype=np.int64)
    out["needed_window"] = np.zeros(shape, dtype=np.int64)
    for layer in range(layers):
        for head in range(num_kv_heads):
            a = valid_window(distance[layer, head])
            out["recency_share"][layer, head] = recency_share(a)
            out["newest_frame_ratio"][layer, head] = newest_frame_ratio(a, period)
            out["decay_rate"][layer, head] = decay_rate(a, period)
            out["periodicity"][layer, head] = folded_periodicity(a, period)
            out["anchor_phase"][layer, head], out["anchor_strength"][layer, head] = anchor(
                phase[layer, head]
            )
            out["budget_recall"][layer, head] = window_recall(a, budget)
            out["needed_window"][layer, head] = needed_window(a, period)
    return HeadMetrics(
        period=period,
        window=profile.window,
        budget=budget,
        group_size=profile.num_heads // num_kv_heads,
        entropy=group_mean(profile.mean("entropy"), num_kv_heads),
        top_mass=group_mean(profile.mean("top_mass"), num_kv_heads),
        **out,
    )


def role_evidence(recency: np.ndarray, periodicity: np.ndarray, top_mass: np.ndarray) -> np.ndarray:
    """Evidence for each role, columns in :data:`EVIDENCE_ORDER`.

    Parameters
    ----------
    recency, periodicity, top_mass : ``(...)`` recency share, periodicity, top-1% mass

    Returns
    -------
    ``(..., 3)`` in [0, 1]
    """
    s = recency_strength(np.asarray(recency, dtype=np.float64))
    a = np.clip(np.nan_to_num(np.asarray(periodicity, dtype=np.float64)), 0.0, 1.0)
    focus = np.clip(
        (np.nan_to_num(np.asarray(top_mass, dtype=np.float64)) - UNIFORM_TOP_MASS)
        / (SPARSE_TOP_MASS - UNIFORM_TOP_MASS),
        0.0,
        1.0,
    )
    r = (1.0 - s) * (1.0 - a) * focus
    columns = {"retrieval": r, "streaming": s, "anchor": a}
    return np.stack([columns[name] for name in EVIDENCE_ORDER], axis=-1)


def classify(evidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Role and confidence from evidence ``(..., 3)`` (columns :data:`EVIDENCE_ORDER`).

    Returns
    -------
    roles : ``(...)`` str, the largest evidence (first column on ties)
    confidence : ``(...)`` in [0, 1], its margin over the second largest
    """
    evidence = np.asarray(evidence, dtype=np.float64)
    best = np.argmax(evidence, axis=-1)  # first maximum: ties go to retrieval
    ranked = np.sort(evidence, axis=-1)
    confidence = np.clip(ranked[..., -1] - ranked[..., -2], 0.0, 1.0)
    roles = np.asarray(EVIDENCE_ORDER)[best]
    return roles, confidence


@dataclass
class HeadRoles:
    """The classification of every KV head: ``roles`` and ``confidence`` ``(layers, kv_heads)``,
    ``evidence`` ``(layers, kv_heads, 3)`` (columns :data:`EVIDENCE_ORDER`)."""

    roles: np.ndarray
    confidence: np.ndarray
    evidence: np.ndarray


def head_roles(metrics: HeadMetrics) -> HeadRoles:
    """Classify every KV head from its measurements."""
    evidence = role_evidence(metrics.recency_share, metrics.periodicity, metrics.top_mass)
    roles, confidence = classify(evidence)
    return HeadRoles(roles, confidence, evidence)


def head_entries(
    metrics: HeadMetrics, roles: HeadRoles, layer: int, budget: int
) -> tuple[HeadPolicy, ...]:
    """The ``heads`` of one layer entry of a ``hermes-policy/2`` policy.

    Streaming heads: a window of :func:`needed_window` tokens (at most ``budget``),
    recency weight 1. Retrieval and anchor heads: equal shares of what the windows leave of
    the layer's ``kv_heads x budget`` slots, ``w = 1 - u`` with the layer's role score
    formula ``u = (1 - s + a) / 2`` on the head's own evidence. Every head: ``k = kappa
    (budget - 1)`` from its own decay rate, as for layers (:mod:`hermes_probe.tiers`).
    """
    num_kv_heads = metrics.shape[1]
    shared = [h for h in range(num_kv_heads) if roles.roles[layer, h] != "streaming"]
    share = round(1.0 / len(shared), 6) if shared else None
    column = {name: i for i, name in enumerate(EVIDENCE_ORDER)}
    heads = []
    for h in range(num_kv_heads):
        role = str(roles.roles[layer, h])
        kappa = float(np.nan_to_num(metrics.decay_rate[layer, h], nan=0.0))
        k = round(float(np.clip(kappa * (budget - 1), 0.0, MAX_FORGETTING_RATE)), 4)
        confidence = round(float(roles.confidence[layer, h]), 4)
        if role == "streaming":
            window = int(min(metrics.needed_window[layer, h], budget))
            heads.append(HeadPolicy(role, window, None, 1.0, k, confidence))
        else:
            s = roles.evidence[layer, h, column["streaming"]]
            a = roles.evidence[layer, h, column["anchor"]]
            u = float(np.clip((1.0 - s + a) / 2.0, 0.0, 1.0))
            heads.append(HeadPolicy(role, None, share, round(1.0 - u, 4), k, confidence))
    if shared:  # rounded equal shares: the last one takes the rounding so they sum to 1
        last = shared[-1]
        heads[last] = replace(heads[last], share=round(1.0 - share * (len(shared) - 1), 6))
    return tuple(heads)


def with_heads(
    layers: list[LayerPolicy], metrics: HeadMetrics, roles: HeadRoles
) -> list[LayerPolicy]:
    """``layers`` (a schema-1 policy's entries) with their per-KV-head entries added."""
    return [
        replace(entry, heads=head_entries(metrics, roles, entry.index, entry.budget))
        for entry in layers
    ]


def head_table(metrics: HeadMetrics, roles: HeadRoles) -> list[dict[str, float | int | str]]:
    """One dict per (layer, KV head) of the measurements and the role (for reports and JSON)."""
    rows = []
    layers, kv_heads = metrics.shape
    for layer in range(layers):
        for head in range(kv_heads):
            rows.append(
                {
                    "layer": layer,
                    "kv_head": head,
                    "role": str(roles.roles[layer, head]),
                    "confidence": round(float(roles.confidence[layer, head]), 4),
                    "recency_share": round(float(metrics.recency_share[layer, head]), 5),
                    "decay_rate": round(float(metrics.decay_rate[layer, head]), 6),
                    "periodicity": round(float(metrics.periodicity[layer, head]), 5),
                    "anchor_phase": int(metrics.anchor_phase[layer, head]),
                    "anchor_strength": round(float(metrics.anchor_strength[layer, head]), 4),
                    "entropy": round(float(metrics.entropy[layer, head]), 5),
                    "top_mass": round(float(metrics.top_mass[layer, head]), 5),
                    "budget_recall": round(float(metrics.budget_recall[layer, head]), 5),
                    "needed_window": int(metrics.needed_window[layer, head]),
                }
            )
    return rows


def mixed_layers(roles: HeadRoles) -> list[int]:
    """Layers whose KV heads do not all have the same role."""
    return [
        layer for layer in range(roles.roles.shape[0]) if len(set(roles.roles[layer].tolist())) > 1
    ]


def analyze_heads(
    profile: AttentionProfile, model: ModelInfo, budget: int
) -> tuple[HeadMetrics, HeadRoles]:
    """Measure and classify every KV head of a profile recorded on ``model``."""
    metrics = head_metrics(profile, model.num_kv_heads, budget)
    return metrics, head_roles(metrics)


def head_provenance(metrics: HeadMetrics, roles: HeadRoles) -> dict[str, object]:
    """What a per-head policy's provenance records of the head analysis (lists per layer)."""

    def rows(values: np.ndarray, digits: int) -> list[list[float]]:
        return [[round(float(v), digits) for v in row] for row in values]

    return {
        "grouping": f"mean of the {metrics.group_size} query heads of each KV head",
        "window_recall_target": WINDOW_RECALL,
        "recency": rows(metrics.recency_share, 5),
        "periodicity": rows(metrics.periodicity, 5),
        "top_mass": rows(metrics.top_mass, 5),
        "budget_recall": rows(metrics.budget_recall, 5),
        "needed_window": [[int(v) for v in row] for row in metrics.needed_window],
        "mixed_layers": mixed_layers(roles),
    }


def role_agreement(runs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """How stable each KV head's role is across runs (seeds, streams).

    Parameters
    ----------
    runs : one ``(layers, kv_heads)`` array of role labels per run

    Returns
    -------
    the modal role ``(layers, kv_heads)`` (ties: the first in :data:`EVIDENCE_ORDER`) and the
    share of runs that gave it, ``(layers, kv_heads)`` in ``[1 / len(EVIDENCE_ORDER), 1]``
    """
    if not runs:
        raise ValueError("no runs to compare")
    stacked = np.stack([np.asarray(r, dtype=object) for r in runs])  # (runs, layers, kv_heads)
    counts = np.stack([(stacked == role).sum(axis=0) for role in EVIDENCE_ORDER], axis=-1)
    best = counts.argmax(axis=-1)
    modal = np.asarray(EVIDENCE_ORDER, dtype=object)[best]
    return modal, counts.max(axis=-1) / len(runs)
