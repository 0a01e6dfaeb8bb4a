"""Soak a live stream behind `hermes-probe serve`: does it keep up, with flat memory?

Starts the server in this process on a free loopback port, creates one stream of the
built-in synthetic stream played by the clock at ``--fps``, asks a question every
``--ask-every`` seconds through the HTTP API, and samples every ``--sample-every`` seconds:
frames seen / ingested / dropped, the stream's lag behind live, tokens kept, KV bytes
and the process's resident memory. Passes (exit 0) when, after the first quarter, no frame
was dropped, the lag stayed under one chunk's duration, and resident memory grew by less
than ``--rss-growth`` (default 5%); otherwise exits 1.

Usage::

    python benchmarks/serve_soak.py [--minutes 30] [--fps 1] [--chunk 8] [--policy paper-default]
        [--budget 768] [--model M] [--device cpu]

Results go to ``benchmarks/results/serve-soak-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from hermes_policy.evaluation.manifest import run_manifest
from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic
from hermes_policy.models import load_adapter
from hermes_policy.serving import ServerConfig, create_app, serve_in_background

RESULTS = Path(__file__).parent / "results"


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--policy", default="paper-default")
    parser.add_argument("--budget", type=int, default=768)
    parser.add_argument("--tokens-per-frame", type=int, default=48)
    parser.add_argument("--ask-every", type=float, default=60.0)
    parser.add_argument("--sample-every", type=float, default=10.0)
    parser.add_argument("--rss-growth", type=float, default=0.05)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    adapter = load_adapter(args.model, device=args.device, tokens_per_frame=args.tokens_per_frame)
    app = create_app(adapter, ServerConfig(policy=args.policy, budget=args.budget, max_new_tokens=16))
    with serve_in_background(app) as base:
        return soak(args, adapter, app, base)


def soak(args: argparse.Namespace, adapter, app, base: str) -> int:
    stream_id = httpx.post(base + "/v1/streams", timeout=120, json={"source": "synthetic", "fps": args.fps,
                                                        "chunk_frames": args.chunk}).json()["id"]
    rule = app.state.registry.streams[stream_id].session.retention
    start = time.monotonic()
    end = start + args.minutes * 60
    samples, answers = [], []
    next_ask = start + args.ask_every
    while time.monotonic() < end:
        time.sleep(args.sample_every)
        status = httpx.get(f"{base}/v1/streams/{stream_id}", timeout=60).json()
        samples.append({"t": time.monotonic() - start, "rss_bytes": rss_bytes(),
                        **{k: status[k] for k in ("frames_seen", "frames_ingested", "frames_dropped",
                                                  "frames_waiting", "lag_seconds", "kv_cache_bytes")},
                        "tokens_kept_max": max(status["tokens_kept_per_layer"])})
        if time.monotonic() >= next_ask:
            reply = httpx.post(base + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "What is the secret code word?"}], "stream_id": stream_id,
                "max_tokens": 16}).json()
            answers.append({"t": time.monotonic() - start, "answer": reply["choices"][0]["message"]["content"],
                            **{key: reply["usage"][key] for key in ("ttft_ms", "wait_ms", "catch_up_ms",
                                                                     "catch_up_frames", "answer_ttft_ms", "frames_seen")}})
            next_ask += args.ask_every
        last = samples[-1]
        print(f"{last['t']:7.0f} s: ingested {last['frames_ingested']}, dropped {last['frames_dropped']}, "
              f"lag {last['lag_seconds']}, RSS {last['rss_bytes'] / 2**20:.0f} MiB", flush=True)
    httpx.delete(f"{base}/v1/streams/{stream_id}", timeout=60)  # stops the stream's threads

    steady = samples[len(samples) // 4:] or samples
    chunk_seconds = args.chunk / args.fps
    worst_lag = max((s["lag_seconds"] or 0.0) for s in steady)
    dropped = steady[-1]["frames_dropped"]
    growth = steady[-1]["rss_bytes"] / steady[0]["rss_bytes"] - 1
    checks = {"no dropped frames": dropped == 0, f"lag under one chunk ({chunk_seconds:g} s)": worst_lag < chunk_seconds,
              f"RSS growth after warm-up under {args.rss_growth:.0%}": growth < args.rss_growth}
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    command = shlex.join(["python", "benchmarks/serve_soak.py", *sys.argv[1:]])
    manifest = run_manifest(adapter, rule, fps=args.fps,
                            chunk_frames=args.chunk, mode="live (serve)", command=command.split())
    document = {"manifest": manifest, "minutes": args.minutes, "checks": checks, "worst_lag_s": worst_lag,
                "rss_growth": growth, "samples": samples, "answers": answers}
    slug = f"{args.device.split(':')[0]}-chunk{args.chunk}-{date}"
    json_path = write_json_atomic(RESULTS / f"serve-soak-{slug}.json", document)
    def median(key: str) -> float:
        return statistics.median(a[key] for a in answers) if answers else float("nan")

    lines = [f"# Serve soak: {args.minutes:g} min at {args.fps:g} fps, {manifest['model']['id']}", "",
             f"Command: `{command}`; device: {manifest['device']}; date: {date}; rule {args.policy}, budget "
             f"{args.budget}, chunks of {args.chunk}.", "",
             f"Frames ingested {samples[-1]['frames_ingested']} of {samples[-1]['frames_seen']} seen, "
             f"{dropped} dropped; worst lag after warm-up {worst_lag:.2f} s; resident memory "
             f"{steady[0]['rss_bytes'] / 2**20:.0f} -> {steady[-1]['rss_bytes'] / 2**20:.0f} MiB ({growth:+.1%}); "
             f"{len(answers)} answers, median served TTFT {median('ttft_ms'):.0f} ms (waiting for the model "
             f"{median('wait_ms'):.0f}, catching up {median('catch_up_ms'):.0f} on {median('catch_up_frames'):.0f} "
             f"frames, the answer's own {median('answer_ttft_ms'):.0f}).", "",
             "| check | passed |", "|---|---|", *[f"| {name} | {'yes' if ok else 'NO'} |" for name, ok in checks.items()]]
    write_text_atomic(json_path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
