"""What standing questions cost a live stream per chunk, next to the chunk's own ingest.

A session of ``--policy`` at ``--budget`` is fed the built-in synthetic stream until its
rule has compressed (the cache at its steady size), then for ``--chunks`` more chunks each
chunk's ingest is timed, followed by one re-check of ``--standing`` standing questions
through :meth:`LiveStream.check_standing` (the server's own code: one question prefill and
a Yes/No comparison per question). On CUDA every timing synchronises the device.

Usage::

    python benchmarks/standing_cost.py [--model M] [--device cpu] [--chunk 8] [--budget 768]
        [--standing 4] [--chunks 10]

Results go to ``benchmarks/results/standing-cost-<model>-chunk<c>-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from hermes_policy.evaluation.manifest import run_manifest
from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic
from hermes_policy.models import load_adapter
from hermes_policy.retention.specs import rule_from_spec
from hermes_policy.serving.live_stream import LiveStream
from hermes_policy.serving.model_lock import ModelLock
from hermes_policy.serving.sources import SourceSpec, open_source
from hermes_policy.session import StreamingSession

RESULTS = Path(__file__).parent / "results"
QUESTIONS = ("Is a person entering the scene?", "Is the red shape touching the blue one?",
             "Has the background changed?", "Is anything moving fast?", "Is there text on screen?",
             "Is the circle larger than the square?", "Did a new shape appear?", "Is the scene dark?")


def timed(device: torch.device, work, *args, **kwargs) -> float:
    """Milliseconds ``work(*args, **kwargs)`` takes, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--policy", default="paper-default")
    parser.add_argument("--budget", type=int, default=768)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--standing", type=int, default=4, help=f"standing questions (at most {len(QUESTIONS)})")
    parser.add_argument("--chunks", type=int, default=10, help="chunks timed after the cache is at its budget")
    parser.add_argument("--tokens-per-frame", type=int, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.standing <= len(QUESTIONS):
        parser.error(f"--standing must be between 1 and {len(QUESTIONS)}")

    adapter = load_adapter(args.model, device=args.device, tokens_per_frame=args.tokens_per_frame)
    rule = rule_from_spec(args.policy, adapter, args.budget)
    session = StreamingSession(adapter, rule, chunk_frames=args.chunk, fps=args.fps)
    stream = LiveStream(session, iter(()), ModelLock(), standing=list(QUESTIONS[: args.standing]))
    frames = iter(open_source(adapter, SourceSpec("synthetic", seed=7), args.fps))

    def next_chunk() -> tuple[list, list[float]]:
        chunk = [next(frames) for _ in range(args.chunk)]
        return [f for f, _ in chunk], [m for _, m in chunk]

    warm_chunks = 0
    while session.compressions == 0:
        items, stamps = next_chunk()
        session.add_frames(items, timestamps=stamps)
        warm_chunks += 1
    stream.check_standing(0.0, held=True)  # untimed: first-use costs

    ingest_ms, standing_ms = [], []
    for _ in range(args.chunks):
        items, stamps = next_chunk()
        ingest_ms.append(timed(adapter.device, session.add_frames, items, timestamps=stamps))
        standing_ms.append(timed(adapter.device, stream.check_standing, stamps[-1], held=True))

    per_question = [ms / args.standing for ms in standing_ms]
    summary = {
        "warm_chunks": warm_chunks, "tokens_kept_max": max(session.tokens_kept),
        "ingest_ms_median": statistics.median(ingest_ms),
        "standing_ms_median": statistics.median(standing_ms),
        "per_question_ms_median": statistics.median(per_question),
        "standing_share_of_ingest": statistics.median(standing_ms) / statistics.median(ingest_ms),
        "ingest_ms": ingest_ms, "standing_ms": standing_ms,
    }
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    command = shlex.join(["python", "benchmarks/standing_cost.py", *sys.argv[1:]])
    manifest = run_manifest(adapter, rule, fps=args.fps, chunk_frames=args.chunk, mode="live (standing questions)",
                            command=command.split(), policy=args.policy, budget=args.budget, standing=args.standing)
    model = (args.model or "embedded").replace(":", "-").replace("/", "-")
    slug = f"{model}-chunk{args.chunk}-{manifest['device'].split(' ')[0].lower()}-{date}"
    json_path = write_json_atomic(RESULTS / f"standing-cost-{slug}.json", {"manifest": manifest, "summary": summary})
    lines = [f"# Standing questions: cost per chunk, {args.model or 'embedded SmolLM2'}", "",
             f"Command: `{command}`; device: {manifest['device']}; date: {date}; {args.policy}, budget "
             f"{args.budget}, chunks of {args.chunk}, medians of {args.chunks} chunks at the budget.", "",
             "| chunk ingest ms | standing questions | their re-check ms | per question ms | share of the chunk's ingest |",
             "|---|---|---|---|---|",
             f"| {summary['ingest_ms_median']:.1f} | {args.standing} | {summary['standing_ms_median']:.1f} | "
             f"{summary['per_question_ms_median']:.1f} | {summary['standing_share_of_ingest']:.0%} |"]
    write_text_atomic(json_path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
