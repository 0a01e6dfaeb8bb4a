"""The policy JSON: paper-default constants, round trips, and validation errors."""

from __future__ import annotations

import json

import pytest

from hermes_policy.errors import PolicyError
from hermes_policy.policy import ModelInfo, Policy, paper_default, paper_tiers

LLAVA = ModelInfo("llava-ov-7b", "LlavaOnevisionForConditionalGeneration", 28, 28, 4, 196)


def test_paper_tiers_10_60_30():
    assert paper_tiers(28) == {"sensory": (0, 2), "working": (3, 19), "long_term": (20, 27)}
    assert paper_tiers(30) == {"sensory": (0, 2), "working": (3, 20), "long_term": (21, 29)}
    assert paper_tiers(3) == {"sensory": (0, 0), "working": (1, 1), "long_term": (2, 2)}
    with pytest.raises(PolicyError, match="at least 3 layers"):
        paper_tiers(2)


def test_paper_default_constants():
    policy = paper_default(LLAVA, budget=4000)
    layers = policy.layers
    assert [layer.tier for layer in layers[:3]] == ["sensory"] * 3
    assert (layers[0].recency_weight, layers[0].forgetting_rate, layers[0].smoothing) == (1.0, 20.0, 0.1)
    # working: w from w0 = 0.75 down to w0 - g = 0.15, k from 20 to 8, lambda 0.3
    assert layers[3].recency_weight == pytest.approx(0.75) and layers[19].recency_weight == pytest.approx(0.15)
    assert layers[11].recency_weight == pytest.approx(0.75 - 0.6 * 8 / 16)
    assert layers[3].forgetting_rate == pytest.approx(20.0) and layers[19].forgetting_rate == pytest.approx(8.0)
    assert all(layer.smoothing == 0.3 for layer in layers[3:20])
    # long-term: pure attention, summary token, lambda 0.4
    assert all(layer.recency_weight == 0.0 and layer.summary_token and layer.smoothing == 0.4 for layer in layers[20:])
    assert not any(layer.summary_token for layer in layers[:20])
    assert all(layer.budget == 4000 for layer in layers)


def test_roundtrip_and_atomic_save(tmp_path):
    policy = paper_default(LLAVA)
    path = policy.save(tmp_path / "policy.json")
    assert Policy.load(path).to_dict() == policy.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["policy.json"]


def _broken(mutate):
    data = paper_default(LLAVA).to_dict()
    mutate(data)
    return data


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d.update(schema="hermes-policy/2"), "schema"),
        (lambda d: d.pop("tiers"), "missing 'tiers'"),
        (lambda d: d["tiers"].update(working=[4, 19]), "contiguous"),
        (lambda d: d["tiers"].update(long_term=[20, 26]), "cover 27 layers"),
        (lambda d: d["layers"].pop(), "27 layer entries"),
        (lambda d: d["layers"][5].update(tier="episodic"), r"layers\[5\].tier"),
        (lambda d: d["layers"][5].update(recency_weight=1.5), r"recency_weight must be in \[0, 1\]"),
        (lambda d: d["layers"][5].update(recency_weight="high"), "must be a number"),
        (lambda d: d["layers"][5].update(forgetting_rate=-1), "forgetting_rate"),
        (lambda d: d["layers"][5].update(smoothing=1.0), "smoothing"),
        (lambda d: d["layers"][5].update(summary_token="yes"), "wrong type"),
        (lambda d: d["layers"][5].update(index=7), "index is 7"),
        (lambda d: d["budget"].update(video_tokens_per_layer=100), "smaller than one frame"),
        (lambda d: d.update(reindex="sometimes"), "reindex"),
        (lambda d: d["guidance"].update(local_with_history="no placeholder"), "{history}"),
        (lambda d: d["guidance"].update(global_with_history="{history} {__class__}"), "bare {history}"),
        (lambda d: d["model"].update(num_layers="28"), "must be a number"),
    ],
)
def test_malformed_policies_are_refused(mutate, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict(_broken(mutate))


def test_load_errors(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        Policy.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.load(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(PolicyError, match="JSON object"):
        Policy.load(bad)


def test_model_mismatch_is_a_clear_error():
    policy = paper_default(LLAVA)
    policy.check_model(28, 28, 4, 196)
    with pytest.raises(PolicyError, match="num_layers=28"):
        policy.check_model(30, 9, 3, 48)
