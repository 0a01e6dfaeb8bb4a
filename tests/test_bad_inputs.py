"""The bad-input matrix: every user mistake is one `error:` line, exit code 1, no traceback,
and nothing already written is lost or half-overwritten.

Each case builds its inputs in a temporary folder and runs the real command line in-process
(typer's CliRunner); a few run it as a subprocess, as a user would. Cases that would need a
model use the tiny Llama built in code, and fail before its forward passes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hermes_cli.main import app
from typer.testing import CliRunner

from hermes_policy.policy import ModelInfo, paper_default
from hermes_probe.profiles import AttentionProfile

runner = CliRunner()

# A folder no one may write, even root: sysfs refuses new entries.
READ_ONLY = Path("/sys")
KEEP = "previous content, must survive"


@dataclass
class Case:
    """One bad input: ``build(tmp, model)`` returns the arguments; the error must contain
    ``message``; ``guarded`` files (relative to tmp) must keep their content."""

    build: Callable[[Path, Path], list[str]]
    message: str
    guarded: tuple[str, ...] = ()


def policy_file(tmp: Path, edit: Callable[[dict], None] | None = None, text: str | None = None) -> str:
    path = tmp / "policy.json"
    if text is None:
        data = paper_default(ModelInfo("tiny", "LlamaForCausalLM", 3, 4, 2, 8), budget=32).to_dict()
        if edit is not None:
            edit(data)
        text = json.dumps(data)
    path.write_text(text)
    return str(path)


def set_guidance(template: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["guidance"]["local_with_history"] = template

    return edit


def profile_file(tmp: Path, change: Callable[[AttentionProfile], None], window: int = 64,
                 probes: int = 4) -> str:
    """A profile of a 3-layer model, frames of 8 tokens, altered by ``change``."""
    rng = np.random.default_rng(0)
    profile = AttentionProfile(num_layers=3, num_heads=2, max_distance=window, period=8, probes=probes,
                               meta={"model": {"name_or_path": "tiny", "architecture": "LlamaForCausalLM",
                                               "num_layers": 3, "num_heads": 2, "num_kv_heads": 1,
                                               "tokens_per_frame": 8}})
    profile.distance_sum[:] = rng.random(profile.distance_sum.shape)
    profile.distance_count[:] = probes
    profile.phase_sum[:] = rng.random(profile.phase_sum.shape)
    profile.phase_count[:] = probes
    profile.entropy_sum[:] = 0.5 * probes
    profile.top_mass_sum[:] = 0.2 * probes
    profile.video_mass_sum[:] = 0.9 * probes
    change(profile)
    return str(profile.save(tmp / "profiles.npz"))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def annotations_file(tmp: Path, text: str) -> str:
    path = tmp / "annotations.json"
    path.write_text(text)
    return str(path)


def from_profiles(change: Callable[[AttentionProfile], None], **kwargs: int) -> Callable[[Path, Path], list[str]]:
    return lambda t, m: ["analyze", "--from-profiles", profile_file(t, change, **kwargs), "--out", str(t / "o"),
                         "--no-figures"]


def stream_args(model: Path, *extra: str) -> list[str]:
    return ["stream", "--model", str(model), "--tokens-per-frame", "8", "--frames", "4", "--chunk", "2",
            "--max-new-tokens", "2", "--ask", "q", *extra]


def eval_args(tmp: Path, model: str, *extra: str) -> list[str]:
    ann = annotations_file(tmp, json.dumps([{"video_id": "v", "video_path": "v.mp4",
                                             "conversations": [{"question": "q?"}]}]))
    return ["eval", "--model", model, "--annotations", ann, "--out", str(tmp / "out"), *extra]


def write_keep(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(KEEP)
    return path


def existing_json(tmp: Path) -> str:
    return str(write_keep(tmp, "answers.json"))


CASES: dict[str, Case] = {
    # -- policy JSON: data from anywhere ------------------------------------------------------
    "policy: 5,000-digit integer": Case(
        lambda t, m: ["show", policy_file(t, text='{"schema": "hermes-policy/1", "budget": ' + "9" * 5000 + "}")],
        "digits"),
    "policy: nested 100,000 deep": Case(lambda t, m: ["show", policy_file(t, text=nested(100_000))],
                                        "nested too deeply"),
    "policy: nested 40 deep": Case(lambda t, m: ["show", policy_file(t, text=nested(40))], "nested too deeply"),
    "policy: not UTF-8": Case(lambda t, m: ["show", str(_binary(t / "policy.json"))], "not valid JSON"),
    "policy: format spec in guidance": Case(
        lambda t, m: ["show", policy_file(t, set_guidance("{history!r:{history}}"))], "bare {history}"),
    "policy: padding width in guidance": Case(
        lambda t, m: ["show", policy_file(t, set_guidance("{history:>3000}"))], "bare {history}"),
    "policy: other field in guidance": Case(
        lambda t, m: ["show", policy_file(t, set_guidance("{history} {__class__}"))], "bare {history}"),
    "policy: attribute of history": Case(
        lambda t, m: ["show", policy_file(t, set_guidance("{history.__class__}"))], "bare {history}"),
    "policy: lone brace in guidance": Case(
        lambda t, m: ["show", policy_file(t, set_guidance("{history} {"))], "not a valid template"),
    "policy: guidance too long": Case(
        lambda t, m: ["show", policy_file(t, set_guidance("{history} " + "x" * 5000))], "characters long"),
    "policy: history repeated": Case(
        lambda t, m: ["show", policy_file(t, set_guidance("{history}" * 50))], "repeats {history}"),
    "policy: missing file": Case(lambda t, m: ["show", str(t / "nope.json")], "not found"),
    "stream: policy with format spec": Case(
        lambda t, m: stream_args(m, "--policy", policy_file(t, set_guidance("{history:>99999}"))), "bare {history}"),
    # -- profiles -----------------------------------------------------------------------------
    "profile: empty .npz": Case(
        lambda t, m: ["analyze", "--from-profiles", str(_touch(t / "p.npz")), "--out", str(t / "o")], "empty"),
    "profile: truncated .npz": Case(
        lambda t, m: ["analyze", "--from-profiles", str(_truncated_profile(t)), "--out", str(t / "o")],
        "not a hermes-probe profile"),
    "profile: garbage .npz": Case(
        lambda t, m: ["analyze", "--from-profiles", str(_binary(t / "p.npz")), "--out", str(t / "o")],
        "not a hermes-probe profile"),
    "profile: all NaN": Case(from_profiles(lambda p: p.distance_sum.fill(np.nan)), "NaN"),
    "profile: all zeros": Case(from_profiles(lambda p: p.distance_sum.fill(0.0)), "no attention"),
    "profile: zero probes": Case(from_profiles(lambda p: setattr(p, "probes", 0)), "no probe"),
    "profile: impossible entropy": Case(from_profiles(lambda p: p.entropy_sum.fill(40.0)), "cannot exceed 1"),
    "profile: 2-token window": Case(from_profiles(lambda p: None, window=2), "less than two frames"),
    "profile: with --calibrate": Case(
        lambda t, m: ["analyze", "--from-profiles", profile_file(t, lambda p: None), "--calibrate",
                      "--out", str(t / "o")], "cannot run from --from-profiles"),
    "profile: missing": Case(lambda t, m: ["analyze", "--from-profiles", str(t / "no.npz"), "--out", str(t / "o")],
                             "not found"),
    "profile: --out is a file": Case(
        lambda t, m: ["analyze", "--from-profiles", profile_file(t, lambda p: None),
                      "--out", str(write_keep(t, "out-file"))], "is a file", guarded=("out-file",)),
    "profile: degenerate keeps an old policy": Case(
        lambda t, m: ["analyze", "--from-profiles", profile_file(t, lambda p: p.distance_sum.fill(np.nan)),
                      "--out", str(write_keep(t, "o/policy.json").parent), "--force"], "NaN",
        guarded=("o/policy.json",)),
    # -- annotations --------------------------------------------------------------------------
    "annotations: 5,000-digit end_time": Case(
        lambda t, m: ["eval", "--model", "random:tiny-llava-ov", "--out", str(t / "out"), "--annotations",
                      annotations_file(t, '[{"video_id": "v", "video_path": "v.mp4", "conversations": '
                                          '[{"question": "q", "end_time": ' + "1" * 5000 + "}]}]")], "digits"),
    "annotations: nested deep": Case(
        lambda t, m: ["eval", "--model", "random:tiny-llava-ov", "--out", str(t / "out"),
                      "--annotations", annotations_file(t, nested(5000))], "nested too deeply"),
    # -- devices and dtypes -------------------------------------------------------------------
    "demo --device tpu": Case(lambda t, m: ["demo", "--model", str(m), "--device", "tpu"], "device"),
    "stream --device banana": Case(lambda t, m: stream_args(m, "--device", "banana"), "unknown device"),
    "stream --device cuda:99": Case(lambda t, m: stream_args(m, "--device", "cuda:99"), "cuda"),
    "stream --dtype foo": Case(lambda t, m: stream_args(m, "--dtype", "foo", "--json", existing_json(t)),
                               "unknown dtype", guarded=("answers.json",)),
    "analyze --dtype int8": Case(lambda t, m: ["analyze", "--model", str(m), "--dtype", "int8",
                                               "--out", str(t / "o")], "unknown dtype"),
    "eval --device tpu": Case(lambda t, m: eval_args(t, "random:tiny-llava-ov", "--device", "tpu"), "device"),
    "eval --dtype foo": Case(lambda t, m: eval_args(t, "random:tiny-llava-ov", "--dtype", "foo",
                                                    "--device", "cpu"), "unknown dtype"),
    # -- outputs ------------------------------------------------------------------------------
    "analyze --out is a file": Case(
        lambda t, m: ["analyze", "--model", str(m), "--out", str(write_keep(t, "out-file"))], "is a file",
        guarded=("out-file",)),
    "analyze --out read-only": Case(lambda t, m: ["analyze", "--model", str(m), "--out", str(READ_ONLY / "o")],
                                    "cannot create"),
    "analyze --out inside a file": Case(
        lambda t, m: ["analyze", "--model", str(m), "--out", str(write_keep(t, "f") / "sub")], "",
        guarded=("f",)),
    "stream --json read-only": Case(lambda t, m: stream_args(m, "--json", str(READ_ONLY / "r.json")),
                                    "cannot write"),
    "stream --json is a folder": Case(lambda t, m: stream_args(m, "--json", str(t)), "is a folder"),
    "demo --json read-only": Case(lambda t, m: ["demo", "--model", str(m), "--json", str(READ_ONLY / "d.json")],
                                  "cannot write"),
    "eval --out is a file": Case(lambda t, m: ["eval", "--model", "random:tiny-llava-ov", "--annotations",
                                               "docs/examples/annotations.json", "--out",
                                               str(write_keep(t, "out-file")), "--device", "cpu"], "",
                                 guarded=("out-file",)),
    # -- frame rates and options --------------------------------------------------------------
    "stream two inputs": Case(lambda t, m: stream_args(m, "--video", str(t), "--synthetic"), "choose one input"),
    "stream unknown rule": Case(lambda t, m: stream_args(m, "--policy", "magic"), "unknown retention rule"),
    "stream budget below a frame": Case(lambda t, m: stream_args(m, "--policy", "fifo", "--budget", "4"),
                                        "smaller than one frame"),
    "stream policy file budget below a frame": Case(
        lambda t, m: stream_args(m, "--policy", policy_file(t), "--budget", "4"), "smaller than one frame"),
    "analyze policy exists": Case(
        lambda t, m: ["analyze", "--model", str(m), "--out", str(write_keep(t, "o/policy.json").parent)],
        "--force", guarded=("o/policy.json",)),
}


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _binary(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _truncated_profile(tmp: Path) -> Path:
    whole = Path(profile_file(tmp, lambda p: None)).read_bytes()
    path = tmp / "cut.npz"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def assert_one_error_line(result, message: str) -> str:
    """Exit 1, no traceback, exactly one `error:` line (containing ``message``)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert message in errors[0], result.output
    return errors[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).parent.parent)  # docs/examples/... paths resolve
    case = CASES[name]
    args = case.build(tmp_path, tiny_llama_dir)
    guarded = {rel: (tmp_path / rel).read_bytes() for rel in case.guarded}
    result = runner.invoke(app, args)
    assert_one_error_line(result, case.message)
    for rel, content in guarded.items():
        assert (tmp_path / rel).read_bytes() == content, f"{rel} was changed"
    assert not list(tmp_path.rglob(".*.tmp*")), "a temporary file was left behind"


def test_cuda_without_a_gpu_is_one_line(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["demo", "--model", str(tiny_llama_dir), "--device", "cuda"],
                 stream_args(tiny_llama_dir, "--device", "cuda:0")):
        assert_one_error_line(runner.invoke(app, args), "no GPU")


def test_stream_json_into_a_read_only_folder_fails_before_the_model_loads(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hermes_cli.main as cli

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded although the output cannot be written")

    monkeypatch.setattr(cli, "_load", never)
    result = runner.invoke(app, stream_args(tiny_llama_dir, "--json", str(READ_ONLY / "r.json")))
    assert_one_error_line(result, "cannot write")


@pytest.mark.parametrize("args", [
    ["show", "{tmp}/policy.json"],
    ["analyze", "--from-profiles", "{tmp}/profiles.npz", "--out", "{tmp}/o"],
])
def test_as_a_subprocess(args: list[str], tmp_path: Path) -> None:
    """What a user sees in a terminal: one line on stderr, nothing on stdout, exit 1."""
    policy_file(tmp_path, text='{"schema": "hermes-policy/1", "budget": ' + "9" * 5000 + "}")
    (tmp_path / "profiles.npz").write_bytes(b"")
    command = [sys.executable, "-m", "hermes_cli.main", *[a.format(tmp=tmp_path) for a in args]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert done.stdout == ""
