"""The runtime search: its moves on planted objectives, and that its start is fifo."""

from __future__ import annotations

import pytest
import torch

from hermes_probe.runtime_search import (
    SearchSpace,
    coordinate_search,
    depth_groups,
    recency_start,
)


def test_depth_groups_are_contiguous_and_cover_every_layer():
    for layers in (1, 3, 7, 30):
        for groups in (1, 2, 5, 40):
            parts = depth_groups(layers, groups)
            assert [i for part in parts for i in part] == list(range(layers))
            assert all(part for part in parts) and len(parts) == min(groups, layers)
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1


def planted(point) -> float:
    """Layers 0-3 want pure recency, layers 4-7 want w = 0.5 with k = 8 and a summary token;
    an uneven budget split costs a little."""
    value = 1.0
    for i, (w, k, summary) in enumerate(zip(point.recency_weight, point.forgetting_rate, point.summary_token,
                                             strict=True)):
        if i < 4:
            value += (1.0 - w) + 0.2 * summary
        else:
            value += abs(w - 0.5) + (0.01 * abs(k - 8.0) if w < 1 else 0.0) + (0.0 if summary else 0.1)
    value += 0.05 * sum(abs(m - 1.0) for m in point.budget_multiple)
    return value


def test_search_finds_the_planted_settings_and_starts_from_recency():
    start = recency_start(["mixed"] * 8, [20.0] * 8)
    result = coordinate_search(planted, start, SearchSpace(groups=2), recall_split=[0.5, 1.5] * 4,
                               recall_smoothing=0.2)
    point = result.point
    assert point.recency_weight == (1.0,) * 4 + (0.5,) * 4
    assert point.forgetting_rate == (20.0,) * 4 + (8.0,) * 4
    assert point.summary_token == (False,) * 4 + (True,) * 4
    assert point.budget_multiple == (1.0,) * 8  # the split was tried and rejected
    assert result.value == pytest.approx(planted(point)) and result.value < result.start_value
    assert result.history[0]["move"].startswith("start") and result.history[0]["kl"] == result.start_value
    assert [h["move"] for h in result.history if h["kept"]][1:] == [
        "layers 4-7: w=0.8", "layers 4-7: w=0.5", "layers 4-7: k=2", "layers 4-7: k=8", "layers 4-7: summary token"]


def test_a_move_below_the_margin_is_not_kept():
    def nearly_flat(point) -> float:
        return 1.0 - 0.001 * (1.0 - point.recency_weight[0])

    start = recency_start(["global"] * 2, [8.0] * 2)
    result = coordinate_search(nearly_flat, start, SearchSpace(groups=2, margin=0.01, summary=False))
    assert result.point == start and result.value == result.start_value
    loose = coordinate_search(nearly_flat, start, SearchSpace(groups=2, margin=0.0, summary=False))
    assert loose.point.recency_weight[0] == 0.2


def test_each_point_is_evaluated_once():
    calls = []

    def counting(point) -> float:
        calls.append(point)
        return 1.0

    coordinate_search(counting, recency_start(["mixed"] * 4, [8.0] * 4), SearchSpace(groups=2),
                      recall_split=[1.0] * 4)
    assert len(calls) == len(set(calls))


def test_the_start_point_keeps_what_fifo_keeps(tiny_adapter):
    """Pure recency with an even split under the HERMES rule gives fifo's answers (fifo with
    the policy's lazy re-indexing, so that positions match too)."""
    from hermes_policy.inputs.fidelity_tasks import fidelity_stream
    from hermes_policy.policy import ModelInfo, paper_default
    from hermes_policy.retention import FifoRetention, HermesRetention
    from hermes_probe.fidelity import rescaled_policy, score_probes, stream_session

    stream = fidelity_stream(12, 3, tiny_adapter.frame_ids, tiny_adapter.encode_text, kv_facts=2, copy_probes=3,
                             tasks=("kv", "copy"))
    info = ModelInfo.of(tiny_adapter)
    base = paper_default(info, budget=32)
    layers = info.num_layers
    policy = recency_start(["mixed"] * layers, [8.0] * layers).policy(base)
    budget = 4 * tiny_adapter.tokens_per_frame
    hermes = score_probes(stream_session(tiny_adapter, HermesRetention(policy=rescaled_policy(policy, budget)),
                                         stream, 4), stream.probes)
    fifo = score_probes(stream_session(tiny_adapter, FifoRetention(budget=budget, reindex=policy.reindex), stream, 4), stream.probes)
    for a, b in zip(hermes, fifo, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
