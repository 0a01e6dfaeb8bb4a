"""Figures drawn from hand-built attention profiles: files, and what the plots actually show."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.collections import PathCollection, QuadMesh
from matplotlib.colors import LogNorm
from PIL import Image

from hermes_probe import figures
from hermes_probe.metrics import compute_metrics
from hermes_probe.profiles import AttentionProfile
from hermes_probe.tiers import best_contiguous_split, role_scores

LAYERS, HEADS, PERIOD, WINDOW, MAX_DISTANCE, PROBES = 6, 2, 8, 64, 80, 5
ANCHOR = 3  # in-frame offset of the anchor token in the periodic layers
KINDS = ("recency", "recency", "flat", "periodic", "flat", "periodic")
SHORT_LAYER, SHORT_REACH = 2, 48  # a layer whose probes never reached beyond 48 tokens


def _attention(kind: str, head: int, rng: np.random.Generator) -> np.ndarray:
    d = np.arange(WINDOW)
    if kind == "recency":
        a = np.exp(-(0.15 + 0.05 * head) * d)
    elif kind == "periodic":
        a = np.where(d % PERIOD == ANCHOR, 30.0, 1.0)
    else:
        a = np.ones(WINDOW)
    a = a * np.exp(0.01 * rng.standard_normal(WINDOW))
    return a / a.sum()


def _profile() -> AttentionProfile:
    rng = np.random.default_rng(0)
    profile = AttentionProfile(LAYERS, HEADS, MAX_DISTANCE, PERIOD, probes=PROBES)
    for layer, kind in enumerate(KINDS):
        reach = SHORT_REACH if layer == SHORT_LAYER else WINDOW
        profile.distance_count[layer, :reach] = PROBES
        for head in range(HEADS):
            profile.distance_sum[layer, head, :reach] = PROBES * _attention(kind, head, rng)[:reach]
        phase = np.full(PERIOD, 1.0)
        if kind == "periodic":
            phase[ANCHOR] = 30.0
        profile.phase_count[layer] = PROBES * WINDOW // PERIOD
        profile.phase_sum[layer] = profile.phase_count[layer] * phase / phase.sum()
        profile.entropy_sum[layer] = PROBES * (0.5 if kind == "recency" else 0.9)
        profile.top_mass_sum[layer] = PROBES * 0.1
        profile.video_mass_sum[layer] = PROBES * 0.8
    return profile


@pytest.fixture(scope="module")
def analysed():
    profile = _profile()
    metrics = compute_metrics(profile)
    fit = best_contiguous_split(role_scores(metrics))
    return profile, metrics, fit


def _line(fig, gid: str):
    found = [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == gid]
    assert len(found) == 1, f"expected one line {gid!r}, found {len(found)}"
    return found[0]


def _local_maxima(y: np.ndarray) -> np.ndarray:
    inner = (y[1:-1] > y[:-2]) & (y[1:-1] > y[2:])
    return np.nonzero(inner)[0] + 1


def test_fixture_has_the_intended_shape(analysed):
    profile, metrics, fit = analysed
    assert profile.window == WINDOW
    assert metrics.recency_share[0] > 0.6 and metrics.periodicity[5] > 0.5
    assert fit.mismatches, "the interleaved layers should not fit contiguous tiers"


@pytest.fixture(scope="module")
def saved(analysed, tmp_path_factory):
    """Figures written once (rendering is the slow part), with pyplot's state around it."""
    import matplotlib.pyplot as plt

    backend = matplotlib.rcParams._get_backend_or_none()
    figure_numbers = plt.get_fignums()
    folder = tmp_path_factory.mktemp("figures") / "nested" / "figures"
    paths = figures.save_figures(*analysed, folder)
    return folder, paths, (backend, figure_numbers)


def test_save_figures_writes_valid_pngs_atomically(saved):
    folder, paths, _ = saved
    assert paths == [folder / f"{name}.png" for name in figures.FIGURE_NAMES]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)  # no temp left
    for path in paths:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 500 <= width <= 2500 and 300 <= height <= 2000, (path.name, image.size)
            colours = image.convert("L").getcolors(maxcolors=256)
            assert colours is not None and len(colours) > 20, f"{path.name} looks blank"


def test_save_png_replaces_atomically_and_cleans_up(analysed, tmp_path):
    profile, _, _ = analysed
    target = tmp_path / "phase.png"
    target.write_bytes(b"old")
    fig = figures.plot_phase_profiles(profile)
    assert figures._save_png(fig, target, dpi=40) == target
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):  # a failing write leaves the old file and no temp behind
        fig.savefig = lambda *a, **k: (_ for _ in ()).throw(ValueError("disk full"))
        figures._save_png(fig, target, dpi=40)
    assert [p.name for p in tmp_path.iterdir()] == ["phase.png"]
    assert target.read_bytes()[:4] == b"\x89PNG"


def test_distance_profiles_show_anchor_rhythm_and_recency(analysed):
    profile, _, fit = analysed
    fig = figures.plot_distance_profiles(profile, layers=[0, 5], fit=fit)
    periodic = _line(fig, "layer-5")
    x, y = np.asarray(periodic.get_xdata()), np.asarray(periodic.get_ydata())
    assert np.array_equal(x, np.arange(WINDOW))
    peaks = _local_maxima(y)
    peaks = peaks[y[peaks] > 5 * np.nanmedian(y)]  # the peaks that stand out, not the noise
    assert peaks.size == WINDOW // PERIOD
    assert set(np.diff(peaks)) == {PERIOD}
    assert set(peaks % PERIOD) == {ANCHOR}
    recent = np.asarray(_line(fig, "layer-0").get_ydata())
    assert np.all(np.diff(recent[:20]) < 0)  # recency: falls with distance
    assert all(ax.get_yscale() == "log" for ax in fig.axes if ax.get_lines())
    uniform = [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == "uniform"]
    assert uniform and np.allclose(uniform[0].get_ydata(), 1.0 / WINDOW)
    minor = fig.axes[0].xaxis.get_minor_locator().tick_values(0, WINDOW - 1)
    assert set(np.diff(minor)) == {PERIOD}  # a gridline every frame


def test_distance_profiles_default_layers_cover_each_tier(analysed):
    profile, _, fit = analysed
    chosen = figures.representative_layers(LAYERS, fit)
    assert {0, LAYERS // 2, LAYERS - 1} <= set(chosen)
    for first, last in fit.tiers.values():
        assert any(first <= layer <= last for layer in chosen)
    fig = figures.plot_distance_profiles(profile, fit=fit)
    drawn = sorted(int(line.get_gid().split("-")[1]) for ax in fig.axes for line in ax.get_lines()
                   if (line.get_gid() or "").startswith("layer-"))
    assert drawn == chosen
    with pytest.raises(ValueError, match="out of range"):
        figures.plot_distance_profiles(profile, layers=[LAYERS])


def test_distance_heatmap_is_the_head_mean_with_gaps(analysed):
    profile, _, _ = analysed
    fig = figures.plot_distance_heatmap(profile)
    ax = fig.axes[0]
    image = ax.images[0]
    shown = np.ma.filled(image.get_array().astype(float), np.nan)
    expected = profile.distance_profile()[:, :, :WINDOW].mean(axis=1)
    assert shown.shape == (LAYERS, WINDOW)
    np.testing.assert_allclose(shown, expected, rtol=1e-12)
    assert np.isnan(shown[SHORT_LAYER, SHORT_REACH:]).all()  # never reached: masked, not zero
    assert isinstance(image.norm, LogNorm)
    bottom, top = ax.get_ylim()
    assert bottom > top  # layer 0 at the top


def test_layer_metrics_show_tiers_scores_and_mismatches(analysed):
    _, metrics, fit = analysed
    fig = figures.plot_layer_metrics(metrics, fit)
    ax = fig.axes[0]
    spans = {p.get_gid(): p for p in ax.patches if (p.get_gid() or "").startswith("tier-")}
    assert set(spans) == {f"tier-{name}" for name in fit.tiers}
    for name, (first, last) in fit.tiers.items():
        span = spans[f"tier-{name}"]
        assert span.get_x() == pytest.approx(first - 0.5)
        assert span.get_x() + span.get_width() == pytest.approx(last + 0.5)
    np.testing.assert_allclose(_line(fig, "metric-role_score").get_ydata(), fit.scores)
    np.testing.assert_allclose(_line(fig, "metric-periodicity").get_ydata(), metrics.periodicity)
    rings = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_gid() == "mismatches"]
    assert len(rings) == 1
    assert sorted(rings[0].get_offsets()[:, 0].astype(int).tolist()) == fit.mismatches


def test_head_periodicity_heatmap_values(analysed):
    _, metrics, _ = analysed
    fig = figures.plot_head_periodicity(metrics)
    meshes = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    assert len(meshes) == 1
    shown = np.ma.filled(meshes[0].get_array().astype(float), np.nan).reshape(LAYERS, HEADS)
    np.testing.assert_allclose(shown, metrics.head_periodicity)


def test_phase_profiles_mark_the_anchor(analysed):
    profile, _, fit = analysed
    fig = figures.plot_phase_profiles(profile, layers=[0, 3, 5], fit=fit)
    for layer in (3, 5):
        y = np.asarray(_line(fig, f"layer-{layer}").get_ydata())
        assert int(np.nanargmax(y)) == ANCHOR
        assert np.nanmean(y) == pytest.approx(1.0)  # relative to the layer's mean
    flat = np.asarray(_line(fig, "layer-0").get_ydata())
    np.testing.assert_allclose(flat, 1.0)


def test_empty_profile_draws_no_data_figures(tmp_path):
    profile = AttentionProfile(4, 2, 32, 8)
    metrics = compute_metrics(profile)
    fit = best_contiguous_split(role_scores(metrics))
    paths = figures.save_figures(profile, metrics, fit, tmp_path)
    assert len(paths) == len(figures.FIGURE_NAMES)
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"
    fig = figures.plot_distance_profiles(profile)
    assert any(t.get_gid() == "no-data" for ax in fig.axes for t in ax.texts)


def test_figures_leave_pyplot_and_backend_alone(saved, analysed):
    import matplotlib.pyplot as plt

    _, _, (backend, figure_numbers) = saved
    figures.plot_distance_profiles(analysed[0])
    assert plt.get_fignums() == figure_numbers == []
    assert matplotlib.rcParams._get_backend_or_none() == backend
