"""How stable the probe's KV-head roles are across streams: the modal role of every head
over several probe runs and the share of runs that gave it (docs/heads.md).

    for s in 0 1 2 3 4; do
        hermes-probe analyze --synthetic --frames 64 --policy-budget 768 --seed $s --device cpu --out runs/heads-$s
    done
    python benchmarks/head_role_stability.py runs/heads-* --out benchmarks/results/head-role-stability-smollm2-cpu

Reads each run's ``metrics.json`` (its ``kv_heads`` table); writes ``<out>.md`` and
``<out>.json`` (atomically) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from hermes_policy.fileio.atomic import write_json_atomic, write_text_atomic
from hermes_probe.heads import EVIDENCE_ORDER, role_agreement


def load_roles(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """Roles and confidences ``(layers, kv_heads)`` of one probe run folder."""
    table = json.loads((run / "metrics.json").read_text())["kv_heads"]
    layers = 1 + max(row["layer"] for row in table)
    heads = 1 + max(row["kv_head"] for row in table)
    roles = np.empty((layers, heads), dtype=object)
    confidence = np.zeros((layers, heads))
    for row in table:
        roles[row["layer"], row["kv_head"]] = row["role"]
        confidence[row["layer"], row["kv_head"]] = row["confidence"]
    return roles, confidence


def summarize(runs: list[Path]) -> dict:
    loaded = [load_roles(run) for run in runs]
    roles = [r for r, _ in loaded]
    confidence = np.stack([c for _, c in loaded])
    modal, share = role_agreement(roles)
    unanimous = share == 1.0
    return {
        "runs": [str(r) for r in runs],
        "heads": int(share.size),
        "unanimous_share": float(unanimous.mean()),
        "mean_agreement": float(share.mean()),
        "modal_counts": {role: int((modal == role).sum()) for role in EVIDENCE_ORDER},
        "unanimous_by_role": {role: int((unanimous & (modal == role)).sum()) for role in EVIDENCE_ORDER},
        "mean_confidence_unanimous": float(confidence.mean(0)[unanimous].mean()) if unanimous.any() else None,
        "mean_confidence_unstable": float(confidence.mean(0)[~unanimous].mean()) if (~unanimous).any() else None,
        "layer_agreement": [round(float(v), 4) for v in share.mean(1)],
        "modal_roles": modal.tolist(),
        "agreement": share.round(4).tolist(),
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(summary: dict, command: str, produced_by: str | None = None) -> str:
    lines = [
        f"# KV-head role stability across probe runs ({datetime.now(timezone.utc).date()})",
        "",
        f"Command: `{command}`  ",
        *([f"Runs made by: `{produced_by}`  "] if produced_by else []),
        f"Runs: {', '.join(summary['runs'])}",
        "",
        f"- {summary['heads']} KV heads; the same role in every run: {summary['unanimous_share']:.0%} "
        f"(mean agreement {summary['mean_agreement']:.2f})",
        "- modal roles: " + ", ".join(f"{k} {v}" for k, v in summary["modal_counts"].items()),
        "- unanimous, by role: " + ", ".join(f"{k} {v}" for k, v in summary["unanimous_by_role"].items()),
        f"- mean confidence of unanimous heads {_fmt(summary['mean_confidence_unanimous'])}, "
        f"of the others {_fmt(summary['mean_confidence_unstable'])}",
        "",
        "| layer | agreement (mean over KV heads) | modal roles |",
        "|---|---|---|",
    ]
    for layer, (value, roles) in enumerate(zip(summary["layer_agreement"], summary["modal_roles"], strict=True)):
        lines.append(f"| {layer} | {value:.2f} | {', '.join(roles)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="probe run folders (each with metrics.json)")
    parser.add_argument("--out", type=Path, required=True, help="results path without suffix")
    parser.add_argument("--produced-by", help="the command that made the runs (recorded)")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.json").is_file()]
    if missing:
        print(f"error: no metrics.json in {', '.join(missing)}", file=sys.stderr)
        return 1
    summary = summarize(args.runs)
    command = "python benchmarks/head_role_stability.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = markdown(summary, command, args.produced_by)
    write_text_atomic(args.out.with_suffix(".md"), text)
    write_json_atomic(args.out.with_suffix(".json"), {"command": command, "produced_by": args.produced_by, **summary})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
