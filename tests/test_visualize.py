"""kept_frame_share against hand counts, and plot_kept_frames' panels (tiny Llama, fast)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from hermes_policy import StreamingSession
from hermes_policy.evaluation.visualize import (
    COLORBAR_LABEL,
    kept_frame_share,
    kept_frame_snapshots,
    plot_kept_frames,
)
from hermes_policy.policy import ModelInfo, paper_default
from hermes_policy.retention import FifoRetention, FullRetention, HermesRetention, UniformRetention

FRAMES = 10  # streamed
COLUMNS = 12  # plotted: the last two are not streamed yet


def random_frames(adapter, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n, adapter.tokens_per_frame), generator=generator)


def streamed(adapter, rule, n=FRAMES, chunk_frames=2):
    session = StreamingSession(adapter, rule, chunk_frames=chunk_frames)
    session.add_frames(random_frames(adapter, n))
    return session


def hand_count(session, num_frames):
    """Share by explicit loops over every cached token (the definition, written out)."""
    n = session.adapter.tokens_per_frame
    out = np.zeros((session.store.num_layers, num_frames))
    for layer, frames in enumerate(session.store.frame_index):
        for frame in frames.tolist():
            if 0 <= frame < num_frames:
                out[layer, frame] += 1.0 / n
    out[:, session.frames_seen :] = np.nan
    return out


@pytest.mark.parametrize("budget_frames", [3, 5])
def test_fifo_keeps_exactly_the_newest_frames(tiny_adapter, budget_frames):
    n = tiny_adapter.tokens_per_frame
    session = streamed(tiny_adapter, FifoRetention(budget=budget_frames * n))
    share = kept_frame_share(session, COLUMNS)

    expected = np.zeros(COLUMNS)
    expected[FRAMES - budget_frames : FRAMES] = 1.0
    expected[FRAMES:] = np.nan
    assert share.shape == (tiny_adapter.num_layers, COLUMNS)
    for layer in range(tiny_adapter.num_layers):
        np.testing.assert_array_equal(share[layer], expected)
    np.testing.assert_array_equal(share, hand_count(session, COLUMNS))


def test_fifo_budget_inside_a_frame_keeps_its_newest_part(tiny_adapter):
    n = tiny_adapter.tokens_per_frame
    session = streamed(tiny_adapter, FifoRetention(budget=3 * n + n // 2))
    share = kept_frame_share(session, FRAMES)
    expected = np.zeros(FRAMES)
    expected[FRAMES - 4] = 0.5  # half of the oldest kept frame: its newest tokens
    expected[FRAMES - 3 :] = 1.0
    np.testing.assert_array_equal(share, np.tile(expected, (tiny_adapter.num_layers, 1)))


def test_full_and_uniform_shares_match_the_hand_count(tiny_adapter):
    full = streamed(tiny_adapter, FullRetention())
    share = kept_frame_share(full, COLUMNS)
    assert np.all(share[:, :FRAMES] == 1.0) and np.all(np.isnan(share[:, FRAMES:]))

    uniform = streamed(tiny_adapter, UniformRetention(budget=4 * tiny_adapter.tokens_per_frame))
    share = kept_frame_share(uniform, COLUMNS)
    np.testing.assert_allclose(share, hand_count(uniform, COLUMNS))
    seen = share[:, :FRAMES]
    assert np.all(seen[:, 0] > 0) and np.all(seen[:, -1] > 0)  # oldest and newest frames both held
    assert np.all(seen < 1)  # every frame thinned out
    # shares of a layer add up to the tokens it holds, in frames
    np.testing.assert_allclose(np.nansum(share, axis=1), np.array(uniform.tokens_kept) / tiny_adapter.tokens_per_frame)


def test_summary_tokens_and_unlisted_frames_are_not_counted(tiny_adapter):
    policy = paper_default(ModelInfo.of(tiny_adapter), budget=3 * tiny_adapter.tokens_per_frame)
    session = streamed(tiny_adapter, HermesRetention(policy=policy))
    assert any(bool((f[session.store.prefix_len :] == -1).any()) for f in session.store.frame_index)
    share = kept_frame_share(session, FRAMES)
    np.testing.assert_allclose(share, hand_count(session, FRAMES))
    held = np.array(session.tokens_kept) / tiny_adapter.tokens_per_frame
    assert np.all(share.sum(axis=1) <= held + 1e-9)  # the summary token (frame -1) is left out
    # fewer columns than frames seen: later frames are simply not shown
    np.testing.assert_array_equal(kept_frame_share(session, 4), share[:, :4])


def test_grouped_frames_share_their_group(tiny_adapter):
    """Qwen-VL-style adapters record a temporal patch's tokens under its first frame."""
    frame_index = torch.tensor([-1, -1, *[0] * 8, *[2] * 4])  # prefix, pair 0-1 whole, pair 2-3 half
    fake = SimpleNamespace(
        adapter=SimpleNamespace(tokens_per_frame=4, temporal_patch_size=2),
        store=SimpleNamespace(frame_index=[frame_index]),
        frames_seen=4,
    )
    np.testing.assert_array_equal(kept_frame_share(fake, 6), [[1.0, 1.0, 0.5, 0.5, np.nan, np.nan]])
    # chunks of 3 frames: pairs (0, 1), (2 + padding), then (3, 4), (5 + padding); two layers
    fake.store.frame_index = [
        torch.tensor([-1, *[0] * 8, *[2] * 8, *[3] * 4, *[5] * 8, -1]),  # -1: a summary token
        torch.tensor([*[2] * 2, *[5] * 8]),
    ]
    fake.frames_seen = 6
    np.testing.assert_array_equal(
        kept_frame_share(fake, 6), [[1, 1, 1, 0.5, 0.5, 1], [0, 0, 0.25, 0, 0, 1]]
    )


def test_plot_has_one_heatmap_per_rule_showing_the_shares(tiny_adapter):
    n = tiny_adapter.tokens_per_frame
    sessions = {
        "full": streamed(tiny_adapter, FullRetention()),
        "fifo": streamed(tiny_adapter, FifoRetention(budget=3 * n)),
        "uniform": streamed(tiny_adapter, UniformRetention(budget=3 * n)),
    }
    fig = plot_kept_frames(sessions, COLUMNS, highlight=[1])
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_label() != COLORBAR_LABEL]
    assert len(panels) == len(sessions)
    assert len(fig.axes) == len(sessions) + 1  # plus one shared colour bar
    for ax, (name, session) in zip(panels, sessions.items()):
        assert ax.get_title().startswith(name)
        assert ax.get_xlabel() and ax.get_title()
        drawn = ax.collections[0].get_array()
        share = kept_frame_share(session, COLUMNS)
        np.testing.assert_array_equal(np.ma.getmaskarray(drawn).reshape(share.shape), np.isnan(share))
        np.testing.assert_allclose(np.ma.filled(drawn, np.nan).reshape(share.shape), share)
    assert panels[0].get_ylabel().startswith("layer")
    assert fig._suptitle is not None and fig._suptitle.get_text()
    fig.savefig(io.BytesIO(), format="png")  # renders headless


def test_plot_accepts_snapshots_and_checks_their_shape(tiny_adapter):
    session = StreamingSession(tiny_adapter, FifoRetention(budget=3 * tiny_adapter.tokens_per_frame),
                               chunk_frames=2)
    frames = random_frames(tiny_adapter, FRAMES)
    history = []
    for start in range(0, FRAMES, 2):
        session.add_frames(frames[start : start + 2])
        history.append((session.frames_seen, kept_frame_share(session, FRAMES)))
    picked = kept_frame_snapshots(history, most=3)
    assert list(picked) == ["after 2 frames", "after 6 frames", "after 10 frames"]
    assert np.isnan(picked["after 2 frames"][:, 2:]).all()
    fig = plot_kept_frames(picked, FRAMES, title="fifo over time")
    assert [ax.get_title() for ax in fig.axes if ax.get_label() != COLORBAR_LABEL] == list(picked)
    fig.savefig(io.BytesIO(), format="png")
    with pytest.raises(ValueError, match="expected an array"):
        plot_kept_frames({"bad": np.zeros((3, 4))}, FRAMES)
    with pytest.raises(ValueError):
        plot_kept_frames({}, FRAMES)
