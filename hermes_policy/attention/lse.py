"""Attention with each row's log-sum-exp, and merging attention over disjoint key sets.

Splitting a row's keys (cache / new tokens, or blocks) and merging the parts by their
log-sum-exp gives exactly the attention over all keys; the same log-sum-exp turns raw
scores into probabilities without a second softmax.
"""

from __future__ import annotations

import warnings

import torch

from hermes_policy.attention.capture import HALF_DTYPES, weighted_head_and_row_mean
from hermes_policy.kernels.fusion import FusedOp, capturing

HAS_CUDNN_SDPA = hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and the log-sum-exp of each query's scores.

    Parameters
    ----------
    query : ``(batch, heads, q, head_dim)``
    key, value : ``(batch, kv_heads, k, head_dim)`` (grouped heads allowed)
    causal : query ``i`` sees keys ``0..i`` (``q == k``); otherwise every key

    Returns
    -------
    output ``(batch, heads, q, head_dim)``, lse ``(batch, heads, q)`` (float32 or wider). On CUDA the
    cuDNN kernel; elsewhere explicit float32 matmuls (for tests).
    """
    if query.device.type == "cuda" and HAS_CUDNN_SDPA:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, causal, False, scale=scaling
        )[:2]
        return out, lse.view(out.shape[:-1])
    return explicit_attention_with_lse(query, key, value, scaling, causal)


def explicit_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_with_lse` as explicit float32 products (CPU, tests, and where no
    fused kernel returns the log-sum-exp)."""
    heads, q_len = query.shape[1], query.shape[2]
    groups = heads // key.shape[1]
    wide = torch.promote_types(query.dtype, torch.float32)
    keys = key.repeat_interleave(groups, 1).to(wide)
    scores = torch.matmul(query.to(wide), keys.transpose(-1, -2)) * scaling
    if causal:
        scores.masked_fill_(~torch.ones(q_len, key.shape[-2], dtype=torch.bool, device=query.device).tril(), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), value.repeat_interleave(groups, 1).to(wide))
    return out.to(query.dtype), lse


def _merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    wide = torch.promote_types(out_a.dtype, torch.float32)
    share = torch.sigmoid(lse_a.to(wide) - lse_b.to(wide)).unsqueeze(-1)
    return torch.lerp(out_b.to(wide), out_a.to(wide), share).to(out_a.dtype)


merge_attention = FusedOp(_merge_attention)
"""Attention over the union of two disjoint key sets, from attention over each.

The softmax over all keys weighs each part by its share of the total exponent mass:
``out = s * out_a + (1 - s) * out_b`` with ``s = exp(lse_a) / (exp(lse_a) + exp(lse_b))
= sigmoid(lse_a - lse_b)``; combined in float32, rounded once (one kernel on CUDA).

Parameters
----------
out_a, out_b : ``(batch, heads, q, head_dim)``
lse_a, lse_b : ``(batch, heads, q)``
"""


def _merge_attention_into(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, dest: torch.Tensor
) -> None:
    dest.copy_(_merge_attention(out_a, lse_a, out_b, lse_b))


merge_attention_into = FusedOp(_merge_attention_into)
""":func:`merge_attention` written into ``dest`` ``(batch, heads, q, head_dim)``, any strides
(a slice of a joined output): one kernel on CUDA, no copy behind it."""


def canonical_batch_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The same view with the stride of a batch axis of size 1 set from the other axes.

    A size-1 axis addresses no memory, but its stride depends on how the tensor was cut:
    the chunk's queries sliced from a forward with pseudo-queries behind them carry the
    longer forward's batch stride. Kernels that key compiled plans on strides (cuDNN)
    would build a new plan for each such length.
    """
    if tensor.dim() == 0 or tensor.shape[0] != 1:
        return tensor
    span = max((n * s for n, s in zip(tensor.shape[1:], tensor.stride()[1:], strict=True)), default=1)
    if tensor.stride(0) == span:
        return tensor
    return tensor.as_strided(tensor.shape, (span, *tensor.stride()[1:]), tensor.storage_offset())


def _masked_softmax_with_lse(
    scores: torch.Tensor, blocked: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = scores.masked_fill(blocked, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)).to(dtype), lse


masked_softmax_with_lse = FusedOp(_masked_softmax_with_lse)
"""Softmax of float32 scores ``(..., q, k)`` with ``blocked`` (broadcast, True: no
attention) set aside, rounded to ``dtype``, and each row's log-sum-exp ``(..., q)``
(float32). One kernel on CUDA where the eager code runs eight."""


HAS_FLASH_LSE = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention")
_FLASH_LSE = [HAS_FLASH_LSE]  # turned off, with a warning, if the kernel ever fails


def unmasked_attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query over every key, and each row's log-sum-exp (natural logarithm).

    On CUDA in half precision the flash kernel, with the query heads of each KV head
    stacked along the query axis (exact without a mask, so grouped heads need no repeated
    keys); it needs no execution plan per shape (cuDNN builds one for each new key
    length, and a growing cache has a new one every chunk). Elsewhere
    :func:`explicit_attention_with_lse` (CPU, tests).

    Parameters
    ----------
    query : ``(batch, heads, q, head_dim)``
    key, value : ``(batch, kv_heads, k, head_dim)``

    Returns
    -------
    output ``(batch, heads, q, head_dim)``, lse ``(batch, heads, q)`` float32 (or wider)
    """
    if query.device.type == "cuda" and query.dtype in HALF_DTYPES and _FLASH_LSE[0]:
        batch, heads, q_len, dim = query.shape
        kv_heads = key.shape[1]
        stacked = query.reshape(batch, kv_heads, heads // kv_heads * q_len, dim)
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                stacked, key, value, 0.0, False, False, scale=scaling
            )[:2]
            return out.reshape(batch, heads, q_len, dim), lse.reshape(batch, heads, q_len)
        except (RuntimeError, TypeError) as error:  # a build or device without it: explicit from now on
            if capturing():
                raise
            _FLASH_LSE[0] = False
            warnings.warn(f"flash attention with log-sum-exp failed ({error}); using explicit products", stacklevel=2)
    return explicit_attention_with_lse(query, key, value, scaling)


def _probabilities_from_lse(scores: torch.Tensor, lse: torch.Tensor, scaling: float, head_mean: bool) -> torch.Tensor:
    probs = torch.exp(scores * scaling - lse.unsqueeze(-1))
    return probs.mean(dim=1, keepdim=True) if head_mean else probs


probabilities_from_lse = FusedOp(_probabilities_from_lse)
"""Softmax probabilities from raw scores ``(batch, heads, q, k)`` (float32, unscaled) and
each row's log-sum-exp ``(batch, heads, q)`` over all the keys it sees, which may be more
than these ``k``: ``exp(scaling * scores - lse)``, averaged over heads (kept as an axis of
size 1) if ``head_mean``. One kernel on CUDA (the scale, the shift, the exponential and the
mean together), where a softmax would read the scores twice and write them once more."""


def _weighted_probabilities_from_lse(
    scores: torch.Tensor, lse: torch.Tensor, scaling: float, weights: torch.Tensor
) -> torch.Tensor:
    return weighted_head_and_row_mean(torch.exp(scores * scaling - lse.unsqueeze(-1)), weights)


weighted_probabilities_from_lse = FusedOp(_weighted_probabilities_from_lse)
""":func:`probabilities_from_lse` averaged over heads and summed over the rows with
``weights`` ``(q,)``: ``(batch, 1, 1, k)``. One kernel on CUDA, which writes one row
where the per-row probabilities would be ``q`` rows (and a mean over them another pass)."""
