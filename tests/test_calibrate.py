"""The calibrator recovers planted optimal parameters from hand-built attention records.

Each record is a stream whose per-layer attention is set by hand (no model): which tokens
later questions attend to, and what the pseudo-queries see, per layer:

- ``recency`` layer: questions attend to the newest tokens (exponential decay); the
  pseudo-query's attention is noise, so trusting it loses recall: the best w is 1;
- ``anchor`` layer: questions attend to one anchor token per frame, anywhere in the
  stream; the pseudo-query sees the anchors too: the best w is 0;
- ``flat`` layer: questions spread evenly: recall grows with every kept token, so this
  layer should get more of a shared budget than the others, which saturate.
"""

from __future__ import annotations

import numpy as np

from hermes_probe.calibrate import StreamRecord, calibrate, split_by_recall, task_weights

FRAME = 8
FRAMES = 32
CHUNK = 4  # frames per compression step


def planted_record(seed: int) -> StreamRecord:
    rng = np.random.default_rng(seed)
    length = FRAME * FRAMES
    idx = np.arange(length)
    recency_q = np.exp(-(length - 1 - idx) / 12.0)
    anchor_q = np.where(idx % FRAME == 3, 1.0, 1e-4)
    flat_q = np.ones(length)
    layers = [recency_q, anchor_q, flat_q]
    probes = 6
    questions = np.zeros((probes, 3, 2, length), dtype=np.float32)
    for layer, pattern in enumerate(layers):
        for p in range(probes):
            noisy = pattern * rng.uniform(0.9, 1.1, length)
            questions[p, layer] = noisy / noisy.sum()
    steps = {"global": [], "mixed": []}
    for t in range(CHUNK * FRAME, length + 1, CHUNK * FRAME):
        pseudo = np.stack([
            rng.random(t),                                           # recency layer: misleading
            np.where(np.arange(t) % FRAME == 3, 1.0, 0.0) + 0.05 * rng.random(t),  # anchors visible
            rng.random(t),                                           # flat layer
        ]).astype(np.float32)
        steps["global"].append(pseudo)
        steps["mixed"].append(pseudo)
    tasks = ["copy", "copy", "copy", "kv", "kv", "facts"]
    return StreamRecord(steps, questions, tasks, seed, FRAMES)


def test_planted_layers_get_their_parameters_and_budgets():
    records = [planted_record(0), planted_record(1)]
    result = calibrate(records, [1 / 8, 1 / 4])
    w = result.recency_weight
    assert w[0] >= 0.8, w
    assert w[1] <= 0.2, w
    multiples = result.budget_multiple
    assert multiples[2] > multiples[0] and multiples[2] > multiples[1], multiples
    assert abs(sum(multiples) - 3.0) < 1e-9


def test_budget_split_maximises_the_summed_recall():
    levels = (0.5, 1.0, 1.5)
    curves = np.array([[0.9, 0.95, 0.96], [0.2, 0.5, 0.8], [0.5, 0.56, 0.6]])
    picked = split_by_recall(curves, levels, 3.0)
    best = max(
        (sum(curves[i, levels.index(c)] for i, c in enumerate(combo)), combo)
        for combo in np.array(np.meshgrid(levels, levels, levels)).T.reshape(-1, 3).tolist()
        if sum(combo) <= 3.0
    )
    value = sum(curves[i, levels.index(c)] for i, c in enumerate(picked))
    assert np.isclose(value, best[0]) and sum(picked) <= 3.0 and picked[1] == 1.5


def test_task_weights_balance_recency_and_memory():
    w = task_weights(["copy"] * 6 + ["kv", "facts"])
    assert np.isclose(w[:6].sum(), 0.5) and np.isclose(w[6:].sum(), 0.5)
    assert np.isclose(task_weights(["copy", "copy"]).sum(), 1.0)
