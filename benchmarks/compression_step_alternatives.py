"""The compression step's GPU work, part by part, against the alternatives it replaced, on
the LLaVA-OV-7B shape at its steady state (28 layers, 4 KV heads, head size 128, a prefix
of 30 tokens, 4,000 kept of 5,569 stream tokens a layer, the last 8 layers with summary
tokens), each part timed inside a CUDA graph (no launch gaps):

- scoring: the mixed scores then the smoothing (:func:`batched_mixed_scores` eager, then
  :func:`smooth_rows` compiled alone) against both in one compiled op
  (:func:`mixed_smoothed_rows`);
- selection: a top-k in float64 with a ramp for ties, a sort of each row's picks, and a
  sort of the summary layers' eviction masks (the path before) against one stable sort and
  one compiled partition (:func:`batched_partition`);
- summary tokens: one compiled op a layer (:func:`evicted_summary`) against one Triton
  launch for all summary layers (:mod:`hermes_policy.kernels.summary_kernel`) at several splits;
- the eviction gather (:mod:`hermes_policy.kernels.compaction_kernel`) at several launch shapes.

Usage::

    python benchmarks/compression_step_alternatives.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from profile_efficiency import graph_ms  # noqa: E402

from hermes_policy.kernels import compaction_kernel  # noqa: E402
from hermes_policy.kernels.fusion import FusedOp  # noqa: E402
from hermes_policy.retention.scoring import (  # noqa: E402
    batched_mixed_scores,
    batched_partition,
    evicted_summary,
    mixed_smoothed_rows,
    partition_by_rank,
    smooth_rows,
    top_indices,
)

compiled_smoothing = FusedOp(smooth_rows)  # the smoothing alone compiled: the alternative not kept

LAYERS, SUMMARY_LAYERS, KV_HEADS, HEAD_DIM = 28, 8, 4, 128
PREFIX, KEPT, STREAM = 30, 4000, 5569
LENGTH = PREFIX + STREAM
CAPACITY = 6144


def us(fn, calls: int = 8) -> str:
    return f"{1e3 * graph_ms(fn, calls=calls):7.1f} us"


def old_selection(scores: torch.Tensor, keep: list[int], counts: torch.Tensor, lead: int) -> torch.Tensor:
    """The selection before (as it was in hermes_policy/retention/scoring.py and the summary
    groups): top-k in float64 with a tie ramp, a sort of the picks, then the summary
    layers' evicted indices by a stable sort of their eviction masks."""
    n = scores.shape[1]
    ramp = torch.arange(n, dtype=torch.float64, device=scores.device) * 1e-12
    k_max = max(keep)
    order = torch.topk(scores.double() + ramp, k_max, dim=1).indices
    past = torch.arange(k_max, device=order.device) >= counts[:, None]
    ordered = order.masked_fill(past, n).sort(dim=1).values
    head = torch.arange(lead, device=ordered.device).expand(ordered.shape[0], lead)
    ordered = torch.cat([head, ordered + lead], dim=1)
    kept = torch.stack([ordered[row, : lead + keep[row]] for row in range(LAYERS - SUMMARY_LAYERS, LAYERS)])
    mask = torch.ones(SUMMARY_LAYERS, lead + n, dtype=torch.uint8, device=scores.device)
    mask[:, :lead] = 0
    mask.scatter_(1, kept[:, lead:], 0)
    return torch.sort(mask, dim=1, descending=True, stable=True).indices[:, : n - keep[-1]]


def old_kept(scores: torch.Tensor, keep: list[int], lead: int) -> torch.Tensor:
    """The non-summary layers' kept indices by :func:`top_indices`, row by row."""
    return torch.stack([torch.cat([torch.arange(lead, device=scores.device), top_indices(scores[row], keep[row]) + lead]) for row in range(LAYERS - SUMMARY_LAYERS)])


def new_selection(scores: torch.Tensor, keep: list[int], counts: torch.Tensor, lead: int) -> torch.Tensor:
    """:func:`batched_partition` with its counts already on the device (no upload inside
    the graph), and the summary layers' evicted indices stacked, as the summary groups do."""
    ranked = torch.sort(scores.flip(-1), dim=1, descending=True, stable=True).indices
    table = partition_by_rank(ranked, counts, lead)
    return torch.stack([table[row, lead + keep[row] :] for row in range(LAYERS - SUMMARY_LAYERS, LAYERS)])


def selection() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    attention = torch.rand(LAYERS, STREAM, device="cuda", generator=g)
    rates = torch.linspace(20, 8, LAYERS, device="cuda")
    weights = torch.cat([torch.ones(5), torch.linspace(0.75, 0.15, 15), torch.zeros(8)]).cuda()
    lambdas = tuple([0.1] * 5 + [0.3] * 15 + [0.4] * 8)
    print("== scoring, (28, 5569) rows")
    print(f"  mixed scores eager, then smoothing compiled  {us(lambda: compiled_smoothing(batched_mixed_scores(attention, rates, weights), lambdas))}")
    print(f"  one compiled op (mixed_smoothed_rows)        {us(lambda: mixed_smoothed_rows(attention, rates, weights, lambdas))}")
    scores = mixed_smoothed_rows(attention, rates, weights, lambdas)
    keep = [KEPT] * (LAYERS - SUMMARY_LAYERS) + [KEPT - 1] * SUMMARY_LAYERS
    counts = torch.tensor(keep, device="cuda")
    old, new = old_selection(scores, keep, counts, PREFIX), new_selection(scores, keep, counts, PREFIX)
    kept, _ = batched_partition(scores, keep, PREFIX)  # the function the rule calls
    assert torch.equal(torch.stack(kept[: LAYERS - SUMMARY_LAYERS]), old_kept(scores, keep, PREFIX))
    print(f"== selection, kept and the summary layers' evicted indices (same evicted: {torch.equal(old, new)})")
    print(f"  top-k float64 + sort + eviction-mask sort    {us(lambda: old_selection(scores, keep, counts, PREFIX))}")
    print(f"  stable sort + compiled partition             {us(lambda: new_selection(scores, keep, counts, PREFIX))}")


def summaries() -> None:
    from hermes_policy.kernels import summary_kernel

    g = torch.Generator(device="cuda").manual_seed(1)
    buffers = [torch.randn(2, 1, KV_HEADS, CAPACITY, HEAD_DIM, device="cuda", generator=g).bfloat16() for _ in range(SUMMARY_LAYERS)]
    keys = [b[0][:, :, :LENGTH] for b in buffers]
    values = [b[1][:, :, :LENGTH] for b in buffers]
    n = STREAM - KEPT + 1
    evicted = torch.stack([torch.randperm(STREAM, device="cuda", generator=g)[:n].sort().values + PREFIX for _ in keys])
    angles = torch.rand(SUMMARY_LAYERS, n, HEAD_DIM // 2, device="cuda", generator=g) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def per_layer():
        for i in range(SUMMARY_LAYERS):
            evicted_summary(keys[i], values[i], evicted[i], cos[i], sin[i])

    print(f"== summary tokens of {SUMMARY_LAYERS} layers, {n} evicted each")
    print(f"  one compiled op a layer                      {us(per_layer)}")
    table = torch.from_numpy(summary_kernel.address_table(keys, values, evicted, cos, sin)).cuda()
    for splits in (None, 16, 32, 64):
        for block_n in (16, 32, 64):
            for warps in (1, 2, 4):
                run = lambda s=splits, b=block_n, w=warps: summary_kernel.launch_with_table(table, keys[0], evicted, cos, sin, s, b, w)  # noqa: E731
                print(f"  one kernel, splits {str(splits):>4}, block_n {block_n:3d}, warps {warps}  {us(run)}")


def compaction() -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    buffers = [torch.randn(2, 1, KV_HEADS, CAPACITY, HEAD_DIM, device="cuda", generator=g).bfloat16() for _ in range(LAYERS)]
    indices, summaries = [], []
    prefix = torch.arange(PREFIX, device="cuda")
    for layer in range(LAYERS):
        if layer < 5:  # recency layers: the newest tokens
            stream = torch.arange(STREAM - KEPT, STREAM, device="cuda")
        else:
            count = KEPT - (layer >= LAYERS - SUMMARY_LAYERS)
            stream = torch.randperm(STREAM, device="cuda", generator=g)[:count].sort().values
        indices.append(torch.cat([prefix, stream + PREFIX]).contiguous())
        summaries.append(
            tuple(torch.randn(1, KV_HEADS, 1, HEAD_DIM, device="cuda").bfloat16() for _ in range(2)) if layer >= LAYERS - SUMMARY_LAYERS else None
        )
    table = torch.from_numpy(compaction_kernel.address_table(buffers, indices, summaries)).cuda()
    print("== eviction gather of 28 layers (in place; (2, 1, 4, 6144, 128) bf16 buffers)")
    for block_rows in (64, 128, 256):
        for cols in (8, 16, 32):
            for warps in (2, 4, 8):
                run = lambda b=block_rows, c=cols, w=warps: compaction_kernel.launch_with_table(table, buffers[0], b, c, w)  # noqa: E731
                print(f"  block_rows {block_rows:3d}, cols {cols:2d}, warps {warps}        {us(run)}")


def main() -> None:
    torch.manual_seed(0)
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    parts = [a for a in sys.argv[1:] if not a.startswith("-")] or ["selection", "summaries", "compaction"]
    for part in parts:
        {"selection": selection, "summaries": summaries, "compaction": compaction}[part]()


if __name__ == "__main__":
    main()
