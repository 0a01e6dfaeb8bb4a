"""Per-KV-head visibility of a layer's cached tokens: the runtime side of per-head retention.

A layer whose heads keep different tokens (``hermes-heads``, docs/heads.md "Runtime") holds
the *union* of what its heads keep in its ordinary buffer, plus a boolean mask
``(kv_heads, width)`` over its first ``width`` cached tokens: True where that KV head may
attend the token. Tokens past ``width`` (appended after the mask was set: a chunk before
the next compression, a question, an answer) are visible to every head. The query heads of
a grouped-query group share their KV head's row.

The mask reaches the attention function in the forward's
:class:`~hermes_policy.attention.context.AttentionContext` (``head_masks``, one entry per
layer, None where every head sees every token). A masked layer runs the explicit masked
products (:func:`head_masked_attention`), whatever fast path it would otherwise take.
"""

from __future__ import annotations

import torch

from hermes_policy.attention.capture import AttentionCapture, bottom_right_causal_mask
from hermes_policy.attention.masks import block_query_mask, slots_blocked
from hermes_policy.attention.static import grouped_masked_attention


def heads_blocked(mask: torch.Tensor, k_len: int) -> torch.Tensor:
    """``(kv_heads, 1, k_len)`` True where a head may NOT attend a key: the inverse of
    ``mask (kv_heads, width)`` over the first ``width`` keys, False (visible) past them."""
    kv_heads, width = mask.shape
    if width > k_len:
        raise ValueError(f"a head mask over {width} tokens for a layer of {k_len} keys")
    blocked = torch.zeros(kv_heads, 1, k_len, dtype=torch.bool, device=mask.device)
    blocked[:, 0, :width] = ~mask
    return blocked


def head_masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    blocks: tuple[int, tuple[int, ...]] | None = None,
    static_limits: torch.Tensor | None = None,
    capture: AttentionCapture | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """One layer's attention under its head mask, as explicit masked products.

    The query-key mask is the one the layer's ordinary path would use (bottom-right causal;
    query blocks behind a lead, :func:`~hermes_policy.attention.masks.block_query_mask`; or
    static mode's slots, :func:`~hermes_policy.attention.masks.slots_blocked`), and each KV
    head's row of ``mask`` removes the cached tokens that head may not see, for all of its
    query heads. No row is ever empty: every new token sees itself.

    Parameters
    ----------
    query : ``(batch, heads, q, head_dim)``
    key, value : ``(batch, kv_heads, k, head_dim)``: the cache (and the new tokens)
    mask : BoolTensor ``(kv_heads, width)``, ``width <= k``: True where a head may attend
    blocks : the context's query blocks ``(lead, sizes)``, or None
    static_limits : static mode: LongTensor ``(q,)``, each new token's highest visible slot
    capture : hand the captured rows' probabilities (under the same mask) to it

    Returns
    -------
    Tensor ``(batch, q, heads, head_dim)``
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    device = query.device
    if static_limits is not None:
        base = slots_blocked(static_limits.to(device), k_len)
    elif blocks is not None:
        lead, sizes = blocks
        base = ~block_query_mask(list(sizes), k_len, device, lead)
    else:
        base = ~bottom_right_causal_mask(q_len, k_len, device)
    blocked = base[None] | heads_blocked(mask.to(device), k_len)  # (kv_heads, q, k)
    out = grouped_masked_attention(query, key, value, blocked, scaling)
    if capture is not None and len(capture.rows(layer, q_len)):
        capture.record(layer, query, key, scaling, ~blocked)
    return out.transpose(1, 2).contiguous()


def visible_counts(mask: torch.Tensor | None, kv_heads: int, length: int, start: int = 0) -> list[int]:
    """Tokens ``start..length`` of a layer each KV head sees under ``mask`` (None: all)."""
    if mask is None:
        return [length - start] * kv_heads
    width = mask.shape[-1]
    seen = mask[:, start:width].sum(dim=1).tolist() if width > start else [0] * mask.shape[0]
    return [int(n) + max(0, length - max(width, start)) for n in seen]
