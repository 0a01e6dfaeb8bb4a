"""Which stream tokens each layer still holds: per-layer, per-frame pictures of a session.

:func:`kept_frame_share` reads a session's KV store (``store.frame_index``: the stream frame
of every cached token, per layer) and returns, for every layer and frame, the share of
that frame's tokens the layer still holds. :func:`plot_kept_frames` draws one
layers x frames heatmap per session (or per snapshot array), side by side, so retention
rules can be compared at a glance:

- ``fifo`` is a hard edge: every layer holds the newest frames completely and nothing
  before them;
- ``uniform`` keeps the same thinned-out share of every frame in every layer;
- ``hermes`` differs by depth: shallow (sensory) layers look like fifo, deep (long-term)
  layers hold a few tokens of every frame (the anchors the pseudo-query attends to).

The figures are built directly (no ``pyplot``), like :mod:`hermes_probe.figures`: nothing
here selects a backend or keeps figures alive; in a notebook with the inline backend a
returned figure displays like any other.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from hermes_policy.session import StreamingSession

CMAP = "viridis"
NOT_STREAMED = "0.86"  # background of frames the session has not ingested yet (NaN cells)
HIGHLIGHT = "#D55E00"  # markers of highlighted frames (e.g. planted facts)
COLORBAR_LABEL = "colorbar"  # ``Axes.get_label()`` of the colour bar's axes


def kept_frame_share(session: StreamingSession, num_frames: int) -> np.ndarray:
    """Share of each frame's tokens that each layer still holds.

    Parameters
    ----------
    session : a streaming session (only ``session.store.frame_index``,
        ``session.frames_seen`` and ``session.adapter.tokens_per_frame`` are read)
    num_frames : number of frame columns (frames ``0 .. num_frames - 1``)

    Returns
    -------
    float array ``(layers, num_frames)``: held tokens of frame ``f`` in layer ``l`` divided
    by the tokens one frame brings in (``adapter.tokens_per_frame``), clipped to [0, 1];
    NaN for frames the session has not ingested yet (``f >= session.frames_seen``).
    Tokens that belong to no frame (system prefix, summary tokens, LLaVA's chunk newline:
    frame -1) and frames at or beyond ``num_frames`` are not counted. Adapters that
    encode frames in groups (Qwen-VL's temporal patches of ``temporal_patch_size``
    frames, whose tokens are all recorded under the group's first frame; an odd chunk's
    last group is one frame, padded) get the group's share in each of its frames.
    """
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    adapter = session.adapter
    tokens_per_frame = int(adapter.tokens_per_frame)
    group = max(1, int(getattr(adapter, "temporal_patch_size", 1) or 1))
    indices = []
    for frames in session.store.frame_index:
        index = np.asarray(frames, dtype=np.int64).reshape(-1)
        indices.append(index[(index >= 0) & (index < num_frames)])
    spans = None
    if group > 1:  # each recorded frame stands for itself and the next frames of its group
        starts = np.unique(np.concatenate(indices)) if indices else np.zeros(0, dtype=np.int64)
        ends = np.minimum(np.append(starts[1:], num_frames), starts + group)
        spans = list(zip(starts.tolist(), ends.tolist()))
    rows = []
    for index in indices:
        counts = np.bincount(index, minlength=num_frames).astype(np.float64)
        if spans is not None:
            spread = np.zeros(num_frames)
            for start, end in spans:
                spread[start:end] = counts[start] / group
            counts = spread
        rows.append(counts / tokens_per_frame)
    share = np.clip(np.array(rows, dtype=np.float64).reshape(len(rows), num_frames), 0.0, 1.0)
    share[:, min(int(session.frames_seen), num_frames) :] = np.nan
    return share


@contextmanager
def _style() -> Iterator[None]:
    """Seaborn's clean look for the artists created inside, without touching global state."""
    rc = {**sns.axes_style("ticks"), **sns.plotting_context("notebook", font_scale=0.8)}
    rc.update({"figure.facecolor": "white", "savefig.facecolor": "white"})
    with mpl.rc_context(rc):
        yield


def _tick_step(count: int, most: int) -> int:
    """A round step (1, 2, 5, 10, 20, ...) showing at most ``most`` labels out of ``count``."""
    scale = 1
    while True:
        for base in (1, 2, 5):
            if math.ceil(count / (base * scale)) <= most:
                return base * scale
        scale *= 10


def plot_kept_frames(
    sessions: Mapping[str, StreamingSession | np.ndarray],
    num_frames: int,
    *,
    highlight: Sequence[int] = (),
    title: str = "Which frames each layer still holds",
    ncols: int | None = None,
) -> Figure:
    """One layers x frames heatmap per rule: the share of each frame's tokens still held.

    Parameters
    ----------
    sessions : panel title -> a streaming session (read with :func:`kept_frame_share`)
        or an array ``(layers, num_frames)`` it returned earlier (a snapshot in time)
    num_frames : frames on the x axis
    highlight : frames to mark with a triangle above every panel (e.g. frames holding
        planted facts)
    title : the figure's title
    ncols : panels per row (default: up to 4)

    Returns
    -------
    A :class:`~matplotlib.figure.Figure` with one axes per entry of ``sessions`` (in order,
    titled by its key) plus one colour-bar axes labelled ``"colorbar"``. Layer 0 (the
    shallowest) is the top row, the oldest frame the left column; grey cells are frames
    not streamed yet.
    """
    if not sessions:
        raise ValueError("plot_kept_frames needs at least one session")
    shares: dict[str, np.ndarray] = {}
    subtitles: dict[str, str] = {}
    for name, item in sessions.items():
        if isinstance(item, np.ndarray):
            share = np.asarray(item, dtype=np.float64)
            if share.ndim != 2 or share.shape[1] != num_frames:
                raise ValueError(f"{name!r}: expected an array (layers, {num_frames}), got {share.shape}")
            subtitles[name] = ""
        else:
            share = kept_frame_share(item, num_frames)
            kept = item.tokens_kept
            held = f"{min(kept)}-{max(kept)}" if min(kept) != max(kept) else f"{kept[0]}"
            subtitles[name] = f"{held} tokens per layer · {item.frames_seen} frames"
        shares[name] = share
    count = len(shares)
    ncols = max(1, min(ncols or 4, count))
    nrows = math.ceil(count / ncols)
    num_layers = max(share.shape[0] for share in shares.values())
    panel_w = min(max(2.6, 0.05 * num_frames + 1.4), 5.0)
    panel_h = min(max(2.0, 0.09 * num_layers + 1.2), 5.0)
    with _style():
        fig = Figure(figsize=(panel_w * ncols + 0.9, panel_h * nrows + 0.8), layout="constrained")
        grid = fig.add_gridspec(nrows, ncols + 1, width_ratios=(*([1.0] * ncols), 0.05))
        x_step, y_step = _tick_step(num_frames, 8), _tick_step(num_layers, 8)
        mesh = None
        for i, (name, share) in enumerate(shares.items()):
            row, col = divmod(i, ncols)
            ax = fig.add_subplot(grid[row, col])
            ax.set_label(name)
            ax.set_facecolor(NOT_STREAMED)
            sns.heatmap(share, ax=ax, vmin=0.0, vmax=1.0, cmap=CMAP, cbar=False,
                        mask=~np.isfinite(share), xticklabels=x_step, yticklabels=y_step,
                        rasterized=True)
            mesh = ax.collections[0]
            marks = [frame + 0.5 for frame in highlight if 0 <= frame < num_frames]
            if marks:  # triangles just above the panel, pointing at the columns
                ax.plot(marks, [1.0] * len(marks), linestyle="none", marker="v", markersize=5.5,
                        color=HIGHLIGHT, transform=ax.get_xaxis_transform(), clip_on=False)
            ax.set_title(name, fontsize=10, pad=17 if subtitles[name] else 8)
            if subtitles[name]:
                ax.annotate(subtitles[name], xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, 5),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7.5,
                            color="0.35")
            ax.tick_params(axis="x", labelrotation=0)
            ax.tick_params(axis="y", labelrotation=0)
            if row == nrows - 1 or i + ncols >= count:
                ax.set_xlabel("stream frame (oldest → newest)")
            if col == 0:
                ax.set_ylabel("layer (0 = shallowest)")
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("0.6")
        bar_ax = fig.add_subplot(grid[:, ncols])
        bar_ax.set_label(COLORBAR_LABEL)
        bar = fig.colorbar(mesh, cax=bar_ax)
        bar.set_label("share of the frame's tokens still held")
        note = "grey: not streamed yet"
        if len(highlight):
            note += " · ▼ highlighted frames"
        fig.suptitle(title, fontweight="bold", fontsize=12)
        fig.supxlabel(note, fontsize=8.5, color="0.35")
    return fig


def kept_frame_snapshots(
    shares: Sequence[tuple[int, np.ndarray]], most: int = 6
) -> dict[str, np.ndarray]:
    """Pick at most ``most`` evenly spaced ``(frames_seen, share)`` snapshots for plotting.

    Returns a mapping ``"after N frames" -> share`` (always including the last snapshot),
    ready for :func:`plot_kept_frames`.
    """
    if not shares:
        return {}
    picks = np.unique(np.linspace(0, len(shares) - 1, min(most, len(shares))).round().astype(int))
    return {f"after {shares[i][0]} frames": shares[i][1] for i in picks}
