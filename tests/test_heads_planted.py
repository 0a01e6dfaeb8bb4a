"""The per-head probe recovers PLANTED head roles: a tiny Llama (4 query heads, 2 KV heads)
whose layers mix heads of different planted kinds (tests/planted.py), streamed and probed
through the real runtime, then analysed with ``per_head=True``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from planted import default_anchor_token_id, planted_frames, planted_llama

from hermes_policy.models import load_adapter
from hermes_policy.policy import Policy, head_token_budgets
from hermes_probe.runner import ProbeConfig, analyze
from hermes_probe.sources import ProbeStream

QUESTIONS = ("What is happening right now?", "What happened at the start?")
PERIOD, OFFSET, WINDOW, FRAMES, BUDGET = 16, 3, 256, 40, 128
RECENCY_DECAY = 0.06  # planted_llama's default
# per layer, the planted kind of KV heads 0 and 1
LAYOUT = {
    0: ("recency", "recency"),
    1: ("recency", "anchor"),  # one layer, two roles: the case the issue is about
    2: ("anchor", "recency"),
    3: ("anchor", "uniform"),  # a flat head has no structure to find
    4: ("anchor", "anchor"),
}
EXPECTED = {"recency": "streaming", "anchor": "anchor"}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted-heads")
    folder = planted_llama(root / "model", LAYOUT, frame_period=PERIOD, span=400)
    adapter = load_adapter(folder, device="cpu", tokens_per_frame=PERIOD)
    assert (adapter.num_heads, adapter.num_kv_heads) == (4, 2)
    frames = planted_frames(FRAMES, PERIOD, default_anchor_token_id(), OFFSET)
    stream = ProbeStream(
        "planted-heads", lambda: (frames, np.arange(FRAMES, dtype=np.float64) * 2.0)
    )
    config = ProbeConfig(chunk_frames=4, fifo_budget=WINDOW, queries=QUESTIONS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = analyze(
            adapter,
            [stream],
            config,
            root / "probe",
            policy_budget=BUDGET,
            progress=False,
            figures=True,
            per_head=True,
        )
    finally:
        torch.set_num_threads(threads)
    return result, root / "probe"


def test_planted_head_roles_are_recovered(probed):
    result, _ = probed
    policy = result.policy
    assert policy.schema == "hermes-policy/2"
    for layer, kinds in LAYOUT.items():
        heads = policy.layers[layer].heads
        for head, kind in enumerate(kinds):
            if kind in EXPECTED:
                assert heads[head].role == EXPECTED[kind], (layer, head, heads[head])
                assert heads[head].confidence > 0.5, (layer, head, heads[head])


def test_a_flat_head_is_not_called_confident(probed):
    result, _ = probed
    flat = result.policy.layers[3].heads[1]
    # no recency, no rhythm, no concentration: the per-layer default role, with no confidence
    assert flat.role == "retrieval" and flat.confidence < 0.1


def test_streaming_windows_follow_the_planted_decay(probed):
    result, _ = probed
    # 90% of exp(-kappa d) lies within d < ln(10) / kappa tokens: whole frames above that
    need = math.ceil(math.log(10) / RECENCY_DECAY / PERIOD) * PERIOD
    for layer, kinds in LAYOUT.items():
        for head, kind in enumerate(kinds):
            if kind == "recency":
                entry = result.policy.layers[layer].heads[head]
                assert entry.window == need and entry.recency_weight == 1.0
                # k = kappa (B - 1), kappa the planted decay
                assert entry.forgetting_rate == pytest.approx(
                    RECENCY_DECAY * (BUDGET - 1), rel=0.05
                )


def test_anchor_heads_weigh_attention_and_memory_stays_bounded(probed):
    result, _ = probed
    for entry in result.policy.layers:
        tokens = head_token_budgets(entry, 2)
        assert sum(tokens) <= 2 * entry.budget
        streaming = any(h.role == "streaming" for h in entry.heads)
        for head, budget in zip(entry.heads, tokens):
            if head.role == "anchor":
                assert head.recency_weight < 0.1
                if streaming:  # it gets what the streaming window leaves
                    assert budget > entry.budget
    # a layer of two anchor heads splits its memory evenly
    assert head_token_budgets(result.policy.layers[4], 2) == [BUDGET, BUDGET]


def test_outputs_hold_the_head_analysis(probed):
    result, out = probed
    assert Policy.load(out / "policy.json").layers[1].heads == result.policy.layers[1].heads
    report = (out / "report.md").read_text()
    assert (
        "## Per KV head" in report and "Layers whose KV heads have different roles: 1-3." in report
    )
    assert (out / "figures" / "head_roles.png").stat().st_size > 1000
    import json

    rows = json.loads((out / "metrics.json").read_text())["kv_heads"]
    assert len(rows) == 2 * len(LAYOUT) and {r["role"] for r in rows} == {
        "streaming",
        "anchor",
        "retrieval",
    }
