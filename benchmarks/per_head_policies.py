"""The three policies of the per-head fidelity comparison (docs/heads.md "Runtime"), from the
probed per-head SmolLM2 policy (``benchmarks/results/smollm2-per-head-policy.json``):

- ``per-layer``: its per-layer entries alone (schema 1): the ``hermes`` rule;
- ``per-head``: the file as it is: the ``hermes-heads`` rule;
- ``duo``: DuoAttention-style: the probe's streaming heads keep a window of a quarter of the
  budget, every other head the newest tokens (recency weight 1: "everything", cut to its
  tokens by age), sharing what the windows leave: the ``hermes-heads`` rule.

All three at budget B keep ``num_kv_heads x B`` tokens of a layer counted per head.

    python benchmarks/per_head_policies.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from hermes_policy.policy import HeadPolicy, Policy

SOURCE = Path(__file__).parent / "results" / "smollm2-per-head-policy.json"


def per_layer(policy: Policy) -> Policy:
    return replace(policy, layers=[replace(layer, heads=None) for layer in policy.layers])


def duo_style(policy: Policy, window_share: float = 0.25) -> Policy:
    window = max(1, int(policy.budget * window_share))
    layers = []
    for layer in policy.layers:
        others = [h for h in layer.heads if h.role != "streaming"]
        share = round(1.0 / len(others), 6) if others else None
        heads = []
        for i, head in enumerate(layer.heads):
            if head.role == "streaming" and others:
                heads.append(HeadPolicy("streaming", window, None, 1.0, 0.0))
            else:  # a retrieval head, or a layer of streaming heads only (kept whole, by age)
                last = i == max(j for j, h in enumerate(layer.heads) if h.role != "streaming" or not others)
                heads.append(HeadPolicy("retrieval", None, share or round(1.0 / len(layer.heads), 6), 1.0, 0.0))
                if last:  # shares sum to exactly 1
                    rest = 1.0 - sum(h.share for h in heads[:-1] if h.share is not None)
                    heads[-1] = replace(heads[-1], share=round(rest, 6))
        layers.append(replace(layer, heads=tuple(heads)))
    provenance = {**policy.provenance, "derived": "duo-style (benchmarks/per_head_policies.py)"}
    return replace(policy, layers=layers, provenance=provenance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    policy = Policy.load(args.source)
    args.out.mkdir(parents=True, exist_ok=True)
    per_layer(policy).save(args.out / "smollm2-per-head-policy-per-layer.json")
    duo_style(policy).save(args.out / "smollm2-per-head-policy-duo-style.json")
    print(f"wrote {args.out}/smollm2-per-head-policy-per-layer.json, -duo-style.json")


if __name__ == "__main__":
    main()
