"""`hermes-probe bench`: the GPU efficiency benchmark (TTFT, TPOT, memory, ingest) vs the floor.

Registered in :mod:`hermes_cli.main`; ``benchmarks/efficiency.py`` runs the same command.
Results: ``<out-dir>/efficiency-<device>-<date>.{json,md,png}``; ``--append`` adds to an
existing file of that name (one shape per call fits the device's time limit per command),
``--report-only FILE`` rewrites the table and plot of a results file (no GPU needed).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_OUT = Path("benchmarks/results")


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"16,64,256"`` -> ``(16, 64, 256)``; a HermesError names ``what`` when malformed."""
    from hermes_policy.errors import HermesError

    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise HermesError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise HermesError(f"{what} is empty")
    return values


def parse_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def device_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"`` (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def read_results(path: Path) -> dict[str, Any]:
    """A results document, or a HermesError saying why the file is not one."""
    from hermes_policy.errors import HermesError

    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HermesError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(results, dict) or results.get("schema") != "hermes-efficiency/1":
        raise HermesError(f"{path} is not an efficiency results file")
    return results


def write_report(results: dict[str, Any], json_path: Path) -> tuple[Path, Path, Path]:
    """Write the results JSON, its markdown table and plot next to it (atomically)."""
    from hermes_policy.benchmarking.efficiency import evaluate_targets
    from hermes_policy.benchmarking.report import markdown_table, plot
    from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic

    results["targets"] = evaluate_targets(results["rows"])
    write_json_atomic(json_path, results)
    md = write_text_atomic(json_path.with_suffix(".md"), markdown_table(results) + "\n")
    png = plot(results, json_path.with_suffix(".png"))
    return json_path, md, png


def bench_command(
    shapes: Annotated[str, typer.Option(help="Model shapes, comma-separated (llava-ov-7b, qwen2.5-vl-7b, llava-ov-72b, tiny-*).")] = "llava-ov-7b,qwen2.5-vl-7b",
    frames: Annotated[str, typer.Option(help="Checkpoints of each stream (frames), increasing.")] = "16,64,256,1024",
    chunks: Annotated[str, typer.Option(help="Chunk sizes (frames per prefill).")] = "8,16",
    rules: Annotated[
        str, typer.Option(help="Rules: full, fifo, hermes (paper-default policy), hermes-heads (the same split per KV head, DuoAttention-style), window (4 frames), retrieval (top-4 chunks).")
    ] = "full,fifo,hermes",
    budget: Annotated[int, typer.Option(help="Stream tokens kept per layer (fifo, hermes).")] = 4000,
    questions: Annotated[int, typer.Option(help="Timed questions per checkpoint (median).")] = 5,
    answer_tokens: Annotated[int, typer.Option(help="Tokens decoded per answer (TPOT).")] = 32,
    device_map: Annotated[str | None, typer.Option(help="Split each model over the visible GPUs: balanced or auto (models too large for one GPU, e.g. llava-ov-72b).")] = None,
    tokenizer: Annotated[str, typer.Option(help="Tokenizer of the random models: auto (the embedded SmolLM2 BPE when installed, else byte), byte, embedded, or a saved tokenizer's folder. Sets the token counts of questions and pseudo-queries.")] = "auto",
    check: Annotated[bool, typer.Option(help="Check greedy tokens: hermes(unlimited) == full, graphs == eager, bf16 and fp32.")] = True,
    out_dir: Annotated[Path, typer.Option(help="Where results go.")] = DEFAULT_OUT,
    append: Annotated[bool, typer.Option(help="Merge into an existing results file of the same device and date.")] = False,
    report_only: Annotated[Path | None, typer.Option(help="Only rewrite the table and plot of this results JSON.")] = None,
) -> None:
    """Measure TTFT, TPOT, peak memory and ingest speed of full / fifo / hermes on one GPU."""
    from hermes_cli.main import console

    from hermes_policy.errors import HermesError

    if report_only is not None:
        if not report_only.is_file():
            raise HermesError(f"results file not found: {report_only}")
        paths = write_report(read_results(report_only), report_only)
        console.print("wrote " + ", ".join(str(p) for p in paths))
        return

    from hermes_policy.benchmarking.efficiency import (
        EfficiencyConfig,
        merge_results,
        run_efficiency,
    )

    config = EfficiencyConfig(
        shapes=parse_names(shapes),
        frames=parse_ints(frames, "--frames"),
        chunks=parse_ints(chunks, "--chunks"),
        rules=parse_names(rules),
        budget=budget,
        questions=questions,
        answer_tokens=answer_tokens,
        check_correctness=check,
        device_map=device_map,
        tokenizer=tokenizer,
    )
    config.validate()
    import torch

    if not torch.cuda.is_available():
        raise HermesError("the efficiency benchmark needs a CUDA GPU (none is visible)")
    from hermes_policy.benchmarking.floor import measure_ceilings

    def target_path(device_name: str, date: str) -> Path:
        return out_dir / f"efficiency-{device_slug(device_name)}-{date}.json"

    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    existing = target_path(torch.cuda.get_device_name(), today)
    if append and existing.is_file():
        read_results(existing)  # a broken file to append to is reported before the run, not after
    ceilings = measure_ceilings()
    console.print(
        f"{ceilings.name}: copy {ceilings.bandwidth / 1e12:.2f} TB/s, bf16 matmul {ceilings.matmul_rate / 1e12:.0f} TFLOP/s"
    )
    results = run_efficiency(config, ceilings, progress=console.print)
    date = today
    results["date"] = date
    results["commands"] = [shlex.join(["hermes-probe", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else shlex.join(sys.argv)]
    results["versions"] = {"torch": torch.__version__, "transformers": __import__("transformers").__version__}
    json_path = target_path(ceilings.name, date)
    if append and json_path.is_file():
        results = merge_results(read_results(json_path), results)
    paths = write_report(results, json_path)
    for target in results["targets"]:
        console.print(f"{target['target']}: {target['value']:.3f} (limit {target['limit']}): {'met' if target['met'] else 'MISSED'}")
    console.print("wrote " + ", ".join(str(p) for p in paths))
