"""`hermes-probe fidelity` on a tiny model: the JSON's schema, and resuming a run."""

from __future__ import annotations

import json

from hermes_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()

ROW_KEYS = {"rule", "policy", "task", "budget", "seed", "n", "accuracy", "kl", "logp"}
MANIFEST_KEYS = {"model", "adapter", "dtype", "tokens_per_frame", "chunk_frames", "rules", "budgets", "policies",
                 "packages", "device", "command", "date", "seeds", "tasks"}


def run(model, out, seeds):
    return runner.invoke(app, [str(a) for a in (
        "fidelity", "--model", model, "--json", out, "--tokens-per-frame", 16, "--frames", 8, "--chunk", 4,
        "--budgets", "1/2", "--seeds", seeds, "--rules", "full,fifo", "--policy", "paper=paper-default",
        "--copy-probes", 2, "--kv-facts", 2, "--device", "cpu")])


def test_fidelity_json_schema_and_resume(tiny_llama_dir, tmp_path):
    out = tmp_path / "fidelity.json"
    first = run(tiny_llama_dir, out, "0")
    assert first.exit_code == 0, first.output
    data = json.loads(out.read_text())
    assert set(data["manifest"]) >= MANIFEST_KEYS
    assert data["manifest"]["budgets"] == [64]
    rows = data["rows"]
    assert {(r["rule"], r["policy"], r["task"]) for r in rows} == {
        (rule, policy, task) for rule, policy in (("full", None), ("fifo", None), ("hermes", "paper"))
        for task in ("kv", "copy", "facts")}
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["n"] == len(row["values"]["accuracy"]) > 0
        assert (row["budget"] is None) == (row["rule"] == "full")
        if row["rule"] == "full":
            assert row["kl"] == 0.0
        else:
            assert row["kl"] >= 0.0
    assert {e["label"] for e in data["summary"]} == {"full", "fifo", "hermes (paper)"}

    # a rerun skips the cells already there (a marked value survives) and adds the new seed
    for row in data["rows"]:
        if row["rule"] == "fifo":
            row["accuracy"] = 123.0
    out.write_text(json.dumps(data))
    second = run(tiny_llama_dir, out, "0,1")
    assert second.exit_code == 0, second.output
    again = json.loads(out.read_text())["rows"]
    assert [r["accuracy"] for r in again if r["rule"] == "fifo" and r["seed"] == 0] == [123.0] * 3
    assert len([r for r in again if r["seed"] == 1]) == 9
    assert len(again) == 18


def test_fidelity_rejects_unknown_tasks(tiny_llama_dir, tmp_path):
    result = runner.invoke(app, ["fidelity", "--model", str(tiny_llama_dir), "--json", str(tmp_path / "x.json"),
                                 "--tasks", "nope"])
    assert result.exit_code == 1 and "unknown tasks" in result.output


def test_fidelity_on_a_video_model_scores_the_scene_probes(tmp_path):
    """A video model streams the shapes video and is scored on its scene questions; the text
    tasks are refused for it with one line."""
    from tiny_llava_ov import tiny_llava_onevision

    from hermes_policy.inputs.fidelity_tasks import video_fidelity_stream

    folder = tiny_llava_onevision(tmp_path / "llava", layers=3)
    out = tmp_path / "video.json"
    result = runner.invoke(app, ["fidelity", "--model", str(folder), "--json", str(out), "--frames", "12",
                                 "--chunk", "4", "--budgets", "1/3", "--seeds", "5", "--rules", "full,fifo",
                                 "--policy", "paper=paper-default", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["manifest"]["tasks"] == ["scene"]
    rows = data["rows"]
    assert {(r["rule"], r["task"]) for r in rows} == {("full", "scene"), ("fifo", "scene"), ("hermes", "scene")}
    expected = video_fidelity_stream(12, 5, lambda text: [0])
    for row in rows:
        assert row["n"] == len(expected.probes) == 6
        assert row["positions"] == [p.position for p in expected.probes]
        assert all(a in (0.0, 1.0) for a in row["values"]["accuracy"])  # multiple choice
    assert "middle" in rows[0]["positions"] and "recent" in rows[0]["positions"]

    refused = runner.invoke(app, ["fidelity", "--model", str(folder), "--json", str(tmp_path / "x.json"),
                                  "--tasks", "kv", "--device", "cpu"])
    assert refused.exit_code == 1 and "its fidelity tasks are scene" in refused.output
