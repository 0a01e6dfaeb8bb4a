"""The pseudo-query blocks' attention in an ingest forward, per layer inside a CUDA graph,
on the LLaVA-OV-7B heads (28 query heads, 4 KV heads, head size 128): a chunk of 1,569
tokens (the lead) after a cache of 4,000, then two prompt blocks, for the prompts before
any question (32 + 56 rows) and after one (64 + 112).

- the block attention as the ingest forward runs it (``lead_and_blocks_attention``, lead
  unread), without a capture and with the weighted capture of the first block's
  probabilities, by score products (``probability_kernel=False``) and by the Triton
  probability kernel (``hermes_policy/kernels/probability_kernel.py``) at several launch shapes;
- its parts: flash over the keys before the blocks, the blocks' own keys;
- the split-key kernel of the answers (``hermes_policy/kernels/split_kv_attention.py``) in place
  of flash over the keys before the blocks (not used: slower for this many rows);
- a whole layer's attention with the lead read (the chunk's rows and the blocks', the
  first block captured), and the last layer's (lead unread), with the block attention
  kernel (``hermes_policy/kernels/block_attention_kernel.py``: the blocks' rows in one cuDNN call
  with the chunk's over the cache, then one pass over the chunk's keys and their own
  block; by default over every key, in ranges walked at once) and without it
  (``block_attention_kernel=False``), next to the chunk's attention alone; the kernel alone at
  several launch shapes.

Output of the run on an H200:
``benchmarks/results/block-attention-alternatives-nvidia-h200-2026-12-02.txt``.

Usage::

    python benchmarks/block_attention_alternatives.py [--layer]   # --layer: the whole-layer part only
    python benchmarks/block_attention_alternatives.py --sweep     # the two kernels' launches
"""

from __future__ import annotations

import functools
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))
from profile_efficiency import graph_ms  # noqa: E402

from hermes_policy import options  # noqa: E402
from hermes_policy.attention.blocks import lead_and_blocks_attention, own_blocks_attention  # noqa: E402
from hermes_policy.attention.causal import causal_attention  # noqa: E402
from hermes_policy.attention.lse import attention_with_lse, unmasked_attention_with_lse  # noqa: E402
from hermes_policy.kernels import (
    block_attention_kernel,  # noqa: E402
    probability_kernel,  # noqa: E402
    split_kv_attention,  # noqa: E402
)

SCALE = 128**-0.5
CACHE, LEAD = 4000, 1569


def us(fn) -> str:
    return f"{1e3 * graph_ms(fn):7.1f} us"


def with_switch(value: str, fn, switch: str = "probability_kernel"):
    def run():
        options.apply(replace(options.current(), **{switch: value == "1"}))
        return fn()

    return run


def set_paths(block_kernel: bool, blocks_with_chunk: bool) -> None:
    """The block attention kernel on or off, the blocks' rows with the chunk's cuDNN call or not."""
    options.apply(replace(options.current(), block_attention_kernel=block_kernel, blocks_with_chunk=blocks_with_chunk))


def steady_blocks_attention(*args, **kwargs):
    """:func:`lead_and_blocks_attention` as a stream's steady state runs it (recurring shapes,
    the active options' ``blocks_with_chunk``), as the attention dispatcher calls it."""
    return lead_and_blocks_attention(
        *args, steady=True, blocks_with_chunk=options.current().blocks_with_chunk, **kwargs
    )


def measure(blocks: list[int]) -> None:
    options.apply(replace(options.current(), block_attention_kernel=False))  # the parts of the plain path
    seen = CACHE + LEAD
    total = seen + sum(blocks)
    query = torch.randn(1, LEAD + sum(blocks), 28, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    buf = torch.randn(2, 1, 4, total + 512, 128, dtype=torch.bfloat16, device="cuda")
    key, value = buf[0][:, :, :total], buf[1][:, :, :total]
    rows = query[:, :, LEAD:]
    weights = torch.full((blocks[0],), 1 / blocks[0], device="cuda")
    block = functools.partial(steady_blocks_attention, query, key, value, LEAD, blocks, SCALE)
    print(f"== blocks {blocks} after a lead of {LEAD} over a cache of {CACHE} (per layer, in a graph)")
    print(f"  block attention, no capture                        {us(lambda: block(None, True, False))}")
    captured = functools.partial(block, (0, blocks[0]), True, False, weights)
    print(f"  ... weighted capture by score products             {us(with_switch('0', captured))}")
    print(f"  ... weighted capture by the probability kernel     {us(with_switch('1', captured))}")
    with options.applied(probability_kernel=False):
        _, plain = captured()
    with options.applied(probability_kernel=True):
        _, fused = captured()
    print(f"      largest difference {(plain - fused).abs().max().item():.2e} (probabilities up to {plain.max().item():.2e})")
    out, lse_seen = unmasked_attention_with_lse(rows, key[:, :, :seen], value[:, :, :seen], SCALE)
    _, lse_own = own_blocks_attention(rows, key[:, :, seen:], value[:, :, seen:], blocks, SCALE)
    first = rows[:, :, : blocks[0]]
    launches = ((32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 64, 4), (128, 128, 8))
    for block_n, block_r, warps in launches:
        kernel = functools.partial(
            probability_kernel.weighted_probabilities_kernel,
            first, key[:, :, :seen], lse_seen[:, :, : blocks[0]], lse_own[:, :, : blocks[0]], weights,
            SCALE, block_n, block_r, warps,
        )  # fmt: skip
        print(f"  probability kernel alone, keys {block_n:3d}, rows {block_r:3d}, warps {warps}  {us(kernel)}")
    print(f"  flash over the keys before the blocks              {us(lambda: unmasked_attention_with_lse(rows, key[:, :, :seen], value[:, :, :seen], SCALE))}")
    print(f"  the blocks over their own keys                     {us(lambda: own_blocks_attention(rows, key[:, :, seen:], value[:, :, seen:], blocks, SCALE))}")
    stacked = rows[0].transpose(0, 1)
    limits = torch.full((sum(blocks),), seen - 1, device="cuda")
    for block_n, warps, splits in ((64, 8, 2), (64, 8, 4), (128, 8, 2), (128, 8, 4)):
        split = functools.partial(
            split_kv_attention.split_kv_slot_attention, stacked, key, value, limits, SCALE, splits, block_n, warps
        )
        print(f"  split-key in place of flash, keys {block_n:3d}, warps {warps}, ranges {splits}  {us(split)}")


def measure_layer(blocks: list[int]) -> None:
    """A whole layer's attention (lead and blocks), with and without the block kernel."""
    seen = CACHE + LEAD
    total = seen + sum(blocks)
    query = torch.randn(1, LEAD + sum(blocks), 28, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    buf = torch.randn(2, 1, 4, total + 512, 128, dtype=torch.bfloat16, device="cuda")
    key, value = buf[0][:, :, :total], buf[1][:, :, :total]
    weights = torch.full((blocks[0],), 1 / blocks[0], device="cuda")
    print(f"== a layer's attention: blocks {blocks} after a lead of {LEAD} over a cache of {CACHE} (per layer, in a graph)")
    chunk = functools.partial(
        causal_attention, query[:, :, :LEAD], key[:, :, :seen], value[:, :, :seen], SCALE, steady=True
    )
    print(f"  the chunk alone (no blocks)                           {us(chunk)}")
    results = {}
    for lead_read in (True, False):
        layer = functools.partial(
            steady_blocks_attention, query, key, value, LEAD, blocks, SCALE, (0, blocks[0]), True, lead_read, weights
        )
        name = "lead read  " if lead_read else "lead unread"
        variants = {  # (block kernel, blocks with the chunk's cuDNN call)
            "plain path (flash, own blocks, merge)": ("0", "0"),
            "block kernel, ranges of keys": ("1", "0"),
            "block kernel after the chunk's cuDNN call": ("1", "1"),
        }
        for label, (kernel_on, with_chunk) in variants.items():
            set_paths(kernel_on == "1", with_chunk == "1")
            print(f"  {name}, first block captured, {label:44s} {us(layer)}")
            out, probs = layer()
            rows = slice(0 if lead_read else LEAD, None)
            results[label] = (out[:, :, rows].float(), probs)
        out0, probs0 = results["plain path (flash, own blocks, merge)"]
        for label in list(variants)[1:]:
            out1, probs1 = results[label]
            print(
                f"      {label}: largest difference: output {(out0 - out1).abs().max().item():.2e} (bf16),"
                f" probabilities {(probs0 - probs1).abs().max().item():.2e} (up to {probs0.max().item():.2e})"
            )
    set_paths(True, False)
    cache = CACHE
    rows = query[:, :, LEAD:]
    out_cache, lse_cache = attention_with_lse(query, key[:, :, :cache], value[:, :, :cache], SCALE, causal=False)
    prior = (out_cache[:, :, LEAD:], lse_cache[:, :, LEAD:])
    print(f"  cuDNN, all rows over the cache                        {us(lambda: attention_with_lse(query, key[:, :, :cache], value[:, :, :cache], SCALE, causal=False))}")
    print(f"  cuDNN, the blocks' rows over the cache                {us(lambda: attention_with_lse(rows, key[:, :, :cache], value[:, :, :cache], SCALE, causal=False))}")
    print(f"  cuDNN, the lead's rows over the cache                 {us(lambda: attention_with_lse(query[:, :, :LEAD], key[:, :, :cache], value[:, :, :cache], SCALE, causal=False))}")
    out = torch.empty_like(rows)
    auto = block_attention_kernel.key_ranges(
        CACHE + LEAD, triton.cdiv(7 * sum(blocks), 64) * 4, rows.device
    )
    print(f"  kernel over every key: {auto} ranges by default (key_ranges)")
    for block_m, block_n, warps in ((64, 64, 4), (64, 32, 4), (128, 64, 8)):
        resume = functools.partial(
            block_attention_kernel.block_rows_attention_kernel,
            rows, key, value, blocks, cache, SCALE, out, prior, block_m, block_n, warps,
        )  # fmt: skip
        whole = functools.partial(
            block_attention_kernel.block_rows_attention_kernel,
            rows, key, value, blocks, 0, SCALE, out, None, block_m, block_n, warps,
        )  # fmt: skip
        by_ranges = ", ".join(f"{r} {us(functools.partial(whole, ranges=r)).strip()}" for r in (1, 2, 4, 6, 8, 12, 16))
        print(f"  kernel, rows {block_m:3d}, keys {block_n:3d}, warps {warps}: from the cached part {us(resume)};"
              f" over every key, by ranges: {by_ranges}")  # fmt: skip


def sweep(blocks: list[int], shared: int) -> None:
    """The block kernel over every key and the probability kernel alone, over a grid of
    launches (rows and keys per program, warps, pipelining depth, ranges): which launch
    the defaults should be."""
    total = shared + sum(blocks)
    rows = torch.randn(1, sum(blocks), 28, 128, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    buf = torch.randn(2, 1, 4, total + 512, 128, dtype=torch.bfloat16, device="cuda")
    key, value = buf[0][:, :, :total], buf[1][:, :, :total]
    out = torch.empty_like(rows)
    auto = block_attention_kernel.key_ranges(shared, triton.cdiv(7 * sum(blocks), 64) * 4, rows.device)
    print(f"== sweep: blocks {blocks} over {shared} shared keys (per layer, in a graph; {auto} ranges by key_ranges)")
    timings = []
    for block_m, block_n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        if block_m == 128 and warps == 4 or block_n == 128 and stages == 4:
            continue  # register or shared-memory spills: slow everywhere in a first pass
        whole = functools.partial(
            block_attention_kernel.block_rows_attention_kernel,
            rows, key, value, blocks, 0, SCALE, out, None, block_m, block_n, warps, num_stages=stages,
        )  # fmt: skip
        line = []
        for r in sorted({auto, 2, 3, 4, 6, 8}):
            t = 1e3 * graph_ms(functools.partial(whole, ranges=r))
            timings.append((t, block_m, block_n, warps, stages, r))
            line.append(f"{r} {t:.1f}")
        print(f"  block kernel, rows {block_m:3d}, keys {block_n:3d}, warps {warps}, stages {stages}: by ranges (us): {', '.join(line)}")
    best = sorted(timings)[:5]
    print("  best: " + "; ".join(f"{t:.1f} us (rows {m}, keys {n}, warps {w}, stages {st}, ranges {r})" for t, m, n, w, st, r in best))
    lse = torch.zeros(1, 28, sum(blocks), device="cuda")
    weights = torch.full((blocks[0],), 1 / blocks[0], device="cuda")
    first = rows[:, :, : blocks[0]]
    probs = []
    for block_n, block_r, warps, stages in itertools.product((32, 64, 128), (32, 64), (4, 8), (2, 3, 4)):
        kernel = functools.partial(
            probability_kernel.weighted_probabilities_kernel,
            first, key[:, :, :shared], lse[:, :, : blocks[0]], None, weights, SCALE, block_n, block_r, warps, stages,
        )  # fmt: skip
        probs.append((1e3 * graph_ms(kernel), block_n, block_r, warps, stages))
    default = [t for t, n, r, w, st in probs if (n, r, w) == (64, 64, 4)]
    probs.sort()
    print(f"  probability kernel ({blocks[0]} rows), best: " + "; ".join(
        f"{t:.1f} us (keys {n}, rows {r}, warps {w}, stages {st})" for t, n, r, w, st in probs[:5]))  # fmt: skip
    print(f"  probability kernel, the default launch (keys 64, rows 64, warps 4) by stages 2/3/4: {', '.join(f'{t:.1f}' for t in default)} us")


def main() -> None:
    torch.manual_seed(0)
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if "--sweep" in sys.argv:
        for blocks in ([40, 80], [64, 112], [40], [64]):
            sweep(blocks, CACHE + LEAD)
        return
    # the kernels of a stream's steady state (cuDNN for the chunk): steady=True throughout
    for blocks in ([40, 80], [64, 112]):
        measure_layer(blocks)
    if "--layer" not in sys.argv:
        for blocks in ([32, 56], [64, 112]):
            measure(blocks)


if __name__ == "__main__":
    main()
