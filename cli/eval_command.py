"""`hermes-probe eval`: run a video-QA benchmark (streaming or offline), resumable and sharded.

Registered in :mod:`hermes_cli.main`. Under ``torchrun --nproc-per-node N`` every process
takes its share of the videos (one GPU each); see :mod:`hermes_policy.evaluation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from hermes_cli.rule_options import Budget, HostBudgetGb, RetrieveChunks, WindowFrames, rule_options


def _load_benchmark(annotations: Path, video_root: Path | None) -> list[Any]:
    from hermes_policy.evaluation.runner import check_benchmark
    from hermes_policy.inputs.annotations import AnnotationError, load_annotations

    if annotations.is_file() and not annotations.read_text(encoding="utf-8", errors="replace").strip():
        raise AnnotationError(f"annotation file {annotations} is empty")
    entries = load_annotations(annotations, video_root)
    try:
        check_benchmark(entries)  # before the model loads: answers not among their choices, ...
    except AnnotationError as exc:
        raise AnnotationError(f"{annotations}: {exc}") from None
    return entries


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _print_summary(console: Any, summary: dict[str, Any], result: Any) -> None:
    from rich.table import Table

    table = Table(title="accuracy")
    for column in ("group", "questions", "scored", "correct", "accuracy %", "unparseable"):
        table.add_column(column)

    def row(name: str, block: dict[str, Any]) -> None:
        accuracy = block.get("accuracy")
        table.add_row(name, str(block.get("questions", block.get("answered"))), str(block["scored"]),
                      str(block["correct"]), _fmt(None if accuracy is None else 100 * accuracy),
                      str(block["unparseable"]))

    row("overall", summary)
    for task, block in summary["per_task"].items():
        row(f"task {task}", block)
    split = summary.get("videomme_split")
    if split:
        for name in ("short", "medium", "long"):
            if split[name]["questions"]:
                row(f"{name} ({split['thresholds_s'][name]} s)", split[name])
    window = summary.get("config", {}).get("perception_window_s")
    for need, block in (summary.get("by_need") or {}).items():
        if block["questions"]:
            row(f"{need} (evidence {'within' if need == 'perception' else 'beyond'} {_fmt(window, 'g')} s)", block)
    console.print(table)
    peak = summary.get("peak_memory_bytes_max")
    console.print(
        f"answered {summary['answered']} of {summary['selected_questions']} questions | "
        f"TTFT {_fmt(summary['ttft_ms_mean'])} ms | TPOT {_fmt(summary['tpot_ms_mean'])} ms | "
        f"peak memory {'-' if peak is None else f'{peak / 2**30:.2f} GiB'}"
    )
    if summary["failed_videos"]:
        console.print(f"[red]{len(summary['failed_videos'])} video(s) failed[/] (their questions are "
                      "retried by the next run into the same --out):")
        for failure in summary["failed_videos"]:
            console.print(f"  - {failure['video_id']} ({failure['video_path']}): {failure['reason']}",
                          highlight=False)
    if summary.get("resume_mismatches"):
        console.print(f"[yellow]{summary['resume_mismatches']} re-asked question(s) answered "
                      "differently than stored[/]")
    console.print(f"wrote {result.results_path} and {result.summary_path}")


def eval_command(
    model: Annotated[str, typer.Option(help="Hub id or local folder of a video model.")],
    annotations: Annotated[Path, typer.Option(help="Streaming-QA annotation JSON: a list of videos, each with "
                                              "video_id, video_path and conversations (question, answer, "
                                              "optional choices and end_time); see docs/annotations.md.")],
    out: Annotated[Path, typer.Option(help="Output folder; re-running into it resumes.")],
    policy: Annotated[
        str, typer.Option(help="A policy.json, paper-default (the paper's HERMES policy; also: hermes), "
                          "or a rule: full, fifo, sink+recent, uniform, attention-only, window, retrieval.")
    ] = "paper-default",
    video_root: Annotated[Path | None, typer.Option(help="Folder that relative video paths refer to.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N questions of the benchmark.")] = None,
    budget: Budget = None,
    window_frames: WindowFrames = None,
    retrieve_chunks: RetrieveChunks = None,
    host_budget_gb: HostBudgetGb = None,
    fps: Annotated[float, typer.Option(min=0.01, help="Frames sampled per second of video "
                                       "(at most each video's own rate).")] = 0.5,
    chunk: Annotated[int, typer.Option(min=1, help="Frames per prefill chunk.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer length limit, open-ended questions.")] = 64,
    mc_max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer length limit, multiple choice.")] = 16,
    judge: Annotated[str, typer.Option(help="Open-ended scoring: exact, f1 or http (an OpenAI-compatible LLM judge).")] = "f1",
    f1_threshold: Annotated[float, typer.Option(help="Token F1 needed to count as correct (--judge f1).")] = 0.5,
    judge_url: Annotated[str | None, typer.Option(help="--judge http: API base URL (or $HERMES_JUDGE_URL).")] = None,
    judge_model: Annotated[str | None, typer.Option(help="--judge http: model name (or $HERMES_JUDGE_MODEL).")] = None,
    judge_api_key_env: Annotated[
        str, typer.Option(help="--judge http: environment variable holding the API key.")
    ] = "OPENAI_API_KEY",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda ... (default: cuda if available); under torchrun cuda:LOCAL_RANK.")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow code from the model repository.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Discard earlier results in --out instead of resuming.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Run a video-QA benchmark: answers to results.jsonl (resumable), accuracies to summary.json.

    The annotation file is a JSON list of videos; each has a video_id, a video_path (relative
    paths start at --video-root, else at the file's folder) and conversations: questions with
    their answer, optional multiple-choice options and the stream second after which to ask
    (end_time; absent: after the whole video). The format, with an example, is in
    docs/annotations.md. To try it without a GPU or downloads: --model random:tiny-llava-ov.
    """
    options = dict(locals())
    from hermes_cli.main import friendly_errors  # here: hermes_cli.main imports this module

    friendly_errors(_run)(**options)


def _run(**options: Any) -> None:
    from hermes_cli.main import _load, console
    from hermes_cli.outputs import check_output_folder

    from hermes_policy.evaluation import distributed, evaluate, make_judge

    o = options
    device = distributed.resolve_device(o["device"])
    check_output_folder(o["out"])  # before the model loads and the first video streams
    entries = _load_benchmark(o["annotations"], o["video_root"])
    judge = make_judge(o["judge"], f1_threshold=o["f1_threshold"], url=o["judge_url"],
                       model=o["judge_model"], api_key_env=o["judge_api_key_env"])
    ctx = distributed.init_distributed(device)
    try:
        adapter = _load(o["model"], str(device), o["dtype"], None, o["trust_remote_code"])
        result = evaluate(
            adapter, o["policy"], entries, o["out"], budget=o["budget"], fps=o["fps"],
            rule_options=rule_options(o["window_frames"], o["retrieve_chunks"], o["host_budget_gb"]),
            chunk_frames=o["chunk"], max_new_tokens=o["max_new_tokens"],
            mc_max_new_tokens=o["mc_max_new_tokens"], judge=judge, limit=o["limit"],
            overwrite=o["overwrite"], progress=o["progress"], console=console, ctx=ctx,
            run_info={"annotations": str(o["annotations"]), "world_size": ctx.world_size},
        )
        if ctx.is_main and result.summary is not None:
            _print_summary(console, result.summary, result)
            _fail_when_nothing_answered(result.summary)
    finally:
        distributed.shutdown(ctx)


def _fail_when_nothing_answered(summary: dict[str, Any]) -> None:
    """A run in which every video failed answered nothing: that is an error (exit 1), not an
    accuracy of null that a script would take for success."""
    from hermes_policy.evaluation.runner import EvalError

    if summary["selected_questions"] and not summary["answered"] and summary["failed_videos"]:
        raise EvalError(f"every video failed ({len(summary['failed_videos'])} of them); no question was "
                        "answered (reasons above)")
