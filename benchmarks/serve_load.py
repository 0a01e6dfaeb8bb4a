"""Several live streams behind one `hermes-probe serve`, asked concurrently: latency and lag.

Starts the server in this process on a free loopback port, creates ``--streams`` streams of
the built-in synthetic stream played by the clock at ``--fps``, lets them run for
``--warmup`` seconds, then asks ``--questions`` questions per stream from one thread per
stream (all streams at once) through the HTTP API. Reports answer latency percentiles, the
TTFT the server measured, frames dropped and the worst lag behind live, and checks that
every answer came back from the stream it was asked on.

Usage::

    python benchmarks/serve_load.py [--model random:llava-ov-7b] [--streams 4] [--fps 2]
        [--questions 5] [--chunk 8] [--budget 4000] [--device cuda]

Results go to ``benchmarks/results/serve-load-<model>-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
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
from hermes_policy.serving import ServerConfig, create_app, serve_in_background

RESULTS = Path(__file__).parent / "results"
QUESTIONS = ("What is happening right now?", "What color is the largest shape?", "Which shape moved most?",
             "What appeared a moment ago?", "Where is the circle now?", "How many shapes are there?")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tokens-per-frame", type=int, default=None)
    args = parser.parse_args(argv)

    adapter = load_adapter(args.model, device=args.device, tokens_per_frame=args.tokens_per_frame)
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
        out = []
        for n in range(args.questions):
            start = time.perf_counter()
            reply = http.post(base + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}], "stream_id": stream_id,
                "max_tokens": args.max_tokens}).json()
            out.append({"stream": stream_id, "answered_by": reply["stream_id"], "latency_s": time.perf_counter() - start,
                        "ttft_ms": reply["usage"]["ttft_ms"], "tpot_ms": reply["usage"]["tpot_ms"],
                        "frames_seen": reply["usage"]["frames_seen"]})
            time.sleep(1.0)
        return out

    with ThreadPoolExecutor(args.streams) as pool:
        answers = [a for batch in pool.map(ask_all, ids) for a in batch]
    statuses = [http.get(f"{base}/v1/streams/{i}").json() for i in ids]
    for i in ids:
        http.delete(f"{base}/v1/streams/{i}")

    ttft = [a["ttft_ms"] for a in answers]
    latency = [a["latency_s"] * 1e3 for a in answers]
    summary = {
        "answers": len(answers), "mixed_up": sum(a["stream"] != a["answered_by"] for a in answers),
        "ttft_ms": {"p50": statistics.median(ttft), "p95": percentile(ttft, 0.95), "max": max(ttft)},
        "latency_ms": {"p50": statistics.median(latency), "p95": percentile(latency, 0.95), "max": max(latency)},
        "frames_dropped": sum(s["frames_dropped"] for s in statuses),
        "frames_ingested": [s["frames_ingested"] for s in statuses],
        "lag_seconds_at_end": [s["lag_seconds"] for s in statuses],
    }
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    command = shlex.join(["python", "benchmarks/serve_load.py", *sys.argv[1:]])
    manifest = run_manifest(adapter, None, fps=args.fps, chunk_frames=args.chunk, mode="live (serve)",
                            command=command.split(), policy=args.policy, budget=args.budget, streams=args.streams)
    model = (args.model or "embedded").replace(":", "-").replace("/", "-")
    slug = f"{model}-{args.streams}streams-{manifest['device'].split(' ')[0].lower()}-{date}"
    json_path = write_json_atomic(RESULTS / f"serve-load-{slug}.json",
                                  {"manifest": manifest, "summary": summary, "answers": answers})
    lines = [f"# Serve load: {args.streams} streams at {args.fps:g} fps, {args.model or 'embedded SmolLM2'}", "",
             f"Command: `{command}`; device: {manifest['device']}; date: {date}; {args.policy}, budget {args.budget}, "
             f"chunks of {args.chunk}, {args.questions} questions per stream asked concurrently.", "",
             "| answers | mixed up | TTFT p50 / p95 / max ms | latency p50 / p95 / max ms | frames dropped | lag at end s |",
             "|---|---|---|---|---|---|",
             f"| {summary['answers']} | {summary['mixed_up']} | {summary['ttft_ms']['p50']:.1f} / "
             f"{summary['ttft_ms']['p95']:.1f} / {summary['ttft_ms']['max']:.1f} | {summary['latency_ms']['p50']:.0f} / "
             f"{summary['latency_ms']['p95']:.0f} / {summary['latency_ms']['max']:.0f} | {summary['frames_dropped']} | "
             f"{', '.join(f'{lag:.2f}' for lag in summary['lag_seconds_at_end'])} |"]
    write_text_atomic(json_path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if summary["mixed_up"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
