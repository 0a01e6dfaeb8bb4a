"""Query blocks: several independent queries prefilled in one forward on one cache.

A forward's new tokens are a lead (ordinary causal tokens, e.g. a chunk of frames) and
then blocks (e.g. HERMES's pseudo-query prompts, or a batch of continuations), each block
seeing the cache, the lead and, causally, itself only: one forward computes what separate
forwards of the lead and of each block would. The probabilities of captured rows come
from the same log-sum-exp as the output.
"""

from __future__ import annotations

import torch

from hermes_policy.attention.capture import HALF_DTYPES, grouped_scores
from hermes_policy.attention.causal import causal_attention
from hermes_policy.attention.lse import (
    HAS_CUDNN_SDPA,
    attention_with_lse,
    canonical_batch_stride,
    masked_softmax_with_lse,
    merge_attention,
    merge_attention_into,
    probabilities_from_lse,
    unmasked_attention_with_lse,
    weighted_probabilities_from_lse,
)
from hermes_policy.attention.masks import own_blocks_blocked
from hermes_policy.attention.shapes import SPLIT_SHAPES
from hermes_policy.kernels import block_attention_kernel, probability_kernel


def lead_and_blocks_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lead: int,
    blocks: list[int],
    scaling: float,
    keep_rows: tuple[int, int] | None = None,
    head_mean: bool = False,
    lead_read: bool = True,
    row_weights: torch.Tensor | None = None,
    steady: bool = False,
    blocks_with_chunk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention under :func:`block_query_mask`, without a mask over the whole cache.

    The lead rows attend causally to the keys before the blocks (:func:`causal_attention`).
    The blocks' rows attend to those keys (the cache and the lead) and, causally, to their
    own block's keys. Where the block attention kernel runs
    (:mod:`~hermes_policy.kernels.block_attention_kernel`) that is one pass over every key (with
    ``blocks_with_chunk``, after one cuDNN call of all rows over the cache:
    :func:`_blocks_by_kernel`); otherwise one flash call for all blocks over the keys before them (no mask), one small
    explicit product over their own keys, and a log-sum-exp merge of the two
    (:func:`merge_attention`). No block's view of the cache is ever copied, and the
    probabilities of captured rows come from the same log-sum-exp: one pass over the
    scores, no softmax.

    Parameters
    ----------
    query : ``(batch, heads, lead + sum(blocks), head_dim)``
    key, value : ``(batch, kv_heads, k, head_dim)``: the cache, the lead, then the blocks
    keep_rows : ``(start, stop)``, rows counted from the first block's first row, lying in
        one block: return their probabilities
    head_mean : return those probabilities averaged over heads
    lead_read : False when nothing reads the lead rows' output (the last layer of an
        ingest forward, which runs attention only for its captured rows): those rows of
        the output are then left unset
    row_weights : float32 ``(stop - start,)``: return the weighted sum over the kept rows
        of their mean over heads, ``(batch, 1, 1, k - sum(blocks))``: on CUDA one Triton
        pass with the scores in registers (:mod:`~hermes_policy.kernels.probability_kernel`), else
        in the kernel of the exponential
    steady : the shapes recur (see :mod:`~hermes_policy.attention.shapes`)
    blocks_with_chunk : see :func:`_blocks_by_kernel`

    Returns
    -------
    output ``(batch, heads, q, head_dim)``; the kept rows' probabilities over the keys
    before the blocks, float32 ``(batch, heads or 1, stop - start, k - sum(blocks))``
    (their own block's keys take the rest of each row's mass), or None
    """
    seen = key.shape[-2] - sum(blocks)
    batch, heads, q_len, dim = query.shape
    joined = None
    if lead or (seen and block_attention_kernel.available(query.device, dim)):
        # the lead's and the blocks' outputs written side by side in (batch, q, heads,
        # head_dim) memory, the layout the output projection reads: no join copies them, and
        # the caller's transpose back copies nothing
        joined = query.new_empty(batch, q_len, heads, dim).transpose(1, 2)
    rows = query[:, :, lead:]
    lse = (
        _blocks_by_kernel(query, key, value, lead, blocks, scaling, joined, lead_read, steady, blocks_with_chunk)
        if seen
        else None
    )
    lse_seen = lse_own = None
    if lse is None:
        if lead and lead_read:
            causal_attention(
                query[:, :, :lead], key[:, :, :seen], value[:, :, :seen], scaling, out=joined[:, :, :lead], steady=steady
            )
        dest = None if joined is None else joined[:, :, lead:]
        out, lse_seen, lse_own = _blocks_by_flash(rows, key, value, blocks, scaling, dest)
    output = out if joined is None else joined
    if keep_rows is None or (lse is None and lse_seen is None):
        return output, None
    start, stop = keep_rows
    # each kept row's log-sum-exp over every key it saw, whole or in its two parts
    parts = (lse[:, :, start:stop], None) if lse is not None else (lse_seen[:, :, start:stop], lse_own[:, :, start:stop])
    if row_weights is not None and probability_kernel.available(rows.device, dim):
        # the scores stay in registers (the products below write them over the whole cache)
        probs = probability_kernel.weighted_probabilities(
            rows[:, :, start:stop], key[:, :, :seen], *parts, row_weights, scaling
        )
        if probs is not None:
            return output, probs
    total = parts[0] if parts[1] is None else torch.logaddexp(*parts)
    # over a multiple of 8 keys (the blocks' own keys follow; their columns are cut off
    # the result, not the scores): cuBLAS runs a float32 output whose rows are not
    # 16-byte aligned in a much slower kernel, and the compiled exponential reads a cut
    # view of the scores much more slowly (docs/performance.md)
    width = min(-(-seen // 8) * 8, key.shape[-2])
    scores = grouped_scores(rows[:, :, start:stop], key[:, :, :width], None).view(*total.shape, width)
    if row_weights is not None:
        probs = weighted_probabilities_from_lse(scores, total, scaling, row_weights)[..., :seen]
    else:
        probs = probabilities_from_lse(scores, total, scaling, head_mean)[..., :seen]
    return output, probs


def _blocks_by_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lead: int,
    blocks: list[int],
    scaling: float,
    joined: torch.Tensor | None,
    lead_read: bool,
    steady: bool = False,
    blocks_with_chunk: bool = False,
) -> torch.Tensor | None:
    """:func:`lead_and_blocks_attention`'s attention through the block attention kernel
    (:mod:`~hermes_policy.kernels.block_attention_kernel`), written into ``joined``; the blocks'
    log-sum-exp over every key they saw, or None where the kernel does not run (nothing
    written then).

    By default the lead as :func:`causal_attention` runs it, and the kernel takes the
    blocks over every key, in ranges walked at once (merged after). With
    ``blocks_with_chunk`` (:class:`~hermes_policy.options.RuntimeOptions`), for a lead that is read, over a cache, where cuDNN runs
    the chunk's attention (on the CPU its explicit stand-in): one cuDNN call takes all rows,
    the lead's and the blocks', over the cached keys (little more than the lead's alone,
    and less than the blocks' own flash call: docs/performance.md), the lead's
    rows take their own keys causally (merged by
    :func:`~hermes_policy.kernels.block_attention_kernel.merge_into`, whose strides change with the
    prompts), and the kernel resumes the blocks' rows from their cached part over the lead's
    keys and their own block. Faster at a steady shape, but that cuDNN call has a new shape
    for every prompt length, and cuDNN builds a plan for each: in the efficiency benchmark,
    where every question lengthens the prompts, the segments with a question ran ~0.25-0.75 s
    slower than on the flash path (the plans being what remained once Triton's
    specialisation and a compiled op's recompiles were gone: inferred, not profiled).
    """
    batch, heads, q_len, dim = query.shape
    if (
        joined is None
        or batch != 1
        or not block_attention_kernel.available(query.device, dim)
        or not 1 <= len(blocks) <= block_attention_kernel.MAX_BLOCKS
    ):
        return None
    seen = key.shape[-2] - sum(blocks)
    cache = seen - lead
    rows, out = query[:, :, lead:], joined[:, :, lead:]
    if blocks_with_chunk and lead and lead_read and cache > 0 and _cached_part_by_one_call(query, key, cache, steady):
        query = canonical_batch_stride(query)
        cached = [canonical_batch_stride(t[:, :, :cache]) for t in (key, value)]
        out_cache, lse_cache = attention_with_lse(query, *cached, scaling, causal=False)
        new = [canonical_batch_stride(t[:, :, cache:seen]) for t in (key, value)]
        out_new, lse_new = attention_with_lse(query[:, :, :lead], *new, scaling, causal=True)
        lead_parts = (out_cache[:, :, :lead], lse_cache[:, :, :lead], out_new, lse_new, joined[:, :, :lead])
        if block_attention_kernel.merge_into(*lead_parts) is None:
            merge_attention_into(*lead_parts)
        prior = (out_cache[:, :, lead:], lse_cache[:, :, lead:])
        lse = block_attention_kernel.block_rows_attention(rows, key, value, blocks, cache, scaling, out, prior)
        if lse is None:  # the kernel failed (and is off from now on): the lead is written, the blocks plainly
            _, lse_seen, lse_own = _blocks_by_flash(rows, key, value, blocks, scaling, out)
            lse = torch.logaddexp(lse_seen, lse_own)
        return lse
    lse = block_attention_kernel.block_rows_attention(rows, key, value, blocks, 0, scaling, out)
    if lse is not None and lead and lead_read:
        causal_attention(
            query[:, :, :lead], key[:, :, :seen], value[:, :, :seen], scaling, out=joined[:, :, :lead], steady=steady
        )
    return lse


def _blocks_by_flash(
    rows: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocks: list[int],
    scaling: float,
    dest: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The blocks' rows without the block kernel: one flash call over the keys before them
    (no mask), explicit products over their own block, merged by log-sum-exp.

    Returns
    -------
    the output (``dest`` when given, where it is written), the log-sum-exp over the keys
    before the blocks (None when there are none) and over their own block
    """
    seen = key.shape[-2] - sum(blocks)
    out, lse_own = own_blocks_attention(rows, key[:, :, seen:], value[:, :, seen:], blocks, scaling)
    if not seen:
        return (out if dest is None else dest.copy_(out)), None, lse_own
    out_seen, lse_seen = unmasked_attention_with_lse(rows, key[:, :, :seen], value[:, :, :seen], scaling)
    if dest is None:
        return merge_attention(out_seen, lse_seen, out, lse_own), lse_seen, lse_own
    merge_attention_into(out_seen, lse_seen, out, lse_own, dest)
    return dest, lse_seen, lse_own


def _cached_part_by_one_call(query: torch.Tensor, key: torch.Tensor, cache: int, steady: bool) -> bool:
    """Whether the lead's and the blocks' rows take the cached keys in one cuDNN call: on
    CUDA where :func:`causal_attention` would split the lead's attention (a recurring
    shape in half precision), and on the CPU (explicit products: the tests)."""
    if query.device.type != "cuda":
        return True
    if not HAS_CUDNN_SDPA or query.dtype not in HALF_DTYPES:
        return False
    shape = ("blocks", tuple(query.shape), tuple(key.shape), cache, query.dtype)
    return bool(SPLIT_SHAPES.recurring(shape) or steady)


def own_blocks_attention(
    rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: list[int], scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's rows over its own keys, causally; output and log-sum-exp.

    Parameters
    ----------
    rows : ``(batch, heads, sum(blocks), head_dim)``
    key, value : ``(batch, kv_heads, sum(blocks), head_dim)``: the blocks' own keys

    Returns
    -------
    output ``(batch, heads, sum(blocks), head_dim)`` in the rows' dtype, log-sum-exp
    ``(batch, heads, sum(blocks))`` float32. Explicit products (a few dozen keys a row).
    """
    batch, heads, total, dim = rows.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scores = grouped_scores(rows, key, scaling).view(batch, kv_heads, groups, total, total)
    probs, lse = masked_softmax_with_lse(scores, own_blocks_blocked(tuple(blocks), rows.device), value.dtype)
    out = torch.matmul(probs.view(batch, kv_heads, groups * total, total), value)
    return out.view(batch, heads, total, dim), lse.view(batch, heads, total)
