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
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.profiler import ProfilerActivity, profile

from hermes_policy import StreamingSession, options
from hermes_policy.benchmarking.compression_timing import fused_guidance_overhead
from hermes_policy.benchmarking.efficiency import (
    COMPRESSION_PHASES,
    QUESTIONS,
    EfficiencyConfig,
    make_rule,
)
from hermes_policy.benchmarking.floor import median_cuda_ms
from hermes_policy.benchmarking.phases import PhaseEvents, PhaseTimer
from hermes_policy.benchmarking.trace import idle_report, load_trace, phase_timeline, sync_sites
from hermes_policy.kernels import split_kv_attention
from hermes_policy.models.random_shapes import build_random_adapter, get_shape, random_frames
from hermes_policy.options import RuntimeOptions
from hermes_policy.session import NoObserver


def table(prof, out: Path, name: str, rows: int = 18) -> None:
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=60)
    (out / f"{name}.txt").write_text(text)
    print(f"== {name}")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


def idle_time(run, out: Path, name: str) -> None:
    """Trace ``run`` and report where the GPU sat idle, charged to the host code behind it."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        run()
        torch.cuda.synchronize()
    path = out / f"trace-{name}.json"
    prof.export_chrome_trace(str(path))
    report = idle_report(load_trace(path))
    (out / f"idle-{name}.txt").write_text(report.summary(rows=40) + "\n")
    print(f"== GPU idle time, {name}")
    print(report.summary())


def timeline(session: StreamingSession, chunk, chunks: int = 8) -> None:
    """Per phase of ``chunks`` compressing chunks, without synchronising: host time, GPU
    span, and GPU time spent waiting before the phase (CUDA events at phase boundaries)."""
    import time

    events = session.observer = PhaseEvents()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(chunks):
        session.add_frames(chunk)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / chunks * 1e3
    marks, session.observer = events.marks, NoObserver()
    first = marks[0][3]
    rows = [(name, h0, h1, first.elapsed_time(e0), first.elapsed_time(e1)) for name, h0, h1, e0, e1 in marks]
    print(f"== phase timeline per chunk (mean of {chunks}; wall {wall:.2f} ms a chunk)")
    for name, entry in phase_timeline(rows).items():
        n = entry["count"] / chunks
        print(
            f"  {name:8s} x{n:.0f}: host {entry['host_ms'] / chunks:6.2f} ms, GPU span {entry['gpu_ms'] / chunks:6.2f} ms, "
            f"GPU waiting before it {entry['gpu_wait_before_ms'] / chunks:6.2f} ms"
        )


def gather_tail(session: StreamingSession, chunk, chunks: int = 8) -> None:
    """Where the gather phase's GPU span goes, without synchronising: a CUDA event at the
    point :meth:`KVStore.keep_layers` waits for its copy of the indices (every gather is
    queued by then) splits it into the gathers' GPU work and the time the GPU then waits
    for the host's bookkeeping (until the phase's end event)."""
    import time

    from hermes_policy.cache import kv_store

    original = kv_store.Download.wait
    marks: list[tuple[float, float, torch.cuda.Event]] = []

    def wait(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        begin = time.perf_counter()
        out = original(self)
        marks.append((begin, time.perf_counter(), event))
        return out

    kv_store.Download.wait = wait
    events = session.observer = PhaseEvents()
    try:
        for _ in range(chunks):
            session.add_frames(chunk)
        torch.cuda.synchronize()
    finally:
        kv_store.Download.wait = original
    phases, session.observer = events.marks, NoObserver()
    gathers = [m for m in phases if m[0] == "gather"]
    selects = [m for m in phases if m[0] == "select"]
    if len(gathers) != len(marks) or len(selects) != len(marks):
        print(f"== gather tail: {len(gathers)} gather phases, {len(marks)} waits: not one each, skipped")
        return
    rows = []
    for (_, _, _, s0, s1), (_, h0, h1, g0, g1), (w0, w1, queued) in zip(selects, gathers, marks, strict=True):
        rows.append((
            s0.elapsed_time(s1), g0.elapsed_time(queued), queued.elapsed_time(g1),
            (w0 - h0) * 1e3, (w1 - w0) * 1e3, (h1 - w1) * 1e3,
        ))  # fmt: skip
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(6)]
    print(f"== gather phase split at the wait for the indices (ms, mean of {len(rows)} compressing chunks)")
    print(f"  GPU: select span {mean[0]:.2f}, gathers queued before the wait {mean[1]:.2f}, "
          f"after it until the phase ends (GPU work left plus waiting for the host) {mean[2]:.2f}")
    print(f"  host: queueing the gathers {mean[3]:.2f}, waiting for the indices {mean[4]:.2f}, bookkeeping {mean[5]:.2f}")


def synchronising_calls(run, name: str) -> None:
    """Print the lines that block the host on the GPU while ``run`` runs."""
    with sync_sites() as sites:
        run()
    torch.cuda.synchronize()
    print(f"== synchronising calls, {name}: {sum(sites.values())}")
    for site, n in sites.most_common(25):
        print(f"  {n:4d}  {site}")


def host_profile(session: StreamingSession, chunk, out: Path, chunks: int = 3) -> None:
    """Python-level time of the compression steps (scoring, summaries, gathering): where
    the host, not the GPU, sets the pace."""
    import cProfile
    import io
    import pstats
    from contextlib import contextmanager

    profiler = cProfile.Profile()

    class CompressionProfiler:  # the profiler runs during the compression phases only
        @contextmanager
        def phase(self, name: str):
            if name not in COMPRESSION_PHASES:
                yield
                return
            profiler.enable()
            try:
                yield
            finally:
                torch.cuda.synchronize()
                profiler.disable()

    session.observer = CompressionProfiler()
    try:
        for _ in range(chunks):
            session.add_frames(chunk)
    finally:
        session.observer = NoObserver()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    (out / "host-compression.txt").write_text(text.getvalue())
    print(f"== host time of {chunks} compression steps (by own time)")
    print(text.getvalue()[:6000])


def attention_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Time the chunk's attention (bottom-right causal over cache + chunk): the flash kernel
    with the causal bias, and cuDNN on two parts merged by log-sum-exp (the cache without a
    mask, the chunk causal), with and without repeated KV heads; the cost of a first call
    at a new key length (cuDNN builds a plan per shape); the merged output's distance from
    flash's."""
    import time

    groups = q.shape[1] // k.shape[1]
    q_len, k_len = q.shape[-2], k.shape[-2]
    cache = k_len - q_len
    scale = q.shape[-1] ** -0.5
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention

    def flash():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q_len, k_len), enable_gqa=True)

    def split(kk, vv):
        a, lse_a = cudnn(q, kk[:, :, :cache], vv[:, :, :cache], None, True, 0.0, False, False, scale=scale)[:2]
        b, lse_b = cudnn(q, kk[:, :, cache:], vv[:, :, cache:], None, True, 0.0, True, False, scale=scale)[:2]
        w = torch.sigmoid(lse_a.view(a.shape[:-1]) - lse_b.view(b.shape[:-1])).unsqueeze(-1)
        return torch.lerp(b.float(), a.float(), w).to(q.dtype)

    print(f"flash, causal bias, GQA: {median_cuda_ms(flash):.3f} ms")
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    reference = flash().float()
    for label, kk, vv in [("repeated KV heads", kr, vr), ("grouped KV heads", k, v)]:
        try:
            out = split(kk, vv)
            ms = median_cuda_ms(lambda kk=kk, vv=vv: split(kk, vv))
            diff = (out.float() - reference).abs().max().item()
            print(f"cuDNN split + merge, {label}: {ms:.3f} ms, max |diff| vs flash {diff:.2e}")
        except RuntimeError as error:
            print(f"cuDNN split, {label}: n/a ({str(error).splitlines()[0][:100]})")
    for extra in (1, 2, 57):
        kk = torch.randn(1, k.shape[1], k_len + extra, k.shape[-1], dtype=k.dtype, device=k.device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            cudnn(q, kk[:, :, : cache + extra], kk[:, :, : cache + extra], None, True, 0.0, False, False, scale=scale)
            torch.cuda.synchronize()
            print(f"cuDNN first call at cache length {cache + extra}: {1e3 * (time.perf_counter() - start):.1f} ms")
        except RuntimeError as error:
            print(f"cuDNN first call: n/a ({str(error).splitlines()[0][:100]})")
    torch.cuda.synchronize()
    start = time.perf_counter()
    cudnn(q, k[:, :, :cache], v[:, :, :cache], None, True, 0.0, False, False, scale=scale)
    torch.cuda.synchronize()
    print(f"cuDNN repeated shape, wall: {1e3 * (time.perf_counter() - start):.2f} ms")


def gemm_rows(rows=(1569, 1600, 1647, 1648, 1664, 1696, 1728, 1792)) -> None:
    """The language model's projections at the token counts a chunk forward can have
    (cuBLAS picks kernels by shape; a fused forward's extra tokens change the pick)."""
    shapes = {"gate/up 3584->18944": (3584, 18944), "down 18944->3584": (18944, 3584), "q 3584->3584": (3584, 3584)}
    weights = {name: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for name, (k, n) in shapes.items()}
    print("== projection time by token count (ms; median of CUDA-event timings)")
    for m in rows:
        cells = []
        for name, (k, _) in shapes.items():
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            cells.append(f"{name} {median_cuda_ms(lambda x=x, w=weights[name]: F.linear(x, w)):.3f}")
        print(f"  {m:5d} tokens: " + ", ".join(cells))


def ingest_comparison(adapter, shape, chunk_frames: int, warm: int, chunks: int = 8) -> None:
    """Wall time a compressing chunk takes (each ``add_frames`` synchronised, as the bench
    times them) without CUDA graphs, with graphs of the transformers layers and with graphs
    of the fewer-kernel forward (`chunk_text_forward`), side by side."""
    import time

    from hermes_policy.graphs.chunk_graphs import ChunkGraphs

    frames = random_frames(shape, warm + chunk_frames)
    chunk = frames[warm:]
    # no graphs; graphs of the transformers layers; graphs of the fewer-kernel forward
    for graphs, fewer in ((False, False), (True, False), (True, True)):
        session = StreamingSession(adapter, make_rule("hermes", adapter, 4000), chunk_frames=chunk_frames, options=RuntimeOptions.from_env(ingest_graphs=graphs))
        if graphs:
            session.chunk_graphs = ChunkGraphs(adapter, session.store, fewer_kernels=fewer)
        session.add_frames(frames[:warm])
        for _ in range(3):  # the steady shape recurs, is captured
            session.add_frames(chunk)
        samples = []
        for _ in range(chunks):
            start = time.perf_counter()
            session.add_frames(chunk)
            samples.append(time.perf_counter() - start)
        samples.sort()
        median = samples[len(samples) // 2] * 1e3
        extra = ""
        if session.chunk_graphs is not None:
            extra = f" (captures {session.chunk_graphs.captures}, replays {session.chunk_graphs.replays}, failed {len(session.chunk_graphs.failed)})"
        name = "off" if not graphs else ("on, fewer kernels" if session.chunk_graphs.fewer_kernels else "on, transformers layers")
        print(f"ingest graphs {name}: {median:6.2f} ms a compressing chunk of {chunk_frames} frames, "
              f"{1e3 * chunk_frames / median:5.1f} frames/s{extra}")
        del session
        torch.cuda.empty_cache()


def steady_session(adapter, shape, chunk_frames: int, warm: int):
    """A hermes session (4K budget, ingest graphs) past its budget and past a question (the
    guidance prompts quote it), its steady compressing shape captured; and the chunk of
    frames that recurs."""
    session = StreamingSession(
        adapter, make_rule("hermes", adapter, 4000), chunk_frames=chunk_frames, options=RuntimeOptions.from_env(answer_path="static", ingest_graphs=True)
    )
    frames = random_frames(shape, warm + chunk_frames)
    chunk = frames[warm:]
    session.add_frames(frames[:warm])
    session.ask(QUESTIONS[0], max_new_tokens=EfficiencyConfig.answer_tokens)  # as long as the bench's answers
    for _ in range(3):  # the steady shape with these prompts recurs, is captured
        session.add_frames(chunk)
    return session, chunk


def ingest_phases(adapter, shape, chunk_frames: int, warm: int, chunks: int):
    """A session past its budget and past a question (the guidance prompts quote it), then
    per compressing chunk: the phases timed with synchronisation, the fused pseudo-queries'
    cost (A/B) and the phase timeline without synchronisation. Returns the session and chunk."""
    session, chunk = steady_session(adapter, shape, chunk_frames, warm)
    timer = session.observer = PhaseTimer(adapter.device)
    for _ in range(chunks):
        session.add_frames(chunk)
    session.observer = NoObserver()
    per_chunk = {k: round(v / chunks * 1e3, 2) for k, v in timer.seconds.items()}
    overhead = fused_guidance_overhead(session, chunk)
    print(f"phases per compressing chunk of {chunk_frames} frames (ms, synchronised, mean of {chunks}): {per_chunk}")
    print(f"fused pseudo-queries add {1e3 * (overhead or 0):.2f} ms to a chunk's prefill (A/B)")
    timeline(session, chunk)
    return session, chunk


def graph_kernels(adapter, shape, chunk_frames: int, warm: int, out: Path, calls: int = 3) -> None:
    """What the fused pseudo-queries add to a steady chunk replayed as a CUDA graph: wall
    time (synchronised), GPU span (CUDA events) and kernel time per call of the chunk's
    prefill alone and with them, and the kernels that differ (profiled replays)."""
    import time

    from torch.autograd import DeviceType

    session, chunk = steady_session(adapter, shape, chunk_frames, warm)
    store = session.store
    request = session.retention.guidance(store, [(t.question, t.answer) for t in session.history])
    with torch.inference_mode():
        piece = adapter.frames_piece(chunk, session.frames_seen)
        prompts = [session.planner.prompt_piece(p) for p in request.prompts]
    lengths = store.lengths()
    variants = {
        "plain": lambda: session._prefill(piece, ingest=True, recurring=True),
        "fused": lambda: session.guidance_attention(request, lead=piece, prompt_pieces=prompts, recurring=True),
    }
    totals = {}
    layout = session.guidance_layout
    print(f"pseudo-queries: {layout.prompt_tokens} tokens in {layout.prompt_rows} rows after a chunk of {layout.lead}; "
          f"rows per layer {layout.layer_rows}: {layout.row_share:.1%} of the rows through the layers")
    print("== a steady chunk's prefill replayed as a CUDA graph, alone and with the pseudo-queries (ms per call)")
    for name, run in variants.items():
        walls, spans = [], []
        for index in range(2 + 2 * calls):  # the first captures
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start = time.perf_counter()
            begin.record()
            with torch.inference_mode():
                run()
            end.record()
            torch.cuda.synchronize()
            if index >= 2:
                walls.append(1e3 * (time.perf_counter() - start))
                spans.append(begin.elapsed_time(end))
            store.truncate(lengths)
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                run()
                torch.cuda.synchronize()
                store.truncate(lengths)
        kernels = {e.key: (e.self_device_time_total / calls, e.count / calls)
                   for e in prof.key_averages() if e.device_type == DeviceType.CUDA}
        totals[name] = kernels
        print(f"  {name}: wall {statistics.median(walls):6.2f}, GPU span {statistics.median(spans):6.2f}, "
              f"kernels {sum(us for us, _ in kernels.values()) / 1e3:6.2f} ({sum(n for _, n in kernels.values()):.0f} launches)")
        (out / f"graph-kernels-{name}.txt").write_text(
            prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90)
        )
    print("== kernels the pseudo-queries add to the replay (GPU ms per call, launches per call)")
    plain, fused = totals["plain"], totals["fused"]
    diff = {k: (fused.get(k, (0, 0))[0] - plain.get(k, (0, 0))[0], fused.get(k, (0, 0))[1] - plain.get(k, (0, 0))[1])
            for k in set(plain) | set(fused)}
    for key, (us, count) in sorted(diff.items(), key=lambda kv: -abs(kv[1][0]))[:25]:
        print(f"  {key[:90]:90s} {us / 1e3:+7.3f} ms {count:+6.0f}")


def answer_breakdown(session: StreamingSession) -> None:
    """TTFT split: tokenising the question, the prefill graph, the decode graph (replays
    timed with CUDA events), against the TTFT and TPOT that ``ask`` reports."""
    import time

    answers = [session.ask(q, max_new_tokens=8) for q in QUESTIONS[:5]]
    ttft = statistics.median(a.ttft_ms for a in answers[1:])
    tpot = statistics.median(a.tpot_ms for a in answers[1:] if a.tpot_ms is not None)
    start = time.perf_counter()
    for _ in range(20):
        session.adapter.question_piece(QUESTIONS[1])
    tokenize = (time.perf_counter() - start) / 20 * 1e3
    graphs = session.answer_graphs
    timings = {}
    with torch.inference_mode():
        for key, graph in graphs._graphs.items():
            timings[str(key)] = median_cuda_ms(graph.run)
    print(f"== answer: TTFT {ttft:.2f} ms, TPOT {tpot:.2f} ms; question tokenised in {tokenize:.3f} ms; "
          f"graph replays (ms): {', '.join(f'{k} {v:.2f}' for k, v in timings.items())}")


def graph_ms(fn, calls: int = 28) -> float:
    """Milliseconds per call of ``fn`` replayed ``calls`` times in one CUDA graph (no launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return median_cuda_ms(graph.replay) / calls


def slot_attention_backends(window: int = 4352, used: int = 4100) -> None:
    """The answer's attention of q new tokens over a window of a layer's buffer (LLaVA-OV-7B
    heads), per layer inside a graph: explicit matmuls vs the split-key kernel vs flash
    varlen with seqused_k."""
    from hermes_policy.graphs.static_forward import slot_attention

    print(f"== slot attention per layer, window {window}, {used} slots used (us, in a graph)")
    buf = torch.randn(2, 1, 4, window + 256, 128, dtype=torch.bfloat16, device="cuda")
    keys, values = buf[0][:, :, :window], buf[1][:, :, :window]
    for q_len in (1, 16):
        q = torch.randn(q_len, 28, 128, dtype=torch.bfloat16, device="cuda")
        limits = used - q_len + torch.arange(q_len, device="cuda")
        blocked = torch.arange(window, device="cuda")[None, :] > limits[:, None]
        explicit = lambda q=q, blocked=blocked: slot_attention(q, keys, values, blocked, 128**-0.5)  # noqa: E731
        reference = explicit().float()
        cells = [f"explicit {1e3 * graph_ms(explicit):6.1f}"]
        stacked = q.transpose(0, 1).reshape(4, 7 * q_len, 128)
        kt = keys[0].transpose(1, 2)
        zero = torch.zeros(1, 1, 1, device="cuda")
        bias = torch.zeros(7 * q_len, window, device="cuda").masked_fill_(blocked.repeat(7, 1), float("-inf"))

        def folded(bias=bias, stacked=stacked, q_len=q_len, kt=kt, zero=zero, blocked=blocked, with_bias=False):
            if with_bias:
                scores = torch.baddbmm(bias, stacked, kt, out_dtype=torch.float32, alpha=128**-0.5)
            else:
                scores = torch.baddbmm(zero, stacked, kt, out_dtype=torch.float32, beta=0, alpha=128**-0.5)
                scores = scores.view(4, 7, q_len, window).masked_fill_(blocked, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(values.dtype).view(4, 7 * q_len, window)
            return torch.bmm(probs, values[0]).view(4, 7, q_len, 128).permute(2, 0, 1, 3).reshape(q_len, 28, 128)

        from hermes_policy.graphs.static_forward import biased_slot_attention

        product = lambda q=q, bias=bias: biased_slot_attention(q, keys, values, bias, 128**-0.5)  # noqa: E731
        for name, fn in [("scale folded", folded), ("scale+mask folded", lambda: folded(with_bias=True)),
                         ("product", product)]:
            try:
                diff = (fn().float() - reference).abs().max().item()
                cells.append(f"{name} {1e3 * graph_ms(fn):6.1f} (max |diff| {diff:.1e})")
            except Exception as error:  # noqa: BLE001
                cells.append(f"{name} n/a ({str(error).splitlines()[0][:120]})")
        split = lambda q=q, limits=limits: split_kv_attention.split_kv_slot_attention(q, keys, values, limits, 128**-0.5)  # noqa: E731
        diff = (split().float() - reference).abs().max().item()
        cells.append(f"split-key kernel {1e3 * graph_ms(split):6.1f} (max |diff| {diff:.1e})")
        cu_q = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, window], dtype=torch.int32, device="cuda")
        seqused = torch.tensor([used], dtype=torch.int32, device="cuda")
        for name, k, v in [("flash strided", keys[0].transpose(0, 1), values[0].transpose(0, 1)),
                           ("flash contiguous", keys[0].transpose(0, 1).contiguous(), values[0].transpose(0, 1).contiguous())]:
            def flash(q=q, k=k, v=v, q_len=q_len, cu_q=cu_q, cu_k=cu_k, seqused=seqused):
                return torch.ops.aten._flash_attention_forward(
                    q, k, v, cu_q, cu_k, q_len, window, 0.0, True, False, scale=128**-0.5, seqused_k=seqused
                )[0]
            try:
                diff = (flash().float() - reference).abs().max().item()
                cells.append(f"{name} {1e3 * graph_ms(flash):6.1f} (max |diff| {diff:.1e})")
            except Exception as error:  # noqa: BLE001
                cells.append(f"{name} n/a ({str(error).splitlines()[0][:120]})")
        print(f"  q={q_len:2d}: " + ", ".join(cells))


def ttft_host(session: StreamingSession, repeats: int = 20) -> None:
    """Host-side steps of an answer's first token, each timed (median ms): what ``ask`` does
    before and around the prefill graph's replay."""
    import time

    from hermes_policy.graphs.answer_graphs import WINDOW_QUANTUM, bucket_length

    graphs, store = session.answer_graphs, session.store
    steps: dict[str, list[float]] = {}
    with torch.inference_mode():
        for _ in range(repeats):
            marks = [("start", time.perf_counter())]
            session._reset_peak_memory()
            marks.append(("reset peak memory", time.perf_counter()))
            session.flush()
            marks.append(("flush", time.perf_counter()))
            piece = session.adapter.question_piece(QUESTIONS[1])
            marks.append(("tokenise", time.perf_counter()))
            lengths = store.lengths()
            bucket = bucket_length(len(piece))
            needed = max(lengths) + bucket + 8
            graphs._reserve(needed)
            window = min(-(-needed // WINDOW_QUANTUM) * WINDOW_QUANTUM, min(layer.capacity for layer in store.cache.layers))
            marks.append(("lengths+reserve", time.perf_counter()))
            graphs._load_inputs(piece, bucket, lengths)
            marks.append(("load inputs", time.perf_counter()))
            graph = graphs._graph((bucket, window))
            graph.run()
            marks.append(("replay call", time.perf_counter()))
            int(graphs._token)
            marks.append(("wait for token", time.perf_counter()))
            for (_, a), (name, b) in zip(marks, marks[1:], strict=False):
                steps.setdefault(name, []).append((b - a) * 1e3)
    print("== first-token steps (median ms): " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in steps.items()))


def ttft_trace(session: StreamingSession, repeats: int = 8) -> None:
    """Where ``ask``'s time to first token goes, from marks set by wrappers around its steps
    (median ms from the call, and the answer's own TTFT)."""
    import time

    graphs = session.answer_graphs
    marks: list[tuple[str, float]] = []

    def wrap(owner, name):  # an instance attribute shadowing the method until deleted
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            marks.append((f"{name} start", time.perf_counter()))
            out = original(*args, **kwargs)
            marks.append((f"{name} end", time.perf_counter()))
            return out

        setattr(owner, name, wrapped)

    steps = [(session.adapter, "question_piece"), (graphs, "_reserve"), (graphs, "_load_inputs"), (graphs, "_graph"), (session, "flush")]
    for owner, name in steps:
        wrap(owner, name)
    rows: dict[str, list[float]] = {}
    ttfts = []
    for _ in range(repeats):
        marks.clear()
        start = time.perf_counter()
        answer = session.ask(QUESTIONS[1], max_new_tokens=1)
        ttfts.append(answer.ttft_ms)
        for name, at in marks:
            rows.setdefault(name, []).append((at - start) * 1e3)
    for owner, name in steps:
        delattr(owner, name)
    print(f"== ask() trace (median ms since the call; TTFT {statistics.median(ttfts):.3f}): "
          + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in rows.items()))


def answer_ab(adapter, shape, warm: int, rounds: int = 2) -> None:
    """Answer graphs with the fewer-kernel forward (its attention by the split-key kernel,
    and explicit) and with the transformers forward, same session, side by side
    (``rounds`` times each, alternating)."""
    from hermes_policy.graphs.answer_graphs import AnswerGraphs

    session = StreamingSession(adapter, make_rule("hermes", adapter, 4000), chunk_frames=8)
    session.add_frames(random_frames(shape, warm))
    variants = [
        ("fewer kernels, split-key attention", True, "1"),
        ("fewer kernels, explicit attention", True, "0"),
        ("transformers forward", False, "1"),
    ]
    for name, fewer, split in variants * rounds:
        with options.applied(split_kv_kernel=split == "1"):  # read when the graphs are captured
            session.answer_graphs = AnswerGraphs(adapter, session.store, fewer_kernels=fewer)
            print(f"-- answer graphs, {name}:")
            answer_breakdown(session)
            ttft_host(session)
            ttft_trace(session)
            session.answer_graphs = None
            torch.cuda.empty_cache()
    # the kernels of the fewer-kernel question prefill (run eagerly: the kernels a graph replays)
    graphs = AnswerGraphs(adapter, session.store, use_graphs=False)
    session.answer_graphs = graphs
    session.ask(QUESTIONS[1], max_new_tokens=2)
    with torch.inference_mode():
        graphs._load_inputs(adapter.question_piece(QUESTIONS[1]), 16, session.store.lengths())
        body = graphs._graph((16, 4096))
        body.run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            body.run()
            torch.cuda.synchronize()
    print("== kernels of the fewer-kernel 16-token prefill (eager run)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))


def compression_profile(adapter, shape, chunk_frames: int, warm: int, out: Path, rounds: int = 3) -> None:
    """The compression step alone (scoring, selection, summary tokens, gathering) after a
    compressing chunk's fused prefill, at the steady state past a question: host and GPU
    time per step, the kernels by operator and shape, and the host's own time by function."""
    import cProfile
    import pstats
    import time

    session, chunk = steady_session(adapter, shape, chunk_frames, warm)

    def prefilled():
        with torch.inference_mode():
            attention = session._prefill_chunk(adapter.frames_piece(chunk, session.frames_seen))
        session.frames_seen += chunk_frames
        torch.cuda.synchronize()
        return attention

    host, gpu = [], []
    for _ in range(rounds):
        attention = prefilled()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start = time.perf_counter()
        begin.record()
        with torch.inference_mode():
            session._apply_retention(attention)
        end.record()
        torch.cuda.synchronize()
        host.append(1e3 * (time.perf_counter() - start))
        gpu.append(begin.elapsed_time(end))
    print(f"compression step: {min(host):.2f} ms synchronised wall, {min(gpu):.2f} ms between its first and last GPU event (best of {rounds})")
    attention = prefilled()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof, torch.inference_mode():
        session._apply_retention(attention)
        torch.cuda.synchronize()
    text = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=50, max_shapes_column_width=70)
    (out / "compression-step.txt").write_text(text)
    print("== compression step, by operator and input shape")
    print(text)
    attention = prefilled()
    profiler = cProfile.Profile()
    with torch.inference_mode():
        profiler.enable()
        session._apply_retention(attention)
        profiler.disable()
    torch.cuda.synchronize()
    print("== compression step, host time by function")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def diagnose(adapter, shape, chunk_frames: int, warm: int, out: Path) -> None:
    """Profiles, grouped by input shape, of the ingest graphs' body run without a graph: a chunk's prefill alone and
    with its fused pseudo-queries (what the fusion adds, by operator), and the host time of
    an answer's first token (cProfile of ``ask`` with the answer graphs warm)."""
    import cProfile
    import io
    import pstats

    frames = random_frames(shape, warm + chunk_frames)
    chunk = frames[warm:]
    session = StreamingSession(adapter, make_rule("hermes", adapter, 4000), chunk_frames=chunk_frames, options=RuntimeOptions.from_env(ingest_graphs=False))
    # the body the ingest graphs capture (fewer-kernel decoder), run without a graph: the
    # profiler sees each of its kernels
    from hermes_policy.graphs.chunk_graphs import ChunkGraphs

    session.chunk_graphs = ChunkGraphs(adapter, session.store, use_graphs=False)
    session.add_frames(frames[:warm])
    for _ in range(3):
        session.add_frames(chunk)
    store = session.store
    request = session.retention.guidance(store, [])
    with torch.inference_mode():
        piece = adapter.frames_piece(chunk, session.frames_seen)
        prompts = [adapter.question_piece(p) for p in request.prompts]
    lengths = store.lengths()
    totals = {}
    for name, run in [
        ("plain", lambda: session._prefill(piece, ingest=True)),
        ("fused", lambda: session.guidance_attention(request, lead=piece, prompt_pieces=prompts)),
    ]:
        for _ in range(2):
            with torch.inference_mode():
                run()
            store.truncate(lengths)
        torch.cuda.synchronize()
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            run()
            torch.cuda.synchronize()
        store.truncate(lengths)
        averages = prof.key_averages(group_by_input_shape=True)
        text = averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=90)
        (out / f"shapes-{name}.txt").write_text(text)
        print(f"== {name} chunk prefill, eager, by operator and input shape")
        print(text)
        totals[name] = {e.key: (e.self_device_time_total, e.count) for e in prof.key_averages() if e.key.startswith("aten::")}
    print("== what the fused pseudo-queries add, by operator (self GPU ms, calls)")
    diff = {k: (totals["fused"].get(k, (0, 0))[0] - totals["plain"].get(k, (0, 0))[0],
                totals["fused"].get(k, (0, 0))[1] - totals["plain"].get(k, (0, 0))[1])
            for k in set(totals["fused"]) | set(totals["plain"])}
    for key, (us, calls) in sorted(diff.items(), key=lambda kv: -abs(kv[1][0]))[:20]:
        print(f"  {key:40s} {us / 1e3:+8.3f} ms {calls:+5d} calls")
    session = None
    torch.cuda.empty_cache()

    answering = StreamingSession(adapter, make_rule("hermes", adapter, 4000), chunk_frames=chunk_frames)
    answering.add_frames(frames[:warm])
    for q in QUESTIONS[:3]:
        answering.ask(q, max_new_tokens=2)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        answering.ask(QUESTIONS[1], max_new_tokens=1)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print("== host time of 10 one-token answers (by own time; the graph replay's wait is in `item`/`int`)")
    print(text.getvalue()[:7000])
    del answering
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-ov-7b")
    parser.add_argument("--warm", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=8, help="compressing chunks timed by phase")
    parser.add_argument("--tokenizer", default="auto", help="see `hermes-probe bench --help`")
    parser.add_argument("--out", type=Path, default=Path("profile-out"))
    parser.add_argument("--attention-only", action="store_true", help="only the attention kernel timings")
    parser.add_argument("--quick", action="store_true", help="only attention, ingest A/B and the answer breakdown")
    parser.add_argument("--answers", action="store_true", help="only the answer's attention backends and the fewer-kernel forward A/B")
    parser.add_argument("--ab-rounds", type=int, default=2, help="--answers: A/B rounds (1: also skips the attention microbenchmark)")
    parser.add_argument("--ingest", action="store_true", help="only the ingest A/B, phases, the fused pseudo-queries' cost and the phase timeline")
    parser.add_argument("--compression", action="store_true", help="only the compression step: its GPU kernels and host time")
    parser.add_argument("--graph-kernels", action="store_true", help="only the pseudo-queries' cost inside the ingest graph, by kernel")
    parser.add_argument("--tail", action="store_true", help="only the phase timeline of a steady session and the gather phase's split at its wait")
    parser.add_argument("--diagnose", action="store_true", help="only shape-level profiles of the fused prefill and the answer's host time")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.answers:
        if args.ab_rounds > 1:
            slot_attention_backends()
        shape = get_shape(args.shape)
        answer_ab(build_random_adapter(shape, tokenizer=args.tokenizer), shape, args.warm, args.ab_rounds)
        return
    if args.ingest:
        shape = get_shape(args.shape)
        adapter = build_random_adapter(shape, tokenizer=args.tokenizer)
        ingest_comparison(adapter, shape, args.chunk, args.warm)
        ingest_phases(adapter, shape, args.chunk, args.warm, args.chunks)
        return
    if args.tail:
        shape = get_shape(args.shape)
        session, chunk = steady_session(build_random_adapter(shape, tokenizer=args.tokenizer), shape, args.chunk, args.warm)
        timeline(session, chunk, args.chunks)
        gather_tail(session, chunk, args.chunks)
        return
    if args.graph_kernels:
        shape = get_shape(args.shape)
        graph_kernels(build_random_adapter(shape, tokenizer=args.tokenizer), shape, args.chunk, args.warm, args.out)
        return
    if args.compression:
        shape = get_shape(args.shape)
        compression_profile(build_random_adapter(shape, tokenizer=args.tokenizer), shape, args.chunk, args.warm, args.out)
        return
    if args.diagnose:
        shape = get_shape(args.shape)
        diagnose(build_random_adapter(shape, tokenizer=args.tokenizer), shape, args.chunk, args.warm, args.out)
        return
    # attention kernels for a chunk prefill on a 4K cache
    q = torch.randn(1, 28, 1569, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, 4, 5700, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    attention_backends(q, k, v)
    gemm_rows()
    if args.attention_only:
        return

    shape = get_shape(args.shape)
    adapter = build_random_adapter(shape, tokenizer=args.tokenizer)
    ingest_comparison(adapter, shape, args.chunk, args.warm)
    answering = StreamingSession(adapter, make_rule("hermes", adapter, 4000), chunk_frames=args.chunk)
    answering.add_frames(random_frames(shape, args.warm))
    answer_breakdown(answering)
    del answering
    if args.quick:
        return
    session, chunk = ingest_phases(adapter, shape, args.chunk, args.warm, args.chunks)
    host_profile(session, chunk, args.out)
    synchronising_calls(lambda: session.add_frames(chunk), "compressing chunk")
    synchronising_calls(lambda: session.ask(QUESTIONS[2], max_new_tokens=4), "answer of 4 tokens")
    idle_time(lambda: session.add_frames(chunk), args.out, "compressing-chunk")
    idle_time(lambda: session.ask(QUESTIONS[3], max_new_tokens=4), args.out, "answer")
    timer = session.observer = PhaseTimer(adapter.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        session.add_frames(chunk)
    session.observer = NoObserver()
    print("phases of the compressing chunk (s):", {k: round(v, 4) for k, v in timer.seconds.items()})
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
