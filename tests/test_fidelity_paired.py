"""Paired differences of fidelity rows against a direct computation on fabricated rows."""

from __future__ import annotations

import numpy as np
import pytest

from hermes_probe.fidelity import paired_difference


def row(rule, policy, task, seed, kl):
    return {"rule": rule, "policy": policy, "task": task, "budget": 8, "seed": seed, "n": len(kl),
            "values": {"kl": list(kl), "accuracy": [0.0] * len(kl), "logp": [0.0] * len(kl)}}


def test_paired_difference_equals_the_per_seed_task_means():
    rng = np.random.default_rng(1)
    rows, expected = [], []
    for seed in range(5):
        per_task = []
        for task, n in (("copy", 4), ("facts", 2)):
            a, b = rng.random(n), rng.random(n)
            rows += [row("hermes", "x", task, seed, a), row("fifo", None, task, seed, b)]
            per_task.append(np.mean(a - b))
        expected.append(np.mean(per_task))
    rows.append(row("hermes", "x", "copy", 9, [1.0]))  # a seed without its pair does not count
    d = paired_difference(rows, "hermes (x)", "fifo", 8, ["copy", "facts"])
    assert d["seeds"] == 5
    assert d["mean"] == pytest.approx(np.mean(expected))
    assert d["low"] <= d["mean"] <= d["high"]
    assert d["a_lower_on"] == int((np.array(expected) < 0).sum())


def test_a_constant_shift_has_a_degenerate_interval():
    rows = []
    for seed in range(4):
        base = np.linspace(0, 1, 3) + seed
        rows += [row("hermes", "x", "copy", seed, base - 0.25), row("fifo", None, "copy", seed, base)]
    d = paired_difference(rows, "hermes (x)", "fifo", 8, ["copy"])
    assert d["mean"] == pytest.approx(-0.25) and d["low"] == pytest.approx(-0.25) and d["high"] == pytest.approx(-0.25)
    assert d["a_lower_on"] == 4
