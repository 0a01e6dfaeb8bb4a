"""What a per-head policy holds, next to the per-layer one: per layer, the union of stream
tokens in the buffer (what memory costs with head masks) and the tokens its heads see
(effective), after a fidelity stream of the embedded SmolLM2 (docs/heads.md "Runtime").

    python benchmarks/per_head_memory.py --budgets 384,768 --seed 0 \
        --policy per-layer=benchmarks/results/smollm2-per-head-policy-per-layer.json \
        --policy per-head=benchmarks/results/smollm2-per-head-policy.json \
        --policy duo=benchmarks/results/smollm2-per-head-policy-duo-style.json
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

import torch

from hermes_policy.inputs.fidelity_tasks import fidelity_stream
from hermes_policy.models import load_adapter
from hermes_policy.policy import ModelInfo, Policy
from hermes_probe.fidelity import contenders, stream_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", action="append", required=True, help="NAME=FILE")
    parser.add_argument("--budgets", default="384,768")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = load_adapter(None, device="cpu", tokens_per_frame=48)
    policies = {name: Policy.load(path) for name, path in (spec.split("=", 1) for spec in args.policy)}
    stream = fidelity_stream(args.frames, args.seed, adapter.frame_ids, adapter.encode_text)
    kv_heads = adapter.num_kv_heads
    rows = []
    for entrant in contenders([], policies, ModelInfo.of(adapter)):
        for budget in (int(b) for b in args.budgets.split(",")):
            session = stream_session(adapter, entrant.make(budget), stream, 8)
            store = session.store
            union = store.stream_lengths()
            row = {
                "rule": entrant.rule, "policy": entrant.policy, "budget": budget,
                "union_tokens_mean": sum(union) / len(union), "union_tokens_max": max(union),
                "effective_tokens_per_layer": store.effective_tokens() / store.num_layers,
                "per_layer_memory_ratio": sum(union) / (len(union) * budget),  # vs the per-layer rule at this budget
                "kv_bytes": store.nbytes(), "kv_heads": kv_heads,
            }
            rows.append(row)
            print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/per_head_memory.py " + " ".join(
                f"--policy {p}" for p in args.policy) + f" --budgets {args.budgets} --seed {args.seed}",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": "cpu",
                "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
