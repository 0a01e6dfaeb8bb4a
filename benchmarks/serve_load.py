"""Several live streams behind one `hermes-probe serve`, asked concurrently: latency and lag.

Starts the server in this process on a free loopback port, creates ``--streams`` streams of
the built-in synthetic stream played by the clock at ``--fps``, lets them run for
``--warmup`` seconds, then asks ``--questions`` questions per stream from one thread per
stream through the HTTP API: ``--arrivals independent`` (default) waits a random
exponential gap (mean ``--gap`` seconds, seeded per stream) before each question, as
independent users would; ``together`` asks on every stream at the same moment, one second
after the previous answers (a burst: questions then queue behind each other's answers). Reports answer latency percentiles, the
served TTFT (from the question's arrival at the server to its first token) and its parts
(waiting for the model, ingesting the frames released before the question, the answer's own
TTFT), frames dropped and the worst lag behind live, and checks that every answer came back
from the stream it was asked on.

For the "within 2x of the single-session bench" comparison the same process first measures
a single-session reference: one plain session with the same rule, budget and chunk, fed
``--reference-frames`` frames of the same synthetic stream, then asked the same questions
(after one untimed question, as the efficiency bench warms up).

Usage::

    python benchmarks/serve_load.py [--model random:llava-ov-7b] [--streams 4] [--fps 2]
        [--questions 5] [--chunk 8] [--budget 4000] [--device cuda] [--reference-frames 64]

Results go to ``benchmarks/results/serve-load-<model>-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx

from hermes_policy.evaluation.manifest import run_manifest
from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic
from hermes_policy.models import load_adapter
from hermes_policy.retention.specs import rule_from_spec
from hermes_policy.serving import ServerConfig, create_app, serve_in_background
from hermes_policy.serving.sources import SourceSpec, open_source
from hermes_policy.session import StreamingSession

RESULTS = Path(__file__).parent / "results"
QUESTIONS = ("What is happening right now?", "What color is the largest shape?", "Which shape moved most?",
             "What appeared a moment ago?", "Where is the circle now?", "How many shapes are there?")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spread(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p95": percentile(values, 0.95), "max": max(values)}


def reference_ttft(args: argparse.Namespace, adapter) -> dict[str, float]:
    """TTFT of one plain session asked the benchmark's questions after ``--reference-frames``
    frames of the synthetic stream (the single-session bench's setting, in this process)."""
    rule = rule_from_spec(args.policy, adapter, args.budget)
    session = StreamingSession(adapter, rule, chunk_frames=args.chunk, fps=args.fps, max_new_tokens=args.max_tokens)
    source = open_source(adapter, SourceSpec("synthetic", frames=args.reference_frames, seed=99), args.fps)
    frames = list(source)
    session.add_frames([f for f, _ in frames], timestamps=[m for _, m in frames])
    session.ask(QUESTIONS[0], max_new_tokens=args.max_tokens)  # warm-up, untimed
    ttft = [session.ask(QUESTIONS[n % len(QUESTIONS)], max_new_tokens=args.max_tokens).ttft_ms
            for n in range(args.streams * args.questions)]
    return spread(ttft)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--policy", default="paper-default")
    parser.add_argument("--budget", type=int, default=4000)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--arrivals", choices=("independent", "together"), default="independent")
    parser.add_argument("--gap", type=float, default=2.0, help="mean seconds between a stream's questions")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tokens-per-frame", type=int, default=None)
    parser.add_argument("--reference-frames", type=int, default=64,
                        help="frames fed to the single-session reference before its questions (0: no reference)")
    args = parser.parse_args(argv)

    adapter = load_adapter(args.model, device=args.device, tokens_per_frame=args.tokens_per_frame)
    args.reference = reference_ttft(args, adapter) if args.reference_frames else None
    app = create_app(adapter, ServerConfig(policy=args.policy, budget=args.budget, max_streams=args.streams,
                                           kv_budget_bytes=1 << 40, max_new_tokens=args.max_tokens))
    with serve_in_background(app) as base:
        return load(args, adapter, base)


def load(args: argparse.Namespace, adapter, base: str) -> int:
    http = httpx.Client(timeout=300)
    ids = [http.post(base + "/v1/streams", json={"source": "synthetic", "fps": args.fps, "chunk_frames": args.chunk,
                                                  "seed": i}).json()["id"] for i in range(args.streams)]
    time.sleep(args.warmup)

    def ask_all(stream_id: str) -> list[dict]:
        gaps = random.Random(ids.index(stream_id))  # the same gaps in every run
        out = []
        for n in range(args.questions):
            if args.arrivals == "independent":
                time.sleep(gaps.expovariate(1 / args.gap))
            start = time.perf_counter()
            reply = http.post(base + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}], "stream_id": stream_id,
                "max_tokens": args.max_tokens}).json()
            usage = reply["usage"]
            out.append({"stream": stream_id, "answered_by": reply["stream_id"], "latency_s": time.perf_counter() - start,
                        **{key: usage[key] for key in ("ttft_ms", "wait_ms", "catch_up_ms", "catch_up_frames",
                                                        "answer_ttft_ms", "tpot_ms", "frames_seen")}})
            if args.arrivals == "together":
                time.sleep(1.0)
        return out

    with ThreadPoolExecutor(args.streams) as pool:
        answers = [a for batch in pool.map(ask_all, ids) for a in batch]
    statuses = [http.get(f"{base}/v1/streams/{i}").json() for i in ids]
    for i in ids:
        http.delete(f"{base}/v1/streams/{i}")

    summary = {
        "answers": len(answers), "mixed_up": sum(a["stream"] != a["answered_by"] for a in answers),
        **{key: spread([a[key] for a in answers]) for key in ("ttft_ms", "wait_ms", "catch_up_ms", "answer_ttft_ms")},
        "catch_up_frames_mean": statistics.mean(a["catch_up_frames"] for a in answers),
        "latency_ms": spread([a["latency_s"] * 1e3 for a in answers]),
        "reference_ttft_ms": args.reference,
        "frames_dropped": sum(s["frames_dropped"] for s in statuses),
        "frames_ingested": [s["frames_ingested"] for s in statuses],
        "lag_seconds_at_end": [s["lag_seconds"] for s in statuses],
    }
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    command = shlex.join(["python", "benchmarks/serve_load.py", *sys.argv[1:]])
    manifest = run_manifest(adapter, None, fps=args.fps, chunk_frames=args.chunk, mode="live (serve)",
                            command=command.split(), policy=args.policy, budget=args.budget, streams=args.streams, arrivals=args.arrivals)
    model = (args.model or "embedded").replace(":", "-").replace("/", "-")
    slug = f"{model}-{args.streams}streams-chunk{args.chunk}-{args.arrivals}-{manifest['device'].split(' ')[0].lower()}-{date}"
    json_path = write_json_atomic(RESULTS / f"serve-load-{slug}.json",
                                  {"manifest": manifest, "summary": summary, "answers": answers})

    def cell(key: str, digits: int = 1) -> str:
        values = summary[key]
        return " / ".join(f"{values[q]:.{digits}f}" for q in ("p50", "p95", "max"))

    reference = summary["reference_ttft_ms"]
    ratio = "" if reference is None else f"{summary['ttft_ms']['p50'] / reference['p50']:.2f}x"
    lines = [f"# Serve load: {args.streams} streams at {args.fps:g} fps, {args.model or 'embedded SmolLM2'}", "",
             f"Command: `{command}`; device: {manifest['device']}; date: {date}; {args.policy}, budget {args.budget}, "
             f"chunks of {args.chunk}, {args.questions} questions per stream, arrivals {args.arrivals}"
             f"{f' (mean gap {args.gap:g} s)' if args.arrivals == 'independent' else ''}. Served TTFT is from "
             "the question's arrival at the server to its first token: waiting for the model, catching up on the "
             "frames released before the question, then the answer's own TTFT (all ms, p50 / p95 / max).", "",
             "| answers | mixed up | served TTFT | wait | catch-up (frames) | answer TTFT | single-session TTFT "
             "| served / single p50 | latency | dropped | lag at end s |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {summary['answers']} | {summary['mixed_up']} | {cell('ttft_ms')} | {cell('wait_ms')} | "
             f"{cell('catch_up_ms')} ({summary['catch_up_frames_mean']:.1f}) | {cell('answer_ttft_ms')} | "
             f"{'-' if reference is None else ' / '.join(f'{reference[q]:.1f}' for q in ('p50', 'p95', 'max'))} | "
             f"{ratio or '-'} | {cell('latency_ms', 0)} | {summary['frames_dropped']} | "
             f"{', '.join(f'{lag:.2f}' for lag in summary['lag_seconds_at_end'])} |"]
    write_text_atomic(json_path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if summary["mixed_up"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
