"""Static mode: attention over a layer's whole preallocated buffer, masked by slot.

The fixed-shape answer forwards (CUDA graphs, :mod:`hermes_policy.graphs.answer_graphs`)
write the new tokens at fixed slots and attend over the buffer's first ``window`` slots;
query ``i`` may see the slots ``<= limits[i]`` (its own slot and everything before it).
On CUDA one split-key pass computes that mask itself
(:mod:`hermes_policy.kernels.split_kv_attention`); elsewhere an explicit mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hermes_policy.attention.capture import grouped_scores
from hermes_policy.attention.masks import slots_blocked
from hermes_policy.kernels import split_kv_attention

# Masked attention (answers on fixed shapes) runs as plain matmuls while its float32 score
# matrix has at most this many elements (128 MiB): a decode step, a question bucket on a
# 4K cache; beyond it (long questions on a huge cache) the memory-efficient kernel.
EXPLICIT_SCORES = 1 << 25


def static_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    limits: torch.Tensor,
    blocked: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """One layer in static mode.

    Parameters
    ----------
    query : ``(batch, heads, q, head_dim)``
    key, value : ``(batch, kv_heads, window, head_dim)``: the buffer's first ``window`` slots
    limits : LongTensor ``(q,)``: each new token's highest visible slot
    blocked : BoolTensor ``(q, window)`` built beforehand (True: not visible), or None

    Returns
    -------
    Tensor ``(batch, q, heads, head_dim)``
    """
    k_len = key.shape[-2]
    limits = limits if limits.device == query.device else limits.to(query.device)
    if query.shape[0] == 1 and split_kv_attention.available(query.device, query.shape[-1]):
        # one split-key pass with the mask computed from the limits (the answer graphs'
        # fewer-kernel forward runs the same kernel)
        out = split_kv_attention.attend(query[0].transpose(0, 1), key, value, limits, scaling)
        if out is not None:
            return out[None]
    if blocked is None or blocked.shape[-1] != k_len:
        blocked = slots_blocked(limits, k_len)
    elif blocked.device != query.device:
        blocked = blocked.to(query.device)
    return grouped_masked_attention(query, key, value, blocked, scaling).transpose(1, 2).contiguous()


def static_masks(limits: torch.Tensor, window: int, head_dim: int) -> torch.Tensor | None:
    """Every layer's static mask ``(layers, q, window)`` at once from ``limits (layers, q)``,
    or None where the split-key kernel computes it from the limits itself."""
    if split_kv_attention.available(limits.device, head_dim):
        return None
    return slots_blocked(limits, window)


def runs_explicitly(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether :func:`grouped_masked_attention` computes these rows as plain matmuls."""
    batch, heads, q_len, _ = query.shape
    return query.device.type != "cuda" or batch * heads * q_len * key.shape[-2] <= EXPLICIT_SCORES


def grouped_masked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocked: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Masked attention with grouped KV heads, without repeating the keys per query head.

    The ``groups`` query heads sharing one KV head are stacked along the query axis, so
    each cached key is read once per KV head, not once per query head.

    Parameters
    ----------
    query : ``(batch, heads, q, head_dim)``
    key, value : ``(batch, kv_heads, k, head_dim)``
    blocked : BoolTensor ``(q, k)``, True where attention is NOT allowed; or ``(kv_heads,
        q, k)``, one mask per KV head, shared by its query heads (per-head retention:
        :mod:`~hermes_policy.attention.head_masks`)

    Returns
    -------
    Tensor ``(batch, heads, q, head_dim)``
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[-2]
    groups = heads // kv_heads
    if not runs_explicitly(query, key):
        # Many rows on many keys: the fused memory-efficient kernel, chosen explicitly (left
        # to itself SDPA picks cuDNN for masked attention, which builds a new plan for every
        # key length). Query heads stacked as in grouped_scores.
        stacked = query.reshape(batch, kv_heads, groups * q_len, dim)
        if blocked.dim() == 3:  # (kv_heads, groups * q, k): each KV head's rows stacked as the queries
            allowed = ~blocked[:, None].expand(kv_heads, groups, q_len, k_len).reshape(kv_heads, groups * q_len, k_len)
        else:
            allowed = ~blocked.repeat(groups, 1)
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            out = F.scaled_dot_product_attention(stacked, key, value, attn_mask=allowed, scale=scaling)
        return out.reshape(batch, heads, q_len, dim)
    # Matmul-softmax-matmul, where cuBLAS splits the key axis across the GPU; the fused
    # kernels run few rows on a handful of blocks, slower for a question's rows over a cache
    # of thousands of keys (docs/performance.md).
    scores = grouped_scores(query, key, scaling)
    if blocked.dim() == 3:  # per KV head: broadcast over the group's query heads
        blocked = blocked[:, None]
    scores = scores.view(batch, kv_heads, groups, q_len, k_len).masked_fill_(blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(value.dtype).view(batch, kv_heads, groups * q_len, k_len), value)
    return out.reshape(batch, heads, q_len, dim)
