"""Where the time of streaming goes: torch-profiler tables of ingest and answering.

Builds the random-weight LLaVA-OV-7B shape on one GPU, streams ``--warm`` frames under the
paper-default ``hermes`` rule (4K budget, chunk 8), times the phases of ``--chunks`` more
compressing chunks (GPU-synchronised), then profiles:

1. one chunk that triggers compression (fused pseudo-queries, scoring, gathering; the
   session's phases appear as ``ingest:<phase>`` ranges),
2. the same chunk's prefill alone,
3. an answer on the fixed-shape path without graphs (the kernels a graph replays),

and micro-benchmarks the attention kernels the chunk prefill can use. Prints the top
kernels by GPU time; writes the full tables under ``--out``.

Usage::

    python benchmarks/profile_efficiency.py [--shape llava-ov-7b] [--warm 64] [--tokenizer auto] [--out DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.profiler import ProfilerActivity, profile

from hermes_policy import StreamingSession
from hermes_policy.benchmarking.efficiency import QUESTIONS, fused_guidance_overhead, make_rule
from hermes_policy.benchmarking.floor import median_cuda_ms
from hermes_policy.benchmarking.shapes import build_random_adapter, get_shape, random_frames


def table(prof, out: Path, name: str, rows: int = 18) -> None:
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60)
    (out / f"{name}.txt").write_text(text)
    print(f"== {name}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


def host_profile(session: StreamingSession, chunk, out: Path, chunks: int = 3) -> None:
    """Python-level time of the compression steps (scoring, summaries, gathering): where
    the host, not the GPU, sets the pace."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    apply = session._apply_retention

    def profiled(attention=None):
        profiler.enable()
        try:
            return apply(attention)
        finally:
            torch.cuda.synchronize()
            profiler.disable()

    session._apply_retention = profiled
    try:
        for _ in range(chunks):
            session.add_frames(chunk)
    finally:
        session._apply_retention = apply
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    (out / "host-compression.txt").write_text(text.getvalue())
    print(f"== host time of {chunks} compression steps (by own time)")
    print(text.getvalue()[:6000])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-ov-7b")
    parser.add_argument("--warm", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=8, help="compressing chunks timed by phase")
    parser.add_argument("--tokenizer", default="auto", help="see `hermes-probe bench --help`")
    parser.add_argument("--out", type=Path, default=Path("profile-out"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    # attention kernels for a chunk prefill on a 4K cache
    q = torch.randn(1, 28, 1569, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, 4, 5700, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    bias = causal_lower_right(1569, 5700)
    gqa = median_cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True))
    rep = median_cuda_ms(
        lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(7, 1), v.repeat_interleave(7, 1), attn_mask=bias
        )
    )
    print(f"chunk attention per layer: causal bias + enable_gqa {gqa:.3f} ms, repeated KV heads {rep:.3f} ms")

    shape = get_shape(args.shape)
    adapter = build_random_adapter(shape, tokenizer=args.tokenizer)
    session = StreamingSession(adapter, make_rule("hermes", adapter, 4000), chunk_frames=args.chunk, answer_path="static")
    frames = random_frames(shape, args.warm + args.chunk)
    session.add_frames(frames[: args.warm])
    session.ask(QUESTIONS[0], max_new_tokens=4)
    session.time_phases = True
    for _ in range(args.chunks):
        session.add_frames(frames[args.warm :])
    per_chunk = {k: round(v / args.chunks * 1e3, 2) for k, v in session.phase_seconds.items()}
    overhead = fused_guidance_overhead(session, frames[args.warm :])
    print(f"phases per compressing chunk of {args.chunk} frames (ms, mean of {args.chunks}): {per_chunk}")
    print(f"fused pseudo-queries add {1e3 * (overhead or 0):.2f} ms to a chunk's prefill (A/B)")
    session.phase_seconds = {}
    host_profile(session, frames[args.warm :], args.out)
    chunk = frames[args.warm :]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        session.add_frames(chunk)
    print("phases of the compressing chunk (s):", {k: round(v, 4) for k, v in session.phase_seconds.items()})
    table(prof, args.out, "compressing-chunk")

    piece = adapter.frames_piece(chunk, session.frames_seen)
    lengths = session.store.lengths()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        session._prefill(piece, ingest=True)
        torch.cuda.synchronize()
    session.store.truncate(lengths)
    table(prof, args.out, "plain-chunk-prefill")

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        session.ask(QUESTIONS[1], max_new_tokens=4)
    table(prof, args.out, "static-answer-4-tokens")


if __name__ == "__main__":
    main()
