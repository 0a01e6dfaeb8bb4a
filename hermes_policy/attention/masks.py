"""Boolean masks of the attention paths: query blocks, static mode's slots.

True marks an allowed query-key pair except where a name says ``blocked`` (True: no
attention). Built once per layout where every layer asks for the same one.
"""

from __future__ import annotations

import functools

import torch

from hermes_policy.attention.capture import bottom_right_causal_mask


def slots_blocked(limits: torch.Tensor, window: int) -> torch.Tensor:
    """Static mode's mask: ``(..., window)`` True where a token may not look, i.e. at the
    slots past its limit, from ``limits`` ``(...)`` (each token's highest visible slot)."""
    return torch.arange(window, device=limits.device) > limits[..., None]


def block_rows_mask(blocks: list[int], k_len: int, device: torch.device) -> torch.Tensor:
    """The rows of :func:`block_query_mask` that belong to the blocks: ``(sum(blocks), k)``.

    Each block sees the first ``k_len - sum(blocks)`` keys (cache and lead) and, causally,
    its own tokens only.
    """
    q_blocks = sum(blocks)
    seen = k_len - q_blocks
    mask = torch.zeros(q_blocks, k_len, dtype=torch.bool, device=device)
    mask[:, :seen] = True
    start = 0
    for size in blocks:
        block = torch.ones(size, size, dtype=torch.bool, device=device).tril()
        mask[start : start + size, seen + start : seen + start + size] = block
        start += size
    return mask


def block_query_mask(blocks: list[int], k_len: int, device: torch.device, lead: int = 0) -> torch.Tensor:
    """Mask ``(q, k)`` for several independent queries prefilled together on one cache.

    The new tokens are ``lead + sum(blocks)`` queries: first ``lead`` ordinary tokens
    (causal, e.g. a chunk of frames), then consecutive blocks; each block sees the whole
    cache and the lead tokens (the first ``k_len - sum(blocks)`` keys) and, causally, its
    own tokens only, so one forward computes what separate forwards of the lead and then
    of each block would.
    """
    rows = block_rows_mask(blocks, k_len, device)
    if not lead:
        return rows
    seen = k_len - sum(blocks)
    lead_rows = torch.zeros(lead, k_len, dtype=torch.bool, device=device)
    lead_rows[:, :seen] = bottom_right_causal_mask(lead, seen, device)
    return torch.cat([lead_rows, rows])


def captured_block(picked: range, lead: int, blocks: list[int]) -> int | None:
    """The block holding all of the contiguous rows ``picked`` (None: none, or several)."""
    if len(picked) == 0 or picked.step != 1 or picked.start < lead:
        return None
    start = lead
    for index, size in enumerate(blocks):
        if start <= picked.start and picked.stop <= start + size:
            return index
        start += size
    return None


def block_rows_needed(lead: int, blocks: list[int], captured: list[range]) -> list[int]:
    """How many leading rows each layer of a forward with query blocks must compute when
    only captured rows are read afterwards (ingest keeps no hidden states).

    A block's rows feed only that block's rows in later layers (blocks see the cache, the
    lead and themselves; the lead sees no block), so a trailing block no later layer
    captures can stop where it stops being read.

    Parameters
    ----------
    lead : ordinary rows before the blocks (always computed)
    blocks : the blocks' lengths, in order
    captured : per layer, the rows captured there (``range(0)``: none)

    Returns
    -------
    per layer, ``lead`` plus the blocks up to the last one read at that layer or later
    (never increasing with depth)
    """
    ends = []
    for size in blocks:
        ends.append((ends[-1] if ends else lead) + size)
    needed, out = lead, [0] * len(captured)
    for layer in reversed(range(len(captured))):
        rows = captured[layer]
        if len(rows) and rows[-1] >= lead:
            needed = max(needed, next(end for end in ends if end > rows[-1]))
        out[layer] = needed
    return out


@functools.lru_cache(maxsize=64)
def own_blocks_blocked(blocks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``~block_rows_mask(blocks, sum(blocks))``: what each block's row may not see among
    the blocks' own keys, built once per block layout (every layer of every compressing
    chunk asks for the same one). Read only."""
    return ~block_rows_mask(list(blocks), sum(blocks), device)
