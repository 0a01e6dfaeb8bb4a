"""The answer's attention over a slot window: alternatives measured before the split-key
kernel (``hermes_policy/kernels/split_kv_attention.py``) was written, and not kept.

Per layer inside a CUDA graph, on the LLaVA-OV-7B heads (28 query heads, 4 KV heads, head
size 128), a window of 4,352 slots of which 4,100 are used, for 1, 16 and 32 new tokens:

- ``--flex``: FlexAttention (compiled) with the slot mask as a score modification;
- ``--dense-tail``: PyTorch's flash kernel over a dense first part of the window (no mask
  needed there), the masked tail explicitly, merged by log-sum-exp;

each next to the explicit path the answer graphs used (``biased_slot_attention``). The
output of the run on an H200 is in
``benchmarks/results/answer-attention-alternatives-nvidia-h200-2026-12-02.txt``.

Usage::

    python benchmarks/answer_attention_alternatives.py [--flex] [--dense-tail]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, str(Path(__file__).parent))
from profile_efficiency import graph_ms  # noqa: E402

from hermes_policy.attention.lse import (  # noqa: E402
    masked_softmax_with_lse,
    merge_attention,
    unmasked_attention_with_lse,
)
from hermes_policy.attention.masks import slots_blocked  # noqa: E402
from hermes_policy.graphs.static_forward import (  # noqa: E402
    biased_slot_attention,
    slot_attention,
    stacked_mask_bias,
)

WINDOW, USED, CAPACITY = 4352, 4100, 4608
SCALE = 128**-0.5


def against_current(q_len: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Queries of ``q_len`` tokens at the end of the used slots, their limits, the float32
    reference and the explicit path's timing (the first cell of a printed line)."""
    q = torch.randn(q_len, 28, 128, dtype=torch.bfloat16, device="cuda")
    limits = USED - q_len + torch.arange(q_len, device="cuda")
    blocked = slots_blocked(limits, WINDOW)
    ref = slot_attention(q.float(), keys.float(), values.float(), blocked, SCALE)
    bias = stacked_mask_bias(blocked[None], 7)[0]
    current = lambda: biased_slot_attention(q, keys, values, bias, SCALE)  # noqa: E731
    return q, limits, ref, [f"current {1e3 * graph_ms(current):6.1f} us (|diff| {(current().float() - ref).abs().max().item():.1e})"]


def flex(keys: torch.Tensor, values: torch.Tensor) -> None:
    @torch.compile(fullgraph=True, dynamic=False)
    def flex_slots(q, k, v, limits):
        def visible(score, b, h, qi, ki):
            return torch.where(ki <= limits[qi], score, -float("inf"))

        return flex_attention(q, k, v, score_mod=visible, scale=SCALE, enable_gqa=True)

    for q_len in (1, 16, 32):
        q, limits, ref, cells = against_current(q_len, keys, values)
        qq = q.transpose(0, 1)[None]
        start = time.perf_counter()
        out = flex_slots(qq, keys, values, limits)
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        diff = (out[0].transpose(0, 1).float() - ref).abs().max().item()
        call = lambda qq=qq, limits=limits: flex_slots(qq, keys, values, limits)  # noqa: E731
        cells.append(f"flex default {1e3 * graph_ms(call):6.1f} us (|diff| {diff:.1e}; first call {first:.1f} s)")
        print(f"q={q_len:2d}: " + "; ".join(cells), flush=True)


def dense_tail(keys: torch.Tensor, values: torch.Tensor) -> None:
    def split(q, limits, dense):
        qq = q.transpose(0, 1)[None]  # (1, heads, q, dim)
        out_d, lse_d = unmasked_attention_with_lse(qq, keys[:, :, :dense], values[:, :, :dense], SCALE)
        q_len = q.shape[0]
        stacked = q.permute(1, 0, 2).reshape(4, 7 * q_len, 128)
        zero = torch.zeros(1, 1, 1, device="cuda")
        tail_keys = keys[0, :, dense:].transpose(1, 2)
        scores = torch.baddbmm(zero, stacked, tail_keys, out_dtype=torch.float32, beta=0, alpha=SCALE)
        scores = scores.view(4, 7, q_len, WINDOW - dense)
        blocked = slots_blocked(limits, WINDOW)[:, dense:]
        probs, lse_t = masked_softmax_with_lse(scores, blocked, values.dtype)
        out_t = torch.bmm(probs.view(4, 7 * q_len, -1), values[0, :, dense:]).view(1, 28, q_len, 128)
        return merge_attention(out_d, lse_d, out_t, lse_t.view(1, 28, q_len))[0].transpose(0, 1)

    for q_len in (1, 16, 32):
        q, limits, ref, cells = against_current(q_len, keys, values)
        qq = q.transpose(0, 1)[None]
        flash_only = lambda qq=qq: unmasked_attention_with_lse(qq, keys[:, :, :3840], values[:, :, :3840], SCALE)  # noqa: E731
        cells.append(f"flash 3840 alone {1e3 * graph_ms(flash_only):6.1f}")
        for dense in (3584, 3840):
            fn = lambda q=q, limits=limits, dense=dense: split(q, limits, dense)  # noqa: E731
            diff = (fn().float() - ref).abs().max().item()
            cells.append(f"split@{dense} {1e3 * graph_ms(fn):6.1f} us (|diff| {diff:.1e})")
        print(f"q={q_len:2d}: " + "; ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flex", action="store_true", help="only FlexAttention")
    parser.add_argument("--dense-tail", action="store_true", help="only flash over the dense part plus an explicit tail")
    args = parser.parse_args()
    both = not (args.flex or args.dense_tail)
    torch.manual_seed(0)
    buffer = torch.randn(2, 1, 4, CAPACITY, 128, dtype=torch.bfloat16, device="cuda")
    keys, values = buffer[0][:, :, :WINDOW], buffer[1][:, :, :WINDOW]
    if args.flex or both:
        print("== FlexAttention, slot mask as a score modification (per layer, in a graph)")
        flex(keys, values)
    if args.dense_tail or both:
        print("== flash over the dense part of the window + explicit masked tail, merged (per layer, in a graph)")
        dense_tail(keys, values)


if __name__ == "__main__":
    main()
