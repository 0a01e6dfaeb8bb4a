"""The run manifest: its pure pieces, and its presence at the top of every results file."""

from __future__ import annotations

import json

from hermes_cli.main import app
from typer.testing import CliRunner

from hermes_policy.evaluation.manifest import (
    model_identity,
    package_versions,
    policy_hash,
    rule_settings,
    run_manifest,
)
from hermes_policy.policy import ModelInfo, paper_default
from hermes_policy.retention import HermesRetention, WindowRetention

runner = CliRunner()


def test_model_identity_hashes_a_folder_by_its_config_and_file_sizes(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    first = model_identity(str(tmp_path))
    assert first["path"] == str(tmp_path.resolve()) and len(first["hash"]) == 16
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)  # same size: same identity
    assert model_identity(str(tmp_path)) == first
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert model_identity(str(tmp_path))["hash"] != first["hash"]
    assert model_identity("llava-hf/llava-onevision-qwen2-7b-ov-hf") == {"id": "llava-hf/llava-onevision-qwen2-7b-ov-hf"}


def test_policy_hash_follows_the_policy_and_rule_settings_name_it():
    info = ModelInfo("m", "A", 4, 2, 2, 8)
    small, large = paper_default(info, budget=64), paper_default(info, budget=128)
    assert policy_hash(small) == policy_hash(paper_default(info, budget=64)) != policy_hash(large)
    settings = rule_settings(HermesRetention(policy=small))
    assert settings["name"] == "hermes" and settings["budget"] == {"min": 64, "max": 64}
    assert settings["policy_hash"] == policy_hash(small) and settings["policy_source"] == "paper-default"
    assert rule_settings(WindowRetention(frames=3)) == {"name": "window", "reindex": "never", "frames": 3, "reuse": True}


def test_run_manifest_of_an_adapter(tiny_adapter):
    manifest = run_manifest(tiny_adapter, WindowRetention(), fps=2.0, chunk_frames=4, command=["x"], extra_fact=1)
    assert manifest["adapter"] == "CausalLMAdapter" and manifest["dtype"] == "float32"
    assert manifest["frames"] == {"tokens_per_frame": tiny_adapter.tokens_per_frame}
    assert manifest["fps"] == 2.0 and manifest["chunk_frames"] == 4 and manifest["rule"]["frames"] == 4
    assert manifest["command"] == ["x"] and manifest["extra_fact"] == 1 and manifest["device"].startswith("cpu")
    assert manifest["packages"]["torch"] and "T" in manifest["date"]
    assert package_versions(("surely-not-installed-package",)) == {"surely-not-installed-package": None}


def test_stream_json_carries_the_manifest(tiny_llama_dir, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, [
        "stream", "--model", str(tiny_llama_dir), "--tokens-per-frame", "8", "--device", "cpu", "--frames", "8",
        "--chunk", "4", "--policy", "fifo", "--budget", "32", "--ask", "now?", "--max-new-tokens", "2",
        "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.read_text())["manifest"]
    assert manifest["rule"] == {"name": "fifo", "reindex": "eager", "budget": 32}
    assert manifest["chunk_frames"] == 4 and manifest["model"]["path"] == str(tiny_llama_dir.resolve())
    assert manifest["command"][0] == "hermes-probe"
