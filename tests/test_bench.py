"""The efficiency benchmark's CPU parts: arguments, floor arithmetic, the measuring loop on
tiny shapes, targets, table, plot, merging and the CLI. The GPU runs themselves are in
``benchmarks/results`` (see the README); ``tests/test_gpu.py`` covers the CUDA-only code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hermes_cli.bench_command import device_slug, parse_ints
from hermes_cli.main import app
from typer.testing import CliRunner

from hermes_policy.benchmarking.efficiency import (
    EfficiencyConfig,
    check_answers,
    evaluate_targets,
    make_rule,
    merge_results,
    run_efficiency,
    run_stream,
    shape_summary,
)
from hermes_policy.benchmarking.floor import (
    DeviceCeilings,
    floor_ms,
    forward_flops,
    forward_weight_bytes,
)
from hermes_policy.benchmarking.report import markdown_table, plot
from hermes_policy.errors import HermesError
from hermes_policy.models.random_shapes import (
    SHAPES,
    benchmark_tokenizer,
    build_random_adapter,
    get_shape,
    tokenizer_description,
)
from hermes_policy.options import RuntimeOptions
from hermes_policy.retention.guidance import PROMPT_QUANTUM, GuidanceLayout

CEILINGS = DeviceCeilings("Test GPU", bandwidth=4e12, matmul_rate=8e14)


@pytest.fixture(scope="module")
def tiny_llava():
    return build_random_adapter("tiny-llava-ov", device="cpu", dtype=torch.float32)


def test_parse_ints_and_slug():
    assert parse_ints("16, 64,256", "--frames") == (16, 64, 256)
    with pytest.raises(HermesError, match="--frames"):
        parse_ints("16,x", "--frames")
    with pytest.raises(HermesError, match="empty"):
        parse_ints(" , ", "--chunks")
    assert device_slug("NVIDIA H200") == "nvidia-h200"
    assert device_slug("!!") == "gpu"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"shapes": ("gpt-5",)}, "unknown model shape"),
        ({"rules": ("snapkv",)}, "unknown rule"),
        ({"frames": (64, 16)}, "increasing"),
        ({"frames": (0, 16)}, "positive"),
        ({"chunks": (8, 0)}, "positive"),
        ({"frames": (12,), "chunks": (8,)}, "multiples"),
        ({"budget": 0}, "budget"),
        ({"questions": 0}, "questions"),
        ({"answer_tokens": 1}, "answer_tokens"),
        ({"tokenizer": "no/such/folder"}, "tokenizer must be one of"),
    ],
)
def test_config_validation(change, message):
    config = EfficiencyConfig(**change)
    with pytest.raises(HermesError, match=message):
        config.validate()


def test_floor_arithmetic():
    # 14 GB at 4 TB/s: 3.5 ms; the compute term only wins for long prefills
    assert floor_ms(14_000_000_000, 4e12) == pytest.approx(3.5)
    assert floor_ms(14_000_000_000, 4e12, forward_flops(7e9, 40), 8e14) == pytest.approx(3.5)
    assert floor_ms(14_000_000_000, 4e12, forward_flops(7e9, 1000), 8e14) == pytest.approx(17.5)
    assert forward_flops(10, 3) == 60
    with pytest.raises(ValueError):
        floor_ms(1, 0)


def test_forward_weight_bytes_skip_the_input_embedding_only(tiny_llava):
    weight_bytes, params = forward_weight_bytes(tiny_llava)
    text = tiny_llava.text_model
    embed = text.get_input_embeddings().weight
    head = tiny_llava.model.get_output_embeddings().weight
    expected = sum(p.numel() for p in text.parameters()) - embed.numel() + head.numel()
    assert params == expected
    assert weight_bytes == 4 * expected  # float32
    assert not any(p is head for p in text.parameters())


def test_published_shapes_have_the_documented_sizes():
    llava, qwen = get_shape("llava-ov-7b"), get_shape("qwen2.5-vl-7b")
    assert llava.text["hidden_size"] == qwen.text["hidden_size"] == 3584
    assert llava.text["num_hidden_layers"] == 28 and llava.text["num_key_value_heads"] == 4
    assert llava.vision["image_size"] // llava.vision["patch_size"] == 27  # -> 14 x 14 = 196 per frame
    assert qwen.frame_size == (448, 448)
    with pytest.raises(HermesError, match="unknown model shape"):
        get_shape("nope")
    assert {"tiny-llava-ov", "tiny-qwen2.5-vl"} <= set(SHAPES)


def test_run_stream_measures_every_checkpoint_on_a_tiny_shape(tiny_llava):
    shape = get_shape("tiny-llava-ov")
    config = EfficiencyConfig(
        shapes=("tiny-llava-ov",), frames=(4, 32), chunks=(4,), budget=6 * tiny_llava.tokens_per_frame,
        questions=2, answer_tokens=3,
    )
    summary = shape_summary(tiny_llava, CEILINGS)
    assert summary["tokens_per_frame"] == tiny_llava.tokens_per_frame
    rows = run_stream(tiny_llava, shape, "hermes", 4, config, summary)
    assert [r["frames"] for r in rows] == [4, 32] and all(r["status"] == "ok" for r in rows)
    early, late = rows
    assert early["compression_share"] == 0 and early["fused_guidance_passes"] == 0
    assert late["fused_guidance_passes"] > 0 and late["fused_guidance_overhead_ms"] is not None
    # the share is measured phases plus fused passes times their A/B-measured cost (on a
    # tiny CPU model that estimate is noisy, so only the arithmetic is checked here)
    phases = sum(late["phase_seconds"].get(k, 0.0) for k in ("guidance", "select", "gather"))
    fused_s = late["fused_guidance_passes_timed"] * late["fused_guidance_overhead_ms"] / 1e3
    assert late["compression_share"] == pytest.approx((phases + fused_s) / late["timed_chunks_seconds"])
    assert late["compression_share"] > 0
    assert late["compression_share_pipelined"] is None  # CUDA events only
    assert late["ingest_fps_median_chunk"] > 0 and late["ingest_fps"] > 0
    # phases are timed on one chunk in four (here the stream's 4th and 8th; the first
    # segment's single chunk too, as a segment's last resort), the rest give the speed
    assert 0 < late["fused_guidance_passes_timed"] <= 2 < late["fused_guidance_passes"]
    assert late["tokens_kept"] <= config.budget
    assert late["ttft_floor_ratio"] == pytest.approx(late["ttft_ms"] / summary["ttft_floor_ms"])
    assert all(1 <= n <= 3 for n in late["answer_tokens"])
    # the pseudo-queries' shape: the global and the mixed prompt, padded to the quantum,
    # quoting the last question and answer (so longer than without history)
    plain = [len(tiny_llava.question_piece(p)) for p in make_rule("hermes", tiny_llava, config.budget).prompts([])]
    tokens, padded = late["guidance_prompt_tokens"], late["guidance_prompt_rows"]
    assert len(tokens) == 2 and all(t > p for t, p in zip(tokens, plain, strict=True))
    assert all(r % PROMPT_QUANTUM == 0 and t <= r < t + PROMPT_QUANTUM for t, r in zip(tokens, padded, strict=True))
    assert 0 < late["guidance_row_share"] < 1
    assert early["guidance_prompt_tokens"] is None and early["guidance_row_share"] is None


def test_check_answers_on_cpu():
    config = EfficiencyConfig(correctness_frames=8)
    result = check_answers(get_shape("tiny-llava-ov"), torch.float32, config, device="cpu")
    assert result["hermes_unlimited_equals_full"] and result["graphs_equal_eager"]
    assert len(result["full_tokens"]) > 0


def synthetic_rows(ttft=(6.0, 6.5), fps=120.0, share=0.05):
    rows = []
    for frames, t in zip((16, 64, 1024), (ttft[0], ttft[0], ttft[1]), strict=True):
        rows.append({
            "shape": "llava-ov-7b", "rule": "hermes", "chunk": 8, "frames": frames, "status": "ok",
            "ttft_ms": t, "tpot_ms": 6.0, "ttft_floor_ratio": t / 3.5, "tpot_floor_ratio": 6.0 / 3.5,
            "peak_memory_bytes": 17 * 2**30 + frames, "kv_cache_bytes": 2**28, "tokens_kept": 4000,
            "ingest_fps": fps, "compression_share": share, "compression_share_pipelined": share / 2,
        })
    rows.append({"shape": "llava-ov-7b", "rule": "full", "chunk": 8, "frames": 1024, "status": "out of memory"})
    return rows


def test_targets_met_and_missed():
    met = {t["target"].split(" (")[0]: t["met"] for t in evaluate_targets(synthetic_rows())}
    assert all(met.values()) and len(met) == 7
    missed = {t["target"].split(" (")[0]: t["met"] for t in evaluate_targets(synthetic_rows(ttft=(6.0, 8.0), fps=50, share=0.3))}
    assert missed["TTFT @1024 vs @16"] is False
    assert missed["ingest fps"] is False
    assert missed["compression share of ingest, synchronised timers"] is False
    assert missed["compression share of ingest, pipelined GPU time"] is False
    half = {t["target"].split(" (")[0]: t["met"] for t in evaluate_targets(synthetic_rows(share=0.15))}
    assert half["compression share of ingest, synchronised timers"] is False
    assert half["compression share of ingest, pipelined GPU time"] is True
    assert evaluate_targets([]) == []


def test_pipelined_compression_share_from_phase_events():
    from hermes_policy.benchmarking.compression_timing import (
        Segment,
        compression_span_seconds,
        pipelined_share,
    )

    class Event:  # a completed CUDA event: milliseconds on the GPU's timeline
        def __init__(self, ms: float):
            self.ms = ms

        def elapsed_time(self, other: Event) -> float:
            return other.ms - self.ms

    marks = [("encode", 0.0, 0.1, Event(0), Event(3)), ("prefill", 0.1, 0.2, Event(3), Event(80)),
             ("select", 0.2, 0.3, Event(80), Event(82)), ("gather", 0.3, 0.4, Event(82), Event(83.5))]
    assert compression_span_seconds(marks) == pytest.approx(3.5e-3)
    segment = Segment(frames=16, seconds=0.2, fused_untimed=2, gpu_compression_seconds=7e-3)
    assert pipelined_share(segment, 5e-3) == pytest.approx((7e-3 + 2 * 5e-3) / 0.2)
    assert pipelined_share(Segment(frames=16, seconds=0.2), 5e-3) is None  # no events recorded
    # a capture in the segment: the segment's speed counts it, its median chunk does not
    timed = Segment(frames=32, seconds=0.5, chunk_seconds=[0.08, 0.26, 0.08, 0.08])
    assert timed.fps() == pytest.approx(64) and timed.median_chunk_fps(8) == pytest.approx(100)
    assert Segment().median_chunk_fps(8) is None


def results_document():
    return {
        "schema": "hermes-efficiency/1",
        "ceilings": CEILINGS.as_dict(),
        "shapes": {"llava-ov-7b": {"weight_bytes": 14e9, "ttft_floor_ms": 3.5, "tpot_floor_ms": 3.5, "question_tokens": 57, "source": "test"}},
        "rows": synthetic_rows(),
        "correctness": [
            {"shape": "llava-ov-7b", "dtype": "float32", "hermes_unlimited_equals_full": True, "graphs_equal_eager": True},
            {
                "shape": "llava-ov-7b", "dtype": "bfloat16", "hermes_unlimited_equals_full": True,
                "graphs_equal_eager": False, "full_tokens": [5, 5, 7, 5], "full_eager_tokens": [5, 5, 5, 7],
            },
        ],
        "commands": ["hermes-probe bench --shapes llava-ov-7b"],
        "date": "2026-12-01",
    }


def test_markdown_and_plot(tmp_path):
    results = results_document()
    results["rows"][1]["ingest_fps_median_chunk"] = 131.4  # rows from before it have none
    results["targets"] = evaluate_targets(results["rows"])
    text = markdown_table(results)
    assert "| hermes | 8 | 1024 | 6.5 (1.86x)" in text
    assert "| 120 / 131 | 5.0% / 2.5% | - |" in text and "| 120 | 5.0% / 2.5% | - |" in text
    results["rows"][2].update(guidance_prompt_tokens=[57, 112], guidance_row_share=0.0987, fused_guidance_overhead_ms=8.16)
    assert "| 57 + 112 tokens, 9.9% of rows, 8.2 ms |" in markdown_table(results)
    assert "out of memory" in text and "Targets" in text and "Correctness" in text
    assert "| llava-ov-7b | bfloat16 | True | False (first 2 of 4 tokens equal) |" in text
    assert "| llava-ov-7b | float32 | True | True |" in text
    path = plot(results, tmp_path / "fig.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_merge_results_replaces_same_rows_and_keeps_others():
    old = results_document()
    new = results_document()
    new["rows"] = [dict(new["rows"][0], ttft_ms=1.0)]
    new["shapes"] = {"qwen2.5-vl-7b": {"source": "x"}}
    new["commands"] = ["second"]
    old["notes"] = ["a note written by hand"]
    merged = merge_results(old, new)
    assert merged["notes"] == ["a note written by hand"]
    assert len(merged["rows"]) == len(old["rows"])
    assert [r["ttft_ms"] for r in merged["rows"] if r["frames"] == 16 and r["rule"] == "hermes"] == [1.0]
    assert set(merged["shapes"]) == {"llava-ov-7b", "qwen2.5-vl-7b"}
    assert merged["commands"] == ["hermes-probe bench --shapes llava-ov-7b", "second"]


def test_run_efficiency_document_on_cpu():
    config = EfficiencyConfig(
        shapes=("tiny-llava-ov",), frames=(8,), chunks=(4,), rules=("full", "fifo"), budget=100,
        questions=1, answer_tokens=2, check_correctness=False,
    )
    doc = run_efficiency(config, CEILINGS, device="cpu")
    assert doc["schema"] == "hermes-efficiency/1"
    assert doc["manifest"]["rules"] == ["full", "fifo"] and doc["manifest"]["device"] == CEILINGS.name
    assert doc["manifest"]["packages"]["torch"]
    assert [(r["rule"], r["frames"]) for r in doc["rows"]] == [("full", 8), ("fifo", 8)]


def test_cli_report_only_and_errors(tmp_path, monkeypatch):
    runner = CliRunner()
    path = tmp_path / "efficiency-test-gpu-2026-12-01.json"
    path.write_text(json.dumps(results_document()))
    result = runner.invoke(app, ["bench", "--report-only", str(path)])
    assert result.exit_code == 0, result.output
    assert path.with_suffix(".md").read_text().startswith("Device: Test GPU")
    assert path.with_suffix(".png").is_file()
    assert json.loads(path.read_text())["targets"]

    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = runner.invoke(app, ["bench", "--report-only", str(bad)])
    assert result.exit_code == 1 and "not valid JSON" in result.output
    other = tmp_path / "other.json"
    other.write_text("{}")
    result = runner.invoke(app, ["bench", "--report-only", str(other)])
    assert result.exit_code == 1 and "not an efficiency results file" in result.output

    result = runner.invoke(app, ["bench", "--frames", "64,16"])
    assert result.exit_code == 1 and "increasing" in result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["bench", "--frames", "16", "--chunks", "8"])
    assert result.exit_code == 1 and "needs a CUDA GPU" in result.output


def test_device_of_takes_the_longest_module_prefix():
    from hermes_policy.models.random_shapes import device_of

    device_map = {"model.language_model.layers.0": 0, "model.language_model": 1, "": "cpu"}
    assert device_of("model.language_model.layers.0.mlp.up_proj.weight", device_map) == torch.device("cuda", 0)
    assert device_of("model.language_model.layers.10.mlp.up_proj.weight", device_map) == torch.device("cuda", 1)
    assert device_of("lm_head.weight", device_map) == torch.device("cpu")
    with pytest.raises(HermesError, match="places no module"):
        device_of("lm_head.weight", {"model": 0})


def test_dispatched_random_model_streams(tmp_path):
    """The device-map build (each weight created on its device, accelerate hooks) runs a
    session; on a CPU-only machine the map has one device."""
    adapter = build_random_adapter(
        "tiny-llava-ov", dtype=torch.float32, device_map="auto", max_memory={"cpu": "4GiB"}
    )
    assert adapter.model.hf_device_map == {"": "cpu"} and not adapter.spans_devices
    from hermes_policy import StreamingSession
    from hermes_policy.benchmarking.efficiency import make_rule
    from hermes_policy.models.random_shapes import random_frames

    session = StreamingSession(adapter, make_rule("hermes", adapter, 60), chunk_frames=4, options=RuntimeOptions(answer_path="static"))
    session.add_frames(random_frames(get_shape("tiny-llava-ov"), 16))
    assert session.compressions > 0
    assert len(session.ask("What?", max_new_tokens=3).token_ids) >= 1
    with pytest.raises(HermesError, match="device_map"):
        build_random_adapter("tiny-llava-ov", dtype=torch.float32, device_map="sequential")
    with pytest.raises(HermesError, match="device_map"):
        EfficiencyConfig(device_map="sequential").validate()


def test_markdown_shows_per_gpu_memory_of_split_models():
    results = results_document()
    results["shapes"]["llava-ov-7b"]["devices"] = ["cuda:0", "cuda:1"]
    results["rows"][0]["peak_memory_per_gpu"] = [70 * 2**30, 69 * 2**30]
    text = markdown_table(results)
    assert "Split over cuda:0, cuda:1" in text and "| 70.00 / 69.00 |" in text


def test_random_models_load_by_name():
    from hermes_policy.errors import ModelLoadError
    from hermes_policy.models import load_adapter

    adapter = load_adapter("random:tiny-qwen2.5-vl", device="cpu")
    assert adapter.name_or_path == "random:tiny-qwen2.5-vl" and adapter.dtype == torch.float32
    with pytest.raises(ModelLoadError, match="unknown random model shape"):
        load_adapter("random:gpt-7", device="cpu")


QUESTION = "What is happening in the video right now?"


def test_byte_tokenizer_is_the_default_and_auto_falls_back_where_the_vocabulary_is_small(tiny_llava):
    assert len(tiny_llava.tokenizer) < 300
    # tiny shapes have 300 ids: "auto" cannot use the 49k-token BPE there
    tiny = build_random_adapter("tiny-llava-ov", device="cpu", dtype=torch.float32, tokenizer="auto")
    assert tokenizer_description(tiny.tokenizer).startswith("Qwen2Tokenizer (byte-level")


def test_embedded_bpe_tokenizer_counts_english_like_a_real_model(tmp_path):
    bpe = benchmark_tokenizer("embedded")
    assert benchmark_tokenizer("auto", vocab_size=152064) is bpe  # loaded once
    assert tokenizer_description(bpe) == "TokenizersBackend (BPE, 49158 tokens)"
    byte = benchmark_tokenizer("byte")
    # the chat and vision tokens exist and are single tokens
    for token in ("<|im_start|>", "<|im_end|>", "<|video_pad|>", "<image>", "<video>"):
        assert len(bpe(token, add_special_tokens=False).input_ids) == 1
    assert bpe.convert_ids_to_tokens(bpe.eos_token_id) == "<|im_end|>"
    assert len(bpe(QUESTION).input_ids) <= 12 < 40 <= len(byte(QUESTION).input_ids)
    # saved and loaded from a folder (how it travels to a machine without the GGUF)
    bpe.save_pretrained(tmp_path / "tok")
    again = benchmark_tokenizer(str(tmp_path / "tok"))
    assert again(QUESTION).input_ids == bpe(QUESTION).input_ids
    assert again.convert_tokens_to_ids("<video>") == bpe.convert_tokens_to_ids("<video>")
    with pytest.raises(HermesError, match="more than the 300"):
        build_random_adapter("tiny-llava-ov", device="cpu", tokenizer="embedded")


def test_bad_tokenizer_sources_raise_one_clear_error(tmp_path):
    with pytest.raises(HermesError, match="neither one of"):
        benchmark_tokenizer("bytes")
    with pytest.raises(HermesError, match="no tokenizer could be loaded"):
        benchmark_tokenizer(str(tmp_path))


def run_benchmark_script(name: str, args: list[str], out: Path, timeout: int) -> dict:
    """Run ``benchmarks/<name>`` with ``args --out out`` in a fresh process; its one JSON result."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    done = subprocess.run(
        [sys.executable, str(script), *args, "--out", str(out)], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = out.glob(Path(name).stem.replace("_", "-") + "-*.json")
    return json.loads(path.read_text())


def test_compression_ops_benchmark_counts_launches(tmp_path):
    """benchmarks/compression_ops.py on a 3-layer model: it writes its figures, and the
    fewer-kernel chunk forward launches fewer kernels outside attention than the
    transformers layers (each fused op counted once, as compiled on CUDA)."""
    (run,) = run_benchmark_script("compression_ops.py", ["--layers", "3", "--chunks", "1"], tmp_path, 300)["runs"]
    decoder = run["decoder_forward_of_a_compressing_chunk"]
    fewer, plain = decoder["fewer kernels"], decoder["transformers layers"]
    # attention is counted apart (its calls differ: the fewer-kernel forward also drops a
    # pseudo-query block after the last layer that captures it)
    assert fewer["inside_attention"] > 0 and plain["inside_attention"] > 0
    assert 0 < fewer["outside_attention_launches_on_cuda"] < plain["outside_attention_launches_on_cuda"]
    assert run["per_compressing_chunk"]["select"]["launches_on_cuda"] > 0
    assert run["per_compressing_chunk"]["gather"]["operators"] > 0


def test_eviction_bookkeeping_benchmark_writes_its_figures(tmp_path):
    """benchmarks/eviction_bookkeeping.py, small: both forms give the same arrays (checked
    inside), and it writes both timings and their ratio."""
    result = run_benchmark_script("eviction_bookkeeping.py", ["--layers", "2", "--repeats", "2"], tmp_path, 120)
    assert result["fancy_indexing_ms"] > 0 and result["np_take_ms"] > 0
    assert result["ratio"] == result["fancy_indexing_ms"] / result["np_take_ms"]


def test_guidance_row_share():
    """Lead rows through every layer, block rows where they are still read: block 1 (rows
    14-21) captured at layer 1, block 0 (rows 10-13) at layer 2, nothing at layer 3."""
    layout = GuidanceLayout(
        lead=10, prompt_tokens=(3, 5), prompt_rows=(4, 8), captured=((1, 14, 22), (2, 10, 14)), layers=4
    )
    assert layout.layer_rows == (22, 22, 14, 10)
    assert layout.row_share == pytest.approx((12 + 12 + 4) / (22 + 22 + 14 + 10))
    assert GuidanceLayout(lead=0, prompt_tokens=(), prompt_rows=(), captured=(), layers=0).row_share == 0.0


def test_fused_guidance_overhead_pairs_cancel_drift_and_outliers(monkeypatch):
    """A fake session on a clock that runs a chunk in 1.0 s alone and 1.5 s with its
    pseudo-queries, each run 0.1 s slower than the one before (a machine heating up),
    and one run hit by a 5 s stall: the pairs' median difference is the 0.5 s itself."""
    from types import SimpleNamespace

    from hermes_policy.benchmarking import compression_timing

    clock = {"now": 0.0, "runs": 0}
    monkeypatch.setattr(compression_timing.time, "perf_counter", lambda: clock["now"])

    def run(seconds: float) -> None:
        clock["now"] += seconds + 0.1 * clock["runs"] + (5.0 if clock["runs"] == 6 else 0.0)
        clock["runs"] += 1

    truncated = []
    store = SimpleNamespace(lengths=lambda: [10, 10], truncate=truncated.append)
    session = SimpleNamespace(
        retention=SimpleNamespace(guidance=lambda store, history: SimpleNamespace(prompts=["a", "b"])),
        store=store,
        history=[],
        frames_seen=0,
        guidance_passes=3,
        adapter=SimpleNamespace(device=torch.device("cpu"), frames_piece=lambda f, n: "piece"),
        planner=SimpleNamespace(prompt_piece=lambda prompt: prompt),
        _prefill=lambda piece, ingest, recurring: run(1.0),
        guidance_attention=lambda request, lead, prompt_pieces, recurring: run(1.5),
    )
    assert compression_timing.fused_guidance_overhead(session, frames=None) == pytest.approx(0.5)
    assert clock["runs"] == 2 + 2 * 8 and len(truncated) == clock["runs"] and session.guidance_passes == 3
    session.retention = SimpleNamespace(guidance=lambda store, history: None)
    assert compression_timing.fused_guidance_overhead(session, frames=None) is None


@pytest.mark.parametrize("rule_name", ["window", "retrieval"])
def test_run_stream_measures_the_question_time_baselines(tiny_llava, rule_name):
    """On a real video architecture (tiny LLaVA-OV): the window holds 4 frames whatever the
    stream's length; retrieval keeps its GPU window and offloads the rest to host memory."""
    shape = get_shape("tiny-llava-ov")
    per_frame = tiny_llava.tokens_per_frame
    config = EfficiencyConfig(
        shapes=("tiny-llava-ov",), frames=(8, 32), chunks=(4,), rules=(rule_name,), budget=6 * per_frame,
        questions=2, answer_tokens=3,
    )
    config.validate()
    rows = run_stream(tiny_llava, shape, rule_name, 4, config, shape_summary(tiny_llava, CEILINGS))
    early, late = rows
    assert all(r["status"] == "ok" for r in rows)
    if rule_name == "window":
        # 4 frames (one chunk of 4: its newline token too) at every checkpoint, nothing on the host
        assert early["tokens_kept"] == late["tokens_kept"] == 4 * per_frame + 1
        assert early["kv_cache_bytes"] == late["kv_cache_bytes"]
        assert late["host_memory_bytes"] == early["host_memory_bytes"] > 0  # the buffered frames
    else:
        assert late["host_memory_bytes"] > early["host_memory_bytes"] > 0
        assert late["tokens_kept"] > config.budget  # the window plus retrieved chunks, at the question


def test_per_head_bench_rule_keeps_each_heads_memory(tiny_llava):
    """``hermes-heads``: the paper default split per KV head (half streaming with a quarter
    of the budget, half scored sharing the rest) loads as a valid schema-2 policy, streams
    on a real video architecture, and keeps the layer's effective memory at
    ``num_kv_heads x budget`` tokens once it compresses."""
    from hermes_policy.benchmarking.efficiency import per_head_paper_default
    from hermes_policy.policy import Policy, head_token_budgets

    shape = get_shape("tiny-llava-ov")
    budget = 6 * tiny_llava.tokens_per_frame
    rule = make_rule("hermes-heads", tiny_llava, budget)
    kv_heads = tiny_llava.num_kv_heads
    for layer in rule.policy.layers:
        assert sum(head_token_budgets(layer, kv_heads)) == kv_heads * budget
        assert [h.role for h in layer.heads].count("streaming") == max(1, kv_heads // 2)
    # valid as a file: the validator accepts what the bench builds
    schema2 = per_head_paper_default(rule.policy, kv_heads)
    assert Policy.from_dict(schema2.to_dict()).per_head
    config = EfficiencyConfig(
        shapes=("tiny-llava-ov",), frames=(8, 32), chunks=(4,), rules=("hermes-heads",), budget=budget,
        questions=2, answer_tokens=3,
    )
    config.validate()
    early, late = run_stream(tiny_llava, shape, "hermes-heads", 4, config, shape_summary(tiny_llava, CEILINGS))
    assert early["status"] == late["status"] == "ok"
    # the union of the heads' tokens stays within the layer's memory although the stream outgrew it
    assert late["tokens_kept"] <= kv_heads * budget < 32 * tiny_llava.tokens_per_frame
