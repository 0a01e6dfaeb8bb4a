"""Efficiency results as a markdown table and a figure (memory and TTFT versus frames)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hermes_policy.fileio.atomic import atomic_path


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
    """The results document as markdown: ceilings, floors, one table per shape, targets, checks."""
    ceilings = results["ceilings"]
    lines = [
        f"Device: {ceilings['device']}; measured copy bandwidth {ceilings['copy_bandwidth_tb_s']:.2f} TB/s, "
        f"bf16 matmul {ceilings['bf16_matmul_tflop_s']:.0f} TFLOP/s.",
        "",
    ]
    for run in results.get("ceilings_per_run", []):
        lines.append(
            f"Run ({', '.join(run.get('shapes', []))}): copy {run['copy_bandwidth_tb_s']:.2f} TB/s, "
            f"bf16 matmul {run['bf16_matmul_tflop_s']:.0f} TFLOP/s.  "
        )
    for command in results.get("commands", []):
        lines.append(f"Command: `{command}`  ")
    for note in results.get("notes", []):
        lines.append(f"Note: {note}  ")
    if results.get("date"):
        lines.append(f"Date: {results['date']}")
    lines.append("")
    for name, shape in results["shapes"].items():
        lines += [
            f"### {name}",
            "",
            f"{shape['source']}. Language-model weights read per forward: {shape['weight_bytes'] / 1e9:.2f} GB "
            f"-> floor {shape['ttft_floor_ms']:.2f} ms for a {shape['question_tokens']}-token question prefill, "
            f"{shape['tpot_floor_ms']:.2f} ms per decode step."
            + (
                f" Tokenizer: {shape['tokenizer']}; pseudo-queries of {' and '.join(map(str, shape['guidance_prompt_tokens']))} tokens."
                if shape.get("tokenizer")
                else ""
            )
            + (f" Split over {', '.join(shape['devices'])} (peak memory per GPU)." if shape.get("devices") else ""),
            "",
            "| rule | chunk | frames | TTFT ms (x floor) | TPOT ms (x floor) | peak GiB | KV GiB | host GiB "
            "| ingest fps (segment / median chunk) | compression (synchronised / pipelined) "
            "| pseudo-queries: tokens, row share, fused cost |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in results["rows"] if r["shape"] == name):
            if row.get("status") != "ok":
                lines.append(
                    f"| {row['rule']} | {row['chunk']} | {row['frames']} | {row.get('status')} | | | | | | | |"
                )
                continue
            share = row.get("compression_share")
            per_gpu = row.get("peak_memory_per_gpu")
            peak = " / ".join(_gib(b) for b in per_gpu) if per_gpu else _gib(row["peak_memory_bytes"])
            lines.append(
                f"| {row['rule']} | {row['chunk']} | {row['frames']} "
                f"| {row['ttft_ms']:.1f} ({row['ttft_floor_ratio']:.2f}x) "
                f"| {row['tpot_ms']:.1f} ({row['tpot_floor_ratio']:.2f}x) "
                f"| {peak} | {_gib(row['kv_cache_bytes'])} | {_gib(row.get('host_memory_bytes') or 0)} "
                f"| {_speeds(row.get('ingest_fps'), row.get('ingest_fps_median_chunk'))} "
                f"| {_share(share, row.get('compression_share_pipelined'))} | {_guidance(row)} |"
            )
        lines.append("")
    targets = results.get("targets") or []
    if targets:
        lines += ["### Targets (hermes, LLaVA-OV-7B shape, chunk 8, 4K budget)", "", "| target | value | limit | met |", "|---|---|---|---|"]
        for t in targets:
            value = t["value"]
            shown = f"{value:+.1%}" if "%" in t["limit"] and "vs" in t["target"] else (
                f"{value:.1%}" if "%" in t["limit"] else f"{value:.2f}"
            )
            lines.append(f"| {t['target']} | {shown} | {t['limit']} | {'yes' if t['met'] else 'NO'} |")
        lines.append("")
    checks = results.get("correctness") or []
    if checks:
        lines += ["### Correctness (greedy answer tokens, random weights)", "", "| shape | dtype | hermes(unlimited) == full | CUDA graphs == eager |", "|---|---|---|---|"]
        for c in checks:
            graphs = str(c["graphs_equal_eager"])
            if not c["graphs_equal_eager"]:
                same = common_prefix(c["full_tokens"], c["full_eager_tokens"])
                graphs += f" (first {same} of {len(c['full_tokens'])} tokens equal)"
            lines.append(f"| {c['shape']} | {c['dtype']} | {c['hermes_unlimited_equals_full']} | {graphs} |")
        lines.append("")
    return "\n".join(lines)


def _speeds(segment: float | None, median_chunk: float | None) -> str:
    """A row's ingest speeds: over the segment, then of its median chunk (when measured)."""
    return _num(segment, 0) if median_chunk is None else f"{_num(segment, 0)} / {median_chunk:.0f}"


def _share(synchronised: float | None, pipelined: float | None) -> str:
    """The compression shares of a row: ``-`` when none, the pipelined one after a slash."""
    if synchronised is None and pipelined is None:
        return "-"
    text = "-" if synchronised is None else f"{synchronised:.1%}"
    return text if pipelined is None else f"{text} / {pipelined:.1%}"


def _guidance(row: dict[str, Any]) -> str:
    """A row's pseudo-queries: each prompt's tokens, their share of the rows through the
    decoder layers, and the measured cost of fusing them into a chunk's forward."""
    tokens, share, cost = row.get("guidance_prompt_tokens"), row.get("guidance_row_share"), row.get("fused_guidance_overhead_ms")
    parts = []
    if tokens:
        parts.append(" + ".join(map(str, tokens)) + " tokens")
    if share is not None:
        parts.append(f"{share:.1%} of rows")
    if cost is not None:
        parts.append(f"{cost:.1f} ms")
    return ", ".join(parts) or "-"


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two answers share."""
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def plot(results: dict[str, Any], path: Path) -> Path:
    """Peak memory and TTFT versus frames, one line per rule (chunk sizes as line styles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    shapes = list(results["shapes"])
    sns.set_theme(style="whitegrid", context="talk")
    fig, axes = plt.subplots(2, len(shapes), figsize=(7 * len(shapes), 10), squeeze=False)
    palette = dict(zip(("full", "fifo", "hermes"), sns.color_palette("deep", 3), strict=True))
    styles = {}
    for col, name in enumerate(shapes):
        rows = [r for r in results["rows"] if r["shape"] == name and r.get("status") == "ok"]
        floor = results["shapes"][name]["ttft_floor_ms"]
        for rule in sorted({r["rule"] for r in rows}):
            for chunk in sorted({r["chunk"] for r in rows}):
                series = sorted((r for r in rows if r["rule"] == rule and r["chunk"] == chunk), key=lambda r: r["frames"])
                if not series:
                    continue
                style = styles.setdefault(chunk, ["-", "--", ":", "-."][len(styles) % 4])
                x = [r["frames"] for r in series]
                kw = dict(color=palette.get(rule), linestyle=style, marker="o", label=f"{rule} (chunk {chunk})")
                axes[0][col].plot(x, [r["peak_memory_bytes"] / 2**30 for r in series], **kw)
                axes[1][col].plot(x, [r["ttft_ms"] for r in series], **kw)
        axes[1][col].axhline(floor, color="gray", linewidth=1, linestyle=":", label="floor")
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("peak GPU memory (GiB)")
        axes[1][col].set_ylabel("TTFT (ms)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("frames streamed")
        axes[1][col].set_yscale("log")
    axes[0][0].legend(fontsize=10)
    axes[1][0].legend(fontsize=10)
    fig.suptitle(f"Streaming efficiency on {results['ceilings']['device']}")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
