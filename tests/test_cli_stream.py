"""`hermes-probe stream` and the question-timing driver behind it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hermes_cli.main import app
from typer.testing import CliRunner

from hermes_policy import StreamingSession
from hermes_policy.errors import PolicyError, StreamError
from hermes_policy.inputs.playback import TimedQuestion, stream_with_questions
from hermes_policy.policy import ModelInfo, paper_default
from hermes_policy.retention import FifoRetention, HermesRetention
from hermes_policy.retention.specs import rule_from_spec

runner = CliRunner()


def test_questions_are_asked_at_their_time(tiny_adapter):
    frames = torch.randint(0, 250, (10, tiny_adapter.tokens_per_frame), generator=torch.Generator().manual_seed(0))
    times = np.arange(10, dtype=float)
    session = StreamingSession(tiny_adapter, chunk_frames=4)
    questions = [TimedQuestion("late?", math.inf), TimedQuestion("at 2.5?", 2.5), TimedQuestion("at 6?", 6.0)]
    results = stream_with_questions(session, frames, times, questions, max_new_tokens=2)
    seen = [(q.question, a.frames_seen) for q, a in results]
    assert seen == [("at 2.5?", 3), ("at 6?", 7), ("late?", 10)]


def test_a_question_before_the_first_frame_is_an_error(tiny_adapter):
    frames = torch.zeros(4, tiny_adapter.tokens_per_frame, dtype=torch.long)
    session = StreamingSession(tiny_adapter, chunk_frames=2)
    with pytest.raises(StreamError, match="before any frame"):
        stream_with_questions(session, frames, np.arange(4, dtype=float) + 5, [TimedQuestion("early?", 1.0)])


def test_rule_from_spec(tiny_adapter, tmp_path):
    assert isinstance(rule_from_spec("fifo", tiny_adapter, 64), FifoRetention)
    hermes = rule_from_spec("paper-default", tiny_adapter, 64)
    assert isinstance(hermes, HermesRetention) and hermes.budget_of(0) == 64
    path = paper_default(ModelInfo.of(tiny_adapter), budget=32).save(tmp_path / "p.json")
    assert rule_from_spec(str(path), tiny_adapter, None).budget_of(2) == 32  # the file's own
    assert rule_from_spec(str(path), tiny_adapter, 64).budget_of(2) == 64  # an explicit override
    with pytest.raises(PolicyError, match="not found"):
        rule_from_spec(str(tmp_path / "missing.json"), tiny_adapter, 64)


def test_stream_command_writes_answers(tiny_llama_dir, tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, [
        "stream", "--model", str(tiny_llama_dir), "--tokens-per-frame", "8", "--device", "cpu",
        "--frames", "12", "--chunk", "4", "--budget", "32", "--policy", "paper-default",
        "--ask", "first?", "--at", "3", "--ask", "last?", "--max-new-tokens", "3", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["question"] for r in data["answers"]] == ["first?", "last?"]
    assert data["answers"][0]["frames_seen"] == 4 and data["answers"][1]["frames_seen"] == 12
    assert all(max(r["tokens_kept"]) <= 32 for r in data["answers"])
    assert data["budget"] == 32
    assert "guidance passes" in result.output


def test_stream_command_errors(tiny_llama_dir, tmp_path):
    base = ["stream", "--model", str(tiny_llama_dir), "--tokens-per-frame", "8", "--device", "cpu"]
    wrong = paper_default(ModelInfo("other", "X", 28, 28, 4, 196), budget=4000).save(tmp_path / "other.json")
    cases = [
        (["--policy", str(wrong), "--ask", "q"], "num_layers=28"),
        (["--policy", "fifo", "--budget", "4", "--ask", "q"], "smaller than one frame"),
        (["--video", str(tmp_path), "--ask", "q"], "text-only"),
        (["--at", "3"], "each --at needs its --ask"),
    ]
    (tmp_path / "bad.json").write_text("{")
    cases.append((["--policy", str(tmp_path / "bad.json"), "--ask", "q"], "not valid JSON"))
    for extra, message in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 1, (extra, result.output)
        assert message in result.output, (extra, result.output)


@pytest.mark.parametrize(
    "options,tokens_seen",
    [
        (["--policy", "window", "--window-frames", "2"], {16}),  # 2 frames of 8 tokens
        # the 16-token GPU window (frames 10-11) plus one chunk per layer: a whole one of 32
        # tokens, or the evicted half of the newest chunk (frames 8-9)
        (["--policy", "retrieval", "--budget", "16", "--retrieve-chunks", "1", "--host-budget-gb", "0.01"], {32, 48}),
    ],
)
def test_stream_command_runs_the_question_time_rules(tiny_llama_dir, tmp_path, options, tokens_seen):
    out = tmp_path / "r.json"
    result = runner.invoke(app, [
        "stream", "--model", str(tiny_llama_dir), "--tokens-per-frame", "8", "--device", "cpu",
        "--frames", "12", "--chunk", "4", *options, "--ask", "last?", "--max-new-tokens", "2", "--json", str(out),
    ])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(out.read_text())["answers"]
    assert set(record["tokens_kept"]) <= tokens_seen


def test_rule_from_spec_passes_only_the_rules_own_options(tiny_adapter):
    assert rule_from_spec("window", tiny_adapter, 64, frames=3, retrieve_chunks=2).frames == 3
    assert rule_from_spec("fifo", tiny_adapter, 64, frames=3).budget == 64
