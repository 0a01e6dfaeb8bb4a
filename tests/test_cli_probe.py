"""`hermes-probe analyze` and `show` end to end on tiny models, and their errors."""

from __future__ import annotations

import json

from hermes_cli.main import app
from typer.testing import CliRunner

from hermes_policy.policy import Policy

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_analyze_then_show_then_reanalyze(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = run("analyze", "--model", tiny_llama_dir, "--synthetic", "--frames", "16", "--tokens-per-frame", 8,
                 "--chunk", 4, "--fifo-budget", 64, "--policy-budget", 64, "--device", "cpu", "--out", out,
                 "--no-figures")
    assert result.exit_code == 0, result.output
    policy = Policy.load(out / "policy.json")
    assert policy.provenance["source"] == "probe" and policy.model.tokens_per_frame == 8
    assert len(policy.provenance["probe"]["metrics"]["periodicity"]) == 3
    assert (out / "profiles.npz").is_file() and (out / "report.md").read_text().startswith("# hermes-probe report")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["layers"]) == 3
    manifest = metrics["manifest"]
    assert manifest["mode"] == "probe" and manifest["rule"]["name"] == "fifo" and manifest["rule"]["budget"] == 64
    assert manifest["chunk_frames"] == 4 and manifest["probe"]["fifo_budget"] == 64 and len(manifest["streams"]) == 1

    shown = run("show", out / "policy.json")
    assert shown.exit_code == 0 and "tiers: sensory" in shown.output

    # the analysis can be redone from the saved profile alone
    again = tmp_path / "again"
    redo = run("analyze", "--from-profiles", out / "profiles.npz", "--out", again, "--no-figures",
               "--policy-budget", 64)
    assert redo.exit_code == 0, redo.output
    assert Policy.load(again / "policy.json").tiers == policy.tiers
    assert json.loads((again / "metrics.json").read_text())["manifest"]["model"]["tokens_per_frame"] == 8


def test_existing_policy_is_not_overwritten(tiny_llama_dir, tmp_path):
    (tmp_path / "policy.json").write_text("keep me")
    result = run("analyze", "--model", tiny_llama_dir, "--tokens-per-frame", 8, "--device", "cpu",
                 "--out", tmp_path)
    assert result.exit_code == 1 and "--force" in result.output
    assert (tmp_path / "policy.json").read_text() == "keep me"


def test_text_model_cannot_watch_videos(tiny_llama_dir, tmp_path):
    result = run("analyze", "--model", tiny_llama_dir, "--videos", tmp_path, "--device", "cpu",
                 "--out", tmp_path / "o")
    assert result.exit_code == 1 and "text-only" in result.output


def test_video_model_with_more_tokens_per_frame_than_it_has(tmp_path):
    from tiny_llava_ov import tiny_llava_onevision

    folder = tiny_llava_onevision(tmp_path / "llava")
    result = run("analyze", "--model", folder, "--tokens-per-frame", 500, "--device", "cpu",
                 "--out", tmp_path / "o")
    assert result.exit_code == 1 and "encodes one frame as" in result.output


def test_two_inputs_and_bad_annotations(tiny_llama_dir, tmp_path):
    both = run("analyze", "--videos", tmp_path, "--synthetic", "--out", tmp_path / "o")
    assert both.exit_code == 1 and "choose one input" in both.output
    from tiny_llava_ov import tiny_llava_onevision

    folder = tiny_llava_onevision(tmp_path / "llava")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps([{"video_id": "v", "video_path": "v.mp4", "conversations": [{"answer": "x"}]}]))
    result = run("analyze", "--model", folder, "--annotations", ann, "--device", "cpu", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "missing 'question'" in result.output


def test_show_rejects_a_malformed_policy(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"schema": "hermes-policy/1"}))
    result = run("show", path)
    assert result.exit_code == 1 and "missing 'model'" in result.output


def test_analyze_calibrate_writes_both_policies(tiny_llama_dir, tmp_path):
    out = tmp_path / "cal"
    result = run("analyze", "--model", tiny_llama_dir, "--synthetic", "--frames", "8", "--tokens-per-frame", 16,
                 "--chunk", 4, "--fifo-budget", 128, "--policy-budget", 32, "--device", "cpu", "--out", out,
                 "--no-figures", "--calibrate")
    assert result.exit_code == 0, result.output
    calibrated, heuristic = Policy.load(out / "policy.json"), Policy.load(out / "policy-heuristic.json")
    assert heuristic.provenance["source"] == "probe"
    recall_only = Policy.load(out / "policy-recall.json")
    assert recall_only.provenance["source"] == "calibrated"
    assert recall_only.provenance["calibration"]["objective_name"] == "value"
    assert calibrated.provenance["source"] == "calibrated"
    made = calibrated.provenance["calibration"]
    assert made["calibration_streams"] == [{"seed": 0, "frames": 8}, {"seed": 1, "frames": 8}]
    assert made["heldout_streams"] == [{"seed": 2, "frames": 8}, {"seed": 3, "frames": 12}]
    assert made["runtime_search"]["kl"] <= made["runtime_search"]["start_kl"]
    assert {"fifo", "hermes (calibrated)", "hermes (recall-calibrated)"} <= set(made["heldout_kl"]["kl"])
    assert sum(layer.budget for layer in calibrated.layers) <= 32 * 3
    report = json.loads((out / "calibration.json").read_text())
    assert {"fifo", "oracle", "hermes (calibrated)"} <= set(report["heldout"]["0.25"])
