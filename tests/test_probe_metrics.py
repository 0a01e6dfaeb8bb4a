"""The probe's pure measurements on synthetic arrays whose answers are known by construction."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hermes_probe.metrics import (
    ProfileMetrics,
    anchor,
    compute_metrics,
    decay_rate,
    folded_periodicity,
    measured_period,
    newest_frame_ratio,
    recency_share,
    valid_window,
)
from hermes_probe.profiles import AttentionProfile
from hermes_probe.recorder import frame_period, frame_phases, frame_runs
from hermes_probe.tiers import (
    MAX_FORGETTING_RATE,
    best_contiguous_split,
    layer_parameters,
    role_scores,
)


def normalised(a: np.ndarray) -> np.ndarray:
    return a / a.sum()


def exponential(window: int, rate: float) -> np.ndarray:
    return normalised(np.exp(-rate * np.arange(window)))


def spikes(window: int, spacing: int, offset: int, height: float = 3.0) -> np.ndarray:
    """Flat attention with ``e^height`` times more on every ``spacing``-th token."""
    d = np.arange(window)
    return normalised(np.where(d % spacing == offset, math.exp(height), 1.0))


# -- recency -----------------------------------------------------------------------------
@pytest.mark.parametrize(("window", "period", "rate"), [(256, 16, 0.06), (250, 16, 0.01), (96, 12, 0.2)])
def test_decay_rate_of_an_exponential_is_its_rate(window, period, rate):
    # exact but for the 1e-12 floor added before the log, felt by the faint tail
    assert decay_rate(exponential(window, rate), period) == pytest.approx(rate, rel=1e-4)


def test_decay_rate_ignores_the_within_frame_rhythm():
    """Frame averaging removes a per-frame anchor from the fit: the rate stays exact."""
    a = normalised(exponential(256, 0.03) * spikes(256, 16, 12, height=4.0))
    assert decay_rate(a, 16) == pytest.approx(0.03, rel=1e-6)


def test_flat_profile():
    a = np.full(200, 1 / 200)
    assert recency_share(a) == pytest.approx(0.1)
    assert newest_frame_ratio(a, 16) == pytest.approx(1.0)
    assert decay_rate(a, 16) == pytest.approx(0.0, abs=1e-12)
    assert folded_periodicity(a, 16) == pytest.approx(0.0, abs=1e-12)
    assert measured_period(a, 16) == 0


def test_recency_share_and_newest_frame_ratio_of_an_exponential():
    window, rate, period = 256, 0.05, 16
    a = exponential(window, rate)
    total = 1 - math.exp(-rate * window)
    assert recency_share(a) == pytest.approx((1 - math.exp(-rate * 26)) / total)  # ceil(25.6)
    newest = (1 - math.exp(-rate * period)) / total
    assert newest_frame_ratio(a, period) == pytest.approx(newest / (period / window))


# -- periodicity -------------------------------------------------------------------------
@pytest.mark.parametrize(("spacing", "offset"), [(16, 12), (12, 0), (7, 3)])
def test_periodic_spikes_are_periodic_at_their_spacing(spacing, offset):
    a = spikes(252, spacing, offset)
    assert folded_periodicity(a, spacing) > 0.95
    assert measured_period(a, spacing) == spacing


def test_measured_period_finds_the_spacing_not_the_nominal_period():
    a = spikes(300, 10, 4)
    assert measured_period(a, 16) == 10
    assert folded_periodicity(a, 16) < 0.3  # folding at the wrong period keeps little


def test_spikes_on_a_recency_trend_stay_periodic():
    a = normalised(exponential(256, 0.05) * spikes(256, 16, 12))
    assert folded_periodicity(a, 16) > 0.95
    assert measured_period(a, 16) == 16


@pytest.mark.parametrize(("period", "rate"), [(16, 0.06), (16, 0.01), (12, 0.08), (15, 0.06)])
def test_a_smooth_recency_trend_is_not_periodic(period, rate):
    """A pure exponential has no rhythm. (Regression: with an even period the one-frame
    moving average sits half a token off-centre, so a linear log-trend left a constant
    residual that folding counted as a rhythm: periodicity 0.24 for rate 0.06, N = 16.)"""
    assert folded_periodicity(exponential(256, rate), period) < 0.05


def test_periodicity_needs_three_periods():
    assert folded_periodicity(spikes(40, 16, 3), 16) == 0.0
    assert folded_periodicity(spikes(40, 16, 3), 1) == 0.0


def test_small_variations_are_not_structure():
    """A 1% per-frame ripple is under the 5% noise floor: low periodicity."""
    assert folded_periodicity(spikes(256, 16, 3, height=0.01), 16) < 0.05
    assert folded_periodicity(spikes(256, 16, 3, height=1.0), 16) > 0.9


# -- anchors -----------------------------------------------------------------------------
def test_anchor_phase_and_strength():
    phase = np.ones(16)
    phase[3] = 5.0
    offset, strength = anchor(phase)
    assert offset == 3
    assert strength == pytest.approx(5.0 / (20.0 / 16))


def test_anchor_of_a_partly_unseen_phase_profile():
    phase = np.array([np.nan, 1.0, 1.0, 4.0])
    assert anchor(phase)[0] == 3
    assert anchor(np.full(4, np.nan))[0] == -1


def test_valid_window_is_the_finite_prefix():
    a = np.array([0.5, 0.3, 0.2, np.nan, np.nan])
    np.testing.assert_array_equal(valid_window(a), [0.5, 0.3, 0.2])
    np.testing.assert_array_equal(valid_window(a[:3]), a[:3])


def test_compute_metrics_on_a_hand_made_profile():
    """Layer 0 exponential, layer 1 spikes; the tail beyond the window was never reached."""
    window, period, probes = 192, 16, 3
    profile = AttentionProfile(num_layers=2, num_heads=2, max_distance=256, period=period)
    profile.probes = probes
    for head in range(2):
        profile.distance_sum[0, head, :window] = probes * exponential(window, 0.04)
        profile.distance_sum[1, head, :window] = probes * spikes(window, period, 12)
    profile.distance_count[:, :window] = probes
    profile.phase_sum[:] = 1.0
    profile.phase_sum[1, :, 3] = 9.0
    profile.phase_count[:] = 1
    m = compute_metrics(profile)
    assert m.window == window
    assert m.decay_rate[0] == pytest.approx(0.04, rel=1e-6)
    assert m.recency_share[0] == pytest.approx(recency_share(exponential(window, 0.04)))
    assert m.periodicity[0] < 0.05 < 0.95 < m.periodicity[1]
    assert list(m.measured_period[1:]) == [period]
    assert m.anchor_phase[1] == 3
    np.testing.assert_allclose(m.head_periodicity[1], m.periodicity[1])


# -- frames in the cache (recorder) --------------------------------------------------------
def test_frame_runs_split_at_frame_changes_and_separators():
    fi = torch.tensor([-1, -1, 5, 5, 6, 6, 6, -1, 7, 7, 7, -1])
    assert frame_runs(fi) == [(2, 2, 5), (4, 3, 6), (8, 3, 7)]
    assert frame_runs(torch.tensor([-1, -1])) == []


def test_frame_period_skips_the_partly_evicted_oldest_frame():
    fi = torch.tensor([4] + [5] * 3 + [6] * 3)  # frame 4 lost 2 of its 3 tokens
    assert frame_period(fi) == 3
    assert frame_period(torch.tensor([2, 2, 2, 2])) == 4  # a single run counts
    with pytest.raises(ValueError):
        frame_period(torch.tensor([-1, -1]))


def test_frame_phases_count_a_partial_oldest_frame_from_its_end():
    fi = torch.tensor([4, 4, 5, 5, 5, 5, -1, 6, 6, 6, 6])
    assert frame_phases(fi, 4).tolist() == [2, 3, 0, 1, 2, 3, -1, 0, 1, 2, 3]
    whole = torch.tensor([0, 0, 0, 1, 1, 1])
    assert frame_phases(whole, 3).tolist() == [0, 1, 2, 0, 1, 2]


def test_frame_phases_drop_offsets_beyond_the_period():
    fi = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])  # frame 1 is longer than the period 3
    assert frame_phases(fi, 3).tolist() == [0, 1, 2, 0, 1, 2, -1, -1]


# -- tiers -------------------------------------------------------------------------------
def brute_force_split(scores: np.ndarray) -> tuple[float, int, int]:
    """Least-squares error and boundaries of the best ordered three-level step fit."""
    best = None
    for a, b in itertools.combinations(range(1, len(scores)), 2):
        parts = [scores[:a], scores[a:b], scores[b:]]
        means = [p.mean() for p in parts]
        if not (means[0] <= means[1] + 1e-12 and means[1] <= means[2] + 1e-12):
            continue
        err = sum(float(((p - p.mean()) ** 2).sum()) for p in parts)
        if best is None or err < best[0] - 1e-12:
            best = (err, a, b)
    return best


def test_exact_three_level_scores_are_recovered_exactly():
    fit = best_contiguous_split(np.array([0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0]))
    assert fit.tiers == {"sensory": (0, 1), "working": (2, 4), "long_term": (5, 6)}
    assert fit.r2 == pytest.approx(1.0)
    assert fit.levels == pytest.approx({"sensory": 0.0, "working": 0.5, "long_term": 1.0})
    assert fit.mismatches == []
    assert fit.tier_of_layer == ["sensory"] * 2 + ["working"] * 3 + ["long_term"] * 2


def test_noisy_scores_known_optimum_and_r2():
    scores = np.array([0.1, 0.2, 0.5, 0.6, 0.9, 1.0])
    fit = best_contiguous_split(scores)
    assert fit.tiers == {"sensory": (0, 1), "working": (2, 3), "long_term": (4, 5)}
    assert fit.levels == pytest.approx({"sensory": 0.15, "working": 0.55, "long_term": 0.95})
    assert fit.r2 == pytest.approx(1 - 0.015 / 0.655)


def test_an_out_of_order_layer_is_a_mismatch():
    """An anchor-like layer among recency layers: the best contiguous split keeps it in the
    sensory tier (error 6/7) and reports it; its own role is long-term."""
    scores = np.array([0, 0, 1, 0, 0, 0, 0, 0.5, 0.5, 1, 1], dtype=float)
    fit = best_contiguous_split(scores)
    assert fit.tiers == {"sensory": (0, 6), "working": (7, 8), "long_term": (9, 10)}
    total = float(((scores - scores.mean()) ** 2).sum())
    assert fit.r2 == pytest.approx(1 - (6 / 7) / total)
    assert fit.roles[2] == "long_term"
    assert fit.mismatches == [2]


def test_decreasing_scores_fall_back_to_the_paper_shape():
    fit = best_contiguous_split(np.linspace(1.0, 0.0, 10))
    assert fit.tiers == {"sensory": (0, 0), "working": (1, 6), "long_term": (7, 9)}
    with pytest.raises(ValueError):
        best_contiguous_split(np.array([0.0, 1.0]))


@pytest.mark.parametrize("seed", range(5))
def test_split_is_the_least_squares_optimum(seed):
    rng = np.random.default_rng(seed)
    scores = np.sort(rng.uniform(size=9)) + rng.normal(scale=0.15, size=9)
    fit = best_contiguous_split(scores)
    err, a, b = brute_force_split(scores)
    assert (fit.tiers["working"][0], fit.tiers["long_term"][0]) == (a, b)
    total = float(((scores - scores.mean()) ** 2).sum())
    assert fit.r2 == pytest.approx(1 - err / total)


def metrics_for(recency: list[float], periodicity: list[float], decay: list[float]) -> ProfileMetrics:
    n = len(recency)
    zeros = np.zeros(n)
    return ProfileMetrics(
        period=16, window=256, newest_frame_ratio=zeros, recency_share=np.array(recency, dtype=float),
        decay_rate=np.array(decay, dtype=float), periodicity=np.array(periodicity, dtype=float),
        measured_period=np.zeros(n, dtype=np.int64), anchor_phase=np.zeros(n, dtype=np.int64),
        anchor_strength=zeros, entropy=zeros, top_mass=zeros, video_mass=zeros,
        head_recency_share=np.zeros((n, 1)), head_periodicity=np.zeros((n, 1)), head_entropy=np.zeros((n, 1)),
    )


def test_role_score_formula():
    m = metrics_for([1.0, 0.1, 0.1, 0.55, float("nan"), 0.05], [0.0, 1.0, 0.0, 0.3, 0.0, 0.0], [0] * 6)
    # rho = clip((share - 0.1) / 0.9, 0, 1); u = clip((1 - rho + p) / 2, 0, 1)
    np.testing.assert_allclose(role_scores(m), [0.0, 1.0, 0.5, (1 - 0.5 + 0.3) / 2, 0.5, 0.5])


def test_layer_parameters_follow_the_documented_formulas():
    m = metrics_for(
        recency=[0.9, 0.8, 0.3, 0.1, 0.1],
        periodicity=[0.0, 0.1, 0.5, 1.0, 0.9],
        decay=[0.3, 0.01, 0.002, float("nan"), -0.001],
    )
    u = role_scores(m)
    fit = best_contiguous_split(u)
    budget = 1000
    layers = layer_parameters(m, fit, budget)
    assert [p.index for p in layers] == list(range(5))
    for i, p in enumerate(layers):
        kappa = np.nan_to_num(m.decay_rate[i], nan=0.0)
        assert p.tier == fit.tier_of_layer[i]
        assert p.recency_weight == pytest.approx(1 - u[i], abs=1e-4)
        assert p.forgetting_rate == pytest.approx(min(max(kappa * (budget - 1), 0.0), MAX_FORGETTING_RATE), abs=1e-4)
        assert p.smoothing == pytest.approx(0.1 + 0.3 * u[i], abs=1e-4)
        assert p.budget == budget
        assert p.summary_token == (p.tier == "long_term")
    assert layers[0].forgetting_rate == MAX_FORGETTING_RATE  # 0.3 * 999 clipped
    assert layers[1].forgetting_rate == pytest.approx(9.99)
    assert layers[3].forgetting_rate == 0.0 and layers[4].forgetting_rate == 0.0
