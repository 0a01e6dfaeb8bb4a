"""The evaluation runner and `hermes-probe eval` on the tiny LLaVA-OV over the synthetic benchmark.

The model is random, so its accuracy is whatever it is: these tests check files, counts,
fields, resume and failure handling, and that the lazily decoded stream asks every question
at the same point as :func:`stream_with_questions` on the whole decoded video.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hermes_cli.main import app
from tiny_llava_ov import tiny_llava_onevision
from typer.testing import CliRunner

from hermes_policy import StreamingSession
from hermes_policy.errors import HermesError
from hermes_policy.evaluation import evaluate
from hermes_policy.evaluation.prompts import format_prompt
from hermes_policy.evaluation.results import RESULTS_FILE, read_records
from hermes_policy.inputs.annotations import load_annotations
from hermes_policy.inputs.playback import TimedQuestion, stream_with_questions
from hermes_policy.inputs.synthetic_benchmark import write_synthetic_benchmark
from hermes_policy.inputs.video import read_video
from hermes_policy.models import load_adapter
from hermes_policy.retention.specs import rule_from_spec

runner = CliRunner()

# 6 frames of 9 tokens (+1 newline per chunk) against a budget of 40: HERMES compresses, and
# its guidance prompts read the conversation history, so question order and resume matter.
SETTINGS = {"budget": 40, "fps": 1.0, "chunk_frames": 2, "max_new_tokens": 3, "mc_max_new_tokens": 2}
CLI_SETTINGS = ["--budget", "40", "--fps", "1", "--chunk", "2", "--max-new-tokens", "3",
                "--mc-max-new-tokens", "2", "--device", "cpu", "--policy", "paper-default"]
VOLATILE = ("ttft_ms", "tpot_ms", "peak_memory_bytes")
FIELDS = {"video_id", "question_index", "task", "question", "choices", "answer", "answer_choice", "end_time",
          "duration", "need", "prediction", "parsed_choice", "unparseable", "correct", "score", "scored_by", "ttft_ms",
          "tpot_ms", "tokens_kept_min", "tokens_kept_max", "tokens_kept_mean", "peak_memory_bytes",
          "kv_cache_bytes", "frames_seen"}


def stable(records):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return tiny_llava_onevision(tmp_path_factory.mktemp("eval_llava"), layers=3)


@pytest.fixture(scope="module")
def adapter(llava_dir):
    return load_adapter(llava_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_synthetic_benchmark(tmp_path_factory.mktemp("eval_bench"), num_videos=2, num_frames=6,
                                     fps=1.0, height=64, width=64)


@pytest.fixture(scope="module")
def reference(llava_dir, bench, tmp_path_factory):
    """One uninterrupted run through the command line; the other tests compare with it."""
    out = tmp_path_factory.mktemp("eval_ref") / "out"
    result = runner.invoke(app, ["eval", "--model", str(llava_dir), "--annotations", str(bench),
                                 "--out", str(out), *CLI_SETTINGS])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_full_pipeline_writes_results_and_summary(reference, bench):
    out, output = reference
    records = read_records(out / RESULTS_FILE)
    entries = load_annotations(bench)
    assert len(records) == sum(len(e.questions) for e in entries) == 16
    assert [(r["video_id"], r["question_index"]) for r in records] == [
        (e.video_id, j) for e in entries for j in range(len(e.questions))]
    for record, question in zip(records, [q for e in entries for q in e.questions]):
        assert set(record) == FIELDS
        assert record["question"] == question.question and record["answer"] == question.answer
        assert record["choices"] == list(question.choices) and record["scored_by"] == "choice"
        assert record["answer_choice"] == "ABCD"[question.choices.index(question.answer)]
        assert isinstance(record["correct"], bool) and record["unparseable"] == (record["parsed_choice"] is None)
        assert record["ttft_ms"] > 0 and record["tokens_kept_max"] <= 40 and record["frames_seen"] >= 1
        assert record["duration"] == 6.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["answered"] == summary["selected_questions"] == 16 and summary["not_answered"] == 0
    assert summary["scored"] == 16 and summary["correct"] == sum(r["correct"] for r in records)
    assert set(summary["per_task"]) == {"color", "position", "count", "appear", "color_change"}
    assert sum(b["questions"] for b in summary["per_task"].values()) == 16
    assert summary["videomme_split"]["short"]["questions"] == 16
    assert summary["ttft_ms_mean"] > 0 and summary["failed_videos"] == []
    assert summary["config"]["policy"] == "paper-default" and summary["config"]["budget"] == 40
    assert json.loads((out / "config.json").read_text())["rule"] == "hermes"
    assert not list(out.glob("shards/*.jsonl"))
    assert "accuracy" in output and "answered 16 of 16 questions" in output and "wrote" in output
    needs = summary["by_need"]
    assert needs["perception"]["questions"] + needs["memory"]["questions"] == 16
    assert all(r["need"] in ("perception", "memory") for r in records)
    if needs["perception"]["questions"]:
        assert "perception (evidence within 4 s)" in output


def test_lazy_stream_asks_where_stream_with_questions_does(adapter, bench, reference):
    entry = load_annotations(bench)[1]
    video = read_video(entry.video_path, fps=1.0)
    session = StreamingSession(adapter, rule_from_spec("paper-default", adapter, 40), chunk_frames=2, fps=1.0)
    questions = [TimedQuestion(format_prompt(q), q.ask_after) for q in entry.questions]
    answers = stream_with_questions(session, video.frames, video.timestamps, questions, 2)
    stored = [r for r in read_records(reference[0] / RESULTS_FILE) if r["video_id"] == entry.video_id]
    assert [a.text for _, a in answers] == [r["prediction"] for r in stored]
    assert [a.frames_seen for _, a in answers] == [r["frames_seen"] for r in stored]


@pytest.mark.slow
def test_resume_after_limit_and_crash_equals_an_uninterrupted_run(adapter, llava_dir, bench, reference, tmp_path):
    out = tmp_path / "out"
    first = runner.invoke(app, ["eval", "--model", str(llava_dir), "--annotations", str(bench), "--out", str(out),
                                "--limit", "3", "--no-progress", *CLI_SETTINGS])
    assert first.exit_code == 0, first.output
    assert len(read_records(out / RESULTS_FILE)) == 3
    assert json.loads((out / "summary.json").read_text())["selected_questions"] == 3

    class Crash(Exception):
        pass

    def crash_after_two(record, seen=[]):  # noqa: B006 - counts across calls
        seen.append(record)
        if len(seen) == 2:
            raise Crash

    entries = load_annotations(bench)
    with pytest.raises(Crash):
        evaluate(adapter, "paper-default", entries, out, progress=False, on_record=crash_after_two, **SETTINGS)
    assert len(read_records(out / RESULTS_FILE)) == 5  # 3 + 2, in the middle of the first video

    result = evaluate(adapter, "paper-default", entries, out, progress=False, **SETTINGS)
    assert result.written == 11 and result.resume_mismatches == 0 and result.failed == []
    assert stable(read_records(out / RESULTS_FILE)) == stable(read_records(reference[0] / RESULTS_FILE))
    assert result.summary["answered"] == 16
    again = evaluate(adapter, "paper-default", entries, out, progress=False, **SETTINGS)
    assert again.written == 0  # nothing left: no video is even decoded


def test_missing_and_undecodable_videos_are_reported_and_the_run_goes_on(adapter, bench, tmp_path):
    good = load_annotations(bench)[0]
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video" * 100)
    colour = next(q for q in good.questions if q.task == "color")
    conversations = [
        {"question": colour.question, "choices": list(colour.choices), "answer": colour.answer,
         "end_time": colour.end_time, "task": "color"},
        {"question": "What is on screen?", "answer": "coloured shapes", "task": "describe"},
        {"question": "Anything else?", "end_time": 2.5},  # no reference: answered, not scored
    ]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps([
        {"video_id": "missing", "video_path": "nowhere.mp4", "duration": 6, "conversations": conversations[:1]},
        {"video_id": "good", "video_path": str(good.video_path), "duration": 6, "conversations": conversations},
        {"video_id": "broken", "video_path": "broken.mp4", "conversations": conversations[:2]},
    ]))
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", "--model", str(adapter.name_or_path), "--annotations", str(path),
                                 "--out", str(out), "--no-progress", *CLI_SETTINGS])
    assert result.exit_code == 0, result.output
    assert "skipped missing" in result.output and "skipped broken" in result.output
    assert "2 video(s) failed" in result.output
    records = read_records(out / RESULTS_FILE)
    assert [(r["video_id"], r["question_index"]) for r in records] == [("good", 0), ("good", 1), ("good", 2)]
    # question_index counts in time order: the question without end_time comes last
    assert [r["question"] for r in records] == ["What color is the " + colour.question.split()[-1],
                                                 "Anything else?", "What is on screen?"]
    unanswerable, open_ended = records[1], records[2]
    assert open_ended["scored_by"] == "f1" and isinstance(open_ended["correct"], bool)
    assert open_ended["parsed_choice"] is None and open_ended["unparseable"] is False
    assert unanswerable["correct"] is None and unanswerable["scored_by"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert [f["video_id"] for f in summary["failed_videos"]] == ["missing", "broken"]
    assert [f["unanswered"] for f in summary["failed_videos"]] == [1, 2]
    assert all(f["reason"] for f in summary["failed_videos"])
    assert (summary["selected_questions"], summary["answered"], summary["scored"]) == (6, 3, 2)
    assert summary["videomme_split"]["unknown_duration"] == 0

    shutil.copy(good.video_path, tmp_path / "nowhere.mp4")  # the missing video turns up
    rerun = runner.invoke(app, ["eval", "--model", str(adapter.name_or_path), "--annotations", str(path),
                                "--out", str(out), "--no-progress", *CLI_SETTINGS])
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads((out / "summary.json").read_text())
    assert [f["video_id"] for f in summary["failed_videos"]] == ["broken"] and summary["answered"] == 4
    assert [r["video_id"] for r in read_records(out / RESULTS_FILE)] == ["missing"] + ["good"] * 3


def _one_error_line(result):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines()
             if line.strip() and not line.startswith("Loading weights")]  # transformers' own bar
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_cli_errors_are_one_line(llava_dir, tiny_llama_dir, bench, reference, tmp_path):
    def run(annotations, model=llava_dir, out=tmp_path / "out", extra=()):
        return runner.invoke(app, ["eval", "--model", str(model), "--annotations", str(annotations),
                                   "--out", str(out), *CLI_SETTINGS, *extra])

    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    assert "is empty" in _one_error_line(run(empty))
    (tmp_path / "none.json").write_text("[]")
    assert "holds no videos" in _one_error_line(run(tmp_path / "none.json"))
    malformed = tmp_path / "malformed.json"
    malformed.write_text(json.dumps([{"video_id": "v", "video_path": "a.mp4", "conversations": [{"answer": "x"}]}]))
    assert "conversation 0 is missing 'question'" in _one_error_line(run(malformed))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"video_id": "v", "video_path": "a.mp4", "conversations": [
        {"question": "Colour?", "choices": ["red", "blue"], "answer": "green"}]}]))
    line = _one_error_line(run(wrong))
    assert "video_id 'v'" in line and "answer 'green' is not among the choices" in line
    assert "unknown judge" in _one_error_line(run(bench, extra=["--judge", "gpt"]))
    assert "text-only" in _one_error_line(run(bench, model=tiny_llama_dir))
    line = _one_error_line(run(bench, out=reference[0], extra=["--budget", "64"]))
    assert "another configuration" in line and "budget: 40 -> 64" in line


@pytest.mark.parametrize(
    "rule,options",
    [("window", {"frames": 2}), ("retrieval", {"retrieve_chunks": 1})],
)
def test_eval_runs_the_question_time_rules_and_resumes_only_with_their_options(adapter, bench, tmp_path, rule, options):
    out = tmp_path / "out"
    result = evaluate(adapter, rule, load_annotations(bench), out, progress=False, rule_options=options, **SETTINGS)
    assert result.summary["answered"] == 16 and result.summary["failed_videos"] == []
    config = json.loads((out / "config.json").read_text())
    assert config["rule"] == rule and config["rule_options"] == options
    manifest = json.loads((out / "summary.json").read_text())["manifest"]
    assert manifest["rule"]["name"] == rule and all(manifest["rule"][k] == v for k, v in options.items())
    assert manifest["adapter"] == "LlavaOnevisionAdapter" and manifest["fps"] == SETTINGS["fps"]
    assert manifest["judge"] == {"judge": "f1", "judge_threshold": 0.5} and "size" in manifest["frames"]
    records = read_records(out / RESULTS_FILE)
    if rule == "window":  # the last (up to) two frames, 9 tokens each, +1 newline per piece of a chunk
        for r in records:
            window = range(max(0, r["frames_seen"] - 2), r["frames_seen"])
            pieces = len({frame // SETTINGS["chunk_frames"] for frame in window})
            assert r["tokens_kept_max"] == 9 * len(window) + pieces
    changed = {key: value + 1 for key, value in options.items()}
    with pytest.raises(HermesError, match="rule_options"):
        evaluate(adapter, rule, load_annotations(bench), out, progress=False, rule_options=changed, **SETTINGS)
