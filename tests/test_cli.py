"""The `hermes-probe` command line: real runs on tiny models, and one-line errors."""

from __future__ import annotations

import json

from hermes_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def test_demo_streams_and_answers(tiny_llama_dir, tmp_path):
    out = tmp_path / "demo.json"
    result = runner.invoke(
        app,
        ["demo", "--model", str(tiny_llama_dir), "--frames", "6", "--tokens-per-frame", "8",
         "--chunk", "3", "--rule", "fifo", "--budget", "16", "--device", "cpu", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["rule"] == "fifo" and len(data["answers"]) >= 1
    assert all(a["tokens_kept"] == [16, 16, 16] for a in data["answers"])
    assert "tokens kept per layer" in result.output


def test_demo_on_a_video_model(tmp_path):
    from tiny_llava_ov import tiny_llava_onevision

    folder = tiny_llava_onevision(tmp_path / "llava")
    out = tmp_path / "demo.json"
    result = runner.invoke(
        app, ["demo", "--model", str(folder), "--frames", "4", "--chunk", "2", "--device", "cpu",
              "--question", "What color is the square?", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    answers = json.loads(out.read_text())["answers"]
    assert [a["question"] for a in answers] == ["What color is the square?"]
    assert answers[0]["frames_seen"] == 4


def test_missing_model_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["demo", "--model", str(tmp_path / "missing"), "--device", "cpu"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "not found" in lines[0]


def test_budget_below_a_frame_is_refused(tiny_llama_dir):
    result = runner.invoke(
        app, ["demo", "--model", str(tiny_llama_dir), "--tokens-per-frame", "8", "--rule", "fifo",
              "--budget", "4", "--device", "cpu"],
    )
    assert result.exit_code == 1
    assert "smaller than one frame" in result.output


def test_unknown_rule_is_refused(tiny_llama_dir):
    result = runner.invoke(app, ["demo", "--model", str(tiny_llama_dir), "--rule", "magic", "--device", "cpu"])
    assert result.exit_code == 1 and "unknown retention rule" in result.output
