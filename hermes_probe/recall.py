"""Attention recall: how much of what later questions attend to a rule would have kept.

Given a question's attention over the stream tokens of the full cache at one layer
(``a``, shape ``(T,)``, summing to 1 over the stream) and the set of stream tokens a rule
keeps at that layer after the whole stream (``kept``), the recall is ``a[kept].sum()``;
the oracle at budget ``B`` keeps the ``B`` tokens the question attends to most.

Which tokens a rule keeps is computed by replaying its compression steps on recorded
pseudo-query attention (:func:`simulate_keep`): after every chunk the rule scores the
tokens it still holds plus the new chunk and keeps the top ``B``, exactly the runtime's
arithmetic (:mod:`hermes_policy.retention.scoring`), except that the pseudo-query's
attention is taken from the full cache (restricted to the held tokens; min-max scaling
makes its normalisation irrelevant) rather than from the evicted cache, whose re-indexed
positions shift RoPE phases slightly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall(attention: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Share of ``attention`` on the kept tokens.

    Parameters
    ----------
    attention : ``(..., T)``, each row summing to 1 over the stream
    kept : int indices into ``T``

    Returns
    -------
    ``(...)``
    """
    return np.asarray(attention)[..., np.asarray(kept, dtype=np.int64)].sum(-1)


def oracle_recall(attention: np.ndarray, budget: int) -> np.ndarray:
    """Best recall at ``budget`` tokens: the sum of the ``budget`` largest entries, ``(..., T)`` -> ``(...)``."""
    a = np.asarray(attention)
    if budget >= a.shape[-1]:
        return a.sum(-1)
    return np.sort(a, axis=-1)[..., -budget:].sum(-1)


def min_max(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant vector becomes zeros (as the runtime does)."""
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def recency(length: int, forgetting_rate: float) -> np.ndarray:
    """``exp(-k dt / (T - 1))``, ``dt = T - 1 - i``: the runtime's recency score ``(T,)``."""
    if length == 1:
        return np.ones(1)
    dt = np.arange(length - 1, -1, -1, dtype=np.float64)
    return np.exp(-forgetting_rate * dt / (length - 1))


def top_keep(scores: np.ndarray, keep: int) -> np.ndarray:
    """Positions of the ``keep`` highest scores in ascending order; ties go to the newer token."""
    n = scores.shape[0]
    if keep >= n:
        return np.arange(n)
    ranked = np.argsort(-scores[::-1], kind="stable")[:keep]
    return np.sort((n - 1) - ranked)


def max_pool(scores: np.ndarray, kernel: int) -> np.ndarray:
    """Max over a centred window of ``kernel`` neighbours (attention-only's SnapKV pooling)."""
    if kernel <= 1 or scores.shape[0] < 2:
        return scores
    half = kernel // 2
    padded = np.pad(scores, half, constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel)
    return windows.max(-1)[: scores.shape[0]]


def hermes_scores(attention: np.ndarray | None, length: int, recency_weight: float, forgetting_rate: float) -> np.ndarray:
    """``(1 - w) minmax(A) + w minmax(R)`` over ``length`` held tokens."""
    r = min_max(recency(length, forgetting_rate))
    if attention is None or recency_weight >= 1.0:
        return r
    return (1.0 - recency_weight) * min_max(attention) + recency_weight * r


def simulate_keep(
    steps: Sequence[np.ndarray],
    budget: int,
    *,
    rule: str = "hermes",
    recency_weight: float = 1.0,
    forgetting_rate: float = 20.0,
    sink: int = 4,
    kernel: int = 7,
) -> np.ndarray:
    """Stream tokens one layer keeps after the whole stream under a rule.

    Parameters
    ----------
    steps : per chunk ``t``, the pseudo-query attention over the first ``n_t`` stream
        tokens ``(n_t,)`` recorded on the full cache after that chunk (``n_t`` increasing;
        the last ``n`` is the stream's length)
    budget : tokens kept
    rule : ``hermes`` (``recency_weight``, ``forgetting_rate``), ``fifo``, ``sink-recent``
        (``sink``), ``attention-only`` (max-pooled attention, ``kernel``)

    Returns
    -------
    int array of kept stream indices, ascending
    """
    held = np.arange(0)
    seen = 0
    for attention in steps:
        n = attention.shape[0]
        held = np.concatenate([held, np.arange(seen, n)])
        seen = n
        if held.shape[0] <= budget:
            continue
        if rule == "fifo":
            held = held[-budget:]
        elif rule == "sink-recent":
            held = np.concatenate([held[:sink], held[held.shape[0] - (budget - sink):]])
        elif rule == "attention-only":
            held = held[top_keep(max_pool(attention[held], kernel), budget)]
        elif rule == "hermes":
            a = None if recency_weight >= 1.0 else attention[held]
            held = held[top_keep(hermes_scores(a, held.shape[0], recency_weight, forgetting_rate), budget)]
        else:
            raise ValueError(f"unknown rule {rule!r}")
    return held


def simulate_policy(
    steps: Sequence[Sequence[np.ndarray]],
    budgets: Sequence[int],
    recency_weights: Sequence[float],
    forgetting_rates: Sequence[float],
    smoothing: Sequence[float],
) -> list[np.ndarray]:
    """:func:`simulate_keep` of all layers together, with cross-layer smoothing.

    Parameters
    ----------
    steps : per layer, per chunk, attention ``(n_t,)`` of the prompt that layer uses
    budgets, recency_weights, forgetting_rates, smoothing : per layer

    Returns
    -------
    per layer, kept stream indices
    """
    layers = len(steps)
    held = [np.arange(0) for _ in range(layers)]
    seen = 0
    for t in range(len(steps[0])):
        n = steps[0][t].shape[0]
        held = [np.concatenate([h, np.arange(seen, n)]) for h in held]
        seen = n
        if all(h.shape[0] <= b for h, b in zip(held, budgets, strict=True)):
            continue
        scores = []
        for layer in range(layers):
            a = None if recency_weights[layer] >= 1.0 else steps[layer][t][held[layer]]
            scores.append(hermes_scores(a, held[layer].shape[0], recency_weights[layer], forgetting_rates[layer]))
        for layer in range(layers - 2, -1, -1):
            lam = smoothing[layer]
            if lam:
                deeper = np.interp(np.linspace(0, 1, scores[layer].shape[0]),
                                   np.linspace(0, 1, scores[layer + 1].shape[0]), scores[layer + 1])
                scores[layer] = (1 - lam) * scores[layer] + lam * deeper
        held = [h[top_keep(s, b)] if h.shape[0] > b else h for h, s, b in zip(held, scores, budgets, strict=True)]
    return held
