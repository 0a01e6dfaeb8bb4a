"""Attention recall and the keep-set replay against brute force on small cases."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from hermes_policy.retention.scoring import mix_scores, recency_scores, top_indices
from hermes_probe.recall import (
    hermes_scores,
    oracle_recall,
    recall,
    simulate_keep,
    simulate_policy,
    top_keep,
)


def test_recall_is_the_kept_share_and_oracle_is_the_best_subset():
    rng = np.random.default_rng(0)
    attention = rng.dirichlet(np.ones(9), size=(2, 3))  # (probes, heads, T)
    kept = np.array([1, 4, 7])
    brute = np.array([[sum(attention[p, h, i] for i in kept) for h in range(3)] for p in range(2)])
    assert np.allclose(recall(attention, kept), brute)
    for budget in (1, 3, 5):
        best = np.zeros((2, 3))
        for subset in itertools.combinations(range(9), budget):
            best = np.maximum(best, attention[..., list(subset)].sum(-1))
        assert np.allclose(oracle_recall(attention, budget), best)


def test_hermes_scores_and_ties_match_the_runtime():
    rng = np.random.default_rng(1)
    a = rng.random(40)
    for w, k in ((0.0, 8.0), (0.3, 20.0), (0.7, 0.5), (1.0, 20.0)):
        ours = hermes_scores(a, 40, w, k)
        runtime = mix_scores(torch.tensor(a, dtype=torch.float32), recency_scores(40, k), w).double().numpy()
        assert np.allclose(ours, runtime, atol=1e-5)
        assert (top_keep(ours, 13) == top_indices(torch.tensor(ours), 13).numpy()).all()
    flat = np.zeros(10)
    assert (top_keep(flat, 4) == np.arange(6, 10)).all()  # ties go to the newest, like FIFO


def brute_stream(steps, budget, w, k):
    """The rule's compression steps written out plainly: held tokens, score, keep top."""
    held: list[int] = []
    seen = 0
    for attention in steps:
        held += list(range(seen, len(attention)))
        seen = len(attention)
        if len(held) > budget:
            m = len(held)
            a = attention[held]
            a = (a - a.min()) / (a.max() - a.min())
            dt = np.array([m - 1 - j for j in range(m)], dtype=float)
            r = np.exp(-k * dt / (m - 1))
            r = (r - r.min()) / (r.max() - r.min())
            s = (1 - w) * a + w * r
            order = sorted(range(m), key=lambda j: (-s[j], -j))[:budget]
            held = [held[j] for j in sorted(order)]
    return np.array(held)


def test_simulated_keep_sets_equal_brute_force():
    rng = np.random.default_rng(2)
    lengths = [8, 16, 24, 32]
    steps = [rng.random(n) for n in lengths]
    for w, k in ((0.0, 1.0), (0.4, 12.0), (0.9, 2.0)):
        assert (simulate_keep(steps, 10, recency_weight=w, forgetting_rate=k) == brute_stream(steps, 10, w, k)).all()
    assert (simulate_keep(steps, 10, rule="fifo") == np.arange(22, 32)).all()
    kept = simulate_keep(steps, 10, rule="sink-recent", sink=2)
    assert (kept == np.concatenate([[0, 1], np.arange(24, 32)])).all()
    # all layers together without smoothing: each layer as alone
    layered = simulate_policy([steps, steps], [10, 6], [0.4, 0.0], [12.0, 1.0], [0.0, 0.0])
    assert (layered[0] == brute_stream(steps, 10, 0.4, 12.0)).all()
    assert (layered[1] == brute_stream(steps, 6, 0.0, 1.0)).all()
    # smoothing pulls the shallow layer towards the deeper one's choice
    smoothed = simulate_policy([steps, steps], [10, 10], [1.0, 0.0], [20.0, 1.0], [0.9, 0.0])
    assert len(set(smoothed[0]) & set(smoothed[1])) >= len(set(simulate_keep(steps, 10, rule="fifo"))
                                                         & set(smoothed[1]))
