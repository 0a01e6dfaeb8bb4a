"""Run a streaming (or offline) video-QA benchmark through a model under a retention rule.

Per video, one continuing stream: a fresh :class:`~hermes_policy.session.StreamingSession`,
frames decoded lazily (:func:`~hermes_policy.inputs.video.iter_video_chunks`, so memory holds one
chunk, not the video), and the questions asked in time order, each once every frame up to
its ``end_time`` has been streamed (no ``end_time``: after the whole video), through
:func:`~hermes_policy.inputs.playback.stream_with_questions`. Offline benchmarks are the special
case where every question comes at the end. Decoding stops after the last question that
still needs an answer.

Each answer becomes one line of ``results.jsonl`` (see :mod:`.results`), written and flushed
as soon as it exists.

Resume
    Re-running into the same output folder skips every ``(video_id, question_index)``
    already in ``results.jsonl`` or a shard file. A video whose questions are all answered is
    not decoded. A partially answered video is streamed again from its start, and its
    earlier, already answered questions are asked again without being written again: asking
    a question flushes a partial chunk and adds to the conversation history that HERMES'
    guidance prompts read, so skipping them would change every later answer. The re-asked
    predictions are compared with the stored ones and a mismatch is reported (it means the
    model is not deterministic on this device). The settings answers depend on are kept in
    ``config.json``; resuming with different ones is refused (use ``overwrite``).

``limit``
    Keeps the first ``limit`` questions of the benchmark (videos in file order, questions
    in time order), whatever the number of processes, so a limited run is a prefix of the
    full one and a later run with a larger limit (or none) completes it.

Failures
    A missing or undecodable video (or one the stream cannot run, or that runs out of GPU
    memory) is reported when it happens, the run goes on, and it is listed at the end and in
    ``summary.json``; its unanswered questions are retried by the next run.

Distributed
    Under ``torchrun`` every rank streams the videos ``rank::world_size`` into its own shard
    file; rank 0 merges them into ``results.jsonl`` and writes the summary (see
    :mod:`.distributed`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hermes_policy.errors import HermesError, StreamError, VideoInputError
from hermes_policy.evaluation import distributed as dist_mod
from hermes_policy.evaluation.answers import correct_choice, parse_choice
from hermes_policy.evaluation.judges import Judge, make_judge
from hermes_policy.evaluation.manifest import run_manifest
from hermes_policy.evaluation.prompts import PROMPT_VERSION, format_prompt, letter
from hermes_policy.evaluation.results import (
    CONFIG_FILE,
    RESULTS_FILE,
    SHARD_DIR,
    SUMMARY_FILE,
    ResultsWriter,
    merge_results,
    read_all,
    record_key,
    shard_path,
    write_json_atomic,
)
from hermes_policy.evaluation.summary import question_need, summarize
from hermes_policy.inputs.annotations import AnnotationError, Question, VideoEntry
from hermes_policy.inputs.playback import TimedQuestion, stream_with_questions
from hermes_policy.inputs.video import iter_video_chunks
from hermes_policy.models.base import ModelAdapter
from hermes_policy.retention.specs import rule_budget, rule_from_spec
from hermes_policy.session import Answer, StreamingSession

CONFIG_SCHEMA = "hermes-eval/1"
# Settings that change answers: a resumed run must use the same ones.
COMPARED_SETTINGS = ("model", "policy", "budget", "fps", "chunk_frames", "max_new_tokens",
                     "mc_max_new_tokens", "judge", "judge_threshold", "prompt", "rule_options",
                     "perception_window_s")


class EvalError(HermesError):
    """An evaluation cannot start (e.g. its output folder holds a different run)."""


@dataclass
class EvalResult:
    """What :func:`evaluate` did. ``summary`` and the merged ``failed`` list only on rank 0."""

    out_dir: Path
    results_path: Path
    summary_path: Path
    written: int
    failed: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    resume_mismatches: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Item:
    """One question to ask: its place, its reference and whether its answer is still needed."""

    index: int
    question: Question
    correct: int | None
    done: dict[str, Any] | None


def check_benchmark(entries: list[VideoEntry]) -> list[list[int | None]]:
    """Validate what scoring needs; returns the right option of every question.

    Raises :class:`AnnotationError` for an empty benchmark, duplicate video ids (results are
    keyed by video id) and answers that are not among their choices.
    """
    if not entries:
        raise AnnotationError("the benchmark holds no videos")
    seen: dict[str, int] = {}
    correct: list[list[int | None]] = []
    for i, entry in enumerate(entries):
        if entry.video_id in seen:
            raise AnnotationError(
                f"video_id {entry.video_id!r} appears in entries {seen[entry.video_id]} and {i}; "
                "ids must be unique (results are keyed by video_id and question index)"
            )
        seen[entry.video_id] = i
        correct.append([
            correct_choice(q, f"entry {i} (video_id {entry.video_id!r}), question {q.question!r}")
            for q in entry.questions
        ])
    return correct


def select_questions(entries: list[VideoEntry], limit: int | None) -> list[int]:
    """How many questions of each video (in time order) the run covers: the first ``limit``."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be at least 1, got {limit}")
    left = math.inf if limit is None else limit
    counts = []
    for entry in entries:
        take = int(min(len(entry.questions), left))
        counts.append(take)
        left -= take
    return counts


def _judge_settings(judge: Judge | None) -> dict[str, Any]:
    return {"judge": None if judge is None else judge.name,
            "judge_threshold": getattr(judge, "threshold", None)}


def _prepare_out_dir(out_dir: Path, config: dict[str, Any], overwrite: bool, ctx: dist_mod.DistContext) -> None:
    """Refuse a folder holding another configuration; rank 0 clears it (overwrite) and writes config."""
    path = out_dir / CONFIG_FILE
    if path.is_file() and not overwrite:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EvalError(f"{path} cannot be read ({exc}); use --overwrite to start over") from None
        changed = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in COMPARED_SETTINGS
                   if old.get(k) != config.get(k)]
        if changed:
            raise EvalError(
                f"{out_dir} holds results of another configuration ({'; '.join(changed)}); "
                "use another --out, or --overwrite to start over"
            )
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in (RESULTS_FILE, SUMMARY_FILE):
                (out_dir / name).unlink(missing_ok=True)
            for shard in (out_dir / SHARD_DIR).glob("rank*.jsonl"):
                shard.unlink()
        write_json_atomic(path, config)
    dist_mod.barrier(ctx)


def _tokens_kept_fields(kept: list[int]) -> dict[str, Any]:
    return {
        "tokens_kept_min": min(kept) if kept else None,
        "tokens_kept_max": max(kept) if kept else None,
        "tokens_kept_mean": sum(kept) / len(kept) if kept else None,
    }


def make_record(
    entry: VideoEntry, item: _Item, answer: Answer, judge: Judge | None, perception_window_s: float = math.inf
) -> dict[str, Any]:
    """The results line of one answered question (``need``: see :func:`.summary.question_need`)."""
    question = item.question
    prediction = answer.text
    parsed: int | None = None
    unparseable = False
    correct: bool | None = None
    score: float | None = None
    scored_by: str | None = None
    if question.choices:
        parsed = parse_choice(prediction, question.choices)
        unparseable = parsed is None
        correct = parsed is not None and parsed == item.correct
        score, scored_by = float(correct), "choice"
    elif question.answer is not None and judge is not None:
        verdict = judge.judge(question.question, question.answer, prediction)
        correct, score, scored_by = verdict.correct, verdict.score, judge.name
    return {
        "video_id": entry.video_id,
        "question_index": item.index,
        "task": question.task,
        "question": question.question,
        "choices": list(question.choices) if question.choices else None,
        "answer": question.answer,
        "answer_choice": letter(item.correct) if item.correct is not None else None,
        "end_time": question.end_time,
        "duration": entry.duration,
        "need": question_need(question.start_time, question.end_time, entry.duration, perception_window_s),
        "prediction": prediction,
        "parsed_choice": letter(parsed) if parsed is not None else None,
        "unparseable": unparseable,
        "correct": correct,
        "score": score,
        "scored_by": scored_by,
        "ttft_ms": answer.ttft_ms,
        "tpot_ms": answer.tpot_ms,
        **_tokens_kept_fields(answer.tokens_kept),
        "peak_memory_bytes": answer.peak_memory_bytes,
        "kv_cache_bytes": answer.kv_cache_bytes,
        "frames_seen": answer.frames_seen,
    }


def stream_answers(
    session: StreamingSession,
    chunks: Iterator[Any],
    questions: list[TimedQuestion],
    max_new_tokens: list[int],
) -> Iterator[tuple[int, Answer]]:
    """Ask ``questions`` (sorted by time) on a lazily decoded stream; yields ``(i, answer)``.

    Frames come from ``chunks`` (objects with ``frames`` and ``timestamps``). Question ``i``
    is asked, through :func:`stream_with_questions`, once every frame with a timestamp
    ``<= at`` has been streamed and before any later one; frames are streamed as soon as
    they are known to precede the next question, so at most one decoded chunk waits in
    memory. Nothing after the last question is decoded.
    """
    frames: np.ndarray | None = None
    stamps = np.zeros(0)
    exhausted = False
    for i, question in enumerate(questions):
        while True:
            ready = int(np.searchsorted(stamps, question.at, side="right"))  # stamps <= at
            if ready < len(stamps) or exhausted:
                before = frames[:ready] if frames is not None else []
                ((_, answer),) = stream_with_questions(
                    session, before, stamps[:ready], [question], max_new_tokens[i]
                )
                frames = frames[ready:] if frames is not None else None
                stamps = stamps[ready:]
                yield i, answer
                break
            if ready and frames is not None:  # every buffered frame precedes the question
                session.add_frames(frames, timestamps=[float(t) for t in stamps])
                frames, stamps = None, np.zeros(0)
            try:
                chunk = next(chunks)
            except StopIteration:
                exhausted = True
                continue
            frames = chunk.frames if frames is None else np.concatenate([frames, chunk.frames])
            stamps = np.concatenate([stamps, np.asarray(chunk.timestamps, dtype=np.float64)])


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    error = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (error,) if error is not None else ()


def evaluate(
    adapter: ModelAdapter,
    rule_spec: str,
    entries: list[VideoEntry],
    out_dir: str | Path,
    *,
    budget: int | None = None,
    fps: float = 0.5,
    chunk_frames: int = 8,
    max_new_tokens: int = 64,
    mc_max_new_tokens: int = 16,
    judge: Judge | str | None = "f1",
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    console: Any = None,
    ctx: dist_mod.DistContext | None = None,
    run_info: dict[str, Any] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    rule_options: dict[str, Any] | None = None,
    perception_window_s: float | None = None,
) -> EvalResult:
    """Evaluate ``adapter`` under the retention rule ``rule_spec`` on ``entries``.

    Parameters
    ----------
    adapter : a loaded video model (see :func:`hermes_policy.models.load_adapter`)
    rule_spec : a policy JSON, ``paper-default`` or a rule name (as ``hermes-probe stream``)
    entries : the benchmark (:func:`hermes_policy.inputs.annotations.load_annotations`)
    out_dir : output folder (results, shards, config, summary; see :mod:`.results`)
    budget : stream tokens per layer for rule names and ``paper-default`` (default 4000); with
        a policy file it overrides the file's budgets (None: the file's own)
    fps, chunk_frames : frame sampling rate and frames per prefill chunk
    max_new_tokens, mc_max_new_tokens : answer length limits, open-ended / multiple choice
    judge : scores open-ended answers that have a reference: a :class:`Judge`, a name for
        :func:`~.judges.make_judge` (default ``f1``, as the command line), or None (not scored)
    limit : only the first ``limit`` questions of the benchmark
    overwrite : discard earlier results in ``out_dir`` instead of resuming
    progress : show a progress bar (rank 0)
    console : a :class:`rich.console.Console` for messages (default: a new one on stderr)
    ctx : the distributed context (default: the initialised process group, if any)
    run_info : extra facts stored in ``config.json`` and the summary (not compared on resume)
    on_record : called with every record after it is written (tests use it to interrupt)
    rule_options : options of the question-time rules (``frames``, ``retrieve_chunks``,
        ``host_budget_bytes``; see :func:`~hermes_policy.inputs.playback.rule_from_spec`), compared
        on resume like the other settings
    perception_window_s : questions whose evidence lies within this many seconds before them
        count as perception, the others as memory (default: 4 frames at ``fps``; see
        :func:`.summary.question_need`)

    Returns
    -------
    EvalResult
        On rank 0 with the summary and every rank's failures.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    ctx = ctx or dist_mod.current()
    console = console or Console(stderr=True)
    out_dir = Path(out_dir)
    tag = f"[rank {ctx.rank}] " if ctx.distributed else ""
    if adapter.is_text_only:
        raise EvalError(f"{adapter.name_or_path} is a text-only model and cannot watch videos")
    if isinstance(judge, str):
        judge = make_judge(judge)
    correct = check_benchmark(entries)
    counts = select_questions(entries, limit)
    rule_options = {k: v for k, v in (rule_options or {}).items() if v is not None}
    if perception_window_s is None:
        perception_window_s = 4 / fps
    rule = rule_from_spec(rule_spec, adapter, budget, **rule_options)
    rule.validate(adapter)  # fail before any video, not inside the first one
    config = {
        "schema": CONFIG_SCHEMA, "model": adapter.name_or_path, "policy": rule_spec, "rule": rule.name,
        **({"rule_options": rule_options} if rule_options else {}),
        "budget": rule_budget(rule, adapter.num_layers), "fps": fps, "chunk_frames": chunk_frames,
        "max_new_tokens": max_new_tokens,
        "mc_max_new_tokens": mc_max_new_tokens, **_judge_settings(judge), "prompt": PROMPT_VERSION,
        "perception_window_s": perception_window_s,
        **(run_info or {}),
    }
    _prepare_out_dir(out_dir, config, overwrite, ctx)

    done = read_all(out_dir)
    videos = ctx.shard([i for i, n in enumerate(counts) if n > 0])
    plans = []
    for v in videos:
        entry = entries[v]
        items = [_Item(j, entry.questions[j], correct[v][j], done.get((entry.video_id, j)))
                 for j in range(counts[v])]
        pending = [it for it in items if it.done is None]
        if pending:  # ask up to the last pending question; earlier ones again, unwritten
            plans.append((entry, items[: pending[-1].index + 1], len(pending)))
    total = sum(n for *_, n in plans)

    results_path = out_dir / RESULTS_FILE
    target = results_path if not ctx.distributed else shard_path(out_dir, ctx.rank)
    failed: list[dict[str, Any]] = []
    written = mismatches = 0
    oom = _out_of_memory_errors()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with ResultsWriter(target) as writer, Progress(
        *columns, console=console, disable=not (progress and ctx.is_main), transient=False
    ) as bar:
        task = bar.add_task(f"{tag}questions", total=total)
        for entry, items, n_pending in plans:
            bar.update(task, description=f"{tag}{entry.video_id}")
            timed = [TimedQuestion(format_prompt(it.question), it.question.ask_after, it.question.answer)
                     for it in items]
            limits = [mc_max_new_tokens if it.question.choices else max_new_tokens for it in items]
            written_here = 0
            try:
                session = StreamingSession(adapter, rule_from_spec(rule_spec, adapter, budget, **rule_options),
                                           chunk_frames=chunk_frames, fps=fps)
                chunks = iter_video_chunks(entry.video_path, fps, chunk_frames, cap_at_source_rate=True)
                for i, answer in stream_answers(session, chunks, timed, limits):
                    item = items[i]
                    if item.done is not None:
                        if item.done.get("prediction") != answer.text:
                            mismatches += 1
                            console.print(f"{tag}[yellow]warning:[/] {entry.video_id} question {item.index}: "
                                          "re-asked on resume, answered differently than stored "
                                          f"({item.done.get('prediction')!r} -> {answer.text!r})")
                        continue
                    record = make_record(entry, item, answer, judge, perception_window_s)
                    writer.write(record)
                    written += 1
                    written_here += 1
                    bar.advance(task)
                    if on_record is not None:
                        on_record(record)
            except (VideoInputError, StreamError, *oom) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                failed.append({"video_id": entry.video_id, "video_path": str(entry.video_path),
                               "reason": reason, "unanswered": n_pending - written_here})
                console.print(f"{tag}[red]skipped {entry.video_id}:[/] {reason}", highlight=False)
                bar.advance(task, n_pending - written_here)
                if oom and isinstance(exc, oom) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
            finally:
                session = None  # noqa: F841 - free the cache before the next video

    everyone = dist_mod.gather_objects(ctx, (failed, mismatches))  # every rank has finished writing
    result = EvalResult(out_dir, results_path, out_dir / SUMMARY_FILE, written, failed,
                        resume_mismatches=mismatches)
    if ctx.is_main:
        result.failed = [f for rank_failed, _ in everyone for f in rank_failed]
        result.resume_mismatches = sum(m for _, m in everyone)
        records = merge_results(out_dir, [e.video_id for e in entries])
        selected = {(e.video_id, j) for e, n in zip(entries, counts) for j in range(n)}
        chosen = [r for r in records if record_key(r) in selected]
        summary = summarize(chosen, selected=len(selected), config=config, failed=result.failed)
        summary["resume_mismatches"] = result.resume_mismatches
        summary = {
            "manifest": run_manifest(adapter, rule, fps=fps, chunk_frames=chunk_frames, mode="streaming",
                                     judge=_judge_settings(judge), annotations=(run_info or {}).get("annotations")),
            **summary,
        }
        write_json_atomic(result.summary_path, summary)
        result.summary, result.records = summary, chosen
    dist_mod.barrier(ctx)
    return result
