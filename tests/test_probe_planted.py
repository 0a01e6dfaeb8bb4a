"""The probe recovers PLANTED ground truth: tiny models whose layers were built by hand to be
recency-biased, anchor-attending, mixed or flat (tests/planted.py), streamed and probed
through the real runtime (FIFO cache, attention capture, recorder, metrics, tiers, report).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from planted import default_anchor_token_id, planted_frames, planted_llama

from hermes_policy.models import load_adapter
from hermes_probe.runner import ProbeConfig, ProbeResult, analyze
from hermes_probe.sources import ProbeStream

KINDS = {"r": "recency", "m": "mixed", "a": "anchor", "u": "uniform"}
ROLE = {"recency": "sensory", "mixed": "working", "uniform": "working", "anchor": "long_term"}
QUESTIONS = ("What is happening right now?", "What happened at the start?", "Which objects appeared so far?")
RECENCY_DECAY = 0.06  # planted_llama's defaults
ANCHOR_LOGIT = 6.0
SPAN = 400


@dataclass(frozen=True)
class Case:
    layout: str  # one letter per layer, see KINDS
    period: int  # tokens per frame N
    offset: int  # the anchor's in-frame offset
    budget: int  # FIFO window
    tiers: dict[str, tuple[int, int]]  # the right contiguous split
    mismatches: list[int] = field(default_factory=list)
    frames: int = 40

    @property
    def kinds(self) -> list[str]:
        return [KINDS[c] for c in self.layout]

    def layers(self, kind: str) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k == kind]


CASES = {
    # 6 layers, not 10/60/30: 3 recency, 1 mixed, 2 anchor
    "3r-1m-2a": Case("rrrmaa", 16, 3, 256, {"sensory": (0, 2), "working": (3, 3), "long_term": (4, 5)}),
    # 8 layers: 1 recency, 2 mixed, 5 anchor; N = 12 and a window of 250 = 20 frames + 10
    # tokens, so the oldest cached frame is always partly evicted
    "1r-2m-5a": Case("rmmaaaaa", 12, 5, 250, {"sensory": (0, 0), "working": (1, 2), "long_term": (3, 7)}),
    # flat layers have neither recency nor rhythm: working memory
    "1r-2u-2a": Case("ruuaa", 16, 3, 256, {"sensory": (0, 0), "working": (1, 2), "long_term": (3, 4)}),
    # non-contiguous: an anchor layer (2) among recency layers; the best contiguous split
    # keeps it in the sensory tier and must report it
    "anchor-among-recency": Case(
        "rrarrrrmmaa", 16, 3, 256, {"sensory": (0, 6), "working": (7, 8), "long_term": (9, 10)}, mismatches=[2]
    ),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def probed(request, tmp_path_factory) -> tuple[Case, ProbeResult, Path]:
    case = CASES[request.param]
    root = tmp_path_factory.mktemp(f"planted-{request.param}")
    folder = planted_llama(root / "model", dict(enumerate(case.kinds)), frame_period=case.period, span=SPAN)
    adapter = load_adapter(folder, device="cpu", tokens_per_frame=case.period)
    anchor_id = default_anchor_token_id()
    assert all(anchor_id not in adapter.encode_text(q) for q in QUESTIONS)
    # the planted behaviours hold over query-key distances up to the model's span
    assert case.budget + max(len(adapter.question_piece(q)) for q in QUESTIONS) <= SPAN
    frames = planted_frames(case.frames, case.period, anchor_id, case.offset)

    def load():
        return frames, np.arange(case.frames, dtype=np.float64) * 2.0  # 0.5 fps

    stream = ProbeStream(f"planted-{request.param}", load)
    config = ProbeConfig(chunk_frames=4, fifo_budget=case.budget, queries=QUESTIONS)
    out = root / "probe"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to busy cores
    try:
        result = analyze(adapter, [stream], config, out, policy_budget=256, progress=False, figures=False)
    finally:
        torch.set_num_threads(threads)
    return case, result, out


def test_protocol_saw_a_full_sliding_window(probed):
    case, result, _ = probed
    assert result.profile.period == case.period
    assert result.metrics.window == case.budget
    assert result.profile.probes >= 5 * len(QUESTIONS)
    assert not result.failed


def test_tiers_are_the_planted_split(probed):
    case, result, _ = probed
    assert result.fit.tiers == case.tiers
    assert result.policy.tiers == case.tiers


def test_each_layer_role_is_its_planted_role(probed):
    case, result, _ = probed
    assert result.fit.roles == [ROLE[k] for k in case.kinds]
    assert result.fit.mismatches == case.mismatches


def test_anchor_layers_attend_one_token_per_frame(probed):
    case, result, _ = probed
    m, n = result.metrics, case.period
    # planted: the anchor gets e^A times an ordinary token's attention -> max/mean per offset
    boost = math.exp(ANCHOR_LOGIT)
    strength = n * boost / (boost + n - 1)
    # the anchors sit at distances d = N - 1 - offset (mod N) from the newest token
    anchors = np.arange(case.budget) % n == (n - 1 - case.offset)
    head = math.ceil(case.budget / 10)
    weights = np.where(anchors, boost, 1.0)
    share = weights[:head].sum() / weights.sum()
    for layer in case.layers("anchor"):
        assert m.anchor_phase[layer] == case.offset
        assert m.measured_period[layer] == n
        assert m.periodicity[layer] > 0.95
        assert m.recency_share[layer] == pytest.approx(share, rel=0.01)
        assert m.recency_share[layer] < 0.15
        assert abs(m.decay_rate[layer]) < 1e-3
        assert m.anchor_strength[layer] == pytest.approx(strength, rel=0.01)


def test_recency_layers_decay_as_planted(probed):
    case, result, _ = probed
    m, w = result.metrics, case.budget
    head = math.ceil(w / 10)
    share = (1 - math.exp(-RECENCY_DECAY * head)) / (1 - math.exp(-RECENCY_DECAY * w))
    for layer in case.layers("recency"):
        assert m.decay_rate[layer] == pytest.approx(RECENCY_DECAY, rel=0.02)
        assert m.recency_share[layer] == pytest.approx(share, rel=0.02)
        assert m.recency_share[layer] > 0.7
        assert m.periodicity[layer] < 0.05


def test_mixed_and_flat_layers_lie_between(probed):
    case, result, _ = probed
    m = result.metrics
    recency = [m.recency_share[i] for i in case.layers("recency")]
    anchors = [m.periodicity[i] for i in case.layers("anchor")]
    for layer in case.layers("mixed"):
        assert max(m.recency_share[i] for i in case.layers("anchor")) < m.recency_share[layer] < min(recency)
        assert 0.2 < m.periodicity[layer] < min(anchors)
        assert m.measured_period[layer] == case.period  # a weak rhythm is still found
    for layer in case.layers("uniform"):
        assert m.recency_share[layer] == pytest.approx(math.ceil(case.budget / 10) / case.budget, rel=1e-3)
        assert m.periodicity[layer] < 1e-3
        assert m.entropy[layer] == pytest.approx(1.0, abs=1e-3)


def test_policy_weights_follow_each_layer(probed):
    case, result, _ = probed
    layers = result.policy.layers
    for i in case.layers("recency"):
        assert layers[i].recency_weight > 0.8
        assert layers[i].forgetting_rate == pytest.approx(RECENCY_DECAY * 255, rel=0.02)
    for i in case.layers("anchor"):
        assert layers[i].recency_weight < 0.01
        assert layers[i].forgetting_rate == 0.0
    for i in case.layers("mixed") + case.layers("uniform"):
        assert 0.3 < layers[i].recency_weight < 0.7
    assert [p.summary_token for p in layers] == [p.tier == "long_term" for p in layers]


def test_report_states_what_was_planted(probed):
    case, result, out = probed
    report = (out / "report.md").read_text()
    assert f"offset {case.offset} in" in report
    assert f"every {case.period} tokens" in report
    provenance = json.loads((out / "policy.json").read_text())["provenance"]["probe"]
    assert provenance["mismatched_layers"] == case.mismatches
    if case.mismatches:
        assert f"do not fit {len(case.mismatches)} layers, whose own role is long_term: 2." in report
    else:
        assert "Every layer's own role matches its contiguous tier." in report
