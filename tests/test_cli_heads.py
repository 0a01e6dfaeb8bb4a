"""`hermes-probe analyze --per-head`, `show` of a schema-2 policy, and `export` (DuoAttention
pattern and head budgets), end to end, with their errors."""

from __future__ import annotations

import json

import numpy as np
from hermes_cli.main import app
from test_policy_heads import SMOL, per_head_policy
from typer.testing import CliRunner

from hermes_policy.policy import SCHEMA_V2, Policy, paper_default

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_export_writes_the_exact_duo_attention_pattern(tmp_path):
    policy = per_head_policy().save(tmp_path / "policy.json")
    out = tmp_path / "pattern" / "full_attention_heads.tsv"
    result = run("export", "--policy", policy, "--duo-attention", out)
    assert result.exit_code == 0, result.output
    # streaming heads 0; the others 1 - recency weight (anchor w 0.1, retrieval w 0.3 / 0.2, anchor w 0)
    assert out.read_text() == "0\t0\t0\n0\t0.9\t0.7\n1\t1\t0\n0.8\t0.8\t0.8\n"
    # what kvpress does with it: loadtxt, one row per layer, one column per KV head
    scores = np.loadtxt(out, dtype=float, delimiter="\t")
    assert scores.shape == (SMOL.num_layers, SMOL.num_kv_heads)
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temporary file left


def test_export_of_a_per_layer_policy_repeats_the_layer_and_says_so(tmp_path):
    policy = paper_default(SMOL, budget=480).save(tmp_path / "policy.json")
    out = tmp_path / "pattern.tsv"
    budgets = tmp_path / "budgets.json"
    result = run("export", "--policy", policy, "--duo-attention", out, "--kvpress-budgets", budgets)
    assert result.exit_code == 0, result.output
    assert "every KV head of a layer gets the layer's values" in result.output
    # paper default on 4 layers: sensory w 1, working w 0.75 and 0.15, long-term w 0
    assert out.read_text() == "0\t0\t0\n0.25\t0.25\t0.25\n0.85\t0.85\t0.85\n1\t1\t1\n"
    data = json.loads(budgets.read_text())
    assert data["format"] == "hermes-head-budgets/1" and data["source"]["per_head"] is False
    assert data["tokens"] == [[480] * 3] * 4 and data["roles"] == [[None] * 3] * 4


def test_export_head_budgets_of_a_per_head_policy(tmp_path):
    policy = per_head_policy().save(tmp_path / "policy.json")
    budgets = tmp_path / "budgets.json"
    result = run("export", "--policy", policy, "--kvpress-budgets", budgets)
    assert result.exit_code == 0, result.output
    data = json.loads(budgets.read_text())
    assert data["source"] == {
        "policy": str(policy),
        "schema": SCHEMA_V2,
        "per_head": True,
        "note": "per-KV-head entries of the policy",
    }
    assert data["tokens"][1] == [240, 720, 480] and data["layer_tokens"] == [288, 1440, 1440, 1440]
    assert data["roles"][1] == ["streaming", "anchor", "retrieval"]
    assert data["window"][2] == [False, False, True]


def test_export_errors_are_one_line(tmp_path):
    nothing = run("export", "--policy", tmp_path / "p.json")
    assert nothing.exit_code == 1 and "nothing to export" in nothing.output
    missing = run("export", "--policy", tmp_path / "p.json", "--duo-attention", tmp_path / "o.tsv")
    assert missing.exit_code == 1 and "policy file not found" in missing.output
    bad = tmp_path / "bad.json"
    data = per_head_policy().to_dict()
    data["layers"][1]["heads"][2]["role"] = "echo"
    bad.write_text(json.dumps(data))
    refused = run("export", "--policy", bad, "--duo-attention", tmp_path / "o.tsv")
    assert refused.exit_code == 1 and "role is 'echo'" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "o.tsv").exists()
    folder = run("export", "--policy", bad, "--duo-attention", tmp_path)
    assert folder.exit_code == 1 and "is a folder" in folder.output


def test_show_prints_the_heads_of_a_schema_2_policy(tmp_path):
    policy = per_head_policy().save(tmp_path / "policy.json")
    shown = run("show", policy)
    assert shown.exit_code == 0, shown.output
    assert (
        "per KV head (hermes-policy/2; 3 KV heads per layer, each serving 3 query heads)"
        in shown.output
    )
    assert "5 streaming, 4 retrieval, 3 anchor" in shown.output
    assert "window 240" in shown.output and "share 0.60 = 720" in shown.output
    v1 = run("show", paper_default(SMOL).save(tmp_path / "v1.json"))
    assert v1.exit_code == 0 and "per KV head" not in v1.output


def test_analyze_per_head_then_reanalyze_and_show(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = run(
        "analyze",
        "--model",
        tiny_llama_dir,
        "--synthetic",
        "--frames",
        "16",
        "--tokens-per-frame",
        8,
        "--chunk",
        4,
        "--fifo-budget",
        64,
        "--policy-budget",
        32,
        "--device",
        "cpu",
        "--out",
        out,
        "--per-head",
    )
    assert result.exit_code == 0, result.output
    policy = Policy.load(out / "policy.json")
    assert policy.schema == SCHEMA_V2
    assert all(len(layer.heads) == 2 for layer in policy.layers)  # the tiny Llama has 2 KV heads
    assert len(policy.provenance["probe"]["heads"]["recency"]) == 3
    assert (out / "figures" / "head_roles.png").is_file()
    assert "## Per KV head" in (out / "report.md").read_text()
    assert "per KV head" in run("show", out / "policy.json").output

    again = tmp_path / "again"
    redo = run(
        "analyze",
        "--from-profiles",
        out / "profiles.npz",
        "--out",
        again,
        "--no-figures",
        "--policy-budget",
        32,
        "--per-head",
    )
    assert redo.exit_code == 0, redo.output
    assert Policy.load(again / "policy.json").layers[1].heads == policy.layers[1].heads
    plain = run(
        "analyze",
        "--from-profiles",
        out / "profiles.npz",
        "--out",
        tmp_path / "plain",
        "--no-figures",
        "--policy-budget",
        32,
    )
    assert (
        plain.exit_code == 0
        and Policy.load(tmp_path / "plain" / "policy.json").schema == "hermes-policy/1"
    )


def test_per_head_and_calibrate_are_refused_together(tmp_path):
    result = run("analyze", "--per-head", "--calibrate", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "--per-head and --calibrate" in result.output
