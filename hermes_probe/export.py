"""Head patterns of a policy in the formats other KV-cache tools read (docs/heads.md).

DuoAttention pattern (``full_attention_heads.tsv``): one row per layer, one tab-separated
column per KV head, each value in [0, 1], the head's need for the full cache (1 = retrieval
head, 0 = streaming head). kvpress' ``DuoAttentionPress`` reads such a file with
``np.loadtxt(..., delimiter="\\t")``, clips it to [0, 1] and turns the lowest-scoring
``head_compression_ratio`` of all heads into streaming heads (sink + recent window); only
the ranking matters to it. Our value per KV head: 0 for a streaming head, else its weight on
attention in the HERMES score, ``1 - recency_weight`` (a pure-attention head is 1, a
pure-recency one 0). A schema-1 policy has no heads: every KV head of a layer gets the
layer's ``1 - recency_weight``.

Head budgets (``hermes-head-budgets/1``, JSON): the stream tokens each KV head keeps
(:func:`hermes_policy.policy.head_token_budgets`), its role and whether it is a window, per
layer, for tools that take per-head budgets (AdaKV / HeadKV-style presses).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hermes_policy.policy import Policy, head_token_budgets

BUDGETS_FORMAT = "hermes-head-budgets/1"


def retrieval_weights(policy: Policy) -> np.ndarray:
    """Each KV head's need for the full cache, ``(layers, kv_heads)`` in [0, 1] (module docstring)."""
    kv_heads = policy.model.num_kv_heads
    rows = []
    for layer in policy.layers:
        if layer.heads is None:
            rows.append([1.0 - layer.recency_weight] * kv_heads)
        else:
            rows.append(
                [0.0 if h.role == "streaming" else 1.0 - h.recency_weight for h in layer.heads]
            )
    return np.clip(np.asarray(rows, dtype=np.float64), 0.0, 1.0)


def format_value(value: float) -> str:
    """A weight as text: at most 6 significant digits, no trailing zeros (``0.85``, ``1``, ``0``)."""
    text = f"{round(float(value), 6):.6g}"
    return "0" if text == "-0" else text


def duo_attention_tsv(policy: Policy) -> str:
    """The DuoAttention pattern file's text: one line per layer, tab-separated KV heads."""
    return "".join(
        "\t".join(format_value(v) for v in row) + "\n" for row in retrieval_weights(policy)
    )


def head_budgets(policy: Policy, source: str = "") -> dict[str, Any]:
    """The ``hermes-head-budgets/1`` document of a policy (module docstring)."""
    kv_heads = policy.model.num_kv_heads
    tokens, roles, windows = [], [], []
    for layer in policy.layers:
        tokens.append(head_token_budgets(layer, kv_heads))
        if layer.heads is None:
            roles.append([None] * kv_heads)
            windows.append([False] * kv_heads)
        else:
            roles.append([h.role for h in layer.heads])
            windows.append([h.role == "streaming" for h in layer.heads])
    return {
        "format": BUDGETS_FORMAT,
        "source": {
            "policy": source,
            "schema": policy.schema,
            "per_head": policy.per_head,
            "note": "per-KV-head entries of the policy"
            if policy.per_head
            else "a per-layer policy: every KV head of a layer gets the layer's budget",
        },
        "model": {
            "name_or_path": policy.model.name_or_path,
            "num_layers": policy.model.num_layers,
            "num_heads": policy.model.num_heads,
            "num_kv_heads": kv_heads,
        },
        "budget_per_kv_head": policy.budget,
        "layer_tokens": [sum(row) for row in tokens],
        "tokens": tokens,
        "roles": roles,
        "window": windows,
    }
