"""Figures of a probe run, in the spirit of the paper's Figure 2 (METHOD.md section 2).

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` built directly, not
through ``pyplot``: nothing here selects or switches a backend, opens a window or keeps a
figure alive in pyplot's registry, so the functions are safe on a headless server and do
not disturb a notebook's own ``%matplotlib`` setting. In a notebook with the inline
backend (``%matplotlib inline``, the Jupyter default once pyplot is in use), a returned
figure displays like any other; ``save_figures`` writes PNG files through Agg.

What to look for:

- :func:`plot_distance_profiles`: shallow layers fall steeply from the newest token
  (recency, "sensory memory"); deep layers stay flat on average but spike once per frame,
  the spikes exactly one frame period apart (anchor tokens, "long-term memory").
- :func:`plot_distance_heatmap`: the same for every layer at once.
- :func:`plot_layer_metrics`: the per-layer measurements, the role score ``u`` and the
  contiguous three-tier fit, with the layers the contiguous tiers do not fit marked.
- :func:`plot_head_periodicity`: which heads carry the per-frame rhythm.
- :func:`plot_phase_profiles`: where within a frame the anchors sit.
- :func:`plot_head_roles`: each KV head's role (streaming / anchor / retrieval, shaded by
  confidence) and the share of its attention a recent window of the policy budget keeps.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, LogNorm, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, MultipleLocator

from hermes_policy.fileio.atomic import atomic_path
from hermes_policy.policy import TIERS

from .heads import EVIDENCE_ORDER, HeadMetrics, HeadRoles
from .metrics import ProfileMetrics
from .profiles import AttentionProfile
from .tiers import TierFit

DPI = 120

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
TIER_COLORS = {"sensory": "#E69F00", "working": "#56B4E9", "long_term": "#CC79A7"}
TIER_LABELS = {"sensory": "sensory", "working": "working", "long_term": "long-term"}
METRIC_STYLES = {  # name: (label, colour, marker)
    "recency_share": ("recency share (newest 10% of window)", "#D55E00", "o"),
    "periodicity": ("periodicity (per-frame rhythm)", "#0072B2", "s"),
    "entropy": ("normalised entropy", "#009E73", "^"),
}
SEQUENTIAL = "viridis"
MISSING = "0.88"  # colour of cells never measured (NaN)
MAX_FRAME_LINES = 150  # more frame gridlines than this would be a grey wash: thin them
ROLE_COLORS = {"streaming": "#E69F00", "anchor": "#CC79A7", "retrieval": "#0072B2"}
HEAD_FIGURE_NAME = "head_roles"
FIGURE_NAMES = ("distance_profiles", "distance_heatmap", "layer_metrics", "head_periodicity",
                "phase_profiles")


# -- shared helpers -------------------------------------------------------------------------
@contextmanager
def _style() -> Iterator[None]:
    """Seaborn's clean look for the artists created inside, without touching global state."""
    rc = {**sns.axes_style("ticks"), **sns.plotting_context("notebook", font_scale=0.85)}
    rc.update({"axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
               "figure.facecolor": "white", "savefig.facecolor": "white"})
    with mpl.rc_context(rc):
        yield


def _finish(fig: Figure) -> Figure:
    """Pin tick styling on every axes (ticks are created lazily, possibly outside _style)."""
    size = sns.plotting_context("notebook", font_scale=0.85)["xtick.labelsize"]
    for ax in fig.axes:
        ax.tick_params(which="both", labelsize=size, color="0.3", labelcolor="0.15")
    return fig


def _titles(fig: Figure, ax: Axes, title: str, subtitle: str = "") -> None:
    fig.suptitle(title, x=0.01, ha="left", fontweight="bold", fontsize=12.5)
    if subtitle:
        ax.set_title(subtitle, loc="left", fontsize=9.5, color="0.35")


def _no_data(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="0.4",
            fontsize=11, gid="no-data")
    ax.set_xticks([])
    ax.set_yticks([])


def _positive(values: np.ndarray) -> np.ndarray:
    """Copy with NaN where a log scale cannot show a value (NaN, inf, zero, negative)."""
    out = np.array(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out[~(np.isfinite(out) & (out > 0))] = np.nan
    return out


def _nice_step(target: float) -> int:
    """Smallest of 1, 2, 5, 10, 20, 50, ... that is >= target."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= target:
                return step * factor
        step *= 10


def _frame_axis(ax: Axes, window: int, period: int, gridlines: bool) -> None:
    """Distance axis in tokens with major ticks on whole frames and a light line per frame."""
    frames = max(window / max(period, 1), 1.0)
    ax.xaxis.set_major_locator(MultipleLocator(period * _nice_step(frames / 8)))
    if gridlines:
        ax.xaxis.set_minor_locator(MultipleLocator(period * _nice_step(frames / MAX_FRAME_LINES)))
        ax.grid(which="minor", axis="x", color="0.86", linewidth=0.6)
        ax.grid(which="major", axis="x", color="0.72", linewidth=0.8)
        ax.set_axisbelow(True)


def _frames_on_top(ax: Axes, window: int, period: int) -> None:
    """A second x axis on top counting frames, ticked where the token axis is."""
    top = ax.secondary_xaxis("top", functions=(lambda d: d / period, lambda f: f * period))
    top.set_xlabel("frames back", fontsize=9, color="0.35")
    top.xaxis.set_major_locator(MultipleLocator(_nice_step(max(window / max(period, 1), 1.0) / 8)))
    top.tick_params(labelsize=8, colors="0.35")


def _layer_ticks(ax: Axes, num_layers: int, axis: str = "y", centred: bool = False) -> None:
    """A tick per layer when they fit, else every few layers (``centred``: cell centres)."""
    step = 1 if num_layers <= 36 else _nice_step(num_layers / 24)
    positions = np.arange(0, num_layers, step)
    locator = FixedLocator(positions + (0.5 if centred else 0.0))
    formatter = FuncFormatter(lambda v, _pos: f"{int(round(v - (0.5 if centred else 0.0)))}")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(locator)
    target.set_major_formatter(formatter)


def _head_mean_distance(profile: AttentionProfile) -> np.ndarray:
    """Mean attention by distance, averaged over heads, over the window ``(layers, window)``."""
    return profile.distance_profile()[:, :, : profile.window].mean(axis=1)


def _row_nanmean(values: np.ndarray) -> np.ndarray:
    """Mean of each row over its finite entries (NaN for a row without any), no warnings."""
    finite = np.isfinite(values)
    counts = finite.sum(axis=-1)
    sums = np.where(finite, values, 0.0).sum(axis=-1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _relative_phase(profile: AttentionProfile) -> np.ndarray:
    """Head-averaged phase profile divided by its mean over offsets ``(layers, period)``."""
    phase = profile.phase_profile().mean(axis=1)
    means = _row_nanmean(phase)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isfinite(means) & (means > 0), phase / means, np.nan)


def _tier_of(fit: TierFit | None, layer: int) -> str | None:
    if fit is None:
        return None
    for name in TIERS:
        first, last = fit.tiers[name]
        if first <= layer <= last:
            return name
    return None


def _layer_label(layer: int, fit: TierFit | None) -> str:
    tier = _tier_of(fit, layer)
    if tier is None:
        return f"layer {layer}"
    label = f"layer {layer} · {TIER_LABELS[tier]} tier"
    if fit is not None and layer < len(fit.roles) and fit.roles[layer] != tier:
        label += f" (acts {TIER_LABELS[fit.roles[layer]]})"
    return label


def representative_layers(num_layers: int, fit: TierFit | None = None) -> list[int]:
    """First, middle and last layer, plus the most typical layer of each tier of ``fit``
    (the one whose role score is nearest the tier's fitted level)."""
    if num_layers <= 0:
        return []
    picks = {0, num_layers // 2, num_layers - 1}
    if fit is not None:
        for name in TIERS:
            first, last = fit.tiers[name]
            level = fit.levels[name]
            centre = (first + last) / 2
            picks.add(min(range(first, last + 1),
                          key=lambda i: (abs(float(fit.scores[i]) - level), abs(i - centre))))
    return sorted(picks)


def _chosen_layers(layers: Sequence[int] | None, num_layers: int, fit: TierFit | None) -> list[int]:
    if layers is None:
        return representative_layers(num_layers, fit)
    chosen = [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the profile has layers 0-{num_layers - 1}")
    return list(dict.fromkeys(chosen))


def _layer_colors(count: int) -> list:
    """Colour-blind-safe line colours, shallow to deep in a fixed order."""
    if count <= len(OKABE_ITO):
        return list(OKABE_ITO[:count])
    return sns.color_palette(SEQUENTIAL, count)


def _log_norm(data: np.ndarray, floor_ratio: float = 1e-6) -> LogNorm | None:
    """A log colour scale over the positive finite values (None if there are none)."""
    positive = data[np.isfinite(data) & (data > 0)]
    if positive.size == 0:
        return None
    vmax = float(positive.max())
    vmin = max(float(positive.min()), vmax * floor_ratio)
    if vmin >= vmax:
        vmin = vmax / 10
    return LogNorm(vmin=vmin, vmax=vmax)


def _cmap(name: str = SEQUENTIAL):
    return mpl.colormaps[name].with_extremes(bad=MISSING)


# -- the figures ----------------------------------------------------------------------------
def plot_distance_profiles(
    profile: AttentionProfile, layers: Sequence[int] | None = None, *, fit: TierFit | None = None
) -> Figure:
    """Mean attention against distance from the newest token (log scale), one panel and one
    line per chosen layer, stacked shallow to deep on shared axes.

    Parameters
    ----------
    profile : recorded profile
    layers : layers to draw; default :func:`representative_layers` (first, middle, last and,
        with ``fit``, the most typical layer of each tier)
    fit : tier fit, used for the default layers and the panel labels

    Light vertical lines mark every frame (``profile.period`` tokens): layers with anchor
    tokens spike once per frame, on that rhythm; recency shows as a fall from the left. Grey
    steps are the mean per frame (the trend without the rhythm), the dashed line a uniform
    spread over the window. The attention lines carry ``gid="layer-<index>"``; their x data
    are the distances ``0 .. window - 1``, their y data the attention (NaN where unseen).
    """
    window, period = profile.window, profile.period
    data = _head_mean_distance(profile)
    has_data = window > 0 and bool(np.isfinite(_positive(data)).any())
    chosen = _chosen_layers(layers, profile.num_layers, fit) if has_data else []
    subtitle = (f"mean over heads, {profile.probes} probes · window {window} tokens · light lines: "
                f"frames of {period} tokens · grey: mean per frame · dashed: uniform")
    with _style():
        fig = Figure(figsize=(10.0, min(1.45 * max(len(chosen), 2) + 1.7, 13.0)), layout="constrained")
        if not chosen:
            ax = fig.add_subplot()
            _titles(fig, ax, "Attention by distance from the newest token", subtitle)
            _no_data(ax, "no attention recorded (window never reached)")
            return _finish(fig)
        axes = fig.subplots(len(chosen), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
        _titles(fig, axes[0], "Attention by distance from the newest token", subtitle)
        distance = np.arange(window)
        blocks = window // period
        for ax, color, layer in zip(axes, _layer_colors(len(chosen)), chosen):
            y = _positive(data[layer])
            ax.plot(distance, y, color=color, linewidth=1.0, label=_layer_label(layer, fit),
                    gid=f"layer-{layer}")
            if blocks >= 2:
                means = _row_nanmean(y[: blocks * period].reshape(blocks, period))
                edges = np.arange(blocks + 1) * period - 0.5
                ax.stairs(_positive(means), edges, color="0.2", alpha=0.55, linewidth=1.4,
                          baseline=None, gid=f"frame-mean-{layer}")
            ax.axhline(1.0 / window, color="0.35", linestyle="--", linewidth=0.9, gid="uniform")
            ax.set_yscale("log")
            _frame_axis(ax, window, period, gridlines=True)
            ax.text(0.995, 0.93, _layer_label(layer, fit), transform=ax.transAxes, ha="right",
                    va="top", fontsize=9.5, fontweight="bold", color=color,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5})
        axes[0].set_xlim(0, max(window - 1, 1))
        _frames_on_top(axes[0], window, period)
        axes[-1].set_xlabel("distance from the newest token (tokens)")
        fig.supylabel("mean attention per token (log)", fontsize=10.5)
    return _finish(fig)


def plot_distance_heatmap(profile: AttentionProfile) -> Figure:
    """Layers x distance heatmap of mean attention (log colour scale, layer 0 on top).

    The image's array is the head-averaged distance profile over the window (masked where
    never measured); grey cells were never reached or hold no attention.
    """
    window, period, num_layers = profile.window, profile.period, profile.num_layers
    data = _head_mean_distance(profile)
    with _style():
        fig = Figure(figsize=(9.5, min(max(3.2, 0.17 * num_layers + 1.8), 9.0)), layout="constrained")
        grid = fig.add_gridspec(1, 2, width_ratios=(1.0, 0.022))
        ax = fig.add_subplot(grid[0])
        bar_ax = fig.add_subplot(grid[1])
        _titles(fig, ax, "Attention by distance, every layer",
                f"mean over heads · log colour scale · frame = {period} tokens · "
                "marker on the colour bar: uniform spread")
        norm = _log_norm(data) if window else None
        if norm is None:
            _no_data(ax, "no attention recorded (window never reached)")
            bar_ax.set_visible(False)
            return _finish(fig)
        masked = np.ma.masked_invalid(np.where(data > 0, data, np.nan))
        image = ax.imshow(masked, aspect="auto", cmap=_cmap(), norm=norm, interpolation="auto",
                          extent=(-0.5, window - 0.5, num_layers - 0.5, -0.5), origin="upper")
        ax.set_ylim(num_layers - 0.5, -0.5)
        _frame_axis(ax, window, period, gridlines=False)
        _frames_on_top(ax, window, period)
        _layer_ticks(ax, num_layers)
        ax.set_xlabel("distance from the newest token (tokens)")
        ax.set_ylabel("layer (0 = shallowest)")
        bar = fig.colorbar(image, cax=bar_ax)
        bar.set_label("mean attention per token (log)")
        uniform = 1.0 / window
        if norm.vmin <= uniform <= norm.vmax:
            bar.ax.axhline(uniform, color="white", linewidth=2.0)
            bar.ax.axhline(uniform, color="black", linewidth=0.8, linestyle="--")
    return _finish(fig)


def plot_layer_metrics(metrics: ProfileMetrics, fit: TierFit) -> Figure:
    """Per-layer recency share, periodicity, entropy and role score ``u`` with the tier fit.

    Shaded bands are the contiguous tiers of ``fit`` (``gid="tier-<name>"``, spanning
    ``first - 0.5`` to ``last + 0.5``), dashed steps their fitted levels; ringed layers
    (``fit.mismatches``) act in a role other than their tier. The strip below compares each
    layer's tier with its own role.
    """
    num_layers = len(fit.scores)
    layer_axis = np.arange(num_layers)
    mismatches = list(fit.mismatches)
    with _style():
        fig = Figure(figsize=(min(max(7.5, 0.3 * num_layers + 4.0), 18.0), 5.6), layout="constrained")
        grid = fig.add_gridspec(2, 1, height_ratios=(5.0, 1.0), hspace=0.02)
        ax = fig.add_subplot(grid[0])
        strip = fig.add_subplot(grid[1], sharex=ax)
        _titles(fig, ax, "Layer measurements and memory tiers",
                f"contiguous three-tier fit of the role score u: R² = {fit.r2:.2f} · "
                f"{len(mismatches)} of {num_layers} layers act in another role (ringed)")
        for name in TIERS:
            first, last = fit.tiers[name]
            span = Rectangle((first - 0.5, 0.0), last - first + 1, 1.0, transform=ax.get_xaxis_transform(),
                             facecolor=TIER_COLORS[name], alpha=0.16, linewidth=0, zorder=0,
                             gid=f"tier-{name}")
            ax.add_patch(span)
            ax.text((first + last) / 2, 0.985, f"{TIER_LABELS[name]}\n{first}-{last}",
                    transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8.5,
                    color="0.25", fontweight="bold", gid=f"tier-label-{name}")
            ax.plot([first - 0.5, last + 0.5], [fit.levels[name]] * 2, color="0.3", linestyle="--",
                    linewidth=1.1, label="fitted tier level" if name == TIERS[0] else None,
                    gid=f"level-{name}")
        for key, (label, color, marker) in METRIC_STYLES.items():
            ax.plot(layer_axis, np.asarray(getattr(metrics, key), dtype=np.float64), color=color,
                    marker=marker, markersize=4, linewidth=1.3, label=label, gid=f"metric-{key}")
        scores = np.asarray(fit.scores, dtype=np.float64)
        ax.plot(layer_axis, scores, color="black", marker="D", markersize=4.5, linewidth=2.2,
                label="role score u (0 sensory, 1 long-term)", gid="metric-role_score")
        if mismatches:
            ax.scatter(mismatches, scores[mismatches], s=170, facecolors="none", edgecolors="black",
                       linewidths=1.4, zorder=5, label="own role differs from its tier", gid="mismatches")
        finite = np.concatenate([np.asarray(getattr(metrics, k), dtype=np.float64)
                                 for k in METRIC_STYLES] + [scores])
        finite = finite[np.isfinite(finite)]
        top = max(1.0, float(finite.max()) if finite.size else 1.0)
        ax.set_ylim(min(0.0, float(finite.min()) if finite.size else 0.0) - 0.02, top * 1.16)
        ax.set_ylabel("value")
        ax.tick_params(labelbottom=False)
        ax.grid(axis="y", color="0.9", linewidth=0.7)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)

        codes = np.array([[TIERS.index(t) for t in fit.tier_of_layer],
                          [TIERS.index(r) for r in fit.roles]], dtype=float)
        palette = ListedColormap([tuple(0.45 + 0.55 * c for c in to_rgb(TIER_COLORS[t])) for t in TIERS])
        strip.imshow(codes, cmap=palette, vmin=-0.5, vmax=len(TIERS) - 0.5, aspect="auto",
                     interpolation="nearest", extent=(-0.5, num_layers - 0.5, 1.5, -0.5))
        if mismatches:
            strip.scatter(mismatches, [1] * len(mismatches), marker="o", s=70, facecolors="none",
                          edgecolors="black", linewidths=1.2, zorder=5)
        strip.set_yticks([0, 1], ["contiguous tier", "own role"])
        strip.set_xlim(-0.5, num_layers - 0.5)
        _layer_ticks(strip, num_layers, axis="x")
        strip.set_xlabel("layer")
        for spine in strip.spines.values():
            spine.set_visible(False)
        strip.tick_params(axis="y", length=0)
    return _finish(fig)


def plot_head_periodicity(metrics: ProfileMetrics) -> Figure:
    """Layers x heads heatmap of each head's periodicity, next to the layer's own value."""
    values = np.asarray(metrics.head_periodicity, dtype=np.float64)
    num_layers, num_heads = values.shape
    with _style():
        fig = Figure(figsize=(min(max(5.5, 0.5 * num_heads + 3.6), 16.0), min(max(3.4, 0.24 * num_layers + 1.8), 11.0)),
                     layout="constrained")
        grid = fig.add_gridspec(1, 3, width_ratios=(max(num_heads, 2), max(2.2, 0.16 * num_heads),
                                                      max(0.35, 0.025 * num_heads)), wspace=0.04)
        ax = fig.add_subplot(grid[0])
        side = fig.add_subplot(grid[1], sharey=ax)
        bar_ax = fig.add_subplot(grid[2])
        _titles(fig, ax, "Which heads keep the per-frame rhythm",
                f"periodicity per head (share of detrended log-attention repeating every "
                f"{metrics.period} tokens)")
        if values.size == 0:
            _no_data(ax, "no heads")
            side.set_visible(False)
            bar_ax.set_visible(False)
            return _finish(fig)
        sns.heatmap(values, ax=ax, cmap=_cmap(), vmin=0.0, vmax=1.0, mask=~np.isfinite(values),
                    annot=values.size <= 160, fmt=".2f", annot_kws={"fontsize": 7},
                    xticklabels=True if num_heads <= 32 else "auto", yticklabels=True,
                    linewidths=0.4 if values.size <= 600 else 0.0, linecolor="white",
                    cbar_ax=bar_ax, cbar_kws={"label": "periodicity"})
        ax.set_facecolor(MISSING)
        ax.set_xlabel("head")
        ax.set_ylabel("layer (0 = shallowest)")
        _layer_ticks(ax, num_layers, centred=True)
        ax.tick_params(axis="y", rotation=0)
        layer_values = np.nan_to_num(np.asarray(metrics.periodicity, dtype=np.float64), nan=0.0)
        side.barh(np.arange(num_layers) + 0.5, layer_values, height=0.8,
                  color=mpl.colormaps[SEQUENTIAL](np.clip(layer_values, 0, 1)), gid="layer-periodicity")
        side.set_xlim(0, 1)
        side.set_xlabel("whole layer\n(head-averaged)")
        side.tick_params(labelleft=False)
        side.grid(axis="x", color="0.9", linewidth=0.7)
    return _finish(fig)


def plot_phase_profiles(
    profile: AttentionProfile, layers: Sequence[int] | None = None, *, fit: TierFit | None = None
) -> Figure:
    """Attention per token at each offset within a frame, relative to the layer's mean.

    Left: lines for the chosen layers (default as in :func:`plot_distance_profiles`), the
    most attended offset (the anchor) marked; 1 = flat, no preferred position. Right: the
    same for every layer. Values are ``phase_profile`` averaged over heads, divided by its
    mean over offsets.
    """
    period, num_layers = profile.period, profile.num_layers
    relative = _relative_phase(profile)
    with _style():
        fig = Figure(figsize=(11.0, min(max(4.2, 0.12 * num_layers + 2.4), 8.0)), layout="constrained")
        grid = fig.add_gridspec(1, 3, width_ratios=(1.25, 1.0, 0.04))
        ax = fig.add_subplot(grid[0])
        heat = fig.add_subplot(grid[1])
        bar_ax = fig.add_subplot(grid[2])
        _titles(fig, ax, "Where in a frame attention goes",
                f"chosen layers · offsets 0-{period - 1} of a frame · star: anchor (most attended)")
        if not np.isfinite(_positive(relative)).any():
            _no_data(ax, "no attention recorded")
            heat.set_visible(False)
            bar_ax.set_visible(False)
            return _finish(fig)
        chosen = _chosen_layers(layers, num_layers, fit)
        offsets = np.arange(period)
        show_markers = period <= 64
        for color, layer in zip(_layer_colors(len(chosen)), chosen):
            y = _positive(relative[layer])
            ax.plot(offsets, y, color=color, linewidth=1.3, marker="o" if show_markers else None,
                    markersize=2.5, label=_layer_label(layer, fit), gid=f"layer-{layer}")
            if np.isfinite(y).any():
                peak = int(np.nanargmax(y))
                ax.plot([peak], [y[peak]], marker="*", markersize=12, color=color,
                        markeredgecolor="black", markeredgewidth=0.6, linestyle="none")
        ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1.0)
        ax.set_yscale("log")
        ax.set_xlim(-0.5, period - 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        ax.set_xlabel("offset within the frame (token)")
        ax.set_ylabel("attention per token / layer mean (log)")
        ax.grid(axis="y", which="major", color="0.9", linewidth=0.7)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8.5)

        values = _positive(relative)
        norm = _log_norm(values, floor_ratio=1e-3)
        # centre the scale on 1 (flat) so above / below average read as two colour families
        span = max(abs(np.log10(norm.vmin)), abs(np.log10(norm.vmax)), 0.05)
        centred = LogNorm(vmin=10 ** -span, vmax=10 ** span)
        image = heat.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=_cmap("PuOr_r"),
                            norm=centred, interpolation="nearest",
                            extent=(-0.5, period - 0.5, num_layers - 0.5, -0.5), origin="upper")
        heat.set_ylim(num_layers - 0.5, -0.5)
        _layer_ticks(heat, num_layers)
        heat.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        heat.set_xlabel("offset within the frame (token)")
        heat.set_ylabel("layer")
        heat.set_title("every layer", loc="left", fontsize=9.5, color="0.35")
        bar = fig.colorbar(image, cax=bar_ax)
        bar.set_label("attention / layer mean (log)")
    return _finish(fig)


def _role_image(roles: HeadRoles) -> np.ndarray:
    """RGB ``(layers, kv_heads, 3)``: the role's colour, faded towards white at low confidence
    (a head the probe barely told apart should not look as certain as a clear one)."""
    colors = np.array([to_rgb(ROLE_COLORS[name]) for name in EVIDENCE_ORDER])
    index = np.vectorize(EVIDENCE_ORDER.index)(roles.roles)
    strength = 0.3 + 0.7 * np.clip(roles.confidence, 0.0, 1.0)[..., None]
    return 1.0 - strength * (1.0 - colors[index])


def plot_head_roles(metrics: HeadMetrics, roles: HeadRoles) -> Figure:
    """Layers x KV heads: the role of each head (colour; paler = less confident, the
    confidence written in the cell) and its recall at the policy budget (share of its
    attention on the newest ``budget`` tokens)."""
    num_layers, kv_heads = metrics.shape
    with _style():
        fig = Figure(figsize=(min(max(6.5, 1.1 * kv_heads + 4.5), 16.0),
                              min(max(3.6, 0.24 * num_layers + 2.0), 11.0)), layout="constrained")
        grid = fig.add_gridspec(1, 3, width_ratios=(max(kv_heads, 2), max(kv_heads, 2), 0.35), wspace=0.08)
        role_ax = fig.add_subplot(grid[0])
        recall_ax = fig.add_subplot(grid[1])
        bar_ax = fig.add_subplot(grid[2])
        _titles(fig, role_ax, "What each KV head does",
                f"role per KV head (mean of {metrics.group_size} query head(s)); recall of the newest "
                f"{metrics.budget} tokens (probe window {metrics.window})")
        if num_layers == 0 or kv_heads == 0:
            _no_data(role_ax, "no heads")
            recall_ax.set_visible(False)
            bar_ax.set_visible(False)
            return _finish(fig)
        role_ax.imshow(_role_image(roles), aspect="auto", interpolation="nearest",
                       extent=(0, kv_heads, num_layers, 0), gid="head-roles")
        if roles.roles.size <= 400:
            for (layer, head), conf in np.ndenumerate(roles.confidence):
                role_ax.text(head + 0.5, layer + 0.5, f"{conf:.2f}", ha="center", va="center", fontsize=7,
                             color="0.1")
        role_ax.set_xlim(0, kv_heads)
        role_ax.set_ylim(num_layers, 0)
        role_ax.set_xticks(np.arange(kv_heads) + 0.5, [str(h) for h in range(kv_heads)])
        role_ax.set_xlabel("KV head")
        role_ax.set_ylabel("layer (0 = shallowest)")
        _layer_ticks(role_ax, num_layers, centred=True)
        handles = [Rectangle((0, 0), 1, 1, color=ROLE_COLORS[name], label=name) for name in ROLE_COLORS]
        fig.legend(handles=handles, loc="outside lower left", ncol=3, fontsize=8, title="role (paler = less confident)",
                   title_fontsize=8)
        values = np.asarray(metrics.budget_recall, dtype=np.float64)
        sns.heatmap(values, ax=recall_ax, cmap=_cmap(), vmin=0.0, vmax=1.0, mask=~np.isfinite(values),
                    annot=values.size <= 400, fmt=".2f", annot_kws={"fontsize": 7},
                    xticklabels=True, yticklabels=False, linewidths=0.4 if values.size <= 600 else 0.0,
                    linecolor="white", cbar_ax=bar_ax, cbar_kws={"label": "recall at the budget"})
        recall_ax.set_facecolor(MISSING)
        recall_ax.set_xlabel("KV head")
        recall_ax.tick_params(labelleft=False)
    return _finish(fig)


def save_head_figure(metrics: HeadMetrics, roles: HeadRoles, folder: str | Path, *, dpi: int = DPI) -> Path:
    """Write :func:`plot_head_roles` as ``head_roles.png`` into ``folder`` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig = plot_head_roles(metrics, roles)
    try:
        return _save_png(fig, folder / f"{HEAD_FIGURE_NAME}.png", dpi)
    finally:
        _close(fig)


# -- writing ------------------------------------------------------------------------------
def _save_png(fig: Figure, path: Path, dpi: int) -> Path:
    """Write ``fig`` as PNG atomically: a temporary file in the same folder, then a rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi, facecolor="white")
    return path


def _close(fig: Figure) -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # a no-op unless someone registered the figure with pyplot
        pyplot.close(fig)
    fig.clear()


def save_figures(
    profile: AttentionProfile,
    metrics: ProfileMetrics,
    fit: TierFit,
    folder: str | Path,
    *,
    dpi: int = DPI,
) -> list[Path]:
    """Write every figure as ``<name>.png`` into ``folder`` (created if missing).

    Names, in order: ``distance_profiles``, ``distance_heatmap``, ``layer_metrics``,
    ``head_periodicity``, ``phase_profiles``. Each file is written atomically and its figure
    released afterwards. Returns the paths written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    makers: dict[str, Callable[[], Figure]] = {
        "distance_profiles": lambda: plot_distance_profiles(profile, fit=fit),
        "distance_heatmap": lambda: plot_distance_heatmap(profile),
        "layer_metrics": lambda: plot_layer_metrics(metrics, fit),
        "head_periodicity": lambda: plot_head_periodicity(metrics),
        "phase_profiles": lambda: plot_phase_profiles(profile, fit=fit),
    }
    paths = []
    for name in FIGURE_NAMES:
        fig = makers[name]()
        try:
            paths.append(_save_png(fig, folder / f"{name}.png", dpi))
        finally:
            _close(fig)
    return paths
