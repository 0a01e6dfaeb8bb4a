"""Attention recall against budget, per layer and head, on held-out fidelity streams.

Records each seed's stream on the full cache (pseudo-query attention after every chunk, the
probes' own attention at their answer positions), then replays fifo, sink+recent,
attention-only and each HERMES policy through their compression steps and reports the
share of the probes' attention on the tokens each would have kept, with the per-layer
oracle (see :mod:`hermes_probe.recall`).

Usage::

    python benchmarks/recall_curves.py --seeds 0,1 --frames 64 \
        --policy paper-default=paper-default --policy calibrated=runs/cal/policy.json \
        --out benchmarks/results/recall-smollm2-cpu-2026-12-07

Writes ``OUT.json`` (manifest, per share: per rule the per-layer and per-layer-per-head
recall) and ``OUT.png`` (one panel per layer).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from hermes_policy.fileio.atomic import write_json_atomic
from hermes_policy.inputs.fidelity_tasks import fidelity_stream
from hermes_policy.models import load_adapter
from hermes_policy.policy import ModelInfo, Policy, paper_default
from hermes_probe.calibrate import RECALL_RULES, record_stream, task_weights
from hermes_probe.fidelity import device_name, file_hash, package_versions
from hermes_probe.recall import recall, simulate_keep
from hermes_probe.recall_figure import plot_recall_curves, recall_curves

SHARES = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2)


def per_head(record, rule: str, budget: int) -> np.ndarray:
    """Weighted recall per layer and head ``(layers, heads)`` of a baseline rule."""
    w = task_weights(record.tasks)
    layers = record.questions.shape[1]
    out = []
    for layer in range(layers):
        kept = simulate_keep(record.layer_steps("global", layer), budget, rule=rule)
        out.append((recall(record.questions[:, layer], kept) * w[:, None]).sum(0))
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--policy", action="append", default=[], help="NAME=FILE or NAME=paper-default")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapter = load_adapter(None, tokens_per_frame=48)
    info = ModelInfo.of(adapter)
    policies, files = {}, {}
    for spec in args.policy:
        name, _, source = spec.partition("=")
        policies[name] = paper_default(info, budget=768) if source == "paper-default" else Policy.load(source)
        files[name] = source if source == "paper-default" else {"path": source, "sha256": file_hash(source)}
    seeds = [int(s) for s in args.seeds.split(",")]
    records = []
    for seed in seeds:
        print(f"recording seed {seed}", flush=True)
        records.append(record_stream(adapter, fidelity_stream(args.frames, seed, adapter.frame_ids, adapter.encode_text),
                                     args.chunk))
    curves = recall_curves(records, SHARES, policies)
    heads = {}
    for share in (1 / 8, 1 / 4):
        budget = int(round(share * records[0].length))
        heads[f"{share:g}"] = {rule: np.mean([per_head(r, rule, budget) for r in records], axis=0).round(4).tolist()
                               for rule in RECALL_RULES}
        a = [r.questions for r in records]
        heads[f"{share:g}"]["oracle"] = np.mean(
            [(np.sort(q, axis=-1)[..., -budget:].sum(-1) * task_weights(r.tasks)[:, None, None]).sum(0)
             for q, r in zip(a, records, strict=True)], axis=0).round(4).tolist()
    manifest = {
        "model": adapter.name_or_path, "adapter": type(adapter).__name__, "dtype": str(adapter.dtype),
        "tokens_per_frame": adapter.tokens_per_frame, "chunk_frames": args.chunk, "frames": args.frames,
        "seeds": seeds, "shares": list(SHARES), "policies": files, "packages": package_versions(),
        "device": device_name(adapter),
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(args.out.with_suffix(".json"), {
        "manifest": manifest,
        "per_layer": {name: values.round(4).tolist() for name, values in curves.items()},
        "mean_over_layers": {name: values.mean(1).round(4).tolist() for name, values in curves.items()},
        "per_head": heads,
    })
    plot_recall_curves(curves, SHARES, args.out.with_suffix(".png"),
                       title=f"attention recall vs budget, {adapter.name_or_path}, held-out seeds {seeds}")
    for name, values in curves.items():
        print(f"{name:28s} " + " ".join(f"{v:.3f}" for v in values.mean(1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
