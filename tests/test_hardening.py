"""Issue 31: what a new user and a bad-input campaign found, one test per finding.

Frame rates capped at the source rate, lazy decoding in `stream`, `--budget` applied to a
policy file and recorded, a note when nothing was compressed, stream identity and the
stream list in `analyze`, `--force` clearing old outputs first, `eval` failing when every
video failed, `--json -`, one key name for answers, the annotation format documented in the
project, fast start-up, progress, and help texts that agree with themselves.
(Bad inputs are in test_bad_inputs.py.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hermes_cli.main import app
from typer.testing import CliRunner

from hermes_policy.inputs.video_writing import write_video
from hermes_policy.policy import ModelInfo, paper_default

runner = CliRunner()
ROOT = Path(__file__).parent.parent
CLIP_FPS = 4.0
CLIP_FRAMES = 12


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3 s clip at 4 fps, 64x64, every frame a different grey level."""
    frames = np.stack([np.full((64, 64, 3), 10 * i, dtype=np.uint8) for i in range(CLIP_FRAMES)])
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, CLIP_FPS)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_llava_ov import tiny_llava_onevision

    return tiny_llava_onevision(tmp_path_factory.mktemp("llava"), layers=3)


def tiny_stream(model: Path, *extra: str) -> list[str]:
    return ["stream", "--model", str(model), "--tokens-per-frame", "8", "--device", "cpu", "--frames", "12",
            "--chunk", "4", "--max-new-tokens", "2", "--ask", "what?", *extra]


# -- start-up ---------------------------------------------------------------------------------
def test_help_version_and_show_import_neither_torch_nor_transformers(tmp_path: Path) -> None:
    policy = paper_default(ModelInfo("m", "LlamaForCausalLM", 4, 2, 1, 8), budget=32).save(tmp_path / "p.json")
    code = f"""
import sys
from hermes_cli.main import app
for args in (["--help"], ["version"], ["show", {str(policy)!r}], ["stream", "--help"]):
    try:
        app(args, prog_name="hermes-probe")
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
heavy = sorted(m for m in ("torch", "transformers", "triton") if m in sys.modules)
print("HEAVY", heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout[-400:]


# -- frame rates ------------------------------------------------------------------------------
@pytest.mark.parametrize("fps", [1000.0, 1e9, math.inf])
def test_runaway_frame_rates_are_capped_at_the_source_rate(clip: Path, fps: float) -> None:
    from hermes_policy.inputs.video import iter_video_chunks, read_video, source_rate

    assert source_rate(clip) == pytest.approx(CLIP_FPS)
    video = read_video(clip, fps=fps, cap_at_source_rate=True)
    assert len(video) == CLIP_FRAMES
    assert len(set(video.timestamps.tolist())) == CLIP_FRAMES  # no repeated frames
    chunks = list(iter_video_chunks(clip, fps, 5, cap_at_source_rate=True))
    assert sum(len(c) for c in chunks) == CLIP_FRAMES


def test_stream_caps_fps_says_so_and_decodes_lazily(llava_dir: Path, clip: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import hermes_policy.inputs.video as video_module
    from hermes_policy.session import StreamingSession

    decoded = 0
    decoded_at_first_ingest: list[int] = []
    original_frames = video_module._sampled_frames
    original_add = StreamingSession.add_frames

    def counting(*args, **kwargs):
        nonlocal decoded
        for item in original_frames(*args, **kwargs):
            decoded += 1
            yield item

    def add_frames(self, frames, timestamps=None):
        if not decoded_at_first_ingest:
            decoded_at_first_ingest.append(decoded)
        return original_add(self, frames, timestamps)

    monkeypatch.setattr(video_module, "_sampled_frames", counting)
    monkeypatch.setattr(StreamingSession, "add_frames", add_frames)
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["stream", "--model", str(llava_dir), "--device", "cpu", "--video", str(clip),
                                 "--fps", "40", "--chunk", "2", "--policy", "fifo", "--budget", "40",
                                 "--ask", "what?", "--max-new-tokens", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    answers = json.loads(out.read_text())["answers"]
    assert answers[0]["frames_seen"] == CLIP_FRAMES  # 4 fps, not 40
    assert "above the rate" in result.output and "sampling at 4 fps" in result.output
    # the first chunk went to the model when at most two chunks had been decoded
    assert decoded == CLIP_FRAMES and decoded_at_first_ingest[0] <= 4


# -- budgets ----------------------------------------------------------------------------------
def test_budget_overrides_a_policy_file_and_is_recorded(tiny_llama_dir: Path, tmp_path: Path) -> None:
    policy = paper_default(ModelInfo("tiny", "LlamaForCausalLM", 3, 4, 2, 8), budget=64).save(tmp_path / "p.json")
    own, override = tmp_path / "own.json", tmp_path / "override.json"
    result = runner.invoke(app, tiny_stream(tiny_llama_dir, "--policy", str(policy), "--json", str(own)))
    assert result.exit_code == 0, result.output
    assert json.loads(own.read_text())["budget"] == 64
    result = runner.invoke(app, tiny_stream(tiny_llama_dir, "--policy", str(policy), "--budget", "24",
                                            "--json", str(override)))
    assert result.exit_code == 0, result.output
    data = json.loads(override.read_text())
    assert data["budget"] == 24
    assert all(max(a["tokens_kept"]) <= 24 for a in data["answers"])
    assert "--budget 24 overrides" in result.output


def test_a_run_without_compression_says_so(tiny_llama_dir: Path) -> None:
    fits = runner.invoke(app, tiny_stream(tiny_llama_dir, "--policy", "fifo", "--budget", "4000"))
    assert fits.exit_code == 0, fits.output
    assert "no compression happened" in fits.output
    bounded = runner.invoke(app, tiny_stream(tiny_llama_dir, "--policy", "fifo", "--budget", "32"))
    assert bounded.exit_code == 0 and "no compression happened" not in bounded.output


# -- outputs ----------------------------------------------------------------------------------
def test_json_dash_is_standard_output_and_both_commands_say_answers(
        tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for args in (tiny_stream(tiny_llama_dir, "--json", "-"),
                 ["demo", "--model", str(tiny_llama_dir), "--frames", "6", "--tokens-per-frame", "8", "--chunk",
                  "3", "--rule", "fifo", "--budget", "16", "--device", "cpu", "--json", "-"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)  # only the JSON on stdout; tables went to stderr
        assert data["answers"] and "results" not in data
        assert "budget" in data and "compressions" in data
    assert not (tmp_path / "-").exists()


def test_demo_runs_the_hermes_rule(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.json"
    result = runner.invoke(app, ["demo", "--model", str(tiny_llama_dir), "--frames", "8", "--tokens-per-frame", "8",
                                 "--chunk", "4", "--rule", "hermes", "--budget", "32", "--device", "cpu",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["rule"] == "hermes" and data["budget"] == 32
    policy = paper_default(ModelInfo("tiny", "LlamaForCausalLM", 3, 4, 2, 8), budget=40).save(tmp_path / "p.json")
    result = runner.invoke(app, ["demo", "--model", str(tiny_llama_dir), "--frames", "8", "--tokens-per-frame", "8",
                                 "--chunk", "4", "--rule", str(policy), "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["budget"] == 40  # the file's own budget, not demo's default


# -- analyze: identity, stream list, --force ----------------------------------------------------
def test_the_same_video_by_another_path_is_one_stream(clip: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from hermes_probe.sources import video_streams

    monkeypatch.chdir(clip.parent.parent)
    relative = Path(clip.parent.name) / clip.name
    (absolute,) = video_streams(clip.resolve(), 0.5)
    (by_relative,) = video_streams(relative, 0.5)
    link = tmp_path / "link.mp4"
    link.symlink_to(clip)
    (by_link,) = video_streams(link, 0.5)
    assert absolute.key == by_relative.key == by_link.key
    assert absolute.identity["size"] == clip.stat().st_size
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(clip.read_bytes())
    os.utime(copy, ns=(1, 1))
    (other,) = video_streams(copy, 0.5)
    assert other.key != absolute.key  # another file (and mtime): another stream


def test_a_stream_given_twice_is_refused(tiny_adapter, clip: Path, tmp_path: Path) -> None:
    from hermes_probe.runner import ProbeConfig, ProbeError, record_streams
    from hermes_probe.sources import video_streams

    twice = video_streams(clip, 0.5) + video_streams(clip.resolve(), 0.5)
    with pytest.raises(ProbeError, match="given twice"):
        record_streams(tiny_adapter, twice, ProbeConfig(), tmp_path / "profiles.npz", progress=False)


def analyze_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["analyze", "--model", str(model), "--synthetic", "--frames", "12", "--tokens-per-frame", "8",
            "--chunk", "4", "--fifo-budget", "48", "--policy-budget", "48", "--device", "cpu", "--out", str(out),
            "--no-figures", *extra]


def test_force_clears_old_outputs_first_and_the_stream_list_is_stored(
        tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hermes_probe.runner as probe_runner
    from hermes_probe.profiles import AttentionProfile

    out = tmp_path / "out"
    first = runner.invoke(app, analyze_args(tiny_llama_dir, out))
    assert first.exit_code == 0, first.output
    streams = AttentionProfile.load(out / "profiles.npz").meta["streams"]
    assert [s["name"] for s in streams] == ["synthetic-text-12-seed0"]
    assert json.loads((out / "metrics.json").read_text())["streams"] == streams
    (out / "notes.txt").write_text("mine")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe_runner, "probe_stream", interrupted)
    crashed = runner.invoke(app, analyze_args(tiny_llama_dir, out, "--force"))
    assert crashed.exit_code != 0
    assert not (out / "policy.json").exists()  # no old policy beside new partial results
    assert not (out / "report.md").exists() and not (out / "metrics.json").exists()
    assert (out / "notes.txt").read_text() == "mine"  # what the run did not write is left alone
    monkeypatch.undo()
    rerun = runner.invoke(app, analyze_args(tiny_llama_dir, out))  # not refused: nothing finished there
    assert rerun.exit_code == 0, rerun.output


def test_probe_reports_frames_of_a_long_stream(tiny_adapter) -> None:
    from hermes_probe.recorder import AttentionRecorder
    from hermes_probe.runner import ProbeConfig, probe_stream
    from hermes_probe.sources import synthetic_streams

    (stream,) = synthetic_streams(tiny_adapter, 12)
    seen: list[tuple[int, int]] = []
    probe_stream(tiny_adapter, stream, ProbeConfig(chunk_frames=4, fifo_budget=48),
                 AttentionRecorder(tiny_adapter, max_distance=48), on_frames=lambda d, t: seen.append((d, t)))
    assert seen == [(4, 12), (8, 12), (12, 12)]


def test_stream_chunks_report_progress_and_ask_where_the_whole_stream_does(tiny_adapter) -> None:
    from types import SimpleNamespace

    from hermes_policy.inputs.playback import (
        TimedQuestion,
        stream_chunks_with_questions,
        stream_with_questions,
    )
    from hermes_policy.inputs.synthetic_text import text_stream
    from hermes_policy.retention import FifoRetention
    from hermes_policy.session import StreamingSession

    text = text_stream(10, seed=1)
    stamps = np.arange(10, dtype=np.float64)
    questions = [TimedQuestion("a?", 2.5), TimedQuestion("b?", 3.0), TimedQuestion("c?", math.inf)]

    def session() -> StreamingSession:
        return StreamingSession(tiny_adapter, FifoRetention(budget=32), chunk_frames=3)

    whole = stream_with_questions(session(), text.frames, stamps, questions, 2)
    progress: list[int] = []
    chunks = (SimpleNamespace(frames=text.frames[i:i + 3], timestamps=stamps[i:i + 3]) for i in range(0, 10, 3))
    lazy = stream_chunks_with_questions(session(), chunks, questions, 2, on_frames=progress.append)
    assert progress == [3, 3, 3, 1]
    assert [(q.question, a.frames_seen, a.text) for q, a in lazy] == \
        [(q.question, a.frames_seen, a.text) for q, a in whole]


def test_transformers_loading_bars_are_silenced(tiny_llama_dir: Path) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_progress_bar()
    result = runner.invoke(app, tiny_stream(tiny_llama_dir))
    assert result.exit_code == 0, result.output
    assert not transformers_logging.is_progress_bar_enabled()
    assert "Loading weights" not in result.output


# -- eval -------------------------------------------------------------------------------------
def test_eval_exits_1_when_every_video_failed(llava_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 100)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([
        {"video_id": "missing", "video_path": "nowhere.mp4", "conversations": [{"question": "q?", "answer": "a"}]},
        {"video_id": "broken", "video_path": "broken.mp4", "conversations": [{"question": "q?", "answer": "a"}]},
    ]))
    result = runner.invoke(app, ["eval", "--model", str(llava_dir), "--annotations", str(ann), "--out",
                                 str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "error: every video failed" in result.output


# -- documentation and help -------------------------------------------------------------------
def test_the_annotation_format_is_documented_in_the_project() -> None:
    from hermes_policy.evaluation.runner import check_benchmark
    from hermes_policy.inputs.annotations import load_annotations

    doc = (ROOT / "docs" / "annotations.md").read_text()
    for key in ("video_id", "video_path", "conversations", "question", "choices", "answer", "end_time"):
        assert f"`{key}`" in doc
    assert "random:tiny-llava-ov" in doc
    entries = load_annotations(ROOT / "docs" / "examples" / "annotations.json")
    check_benchmark(entries)  # the example is valid, answers among their choices
    help_text = runner.invoke(app, ["eval", "--help"], terminal_width=200).output
    assert "docs/annotations.md" in help_text and "random:tiny-llava-ov" in help_text
    for command in ("eval", "stream", "analyze"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert "METHOD.md" not in text and "TRAPS.md" not in text


def test_help_texts_agree_with_themselves() -> None:
    for command in ("analyze", "stream"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert "(the default)" not in text and "default: no-synthetic" not in text
    for command in ("stream", "eval"):
        text = " ".join(runner.invoke(app, [command, "--help"], terminal_width=200).output.split())
        assert "hermes" in text.split("--policy", 1)[1][:300]
