"""Every retention rule through the eval harness on the synthetic video benchmark.

The same streaming-QA run (``hermes_policy.evaluation.evaluate``, as ``hermes-probe eval``)
for ``full``, ``fifo``, ``hermes`` (paper-default policy), ``window`` (SimpleStream: the
last 4 frames re-prefilled at each question) and ``retrieval`` (ReKV: top-k chunks back
from host memory), on one model, benchmark, frame rate and chunk size. Each rule's
summary (accuracy overall and split perception / memory, TTFT, memory, tokens the
questions saw) with its run manifest goes into one table.

No trained video-language model can be had on the machines this runs on, so the default
model is ``random:tiny-llava-ov`` (the LLaVA-OneVision architecture with random weights):
it answers no parseable choice (accuracy 0), so the table shows only that every rule runs
through the same harness, and the shape of each rule's costs. Pass ``--model`` with real weights for
real accuracies.

Usage::

    python benchmarks/baselines_eval.py [--model random:tiny-llava-ov] [--videos 4] [--frames 24]
        [--budget 64] [--device cpu]

Results go to ``benchmarks/results/baselines-eval-<model>-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from hermes_policy.evaluation import evaluate
from hermes_policy.evaluation.manifest import device_name
from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic
from hermes_policy.inputs.synthetic_benchmark import write_synthetic_benchmark
from hermes_policy.models import load_adapter

RESULTS = Path(__file__).parent / "results"
RULES = (
    ("full", {}),
    ("fifo", {}),
    ("paper-default", {}),
    ("window", {"frames": 4}),
    ("retrieval", {"retrieve_chunks": 2}),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:tiny-llava-ov")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--budget", type=int, default=64, help="stream tokens per layer (fifo, hermes, retrieval's GPU window)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    adapter = load_adapter(args.model, device=args.device)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        bench = write_synthetic_benchmark(Path(scratch) / "bench", num_videos=args.videos, num_frames=args.frames,
                                          fps=args.fps, height=96, width=96)
        from hermes_policy.inputs.annotations import load_annotations

        entries = load_annotations(bench)
        for spec, options in RULES:
            print(f"{spec} {options or ''}", flush=True)
            result = evaluate(adapter, spec, entries, Path(scratch) / spec, budget=args.budget, fps=args.fps,
                              chunk_frames=args.chunk, max_new_tokens=8, mc_max_new_tokens=4, progress=False,
                              rule_options=options)
            rows.append({"policy": spec, "rule_options": options, "summary": result.summary})

    date = datetime.now(UTC).strftime("%Y-%m-%d")
    command = shlex.join(["python", "benchmarks/baselines_eval.py", *sys.argv[1:]])
    device = device_name(adapter)
    slug = f"{args.model.replace(':', '-').replace('/', '-')}-{args.device.split(':')[0]}-{date}"
    document = {"command": command, "device": device, "date": date, "rows": rows}
    json_path = write_json_atomic(RESULTS / f"baselines-eval-{slug}.json", document)

    lines = [
        f"# Baselines through the eval harness: {args.model}",
        "",
        f"Command: `{command}`; device: {device}; date: {date}. Synthetic shapes benchmark: {args.videos} videos "
        f"x {args.frames} frames at {args.fps:g} fps, chunks of {args.chunk}, budget {args.budget} tokens per layer. "
        "Perception: evidence within the perception window before the question (see "
        "`hermes_policy/evaluation/summary.py`).",
        "",
        "| rule | options | questions | accuracy % | perception % (n) | memory % (n) | TTFT ms | tokens seen (max) | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(block: dict) -> str:
        return "-" if block["accuracy"] is None else f"{100 * block['accuracy']:.1f} ({block['scored']})"

    for row in rows:
        s = row["summary"]
        peak = s.get("peak_memory_bytes_max")
        lines.append(
            f"| {s['config']['rule']} | {row['rule_options'] or '-'} | {s['answered']} "
            f"| {100 * s['accuracy']:.1f} | {pct(s['by_need']['perception'])} | {pct(s['by_need']['memory'])} "
            f"| {s['ttft_ms_mean']:.1f} | {s['tokens_kept_max']} | {'-' if peak is None else f'{peak / 2**30:.2f}'} |"
        )
    if args.model.startswith("random:"):
        lines += ["", "Random weights: the answers are no parseable choice, so every accuracy is 0; only the "
                  "costs, and that every rule runs through the same harness, are informative."]
    if all(not row["summary"]["by_need"]["memory"]["questions"] for row in rows):
        lines += ["", "The synthetic benchmark's questions are asked mid-stream and carry no evidence span, so "
                  "all of them count as perception; benchmarks with evidence spans fill the memory column."]
    md_path = write_text_atomic(json_path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
