"""The ordinary path: the newest ``q`` tokens over a layer's cache and themselves,
bottom-right causal (query ``i`` of ``q`` sees every cached key and new keys ``0..i``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from hermes_policy.attention.capture import HALF_DTYPES, bottom_right_causal_mask
from hermes_policy.attention.lse import (
    HAS_CUDNN_SDPA,
    attention_with_lse,
    canonical_batch_stride,
    merge_attention,
    merge_attention_into,
)
from hermes_policy.attention.shapes import SPLIT_SHAPES


def causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    out: torch.Tensor | None = None,
    steady: bool = False,
) -> torch.Tensor:
    """SDPA of the newest ``q`` tokens over ``k`` keys, bottom-right causal.

    ``out``: where to write the result ``(batch, heads, q, head_dim)`` (any strides; the
    merge of the split path writes there directly); returned. ``steady``: the shape is
    known to recur (see :mod:`~hermes_policy.attention.shapes`).

    On CUDA, a chunk over a cache at a recurring shape runs as two cuDNN calls merged by
    log-sum-exp (:func:`merge_attention`): the cached keys without a mask, the chunk's own
    keys causally, faster than one flash call at such a shape
    (``benchmarks/profile_efficiency.py --attention-only``; docs/performance.md).
    Otherwise the flash kernel with the bottom-right causal bias (no mask materialised).
    """
    q_len, k_len = query.shape[-2], key.shape[-2]
    gqa = query.shape[1] != key.shape[1]
    if query.device.type != "cuda":
        mask = bottom_right_causal_mask(q_len, k_len, query.device)
        result = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        return result if out is None else out.copy_(result)
    cache = k_len - q_len
    if HAS_CUDNN_SDPA and cache > 0 and q_len >= 128 and query.dtype in HALF_DTYPES:  # (few rows: flash is short)
        query = canonical_batch_stride(query)
        parts = [canonical_batch_stride(t) for t in (key[:, :, :cache], value[:, :, :cache], key[:, :, cache:], value[:, :, cache:])]
        # cuDNN keys its plans on shapes and strides
        shape = tuple((t.shape, t.stride()) for t in (query, *parts)) + (query.dtype,)
        if SPLIT_SHAPES.recurring(shape) or steady:
            out_cache, lse_cache = attention_with_lse(query, parts[0], parts[1], scaling, causal=False)
            out_new, lse_new = attention_with_lse(query, parts[2], parts[3], scaling, causal=True)
            if out is None:
                return merge_attention(out_cache, lse_cache, out_new, lse_new)
            merge_attention_into(out_cache, lse_cache, out_new, lse_new, out)
            return out
    mask = causal_lower_right(q_len, k_len) if q_len > 1 else None
    result = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return result if out is None else out.copy_(result)
