"""Policy schema ``hermes-policy/2``: per-KV-head entries round-trip, schema-1 files load
unchanged, and every malformed head entry is refused with a PolicyError naming it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hermes_policy.errors import PolicyError
from hermes_policy.policy import (
    SCHEMA,
    SCHEMA_V2,
    HeadPolicy,
    ModelInfo,
    Policy,
    head_token_budgets,
    paper_default,
)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# a SmolLM2-shaped model: 9 query heads in 3 groups of 3
SMOL = ModelInfo("smollm2", "LlamaForCausalLM", 4, 9, 3, 48)


def per_head_policy(budget: int = 480) -> Policy:
    """Layer 0: all streaming; 1: streaming + anchor + retrieval; 2-3: shares only."""
    base = paper_default(SMOL, budget=budget)
    heads = {
        0: (HeadPolicy("streaming", 96, None, 1.0, 20.0, 0.9),) * 3,
        1: (
            HeadPolicy("streaming", 240, None, 1.0, 12.0, 0.7),
            HeadPolicy("anchor", None, 0.6, 0.1, 2.0, 0.8),
            HeadPolicy("retrieval", None, 0.4, 0.3, 1.0),
        ),
        2: (HeadPolicy("anchor", None, 0.5, 0.0, 0.0),) * 2
        + (HeadPolicy("streaming", 48, None, 1.0, 5.0),),
        3: tuple(
            HeadPolicy("retrieval", None, share, 0.2, 0.5)
            for share in (0.333333, 0.333333, 0.333334)
        ),
    }
    layers = [replace(layer, heads=heads[layer.index]) for layer in base.layers]
    return replace(base, layers=layers)


def test_schema_2_round_trips(tmp_path):
    policy = per_head_policy()
    assert policy.schema == SCHEMA_V2 and policy.per_head
    path = policy.save(tmp_path / "policy.json")
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA_V2
    assert data["layers"][1]["heads"][0] == {
        "role": "streaming",
        "window": 240,
        "share": None,
        "recency_weight": 1.0,
        "forgetting_rate": 12.0,
        "confidence": 0.7,
    }
    assert "confidence" not in data["layers"][1]["heads"][2]  # unknown: left out, not null
    loaded = Policy.load(path)
    assert loaded.to_dict() == policy.to_dict()
    assert loaded.layers[1].heads == policy.layers[1].heads


def test_schema_1_files_load_and_write_unchanged(tmp_path):
    for name in ("smollm2-probed-policy.json", "smollm2-calibrated-kl-policy.json"):
        original = json.loads((RESULTS / name).read_text())
        assert original["schema"] == SCHEMA
        policy = Policy.from_dict(original)
        assert not policy.per_head and policy.schema == SCHEMA
        assert policy.to_dict() == original  # no 'heads' key appears, nothing else moves
    assert "heads" not in paper_default(SMOL).to_dict()["layers"][0]


def test_head_token_budgets_keep_the_layer_memory():
    policy = per_head_policy(budget=480)
    layers = policy.layers
    assert head_token_budgets(layers[0], 3) == [96, 96, 96]  # all streaming: less than 3 x 480
    # 1440 slots - 240 window = 1200 left: 0.6 -> 720, 0.4 -> 480
    assert head_token_budgets(layers[1], 3) == [240, 720, 480]
    assert head_token_budgets(layers[2], 3) == [696, 696, 48]
    assert sum(head_token_budgets(layers[3], 3)) == 3 * 480
    assert head_token_budgets(paper_default(SMOL, budget=480).layers[1], 3) == [480, 480, 480]
    for layer in layers:
        assert sum(head_token_budgets(layer, 3)) <= 3 * layer.budget


def test_with_budget_scales_the_windows():
    smaller = per_head_policy(budget=480).with_budget(240)
    assert [h.window for h in smaller.layers[1].heads] == [120, None, None]
    assert head_token_budgets(smaller.layers[1], 3) == [120, 360, 240]
    Policy.from_dict(json.loads(json.dumps(smaller.to_dict())))  # still valid


def _broken(mutate):
    data = json.loads(json.dumps(per_head_policy().to_dict()))
    mutate(data)
    return data


def _head(data, layer, head):
    return data["layers"][layer]["heads"][head]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda d: d["layers"][2]["heads"].pop(),
            r"layers\[2\].heads has 2 entries, the model has 3 KV heads",
        ),
        (
            lambda d: d["layers"][2]["heads"].append(dict(_head(d, 2, 0))),
            "has 4 entries, the model has 3 KV heads",
        ),
        (
            lambda d: _head(d, 1, 1).update(share=0.5),
            r"layers\[1\].heads: the shares .* sum to 0.9, not 1",
        ),
        (
            lambda d: _head(d, 1, 2).update(role="echo"),
            r"heads\[2\].role is 'echo', expected one of",
        ),
        (
            lambda d: _head(d, 1, 0).update(window=None),
            "streaming head needs a positive integer window",
        ),
        (
            lambda d: _head(d, 1, 0).update(window=0),
            "streaming head needs a positive integer window",
        ),
        (lambda d: _head(d, 1, 0).update(share=0.2), "a streaming head has a window, not a share"),
        (lambda d: _head(d, 1, 1).update(window=48), "an? anchor head has a share, not a window"),
        (lambda d: _head(d, 1, 2).pop("share"), r"heads\[2\] is missing 'share'"),
        (lambda d: _head(d, 1, 1).update(share=1.5), r"share must be in \(0, 1\]"),
        (
            lambda d: _head(d, 1, 1).update(recency_weight=-0.1),
            r"heads\[1\].recency_weight must be in",
        ),
        (
            lambda d: _head(d, 1, 1).update(forgetting_rate=-2),
            r"heads\[1\].forgetting_rate must be >= 0",
        ),
        (lambda d: _head(d, 1, 1).update(confidence=2), r"confidence must be in \[0, 1\]"),
        (
            lambda d: _head(d, 1, 0).update(window=1440),
            "the streaming windows take 1440 of the layer's 1440",
        ),
        (lambda d: d["layers"][3].pop("heads"), r"layers\[3\] is missing 'heads'"),
        (lambda d: d["layers"][3].update(heads="all"), "wrong type"),
        (lambda d: d.update(schema=SCHEMA), r"has 'heads', which needs schema 'hermes-policy/2'"),
        (lambda d: d.update(schema="hermes-policy/3"), "schema is 'hermes-policy/3'"),
        (lambda d: d["model"].update(num_heads=8), "8 query heads do not group onto"),
    ],
)
def test_malformed_head_entries_are_refused(mutate, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_dict(_broken(mutate))


def test_a_policy_for_other_kv_heads_is_refused_at_use():
    # the runtime checks the policy's model shape (HermesRetention.validate -> check_model);
    # the heads are validated against that shape on load, so a mismatch is caught there
    with pytest.raises(PolicyError, match="num_kv_heads=3"):
        per_head_policy().check_model(4, 9, 9, 48)


def test_save_refuses_an_invalid_per_head_policy(tmp_path):
    policy = per_head_policy()
    bad = replace(policy.layers[1], heads=policy.layers[1].heads[:2])
    with pytest.raises(PolicyError, match="heads has 2 entries"):
        replace(policy, layers=[policy.layers[0], bad, *policy.layers[2:]]).save(
            tmp_path / "p.json"
        )
    assert not (tmp_path / "p.json").exists()
