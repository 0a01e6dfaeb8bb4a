"""Soak test: stream N frames through one session and check that memory and positions stay flat.

A bounded rule must hold a stream of any length in constant memory: the KV cache stays at
its budget, the process's resident memory stops growing after warm-up, and positions stay
below the model's limit (lazy re-indexing compacts them). This script streams ``--frames``
synthetic text frames (the embedded SmolLM2 by default) chunk by chunk, asks a short
question every ``--ask-every`` frames, samples RSS, KV-cache bytes, tokens kept and the
highest position, and exits 1 when any of them grows after warm-up beyond its tolerance.

Usage::

    python benchmarks/soak.py --frames 10000                    # embedded SmolLM2, paper-default
    python benchmarks/soak.py --frames 2000 --rule fifo --budget 512
    python benchmarks/soak.py --model random:tiny-llava-ov ...  # any model load_adapter accepts

Results (the command, device, date, every sample and the verdict) go to
``benchmarks/results/soak-<model>-<rule>-<frames>f-<device>-<date>.json`` and a readable
summary is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"
MIB = 2**20


@dataclass
class Sample:
    """One measurement taken after a chunk boundary."""

    frames: int
    seconds: float
    rss_bytes: int
    kv_cache_bytes: int
    tokens_kept_max: int
    max_position: int
    compressions: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="load_adapter name (default: the embedded SmolLM2)")
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--rule", default="paper-default",
                        help="paper-default, a policy.json or a rule name (fifo, sink+recent, ...)")
    parser.add_argument("--budget", type=int, default=1024, help="stream tokens per layer")
    parser.add_argument("--tokens-per-frame", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--sample-every", type=int, default=100, help="frames between samples")
    parser.add_argument("--ask-every", type=int, default=1000, help="frames between questions (0: none)")
    parser.add_argument("--warmup", type=float, default=0.2,
                        help="share of the run before the flatness reference is taken")
    parser.add_argument("--rss-tolerance-mib", type=float, default=64.0,
                        help="allowed growth of the median RSS from the first to the last quarter after warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 avoids spinning threads on a machine shared with other jobs)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: benchmarks/results/...)")
    return parser.parse_args(argv)


def verdict(samples: list[Sample], warmup_frames: int, rss_tolerance: int, max_positions: int,
            budget_tokens: int) -> list[str]:
    """Why the run is not flat (empty list: it is)."""
    after = [s for s in samples if s.frames >= warmup_frames]
    if len(after) < 2:
        return ["too few samples after warm-up to judge flatness"]
    problems = []
    reference = after[0]
    # the allocator returns and takes memory in steps of ~100 MiB from one chunk to the
    # next, so single samples are noisy: a leak shows as a rise of the median from the
    # first to the last quarter of the run after warm-up
    quarter = max(1, len(after) // 4)
    rss_growth = (statistics.median(s.rss_bytes for s in after[-quarter:])
                  - statistics.median(s.rss_bytes for s in after[:quarter]))
    if rss_growth > rss_tolerance:
        problems.append(f"median RSS grew {rss_growth / MIB:.1f} MiB after warm-up "
                        f"(tolerance {rss_tolerance / MIB:.0f} MiB)")
    kv_growth = max(s.kv_cache_bytes for s in after) - reference.kv_cache_bytes
    if kv_growth > 0:
        problems.append(f"KV cache grew {kv_growth / MIB:.2f} MiB after warm-up")
    highest = max(s.max_position for s in samples)
    if highest >= max_positions:
        problems.append(f"positions reached {highest}, the model's limit is {max_positions}")
    most_kept = max(s.tokens_kept_max for s in after)
    if most_kept > budget_tokens:
        problems.append(f"a layer kept {most_kept} stream tokens, above its budget of {budget_tokens}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # heavy imports after argument parsing, so that --help answers at once
    import torch

    from hermes_policy import StreamingSession
    from hermes_policy.fileio.atomic import write_text_atomic
    from hermes_policy.inputs.synthetic_text import text_stream
    from hermes_policy.models import load_adapter
    from hermes_policy.retention.specs import rule_from_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    process = psutil.Process()
    adapter = load_adapter(args.model, device=args.device, tokens_per_frame=args.tokens_per_frame)
    if not adapter.is_text_only:
        raise SystemExit("soak.py streams text frames: choose a causal LM")
    rule = rule_from_spec(args.rule, adapter, args.budget)
    session = StreamingSession(adapter, rule, chunk_frames=args.chunk, fps=1.0)
    # one long stream, so that every frame keeps its own "Second i" label
    stream = text_stream(args.frames, seed=0)
    question = stream.questions[0].question
    budgets = [rule.budget_of(layer) for layer in range(adapter.num_layers)]
    budget_tokens = max((b for b in budgets if b is not None), default=args.frames * args.tokens_per_frame)

    samples: list[Sample] = []
    answers: list[dict[str, object]] = []
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    device = str(adapter.device)
    if adapter.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(adapter.device)})"
    else:
        device += f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    out = args.out
    if out is None:
        model_name = adapter.name_or_path.replace("/", "_").replace(":", "-")
        out = RESULTS / f"soak-{model_name}-{rule.name}-{args.frames}f-{adapter.device.type}-{date[:10]}.json"

    def record(problems: list[str] | None) -> dict[str, object]:
        """The results file; written after every sample, so an interrupted run keeps its data."""
        return {
            "command": "python benchmarks/soak.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "date": date, "device": device, "torch": torch.__version__, "model": adapter.name_or_path,
            "rule": rule.name, "budget": args.budget, "tokens_per_frame": adapter.tokens_per_frame,
            "chunk_frames": args.chunk, "frames": args.frames, "max_positions": adapter.max_positions,
            "complete": problems is not None, "frames_done": samples[-1].frames if samples else 0,
            "seconds": samples[-1].seconds if samples else 0.0,
            "flat": problems is not None and not problems, "problems": problems,
            "answers": answers, "samples": [asdict(s) for s in samples],
        }

    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    step = args.chunk * max(1, args.sample_every // args.chunk)
    for first in range(0, args.frames, step):
        batch = stream.frames[first : first + step]
        session.add_frames(batch)
        done = first + len(batch)
        if args.ask_every and done // args.ask_every > first // args.ask_every:
            answer = session.ask(question, max_new_tokens=8)
            answers.append({"frames": done, "answer": answer.text, "ttft_ms": answer.ttft_ms})
        gc.collect()
        sample = Sample(
            frames=done,
            seconds=time.perf_counter() - start,
            rss_bytes=process.memory_info().rss,
            kv_cache_bytes=session.store.nbytes(),
            tokens_kept_max=max(session.tokens_kept),
            max_position=session.store.max_position(),
            compressions=session.compressions,
        )
        samples.append(sample)
        print(f"{sample.frames:>7} frames  {sample.seconds:7.0f} s  RSS {sample.rss_bytes / MIB:7.1f} MiB  "
              f"KV {sample.kv_cache_bytes / MIB:6.2f} MiB  kept<= {sample.tokens_kept_max:>5}  "
              f"max position {sample.max_position:>6}  compressions {sample.compressions}", flush=True)
        write_text_atomic(out, json.dumps(record(None), indent=1) + "\n")

    problems = verdict(samples, int(args.warmup * args.frames), int(args.rss_tolerance_mib * MIB),
                       adapter.max_positions, budget_tokens)
    write_text_atomic(out, json.dumps(record(problems), indent=1) + "\n")
    after = [s for s in samples if s.frames >= args.warmup * args.frames] or samples
    print(f"\n{args.frames} frames in {samples[-1].seconds:.0f} s on {device}; RSS after warm-up "
          f"{min(s.rss_bytes for s in after) / MIB:.1f}-{max(s.rss_bytes for s in after) / MIB:.1f} MiB; "
          f"highest position {max(s.max_position for s in samples)} of {adapter.max_positions}")
    print("FLAT" if not problems else "NOT FLAT: " + "; ".join(problems))
    print(f"wrote {out}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
