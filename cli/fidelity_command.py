"""`hermes-probe fidelity`: retention rules and policies on probes the full cache passes.

Registered in :mod:`hermes_cli.main`. See ``docs/fidelity.md`` and
:mod:`hermes_probe.fidelity`.
"""

from __future__ import annotations

import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_RULES = "full,fifo,sink-recent,uniform,attention-only"


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str, what: str) -> list[int]:
    from hermes_policy.errors import HermesError

    try:
        return [int(part) for part in _split(text)]
    except ValueError:
        raise HermesError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_policies(specs: list[str]) -> dict[str, Any]:
    """``NAME=FILE`` or ``NAME=paper-default`` (or bare ``paper-default``) -> name: Policy | "paper-default"."""
    from hermes_policy.errors import HermesError
    from hermes_policy.policy import Policy

    out: dict[str, Any] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            name, source = spec, spec
        if not name or not source:
            raise HermesError(f"--policy takes NAME=FILE or NAME=paper-default, got {spec!r}")
        if name in out:
            raise HermesError(f"two policies are named {name!r}")
        out[name] = "paper-default" if source == "paper-default" else Policy.load(source)
    return out


def parse_budgets(text: str, stream_tokens: int) -> list[int]:
    """Budgets as integers or fractions of the stream (``1/8``)."""
    from hermes_policy.errors import HermesError

    out = []
    for part in _split(text):
        try:
            if "/" in part:
                num, den = part.split("/")
                out.append(int(stream_tokens * int(num) // int(den)))
            else:
                out.append(int(part))
        except ValueError:
            raise HermesError(f"--budgets takes integers or fractions like 1/8, got {part!r}") from None
    return out


def fidelity_command(
    json_out: Annotated[Path, typer.Option("--json", help="Results JSON (resumed when it exists).")],
    model: Annotated[str | None, typer.Option(help="Hub id, folder or .gguf; default: the embedded SmolLM2.")] = None,
    tasks: Annotated[str | None, typer.Option(
        help="Comma-separated: kv, copy, facts (text models; the default) or scene (video models; the default).")] = None,
    rules: Annotated[str, typer.Option(help="Comma-separated baseline rules.")] = DEFAULT_RULES,
    policy: Annotated[
        list[str] | None, typer.Option(help="NAME=FILE or NAME=paper-default (repeatable): HERMES policies.")
    ] = None,
    budgets: Annotated[str, typer.Option(help="Stream tokens per layer: integers or fractions of the stream (1/8).")] = "1/8,1/4",
    seeds: Annotated[str, typer.Option(help="Comma-separated stream seeds (use seeds the policies were not calibrated on).")] = "0,1,2",
    frames: Annotated[int, typer.Option(min=4, help="Frames per stream.")] = 64,
    tokens_per_frame: Annotated[int | None, typer.Option(min=1, help="Text-frame length (default 48).")] = None,
    chunk: Annotated[int, typer.Option(min=1, help="Frames per prefill chunk.")] = 8,
    kv_facts: Annotated[int, typer.Option(min=0, help="Key-value facts per stream.")] = 8,
    copy_probes: Annotated[int, typer.Option(min=0, help="Copy probes per stream.")] = 24,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch (1 is fastest on a busy machine).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Also write the summary table here.")] = None,
) -> None:
    """Score the full cache, baseline rules and HERMES policies on probes with known answers."""
    import torch
    from hermes_cli.main import _load, console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from hermes_policy.errors import HermesError
    from hermes_policy.inputs.fidelity_tasks import (
        TASKS,
        VIDEO_TASKS,
        fidelity_stream,
        video_fidelity_stream,
    )
    from hermes_policy.policy import ModelInfo
    from hermes_probe import fidelity as fid

    if threads:
        torch.set_num_threads(threads)
    rule_list = _split(rules)
    seed_list = _ints(seeds, "--seeds")
    policies = parse_policies(policy or [])
    asked = None if tasks is None else _split(tasks)
    if asked is not None:
        unknown = [t for t in asked if t not in TASKS + VIDEO_TASKS]
        if unknown or not asked:
            raise HermesError(f"unknown tasks {unknown}; choose from {', '.join(TASKS + VIDEO_TASKS)}")
    adapter = _load(model, device, dtype, tokens_per_frame, False)
    allowed = TASKS if adapter.is_text_only else VIDEO_TASKS
    task_list = list(allowed) if asked is None else asked
    if [t for t in task_list if t not in allowed]:
        kind = "a text-only model" if adapter.is_text_only else "a video model"
        raise HermesError(f"{adapter.name_or_path} is {kind}: its fidelity tasks are {', '.join(allowed)}")
    stream_tokens = frames * adapter.tokens_per_frame
    budget_list = parse_budgets(budgets, stream_tokens)
    info = ModelInfo.of(adapter)
    entrants = fid.contenders(rule_list, policies, info)
    hashes = {name: ("paper-default" if p == "paper-default" else p.provenance.get("source", "?"))
              for name, p in policies.items()}
    files = {}
    for spec in policy or []:
        name, _, source = spec.partition("=")
        if source and source != "paper-default":
            files[name] = {"path": source, "sha256": fid.file_hash(source), "source": hashes[name]}
    manifest = {
        "model": adapter.name_or_path,
        "adapter": type(adapter).__name__,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "tokens_per_frame": adapter.tokens_per_frame,
        "frames": frames,
        "stream_tokens": stream_tokens,
        "chunk_frames": chunk,
        "tasks": task_list,
        "rules": rule_list,
        "policies": {name: files.get(name, "paper-default") for name in policies},
        "budgets": budget_list,
        "seeds": seed_list,
        "kv_facts": kv_facts,
        "copy_probes": copy_probes,
        "packages": fid.package_versions(),
        "device": fid.device_name(adapter),
        "threads": torch.get_num_threads(),
        "command": "hermes-probe " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    def streams(seed: int) -> Any:
        if not adapter.is_text_only:
            return video_fidelity_stream(frames, seed, adapter.encode_text)
        return fidelity_stream(frames, seed, adapter.frame_ids, adapter.encode_text, kv_facts=kv_facts,
                               copy_probes=copy_probes, tasks=tuple(task_list))

    total = len(seed_list) * (1 + len(entrants) * len(budget_list))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False) as bar:
        job = bar.add_task("fidelity", total=total)

        def progress(description: str, steps: int) -> None:
            bar.update(job, advance=steps, description=description)

        rows = fid.run_fidelity(adapter, streams, seed_list, budget_list, entrants, task_list, json_out, manifest,
                                chunk_frames=chunk, progress=progress)
    summary = fid.summarise(rows)
    order = ["full", *rule_list, *[f"{e.rule} ({e.policy})" for e in entrants if e.policy is not None]]
    table = fid.markdown_table(summary, order)
    console.print(table, highlight=False)
    if markdown is not None:
        from hermes_policy.fileio.atomic import write_text_atomic

        write_text_atomic(markdown, table + "\n")
    console.print(f"wrote {json_out}")


def calibrate_after_analyze(adapter: Any, heuristic: Any, out: Path, *, frames: int, seed: int, chunk: int,
                            console: Any, objective: str = "value", kl_check: bool = True) -> Any:
    """``analyze --calibrate``: keep the heuristic policy as ``policy-heuristic.json``, write the
    calibrated one as ``policy.json`` and the calibration report as ``calibration.json``.

    Calibration streams: seeds ``seed`` and ``seed + 1`` at ``frames``; held-out: ``seed + 2``
    at ``frames`` and ``seed + 3`` at one and a half times ``frames``. ``objective``: ``value``
    (value-weighted attention recall) or ``attention``; ``kl_check``: then search on the real
    runtime by KL(full || policy) on calibration stream ``seed``, from pure recency, with the
    recall choices as moves (:mod:`hermes_probe.runtime_search`), and report the held-out KL.
    """
    from hermes_policy.fileio.atomic import write_json_atomic
    from hermes_policy.inputs.fidelity_tasks import fidelity_stream
    from hermes_probe.calibrate import run_calibration

    def streams(s: int, f: int) -> Any:
        return fidelity_stream(f, s, adapter.frame_ids, adapter.encode_text)

    heuristic.save(out / "policy-heuristic.json")
    with console.status("calibrating...") as status:
        policy, report, recall_only = run_calibration(
            adapter, heuristic, streams, [(seed, frames), (seed + 1, frames)],
            [(seed + 2, frames), (seed + 3, frames * 3 // 2)], chunk_frames=chunk,
            progress=lambda text: status.update(text), objective=objective,
            kl_stream=streams(seed, frames) if kl_check else None)
    write_json_atomic(out / "calibration.json", report)
    policy.save(out / "policy.json")
    written = [out / "policy-heuristic.json", out / "calibration.json"]
    if recall_only is not None:  # the recall calibration alone, for comparison
        recall_only.save(out / "policy-recall.json")
        written.insert(1, out / "policy-recall.json")
        kl = report["heldout_kl"]["kl"]
        line = ", ".join(f"{name} {value:.3f}" for name, value in kl.items())
        console.print(f"  held-out KL to the full cache (seed {report['heldout_kl']['stream']['seed']}): {line}",
                      highlight=False)
    for share, entry in report["heldout"].items():
        line = ", ".join(f"{name} {value['mean']:.3f}" for name, value in entry.items())
        console.print(f"  held-out attention recall at {share} of the stream: {line}", highlight=False)
    console.print(f"wrote {out / 'policy.json'} (calibrated), {', '.join(str(p) for p in written)}")
    return policy


def stability_command(
    profiles: Annotated[list[Path], typer.Argument(help="profiles.npz of two or more analyze runs (one stream each).")],
    out: Annotated[Path, typer.Option(help="Stability JSON to write.")] = Path("stability.json"),
    policy: Annotated[Path | None, typer.Option(help="Record the result in this policy's provenance.")] = None,
    resamples: Annotated[int, typer.Option(min=10, help="Bootstrap resamples.")] = 200,
    report: Annotated[Path | None, typer.Option(help="Add (or replace) a stability section in this report.md.")] = None,
) -> None:
    """Bootstrap the probe's per-layer role scores and tiers over streams; flag uncertain layers."""
    from hermes_cli.main import console

    from hermes_policy.errors import HermesError
    from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic
    from hermes_policy.policy import Policy
    from hermes_probe.profiles import AttentionProfile
    from hermes_probe.stability import bootstrap, uncertain_lines

    if len(profiles) < 2:
        raise HermesError("stability needs the profiles of at least two streams")
    if report is not None and not report.is_file():
        raise HermesError(f"report not found: {report}")
    loaded = [AttentionProfile.load(p) for p in profiles]
    result = bootstrap(loaded, resamples=resamples).to_dict()
    result["profiles"] = [str(p) for p in profiles]
    write_json_atomic(out, result)
    for line in uncertain_lines(result):
        console.print(line, highlight=False)
    if report is not None:
        from hermes_probe.report import with_stability

        write_text_atomic(report, with_stability(report.read_text(), result))
        console.print(f"updated {report}")
    if policy is not None:
        target = Policy.load(policy)
        target.provenance["stability"] = result
        target.save(policy)
        console.print(f"recorded in {policy}")
    console.print(f"wrote {out}")
