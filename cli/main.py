"""The `hermes-probe` command line (installed as the package ``hermes_cli``).

Every command turns the package's :class:`~hermes_policy.errors.HermesError` into one red
line on stderr and exit code 1; nothing else about a user error is printed.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from hermes_cli.outputs import check_output_file, check_output_folder, is_stdout, write_json_output
from hermes_cli.rule_options import Budget, HostBudgetGb, RetrieveChunks, WindowFrames, rule_options
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="hermes-probe",
    help="Probe how a video-language model's KV cache remembers a stream, and run it on endless video.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(width=None if sys.stdout.isatty() else 160)
F = TypeVar("F", bound=Callable[..., Any])


def _error_line(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)


def friendly_errors(func: F) -> F:
    """Report user errors as one line and exit 1.

    Besides the package's own errors, a file-system error (a disk that fills up, a folder
    removed under a run) is the user's environment, not a bug: it gets one line too.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from hermes_policy.errors import HermesError

        try:
            return func(*args, **kwargs)
        except HermesError as exc:
            _error_line(str(exc))
            raise typer.Exit(1) from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            _error_line(f"{exc.strerror or exc}{where}")
            raise typer.Exit(1) from None
        finally:
            console.file = None  # type: ignore[assignment] - back to standard output

    return wrapper  # type: ignore[return-value]


@contextmanager
def _report_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--json -`` the JSON owns standard output; tables and notes go to stderr."""
    if enabled:
        console.file = sys.stderr
    try:
        yield
    finally:
        console.file = None  # type: ignore[assignment]


def _note(message: str) -> None:
    """A notice about what the run did (not an error): yellow, on stderr."""
    typer.secho(message, err=True, fg=typer.colors.YELLOW)


@app.command()
@friendly_errors
def demo(
    model: Annotated[
        str | None, typer.Option(help="Hub id, local folder or .gguf file; default: the embedded SmolLM2.")
    ] = None,
    frames: Annotated[int, typer.Option(min=1, help="Frames of the synthetic stream.")] = 40,
    tokens_per_frame: Annotated[int, typer.Option(min=1, help="Text-frame length (causal LMs).")] = 48,
    chunk: Annotated[int, typer.Option(min=1, help="Frames per prefill chunk.")] = 8,
    rule: Annotated[str, typer.Option(help="Retention rule: full, fifo, sink+recent, uniform, attention-only, "
                                      "hermes (= paper-default, the paper's policy) or a policy.json.")] = "full",
    budget: Annotated[
        int | None, typer.Option(min=1, help="Stream tokens per layer (bounded rules; default 6000; "
                                 "overrides a policy file's own).")
    ] = None,
    question: Annotated[
        str | None, typer.Option(help="Question to ask (default: the stream's own questions).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic stream.")] = 0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results here (- for standard output).")
    ] = None,
) -> None:
    """Stream the built-in synthetic stream through a model and answer questions about it."""
    check_output_file(json_out)
    with _report_to_stderr(is_stdout(json_out)):
        _demo(model, frames, tokens_per_frame, chunk, rule, budget, question, device, seed, json_out)


def _demo(model: str | None, frames: int, tokens_per_frame: int, chunk: int, rule: str, budget: int | None,
          question: str | None, device: str | None, seed: int, json_out: Path | None) -> None:
    from rich.progress import Progress

    from hermes_policy import StreamingSession
    from hermes_policy.inputs.synthetic_shapes import shapes_video
    from hermes_policy.inputs.synthetic_text import text_stream
    from hermes_policy.retention.specs import rule_budget, rule_from_spec

    adapter = _load(model, device, None, tokens_per_frame, False, exact_frame_length=False)
    policy_file = rule.endswith(".json") or Path(rule).is_file()
    # a policy file keeps its own budgets unless --budget is given; rules default to 6000 here
    retention = rule_from_spec(rule, adapter, budget if budget is not None or policy_file else 6000)
    if adapter.is_text_only:
        stream = text_stream(frames, seed=seed)
        items: Any = stream.frames
    else:
        stream = shapes_video(frames, seed=seed)
        items = stream.frames
    fps = getattr(stream, "fps", None)
    session = StreamingSession(adapter, retention, chunk_frames=chunk, fps=fps)
    console.print(
        f"[bold]{adapter.name_or_path}[/] ({adapter.architecture}, {adapter.num_layers} layers, "
        f"{adapter.tokens_per_frame} tokens/frame) | rule [bold]{retention.name}[/] | "
        f"{frames} frames in chunks of {chunk}"
    )
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("streaming frames", total=frames)
        for start in range(0, frames, chunk):
            session.add_frames(items[start : start + chunk])
            progress.update(task, advance=min(chunk, frames - start))
    if question:
        questions = [(question, None)]
    else:
        questions = [(q.question, q.answer) for q in stream.questions[:3]]
    table = Table(title="answers")
    for column in ("question", "expected", "answer", "TTFT ms", "TPOT ms"):
        table.add_column(column)
    results = []
    for text, expected in questions:
        answer = session.ask(text)
        table.add_row(
            text,
            expected or "-",
            answer.text,
            f"{answer.ttft_ms:.1f}",
            f"{answer.tpot_ms:.1f}" if answer.tpot_ms else "-",
        )
        results.append({"question": text, "expected": expected, **_answer_dict(answer)})
    console.print(table)
    kept = session.tokens_kept
    console.print(
        f"tokens kept per layer: min {min(kept)}, max {max(kept)} | KV cache "
        f"{session.store.nbytes() / 2**20:.1f} MiB | compressions {session.compressions}"
    )
    _note_no_compression(session, retention)
    if json_out is not None:
        from hermes_policy.evaluation.manifest import run_manifest

        manifest = run_manifest(adapter, retention, chunk_frames=session.chunk_frames, mode="streaming (synthetic)")
        write_json_output(json_out, {"manifest": manifest, "model": adapter.name_or_path, "rule": retention.name,
                                     "budget": rule_budget(retention, adapter.num_layers),
                                     "compressions": session.compressions, "answers": results})


def _note_no_compression(session: Any, rule: Any) -> None:
    """A bounded rule that never had to compress ran as the full cache: say so, so that a
    comparison of rules on a stream shorter than the budget is not taken for a result."""
    budgets = [rule.budget_of(layer) for layer in range(session.store.num_layers)]
    if session.compressions == 0 and any(b is not None for b in budgets):
        streamed = session.frames_seen * session.adapter.tokens_per_frame
        _note(f"note: no compression happened: the stream ({session.frames_seen} frames, about "
              f"{streamed} tokens) fits the budget ({min(b for b in budgets if b is not None)} tokens per "
              f"layer), so rule '{rule.name}' kept everything, as the full cache would")


def _answer_dict(answer: Any) -> dict[str, Any]:
    return {
        "answer": answer.text,
        "ttft_ms": answer.ttft_ms,
        "tpot_ms": answer.tpot_ms,
        "tokens_kept": answer.tokens_kept,
        "peak_memory_bytes": answer.peak_memory_bytes,
        "kv_cache_bytes": answer.kv_cache_bytes,
        "frames_seen": answer.frames_seen,
    }


@app.command()
@friendly_errors
def analyze(
    model: Annotated[
        str | None, typer.Option(help="Hub id, local folder or .gguf file; default: the embedded SmolLM2.")
    ] = None,
    videos: Annotated[Path | None, typer.Option(help="A video file or a folder of videos.")] = None,
    annotations: Annotated[Path | None, typer.Option(help="A streaming-QA annotation JSON.")] = None,
    video_root: Annotated[Path | None, typer.Option(help="Folder that relative video paths refer to.")] = None,
    synthetic: Annotated[bool, typer.Option(
        help="Probe on the built-in synthetic stream (also used when neither --videos nor --annotations is given).",
        show_default=False)] = False,
    frames: Annotated[int, typer.Option(min=3, help="Frames of the synthetic stream.")] = 64,
    tokens_per_frame: Annotated[
        int | None, typer.Option(min=1, help="Text-frame length for causal LMs (default 48).")
    ] = None,
    fps: Annotated[float, typer.Option(min=0.01, help="Frames sampled per second of video "
                                       "(at most the video's own rate).")] = 0.5,
    chunk: Annotated[int, typer.Option(min=1, help="Frames per prefill chunk.")] = 8,
    fifo_budget: Annotated[int, typer.Option(min=1, help="FIFO window of stream tokens per layer.")] = 6000,
    policy_budget: Annotated[int, typer.Option(min=1, help="Stream tokens per layer in the written policy.")] = 4000,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic stream.")] = 0,
    query: Annotated[
        list[str] | None, typer.Option(help="Probe query (repeatable); default: guidance prompts + generic questions.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("probe-out"),
    force: Annotated[bool, typer.Option(help="Start over: first remove the outputs of an earlier run in --out "
                                        "(policy.json, profiles.npz, metrics.json, report.md, figures/).")] = False,
    figures: Annotated[bool, typer.Option(help="Write the figures.")] = True,
    from_profiles: Annotated[
        Path | None, typer.Option(help="Redo the analysis from a saved profiles.npz, without the model.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow code from the model repository.")] = False,
    calibrate: Annotated[bool, typer.Option(help="Calibrate the policy: attention recall, then a search on the runtime by KL to the full cache (see docs/fidelity.md).")] = False,
    per_head: Annotated[bool, typer.Option(help="Write a hermes-policy/2 policy: a role, memory, recency weight "
                                           "and forgetting rate per KV head (see docs/heads.md).")] = False,
) -> None:
    """Probe how a model's layers attend over a stream; write policy.json, profiles and figures."""
    from hermes_probe.report import findings
    from hermes_probe.runner import (
        ProbeConfig,
        ProbeError,
        analyze_profile,
        clear_outputs,
        write_outputs,
    )
    from hermes_probe.runner import analyze as run_analysis

    config = ProbeConfig(fps=fps, chunk_frames=chunk, fifo_budget=fifo_budget, seed=seed, queries=tuple(query or ()))
    if per_head and calibrate:
        # calibration chooses per-layer parameters and would drop or contradict the heads
        raise ProbeError("--per-head and --calibrate cannot be combined yet; run one of them")
    if from_profiles is not None and calibrate:
        # calibration streams its calibration streams through the model; a profile has none
        raise ProbeError("--calibrate needs the model (it streams calibration streams); "
                         "it cannot run from --from-profiles: give --model instead")
    if from_profiles is not None:
        from hermes_policy.policy import ModelInfo
        from hermes_probe.profiles import AttentionProfile

        check_output_folder(out)
        if (out / "policy.json").exists() and not force:
            raise ProbeError(f"{out} already holds a policy.json; use --force to overwrite it")
        profile = AttentionProfile.load(from_profiles)
        if not isinstance(profile.meta.get("model"), dict):
            raise ProbeError(f"{from_profiles} does not say which model it was recorded on")
        try:
            model_info = ModelInfo(**profile.meta["model"])
        except TypeError:
            raise ProbeError(f"{from_profiles}: its model description is malformed") from None
        metrics, fit, policy = analyze_profile(profile, model_info, budget=policy_budget,
                                               source=str(from_profiles), per_head=per_head)
        if force:
            clear_outputs(out, keep=from_profiles)
        from hermes_policy.evaluation.manifest import run_manifest

        manifest = run_manifest(mode="probe (from profiles)", profiles=str(from_profiles), model=profile.meta["model"])
        write_outputs(out, profile, metrics, fit, policy, {}, figures=figures, manifest=manifest)
    else:
        chosen = [name for name, given in (("--videos", videos), ("--annotations", annotations),
                                           ("--synthetic", synthetic or None)) if given is not None]
        if len(chosen) > 1:
            raise ProbeError(f"choose one input, not {' and '.join(chosen)}")
        check_output_folder(out)
        if (out / "policy.json").exists() and not force:
            raise ProbeError(f"{out} already holds a policy.json; use --force to overwrite it")
        adapter = _load(model, device, dtype, tokens_per_frame, trust_remote_code)
        streams = _probe_streams(adapter, videos, annotations, video_root, frames, fps, seed)
        result = run_analysis(adapter, streams, config, out, policy_budget=policy_budget, force=force,
                              figures=figures, per_head=per_head)
        metrics, fit, policy = result.metrics, result.fit, result.policy
        for name, reason in result.failed.items():
            typer.secho(f"skipped {name}: {reason}", err=True, fg=typer.colors.YELLOW)
        if calibrate:
            from hermes_cli.fidelity_command import calibrate_after_analyze

            policy = calibrate_after_analyze(adapter, policy, out, frames=frames, seed=seed, chunk=chunk, console=console)
    console.print(f"[bold]{policy.model.name_or_path}[/]: {policy.provenance['probe']['probes']} probe queries")
    for line in findings(metrics, fit):
        console.print(f"  - {line}", highlight=False)
    console.print(f"wrote {out / 'policy.json'}, {out / 'report.md'}, {out / 'metrics.json'}"
                  + (f", {out / 'figures'}/" if figures else ""))


def _load(model: str | None, device: str | None, dtype: str | None, tokens_per_frame: int | None,
          trust_remote_code: bool, exact_frame_length: bool = True) -> Any:
    """Load a model quietly; ``exact_frame_length``: a video model whose frames are not
    ``tokens_per_frame`` tokens long is an error (a default length only applies to text)."""
    from transformers.utils import logging as transformers_logging

    from hermes_policy.errors import ModelLoadError
    from hermes_policy.models import load_adapter

    # transformers' own "Loading weights" bars would print on every run, under our status line
    transformers_logging.disable_progress_bar()
    with console.status("loading model..."):
        adapter = load_adapter(model, device=device, dtype=dtype, tokens_per_frame=tokens_per_frame,
                               trust_remote_code=trust_remote_code)
    if exact_frame_length and tokens_per_frame is not None and adapter.tokens_per_frame != tokens_per_frame:
        raise ModelLoadError(
            f"{adapter.name_or_path} encodes one frame as {adapter.tokens_per_frame} tokens; "
            f"--tokens-per-frame {tokens_per_frame} is not possible for this model"
        )
    return adapter


def _probe_streams(adapter: Any, videos: Path | None, annotations: Path | None, video_root: Path | None,
                   frames: int, fps: float, seed: int) -> list[Any]:
    from hermes_probe.runner import ProbeError
    from hermes_probe.sources import annotation_streams, synthetic_streams, video_streams

    if (videos or annotations) and adapter.is_text_only:
        raise ProbeError(
            f"{adapter.name_or_path} is a text-only model and cannot watch videos; use --synthetic"
        )
    if videos is not None:
        return video_streams(videos, fps)
    if annotations is not None:
        return annotation_streams(annotations, fps, video_root)
    return synthetic_streams(adapter, frames, seed)


@app.command()
@friendly_errors
def show(policy_path: Annotated[Path, typer.Argument(help="A policy.json file.")]) -> None:
    """Print a readable summary of a policy."""
    from hermes_policy.policy import Policy

    policy = Policy.load(policy_path)
    model = policy.model
    console.print(f"[bold]{policy_path}[/] ({policy.provenance.get('source', '?')} policy, "
                  f"created {policy.provenance.get('created_at', '?')})")
    console.print(f"model: {model.name_or_path} ({model.architecture}, {model.num_layers} layers, "
                  f"{model.num_heads} heads / {model.num_kv_heads} KV heads, {model.tokens_per_frame} tokens/frame)")
    console.print(f"budget: {policy.budget} stream tokens per layer | re-indexing: {policy.reindex}")
    console.print("tiers: " + ", ".join(f"{name} {a}-{b}" for name, (a, b) in policy.tiers.items()))
    probe = policy.provenance.get("probe", {})
    if probe:
        console.print(f"probe: {probe.get('streams')} stream(s), {probe.get('probes')} queries, "
                      f"window {probe.get('window')} tokens, frame period {probe.get('frame_period')}, "
                      f"tier fit R^2 {probe.get('tier_fit_r2')}, mismatched layers: {probe.get('mismatched_layers') or 'none'}")
    table = Table()
    columns = ["layer", "tier", "w (recency)", "k", "lambda", "budget", "summary"]
    metrics = probe.get("metrics", {})
    if metrics:
        columns += ["role", "recency", "periodicity", "anchor"]
    for column in columns:
        table.add_column(column, justify="right" if column not in ("tier", "role") else "left")
    for layer in policy.layers:
        row = [str(layer.index), layer.tier, f"{layer.recency_weight:.2f}", f"{layer.forgetting_rate:.1f}",
               f"{layer.smoothing:.2f}", str(layer.budget), "yes" if layer.summary_token else "-"]
        if metrics:
            i = layer.index
            row += [probe.get("roles", ["?"] * (i + 1))[i], f"{metrics['recency'][i]:.3f}",
                    f"{metrics['periodicity'][i]:.3f}", str(metrics["anchor_phase"][i])]
        table.add_row(*row)
    console.print(table)
    if policy.per_head:
        _show_heads(policy)
    if policy.provenance.get("stability"):
        from hermes_probe.stability import uncertain_lines

        console.print("\n".join(uncertain_lines(policy.provenance["stability"])), highlight=False)


def _show_heads(policy: Any) -> None:
    """A schema-2 policy's KV heads: counts per role and, per layer, each head's memory."""
    from hermes_policy.policy import HEAD_ROLES, head_token_budgets

    kv_heads = policy.model.num_kv_heads
    roles = [h.role for layer in policy.layers for h in layer.heads]
    group = policy.model.num_heads // kv_heads
    console.print(f"per KV head ({policy.schema}; {kv_heads} KV heads per layer, each serving {group} query "
                  "heads): " + ", ".join(f"{roles.count(r)} {r}" for r in HEAD_ROLES))
    table = Table()
    for column in ("layer", *[f"KV head {j}" for j in range(kv_heads)], "tokens"):
        table.add_column(column, justify="right" if column in ("layer", "tokens") else "left")
    for layer in policy.layers:
        tokens = head_token_budgets(layer, kv_heads)
        cells = []
        for head, n in zip(layer.heads, tokens):
            memory = f"window {head.window}" if head.role == "streaming" else f"share {head.share:.2f} = {n}"
            confidence = "" if head.confidence is None else f" ({head.confidence:.2f})"
            cells.append(f"{head.role}{confidence}, {memory}, w {head.recency_weight:.2f}, k {head.forgetting_rate:.1f}")
        table.add_row(str(layer.index), *cells, f"{sum(tokens)} / {kv_heads * layer.budget}")
    console.print(table)


@app.command()
@friendly_errors
def export(
    policy_path: Annotated[Path, typer.Option("--policy", help="A policy.json (schema 1 or 2).")],
    duo_attention: Annotated[Path | None, typer.Option(
        help="Write the KV heads' retrieval weights in DuoAttention's pattern format (TSV: a row per "
             "layer, a column per KV head), which kvpress' DuoAttentionPress reads.")] = None,
    kvpress_budgets: Annotated[Path | None, typer.Option(
        help="Write the stream tokens of every KV head (JSON, format hermes-head-budgets/1).")] = None,
) -> None:
    """Export a policy's head patterns for other tools (see docs/heads.md)."""
    from hermes_policy.errors import OutputError
    from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic
    from hermes_policy.policy import Policy
    from hermes_probe.export import duo_attention_tsv, head_budgets

    if duo_attention is None and kvpress_budgets is None:
        raise OutputError("nothing to export: give --duo-attention OUT.tsv and/or --kvpress-budgets OUT.json")
    if duo_attention is not None and kvpress_budgets is not None and duo_attention.resolve() == kvpress_budgets.resolve():
        raise OutputError("--duo-attention and --kvpress-budgets name the same file")
    check_output_file(duo_attention, "--duo-attention")
    check_output_file(kvpress_budgets, "--kvpress-budgets")
    policy = Policy.load(policy_path)
    if not policy.per_head:
        _note(f"note: {policy_path} is a {policy.schema} policy (per layer): every KV head of a layer gets "
              "the layer's values")
    if duo_attention is not None:
        write_text_atomic(duo_attention, duo_attention_tsv(policy))
        console.print(f"wrote {duo_attention} ({policy.model.num_layers} layers x {policy.model.num_kv_heads} "
                      "KV heads, retrieval weights)")
    if kvpress_budgets is not None:
        write_json_atomic(kvpress_budgets, head_budgets(policy, str(policy_path)))
        console.print(f"wrote {kvpress_budgets} (tokens per KV head)")


@app.command()
@friendly_errors
def stream(
    model: Annotated[
        str | None, typer.Option(help="Hub id, local folder or .gguf file; default: the embedded SmolLM2.")
    ] = None,
    policy: Annotated[
        str, typer.Option(help="A policy.json, paper-default (the paper's HERMES policy; also: hermes), "
                          "or a rule: full, fifo, sink+recent, uniform, attention-only, window, retrieval.")
    ] = "paper-default",
    video: Annotated[Path | None, typer.Option(help="A video file or frame folder.")] = None,
    annotations: Annotated[Path | None, typer.Option(help="Run every video and question of a streaming-QA JSON "
                                                     "(format: docs/annotations.md).")] = None,
    video_root: Annotated[Path | None, typer.Option(help="Folder that relative video paths refer to.")] = None,
    synthetic: Annotated[bool, typer.Option(
        help="Stream the built-in synthetic stream (also used when neither --video nor --annotations is given).",
        show_default=False)] = False,
    frames: Annotated[int, typer.Option(min=1, help="Frames of the synthetic stream.")] = 64,
    tokens_per_frame: Annotated[int | None, typer.Option(min=1, help="Text-frame length (causal LMs).")] = None,
    fps: Annotated[float, typer.Option(min=0.01, help="Frames sampled per second of video "
                                       "(at most the video's own rate).")] = 0.5,
    chunk: Annotated[int, typer.Option(min=1, help="Frames per prefill chunk.")] = 8,
    budget: Budget = None,
    window_frames: WindowFrames = None,
    retrieve_chunks: RetrieveChunks = None,
    host_budget_gb: HostBudgetGb = None,
    ask: Annotated[list[str] | None, typer.Option(help="A question (repeatable).")] = None,
    at: Annotated[
        list[float] | None, typer.Option(help="Stream second of each --ask, in order (default: at the end).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer length limit.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic stream.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow code from the model repository.")] = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the results here (- for standard output).")
    ] = None,
) -> None:
    """Stream a video (or the synthetic stream) under a retention rule and answer questions at their times."""
    from hermes_policy.errors import StreamError

    chosen = [n for n, g in (("--video", video), ("--annotations", annotations), ("--synthetic", synthetic or None))
              if g is not None]
    if len(chosen) > 1:
        raise StreamError(f"choose one input, not {' and '.join(chosen)}")
    if at and (not ask or len(at) > len(ask)):
        raise StreamError("each --at needs its --ask (they pair up in order)")
    check_output_file(json_out)  # before the stream runs, not after
    with _report_to_stderr(is_stdout(json_out)):
        _stream(model, policy, video, annotations, video_root, frames, tokens_per_frame, fps, chunk, budget,
                ask, at, max_new_tokens, seed, device, dtype, trust_remote_code, json_out,
                rule_options(window_frames, retrieve_chunks, host_budget_gb))


def _stream(model: str | None, policy: str, video: Path | None, annotations: Path | None,
            video_root: Path | None, frames: int, tokens_per_frame: int | None, fps: float, chunk: int,
            budget: int | None, ask: list[str] | None, at: list[float] | None, max_new_tokens: int,
            seed: int, device: str | None, dtype: str | None, trust_remote_code: bool,
            json_out: Path | None, rule_settings: dict[str, Any]) -> None:
    from types import SimpleNamespace

    import numpy as np
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from hermes_policy import StreamingSession
    from hermes_policy.errors import StreamError
    from hermes_policy.inputs.annotations import load_annotations
    from hermes_policy.inputs.playback import TimedQuestion, stream_chunks_with_questions
    from hermes_policy.inputs.synthetic_shapes import shapes_video
    from hermes_policy.inputs.synthetic_text import text_stream
    from hermes_policy.inputs.video import iter_video_chunks, source_rate
    from hermes_policy.retention.specs import rule_budget, rule_from_spec

    entries = load_annotations(annotations, video_root) if annotations is not None else []
    adapter = _load(model, device, dtype, tokens_per_frame, trust_remote_code)
    if (video or annotations) and adapter.is_text_only:
        raise StreamError(f"{adapter.name_or_path} is a text-only model and cannot watch videos; use --synthetic")
    rule = rule_from_spec(policy, adapter, budget, **rule_settings)
    rule.validate(adapter)  # before any frame is decoded
    if getattr(getattr(rule, "policy", None), "per_head", False):
        _note(f"note: {policy} has per-KV-head entries (hermes-policy/2): rule hermes-heads keeps tokens per KV "
              "head (docs/heads.md)")
    if budget is not None and policy not in ("paper-default", "hermes") and getattr(rule, "policy", None):
        original = rule.policy.provenance.get("budget_override", {}).get("from")
        _note(f"note: --budget {budget} overrides the budget of {policy} ({original} tokens per layer)")
    times = list(at or []) + [math.inf] * (len(ask or []) - len(at or []))

    def chunks_of(path: Path) -> tuple[Any, int | None]:
        """Lazily decoded chunks (one chunk in memory, not the video) and no known length."""
        rate = source_rate(path)
        if rate > 0 and fps > rate:
            _note(f"note: --fps {fps:g} is above the rate of {path} ({rate:g} fps); sampling at {rate:g} fps "
                  "(a higher rate would only repeat frames)")
        return iter_video_chunks(path, fps, chunk, cap_at_source_rate=True), None

    jobs: list[tuple[str, Callable[[], tuple[Any, int | None]], list[Any]]] = []
    if annotations is not None:
        for entry in entries:
            questions = [TimedQuestion(q.question, q.ask_after, q.answer) for q in entry.questions]
            jobs.append((entry.video_id, functools.partial(chunks_of, Path(entry.video_path)), questions))
    elif video is not None:
        jobs.append((str(video), functools.partial(chunks_of, video),
                     [TimedQuestion(q, t) for q, t in zip(ask or [], times)]))
    else:
        synth = text_stream(frames, seed=seed) if adapter.is_text_only else shapes_video(frames, seed=seed)
        questions = [TimedQuestion(q, t) for q, t in zip(ask or [], times)] or [
            TimedQuestion(q.question, q.end_time, q.answer) for q in synth.questions[:3]
        ]
        stamps = np.asarray(synth.timestamps)

        def synthetic_chunks() -> tuple[Any, int | None]:
            pieces = (SimpleNamespace(frames=synth.frames[i : i + chunk], timestamps=stamps[i : i + chunk])
                      for i in range(0, len(synth.frames), chunk))
            return pieces, len(synth.frames)

        jobs.append(("synthetic", synthetic_chunks, questions))
    if not any(questions for *_, questions in jobs):
        raise StreamError("nothing to ask: give --ask (or --annotations with questions)")
    records = []
    compressions = 0
    for name, open_chunks, questions in jobs:
        session = StreamingSession(adapter, rule_from_spec(policy, adapter, budget, **rule_settings), chunk_frames=chunk,
                                   fps=fps)
        console.print(f"[bold]{name}[/] | rule [bold]{rule.name}[/] | {adapter.name_or_path}")
        table = Table()
        for column in ("at s", "question", "expected", "answer", "TTFT ms", "TPOT ms", "kept/layer", "peak MiB"):
            table.add_column(column)
        chunks, total = open_chunks()
        columns = (TextColumn("streaming"), BarColumn(), TextColumn("{task.completed} frames"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("streaming", total=total)
            answered = stream_chunks_with_questions(session, chunks, questions, max_new_tokens,
                                                    on_frames=lambda n, task=task: progress.advance(task, n))
        for question, answer in answered:
            kept = answer.tokens_kept
            peak = answer.peak_memory_bytes
            table.add_row(
                "end" if math.isinf(question.at) else f"{question.at:g}", question.question,
                question.expected or "-", answer.text, f"{answer.ttft_ms:.1f}",
                f"{answer.tpot_ms:.1f}" if answer.tpot_ms else "-",
                f"{min(kept)}-{max(kept)}" if min(kept) != max(kept) else str(kept[0]),
                f"{peak / 2**20:.0f}" if peak else "-",
            )
            records.append({"stream": name, "at": None if math.isinf(question.at) else question.at,
                            "question": question.question, "expected": question.expected,
                            **_answer_dict(answer)})
        console.print(table)
        console.print(f"{session.frames_seen} frames | compressions {session.compressions}, guidance passes "
                      f"{session.guidance_passes}, KV cache {session.store.nbytes() / 2**20:.1f} MiB")
        _note_no_compression(session, session.retention)
        compressions += session.compressions
    if json_out is not None:
        from hermes_policy.evaluation.manifest import run_manifest

        manifest = run_manifest(adapter, rule, fps=fps, chunk_frames=chunk, mode="streaming")
        write_json_output(json_out, {"manifest": manifest, "model": adapter.name_or_path, "policy": policy,
                                     "budget": rule_budget(rule, adapter.num_layers),
                                     "compressions": compressions, "answers": records})


@app.command()
def version() -> None:
    """Print the version."""
    from hermes_policy import __version__

    console.print(f"hermes-probe {__version__}")


from hermes_cli.bench_command import bench_command  # noqa: E402 - needs the helpers above
from hermes_cli.eval_command import eval_command  # noqa: E402 - needs the helpers above
from hermes_cli.fidelity_command import fidelity_command, stability_command  # noqa: E402
from hermes_cli.serve_command import serve_command  # noqa: E402 - needs the helpers above

app.command("eval")(eval_command)
app.command("fidelity")(friendly_errors(fidelity_command))
app.command("stability")(friendly_errors(stability_command))
app.command("bench")(friendly_errors(bench_command))
app.command("serve")(serve_command)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
