"""The efficiency benchmark: TTFT, TPOT, memory and ingest speed per rule, against the floor.

For each model shape (random weights, :mod:`.shapes`), after a warm-up stream per chunk
size, and for each chunk size and rule, one stream runs up to the largest frame count; at every checkpoint (16, 64, 256, 1024 frames by
default) repeated questions are timed. Rows hold, per checkpoint: TTFT and TPOT (median of
the questions, CUDA-synchronised), their ratios to the physical floor (:mod:`.floor`),
peak GPU memory since the stream began, KV bytes, ingest throughput over the segment
since the previous checkpoint, and the share of that ingest time spent compressing.

Compression time is measured, not estimated, two ways (both reported):

- synchronised (``compression_share``): the session times its phases (GPU synchronised at
  each boundary) for a separate guidance pass, scoring and gathering, on one chunk in four
  (:data:`~hermes_policy.benchmarking.compression_timing.TIMED_EVERY`, at least one per
  segment; the measuring helpers are in that module). The synchronisation stalls the pipeline:
  the host's time to launch the phases' kernels, which otherwise overlaps the GPU's work on
  the forward queued before them, is counted too. So the ingest speed comes from the other
  chunks, and this share is an upper bound.
- pipelined (``compression_share_pipelined``, one GPU): on the other chunks, which run as
  a stream runs, CUDA events recorded at the phase boundaries without synchronising give
  each phase's span on the GPU's timeline: its kernels, and any time the GPU waited for the
  host inside the phase (host work after the gather's one wait for the GPU included).

When the pseudo-queries ride in the chunk's forward (fused guidance), their marginal cost is
measured at every checkpoint by timing the same chunk with and without them (the prompts
lengthen once a question has been asked: they quote the last question and answer), and
counted for every fused pass of the chunks each share covers.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hermes_policy import retention
from hermes_policy.attention.shapes import SPLIT_SHAPES
from hermes_policy.benchmarking.compression_timing import (
    TIMED_EVERY,
    Segment,
    compression_span_seconds,
    fused_guidance_overhead,
    guidance_shape,
    pipelined_share,
    release_memory,
)
from hermes_policy.benchmarking.floor import (
    DeviceCeilings,
    floor_ms,
    forward_flops,
    forward_weight_bytes,
)
from hermes_policy.benchmarking.phases import PhaseEvents, PhaseTimer
from hermes_policy.errors import HermesError
from hermes_policy.models.base import ModelAdapter
from hermes_policy.models.random_shapes import (
    SHAPES,
    TOKENIZER_SOURCES,
    ModelShape,
    build_random_adapter,
    get_shape,
    random_frames,
    tokenizer_description,
)
from hermes_policy.options import RuntimeOptions
from hermes_policy.policy import HeadPolicy, ModelInfo, Policy, paper_default
from hermes_policy.retention import FullRetention, RetentionRule
from hermes_policy.session import NoObserver, StreamingSession

SCHEMA = "hermes-efficiency/1"
RULE_NAMES = ("full", "fifo", "hermes")  # the default grid
# every rule the benchmark can run: the question-time baselines measure what a live stream
# pays (window: its frames re-prefilled at every question; retrieval: top-4 chunks back)
BENCH_RULES = (*RULE_NAMES, "hermes-heads", "window", "retrieval")
QUESTIONS = (
    "What is happening in the video right now?",
    "What color is the largest object on screen?",
    "How many people have appeared so far?",
    "What did the person pick up a moment ago?",
    "Where is the camera pointing at the moment?",
    "Which object moved most in the last minute?",
    "What was on the table at the very beginning?",
    "Is anything different from five seconds ago?",
)


@dataclass
class EfficiencyConfig:
    """What to measure (defaults: the issue's grid)."""

    shapes: tuple[str, ...] = ("llava-ov-7b", "qwen2.5-vl-7b")
    frames: tuple[int, ...] = (16, 64, 256, 1024)
    chunks: tuple[int, ...] = (8, 16)
    rules: tuple[str, ...] = RULE_NAMES
    budget: int = 4000
    questions: int = 5
    answer_tokens: int = 32
    check_correctness: bool = True
    correctness_frames: int = 32
    seed: int = 0
    device_map: str | None = None  # "balanced" / "auto": split each model over the visible GPUs
    tokenizer: str = "auto"  # see shapes.benchmark_tokenizer: token counts of questions and prompts

    def validate(self) -> None:
        """Raise a HermesError naming the first bad setting."""
        for name in self.shapes:
            if name not in SHAPES:
                raise HermesError(f"unknown model shape {name!r}; choose from {', '.join(SHAPES)}")
        for name in self.rules:
            if name not in BENCH_RULES:
                raise HermesError(f"unknown rule {name!r}; the benchmark runs {', '.join(BENCH_RULES)}")
        if not self.frames or any(f < 1 for f in self.frames):
            raise HermesError(f"frame counts must be positive, got {list(self.frames)}")
        if list(self.frames) != sorted(set(self.frames)):
            raise HermesError(f"frame counts must be increasing, got {list(self.frames)}")
        if not self.chunks or any(c < 1 for c in self.chunks):
            raise HermesError(f"chunk sizes must be positive, got {list(self.chunks)}")
        for chunk in self.chunks:
            bad = [f for f in self.frames if f % chunk]
            if bad:
                raise HermesError(f"frame counts {bad} are not multiples of the chunk size {chunk}")
        if self.budget < 1:
            raise HermesError(f"budget must be positive, got {self.budget}")
        if not 1 <= self.questions < len(QUESTIONS):
            raise HermesError(f"questions must be between 1 and {len(QUESTIONS) - 1}, got {self.questions}")
        if self.answer_tokens < 2:
            raise HermesError("answer_tokens must be at least 2 (TPOT needs a second token)")
        if self.tokenizer not in TOKENIZER_SOURCES and not Path(self.tokenizer).is_dir():
            raise HermesError(
                f"tokenizer must be one of {', '.join(TOKENIZER_SOURCES)} or a folder, got {self.tokenizer!r}"
            )
        if self.device_map not in (None, "balanced", "auto"):
            raise HermesError(f"device_map must be 'balanced' or 'auto', got {self.device_map!r}")


def make_rule(name: str, adapter: ModelAdapter, budget: int) -> RetentionRule:
    """A benchmark rule: ``hermes`` with the paper-default policy for this model;
    ``hermes-heads`` with the same policy split per KV head (:func:`per_head_paper_default`);
    ``window`` of 4 frames re-prefilled at every question; ``retrieval`` with a GPU window
    of ``budget`` tokens and 4 chunks retrieved per layer."""
    if name == "window":
        return retention.WindowRetention(frames=4, reuse=False)
    if name == "hermes-heads":
        policy = per_head_paper_default(paper_default(ModelInfo.of(adapter), budget=budget), adapter.num_kv_heads)
        return retention.make_rule(name, budget=budget, policy=policy)
    policy = paper_default(ModelInfo.of(adapter), budget=budget) if name == "hermes" else None
    return retention.make_rule(name, budget=budget, policy=policy)


def per_head_paper_default(policy: Policy, num_kv_heads: int, window_share: float = 0.25) -> Policy:
    """``policy`` (schema 1) as schema 2, DuoAttention-style, for the cost of per-head
    retention: in every layer the first half of the KV heads stream (sink and a window of
    ``window_share`` of the budget), the others keep the layer's HERMES scoring and share
    what the windows leave equally. Every layer's effective memory stays
    ``num_kv_heads x budget`` tokens (a cost figure, not a probed policy)."""
    streaming = max(1, num_kv_heads // 2) if num_kv_heads > 1 else 0
    layers = []
    for layer in policy.layers:
        window = max(1, int(layer.budget * window_share))
        others = num_kv_heads - streaming
        shares = [round(1.0 / others, 6)] * others
        shares[-1] = round(1.0 - sum(shares[:-1]), 6)
        heads = [HeadPolicy("streaming", window, None, 1.0, layer.forgetting_rate)] * streaming
        heads += [HeadPolicy("retrieval", None, s, layer.recency_weight, layer.forgetting_rate) for s in shares]
        layers.append(replace(layer, heads=tuple(heads)))
    return replace(policy, layers=layers, provenance={**policy.provenance, "source": "bench: per-head paper default"})


def question_tokens(adapter: ModelAdapter) -> int:
    """Tokens of a benchmark question as prefilled (template included; median)."""
    return int(statistics.median(len(adapter.question_piece(q)) for q in QUESTIONS))


def shape_summary(adapter: ModelAdapter, ceilings: DeviceCeilings) -> dict[str, Any]:
    """Weights read per forward and the TTFT / TPOT floors of one shape."""
    weight_bytes, params = forward_weight_bytes(adapter)
    q_tokens = question_tokens(adapter)
    rule = make_rule("hermes", adapter, 4000)
    prompts = rule.prompts([])  # (global, mixed): the pseudo-queries of a stream without Q/A
    return {
        "tokenizer": tokenizer_description(adapter.tokenizer),
        "guidance_prompt_tokens": [len(adapter.question_piece(p)) for p in prompts],
        "weight_bytes": weight_bytes,
        "weight_params": params,
        "tokens_per_frame": adapter.tokens_per_frame,
        "question_tokens": q_tokens,
        "ttft_floor_ms": floor_ms(weight_bytes, ceilings.bandwidth, forward_flops(params, q_tokens), ceilings.matmul_rate),
        "tpot_floor_ms": floor_ms(weight_bytes, ceilings.bandwidth, forward_flops(params, 1), ceilings.matmul_rate),
    }


@dataclass
class _StreamState:
    frames_done: int = 0
    chunks_done: int = 0
    peak: int = 0


def run_stream(
    adapter: ModelAdapter,
    shape: ModelShape,
    rule_name: str,
    chunk: int,
    config: EfficiencyConfig,
    summary: dict[str, Any],
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One stream under one rule, measured at every checkpoint; returns its rows."""
    rule = make_rule(rule_name, adapter, config.budget)
    pool = random_frames(shape, chunk * 4, seed=config.seed)
    rows: list[dict[str, Any]] = []
    state = _StreamState()
    overhead: float | None = None
    release_memory()
    gpus = sorted({d.index or 0 for d in adapter.devices if d.type == "cuda"}) if adapter.spans_devices else []
    for index in gpus:
        torch.cuda.reset_peak_memory_stats(index)
    session = StreamingSession(adapter, rule, chunk_frames=chunk, max_new_tokens=config.answer_tokens)
    events = adapter.device.type == "cuda" and not adapter.spans_devices
    timer = PhaseTimer(adapter.device)  # the timed chunks' phases, added up over the stream
    base = {"shape": shape.name, "rule": rule_name, "chunk": chunk, "budget": config.budget}
    for target in config.frames:
        segment = Segment()
        phases_before = dict(timer.seconds)
        fused_total_before = session.fused_guidance_passes
        try:
            while state.frames_done < target:
                start = (state.frames_done // chunk) % 4 * chunk
                last = state.frames_done + chunk >= target
                timed = state.chunks_done % TIMED_EVERY == TIMED_EVERY - 1 or (last and not segment.timed_frames)
                # timed chunks: synchronised phases; the others: events at the phase
                # boundaries, no synchronisation (one GPU only)
                marks = PhaseEvents() if events and not timed else None
                session.observer = timer if timed else marks or NoObserver()
                fused_before = session.fused_guidance_passes
                report = session.add_frames(pool[start : start + chunk])
                if timed:
                    segment.timed_frames += chunk
                    segment.timed_seconds += report.seconds
                    segment.fused_timed += session.fused_guidance_passes - fused_before
                else:
                    segment.frames += chunk
                    segment.seconds += report.seconds
                    segment.chunk_seconds.append(report.seconds)
                    segment.fused_untimed += session.fused_guidance_passes - fused_before
                    if marks is not None:  # add_frames ended synchronised: events are done
                        spans = compression_span_seconds(marks.marks)
                        segment.gpu_compression_seconds = (segment.gpu_compression_seconds or 0.0) + spans
                state.peak = max(state.peak, report.peak_memory_bytes or 0)
                state.frames_done += chunk
                state.chunks_done += 1
            session.observer = NoObserver()
            if session.fused_guidance_passes > fused_total_before:
                # at every checkpoint: the pseudo-queries grow once questions are asked
                # (the guidance prompts quote the last question and answer)
                overhead = fused_guidance_overhead(session, pool[:chunk])
            session.ask(QUESTIONS[0], max_new_tokens=config.answer_tokens)  # warm-up (graph capture)
            answers = [
                session.ask(q, max_new_tokens=config.answer_tokens) for q in QUESTIONS[1 : 1 + config.questions]
            ]
        except torch.cuda.OutOfMemoryError:
            del session
            release_memory()
            rows.append({**base, "frames": target, "status": "out of memory"})
            if progress:
                progress(f"{shape.name} {rule_name} chunk {chunk}: out of memory at {target} frames")
            return rows
        state.peak = max([state.peak] + [a.peak_memory_bytes or 0 for a in answers])
        spent = {k: timer.seconds.get(k, 0.0) - phases_before.get(k, 0.0) for k in timer.seconds}
        fused = session.fused_guidance_passes - fused_total_before
        compression_s = spent.get("guidance", 0.0) + spent.get("select", 0.0) + spent.get("gather", 0.0)
        compression_s += segment.fused_timed * (overhead or 0.0)
        ttft = statistics.median(a.ttft_ms for a in answers)
        tpot = statistics.median(a.tpot_ms for a in answers if a.tpot_ms is not None)
        rows.append(
            {
                **base,
                "frames": target,
                "status": "ok",
                "ttft_ms": ttft,
                "tpot_ms": tpot,
                "ttft_floor_ratio": ttft / summary["ttft_floor_ms"],
                "tpot_floor_ratio": tpot / summary["tpot_floor_ms"],
                "peak_memory_bytes": state.peak,
                "kv_cache_bytes": max(a.kv_cache_bytes for a in answers),
                "host_memory_bytes": max(a.host_memory_bytes for a in answers),
                "tokens_kept": max(max(a.tokens_kept) for a in answers),  # what the questions saw
                "ingest_fps": segment.fps(),
                "ingest_fps_median_chunk": segment.median_chunk_fps(chunk),
                "compression_share": compression_s / segment.timed_seconds if segment.timed_seconds > 0 else None,
                "compression_share_pipelined": pipelined_share(segment, overhead),
                "phase_seconds": spent,
                "timed_chunks_seconds": segment.timed_seconds,
                "fused_guidance_passes_timed": segment.fused_timed,
                "fused_guidance_passes": fused,
                "fused_guidance_overhead_ms": None if overhead is None else overhead * 1e3,
                **guidance_shape(session.guidance_layout if fused else None),
                "answer_tokens": [len(a.token_ids) for a in answers],
            }
        )
        if gpus:
            # the session resets the first GPU's counter per call; the others run since the stream began
            main = adapter.device.index or 0
            rows[-1]["peak_memory_per_gpu"] = [
                state.peak if index == main else int(torch.cuda.max_memory_allocated(index)) for index in gpus
            ]
        if progress:
            progress(
                f"{shape.name} {rule_name} chunk {chunk} @{target}: TTFT {ttft:.1f} ms, TPOT {tpot:.1f} ms, "
                f"peak {state.peak / 2**30:.2f} GiB, ingest {rows[-1]['ingest_fps'] or 0:.0f} fps"
            )
    del session
    release_memory()
    return rows


def warm_up(adapter: ModelAdapter, shape: ModelShape, config: EfficiencyConfig) -> None:
    """Run each chunk size into a full cache and a few chunks beyond, so one-time costs
    (kernel and plan selection, processor set-up, first graph captures, the attention
    plans of the steady state, see :class:`~hermes_policy.attention.shapes.ShapeCounter`) stay
    out of the measured streams."""
    per_frame = max(1, adapter.tokens_per_frame or 1)
    steady = SPLIT_SHAPES.after // max(1, adapter.num_layers) + 2  # chunks at one shape before the plans
    # every bounded rule: their buffers (and so the attention's strides) differ a little
    bounded = [name for name in config.rules if name != "full"] or ["fifo"]
    for chunk in config.chunks:
        frames = -(-config.budget // per_frame) + chunk * (steady + 1)
        pool = random_frames(shape, chunk, seed=config.seed + 2)
        for name in bounded:
            session = StreamingSession(adapter, make_rule(name, adapter, config.budget), chunk_frames=chunk)
            for _ in range(-(-frames // chunk)):
                session.add_frames(pool)
            session.ask(QUESTIONS[0], max_new_tokens=2)
            del session
    release_memory()


def check_answers(shape: ModelShape, dtype: torch.dtype, config: EfficiencyConfig, device: str = "cuda") -> dict[str, Any]:
    """Greedy answer tokens: ``hermes`` with an unlimited budget vs ``full`` (CUDA graphs),
    and the graph path vs the eager path, on one random-weight model."""
    adapter = build_random_adapter(
        shape, device=device, dtype=dtype, seed=config.seed, device_map=config.device_map, tokenizer=config.tokenizer
    )
    frames = random_frames(shape, config.correctness_frames, seed=config.seed + 1)
    unlimited = 10**9
    # the fixed-shape path: captured as graphs on one GPU, the same code uncaptured otherwise
    fixed = "graphs" if adapter.device.type == "cuda" and not adapter.spans_devices else "static"

    def tokens(rule: RetentionRule, path: str) -> list[int]:
        session = StreamingSession(adapter, rule, chunk_frames=8, options=RuntimeOptions.from_env(answer_path=path))
        session.add_frames(frames)
        return session.ask(QUESTIONS[0], max_new_tokens=16).token_ids

    full_graphs = tokens(FullRetention(), fixed)
    hermes_graphs = tokens(make_rule("hermes", adapter, unlimited), fixed)
    full_eager = tokens(FullRetention(), "eager")
    return {
        "shape": shape.name,
        "dtype": str(dtype).replace("torch.", ""),
        "frames": config.correctness_frames,
        "full_tokens": full_graphs,
        "hermes_unlimited_tokens": hermes_graphs,
        "full_eager_tokens": full_eager,
        "hermes_unlimited_equals_full": hermes_graphs == full_graphs,
        "graphs_equal_eager": full_graphs == full_eager,
    }


def evaluate_targets(rows: list[dict[str, Any]], shape: str = "llava-ov-7b", chunk: int = 8) -> list[dict[str, Any]]:
    """The issue's targets for ``hermes`` on one shape, each with its value and verdict."""
    mine = {r["frames"]: r for r in rows if r["shape"] == shape and r["rule"] == "hermes" and r["chunk"] == chunk and r.get("status") == "ok"}
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: str, met: bool | None) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": met})

    if not mine:
        return out
    worst_ttft = max(r["ttft_floor_ratio"] for r in mine.values())
    worst_tpot = max(r["tpot_floor_ratio"] for r in mine.values())
    add("TTFT / floor (worst checkpoint)", worst_ttft, "<= 2", worst_ttft <= 2)
    add("TPOT / floor (worst checkpoint)", worst_tpot, "<= 2", worst_tpot <= 2)
    frames = sorted(mine)
    first, last = frames[0], frames[-1]
    ttft_growth = mine[last]["ttft_ms"] / mine[first]["ttft_ms"] - 1
    add(f"TTFT @{last} vs @{first}", ttft_growth, "<= +10%", ttft_growth <= 0.10)
    if 64 in mine and last > 64:
        growth = mine[last]["peak_memory_bytes"] / mine[64]["peak_memory_bytes"] - 1
        add(f"peak memory @{last} vs @64", growth, "<= +2%", growth <= 0.02)
    steady = [r for f, r in mine.items() if f > 16 and r.get("ingest_fps")]
    if steady:
        fps = min(r["ingest_fps"] for r in steady)
        share = max(r["compression_share"] for r in steady)
        add("ingest fps (slowest segment after 16 frames)", fps, ">= 100", fps >= 100)
        add("compression share of ingest, synchronised timers (largest)", share, "< 10%", share < 0.10)
        pipelined = [r.get("compression_share_pipelined") for r in steady]
        if all(p is not None for p in pipelined):
            share = max(pipelined)
            add("compression share of ingest, pipelined GPU time (largest)", share, "< 10%", share < 0.10)
    return out


def run_efficiency(
    config: EfficiencyConfig,
    ceilings: DeviceCeilings,
    progress: Callable[[str], None] | None = None,
    device: str = "cuda",
) -> dict[str, Any]:
    """Run the whole grid on one GPU; returns the results document (without command/date)."""
    config.validate()
    rows: list[dict[str, Any]] = []
    shapes: dict[str, Any] = {}
    correctness: list[dict[str, Any]] = []
    for name in config.shapes:
        shape = get_shape(name)
        if config.check_correctness:
            # split models are the ones too large for fp32 to fit: bf16 only
            for dtype in (torch.bfloat16,) if config.device_map else (torch.bfloat16, torch.float32):
                result = check_answers(shape, dtype, config, device)
                release_memory()
                correctness.append(result)
                if progress:
                    progress(
                        f"{name} {result['dtype']}: hermes(unlimited) == full: {result['hermes_unlimited_equals_full']}, "
                        f"graphs == eager: {result['graphs_equal_eager']}"
                    )
        adapter = build_random_adapter(
            shape,
            device=device,
            dtype=torch.bfloat16,
            seed=config.seed,
            device_map=config.device_map,
            tokenizer=config.tokenizer,
        )
        shapes[name] = {**shape_summary(adapter, ceilings), "source": shape.source}
        if adapter.spans_devices:
            shapes[name]["devices"] = [str(d) for d in adapter.devices]
        warm_up(adapter, shape, config)
        for chunk in config.chunks:
            for rule_name in config.rules:
                rows.extend(run_stream(adapter, shape, rule_name, chunk, config, shapes[name], progress))
        del adapter
        release_memory()
    from hermes_policy.evaluation.manifest import run_manifest

    manifest = run_manifest(
        mode="streaming (random-weight model shapes)", shapes=list(config.shapes), rules=list(config.rules),
        budget=config.budget, chunks=list(config.chunks), frames=list(config.frames), dtype="bfloat16",
        tokenizer=config.tokenizer, device_map=config.device_map,
    )
    manifest["device"] = ceilings.name
    return {
        "schema": SCHEMA,
        "manifest": manifest,
        "ceilings": ceilings.as_dict(),
        "config": asdict(config),
        "shapes": shapes,
        "rows": rows,
        "correctness": correctness,
    }


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Add ``new``'s shapes, rows and checks to ``old`` (same key: the new one wins)."""
    def key(row: dict[str, Any]) -> tuple:
        return (row["shape"], row["rule"], row["chunk"], row["frames"])

    rows = {key(r): r for r in old.get("rows", [])}
    rows.update({key(r): r for r in new.get("rows", [])})
    checks = {(c["shape"], c["dtype"]): c for c in old.get("correctness", [])}
    checks.update({(c["shape"], c["dtype"]): c for c in new.get("correctness", [])})
    merged = dict(new)
    merged["shapes"] = {**old.get("shapes", {}), **new.get("shapes", {})}
    merged["rows"] = sorted(rows.values(), key=lambda r: (r["shape"], r["chunk"], r["rule"], r["frames"]))
    merged["correctness"] = list(checks.values())
    merged["commands"] = list(dict.fromkeys(old.get("commands", []) + new.get("commands", [])))
    notes = list(dict.fromkeys(old.get("notes", []) + new.get("notes", [])))  # written by hand: kept
    if notes:
        merged["notes"] = notes
    return merged
