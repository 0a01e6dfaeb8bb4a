"""Exact attention over ragged per-layer caches, and the attention capture mechanism.

transformers builds one attention mask per forward from layer 0's cache length, which is
wrong once layers keep different numbers of tokens (TRAPS.md). We register our own
attention function with ``AttentionInterface`` (and a mask function that builds nothing)
and set it on the text model only. It derives the mask from each layer's own key length
with bottom-right causal alignment: query ``i`` of ``q`` new tokens sees every cached key
plus new keys ``0..i``.

Capture: while an :class:`AttentionCapture` is active, the function also computes the
softmax probabilities of chosen query rows from that layer's own query states and hands
them to the capture, under TransformerLens-style names ``blocks.{layer}.attn.hook_pattern``.
The probe and the HERMES pseudo-queries both use this one mechanism.

Static mode (CUDA graphs, see ``hermes_policy.graphs.answer_graphs``): inside
:class:`StaticMasks`, keys and values are a layer's whole preallocated buffer and query
``i`` may see the slots ``<= limits[i]`` (its own slot and everything before it); on
CUDA one split-key pass computes that mask itself (:mod:`hermes_policy.kernels.split_kv_attention`).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hermes_policy.kernels import block_attention_kernel, probability_kernel, split_kv_attention
from hermes_policy.kernels.fusion import FusedOp, capturing

ATTENTION_NAME = "hermes_ragged"
# Masked attention (answers on fixed shapes) runs as plain matmuls while its float32 score
# matrix has at most this many elements (128 MiB): a decode step, a question bucket on a
# 4K cache; beyond it (long questions on a huge cache) the memory-efficient kernel.
EXPLICIT_SCORES = 1 << 25
HALF_DTYPES = (torch.float16, torch.bfloat16)
# "1": the pseudo-query blocks' rows join the chunk's cuDNN call over the cache (see _blocks_by_kernel)
BLOCKS_WITH_CHUNK = "HERMES_BLOCKS_WITH_CHUNK"
# half-precision batched matmul with float32 output (CUDA kernels since torch 2.8)
BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()

PatternCallback = Callable[[int, torch.Tensor], None]


def bottom_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask ``(q_len, k_len)``; True where query ``i`` may attend key ``j``.

    The ``q_len`` queries are the last ``q_len`` keys: ``j <= k_len - q_len + i``.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Scaled attention scores in float32, the query heads of each KV head stacked.

    Parameters
    ----------
    query : ``(batch, heads, q, head_dim)``
    key : ``(batch, kv_heads, k, head_dim)``
    scaling : the softmax scale, or None for the raw products (a caller that folds the
        scale into a later step saves a pass over the scores)

    Returns
    -------
    Tensor ``(batch, kv_heads, groups * q, k)``: row ``j * q + i`` of KV head ``h`` is query
    head ``h * groups + j``, token ``i`` (so each key is read once per KV head, not once per
    query head). The product runs on tensor cores with float32 accumulation; on CUDA in
    half precision it is written as float32 directly (one kernel, no rounding of the scores
    to the model's dtype).
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[-2]
    groups = heads // kv_heads
    stacked = query.reshape(batch, kv_heads, groups * q_len, dim)
    if query.device.type == "cuda" and query.dtype in HALF_DTYPES and BMM_OUT_DTYPE:
        scores = torch.bmm(
            stacked.reshape(batch * kv_heads, groups * q_len, dim),
            key.reshape(batch * kv_heads, k_len, dim).transpose(1, 2),
            out_dtype=torch.float32,
        ).view(batch, kv_heads, groups * q_len, k_len)
    else:
        scores = torch.matmul(stacked, key.transpose(-1, -2)).float()
    return scores if scaling is None else scores.mul_(scaling)


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention probabilities in float32.

    Parameters
    ----------
    query : Tensor ``(batch, heads, q, head_dim)`` (RoPE applied)
    key : Tensor ``(batch, kv_heads, k, head_dim)`` (RoPE applied; heads are grouped)
    scaling : softmax scale
    mask : BoolTensor ``(q, k)``, True where attention is allowed (default: the
        bottom-right causal mask, i.e. the queries are the newest keys)

    Returns
    -------
    Tensor ``(batch, heads, q, k)``
    """
    batch, heads, rows, _ = query.shape
    k_len = key.shape[-2]
    scores = grouped_scores(query, key, scaling).view(batch, heads, rows, k_len)
    if mask is None:
        # bottom-right causal: only the last `rows` keys hold masked entries, so only
        # they are touched (these matrices are large: rows x a whole cache)
        tail = scores[..., k_len - rows :]
        tail.masked_fill_(~torch.ones(rows, rows, dtype=torch.bool, device=query.device).tril(), float("-inf"))
    else:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


@dataclass
class AttentionCapture:
    """Record attention probabilities of chosen query rows, per layer and head.

    Use as a context manager around a forward pass::

        with AttentionCapture(layers, query_rows=slice(-8, None)) as cap:
            model(...)
        cap.patterns["blocks.3.attn.hook_pattern"]   # (batch, heads, 8, keys)

    Parameters
    ----------
    attention_modules : the text model's attention modules, in layer order
    layers : layer indices to capture (default: all)
    query_rows : which query rows of the forward to capture (default: all), or a mapping
        from layer to rows (layers absent from it capture nothing)
    callback : called as ``callback(layer, probs)`` with ``probs`` of shape
        ``(batch, heads, rows, keys)`` in float32. When given, nothing is kept in
        ``patterns`` (so long runs can accumulate statistics without storing matrices).
    head_mean : hand over the mean over heads, ``(batch, 1, rows, keys)``
    row_weights : per layer, float32 weights ``(rows,)`` on the layer's device: hand over
        the weighted sum over the rows of the head mean, ``(batch, 1, 1, keys)`` (e.g. the
        mean over a padded prompt's real tokens: ``1 / n`` for them, 0 for the padding);
        read when the forward runs, so a CUDA graph's replay sees new values

    Under :class:`QueryBlocks`, rows inside one block get probabilities over the keys that
    block sees, in the order it would see them alone: the cache and the lead, then its
    own tokens (other rows: over all keys).
    """

    attention_modules: list[nn.Module]
    layers: Iterable[int] | None = None
    query_rows: slice | dict[int, slice] = field(default_factory=lambda: slice(None))
    callback: PatternCallback | None = None
    head_mean: bool = False
    row_weights: dict[int, torch.Tensor] | None = None
    patterns: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: int = 0  # layer patterns handed over

    def __post_init__(self) -> None:
        if self.layers is not None:
            wanted = self.layers
        elif isinstance(self.query_rows, dict):
            wanted = self.query_rows.keys()
        else:
            wanted = range(len(self.attention_modules))
        self._layers = sorted(set(wanted))

    @staticmethod
    def hook_name(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_pattern"

    def __enter__(self) -> AttentionCapture:
        for layer in self._layers:
            module = self.attention_modules[layer]
            if getattr(module, "hermes_capture", None) is not None:
                raise RuntimeError(f"layer {layer} already has an active attention capture")
            module.hermes_capture = self
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self._layers:
            self.attention_modules[layer].hermes_capture = None

    def rows(self, layer: int, q_len: int) -> range:
        """The query rows of a forward of ``q_len`` new tokens captured at ``layer``."""
        selection = self.query_rows.get(layer) if isinstance(self.query_rows, dict) else self.query_rows
        return range(0) if selection is None else range(q_len)[selection]

    def record(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        mask: torch.Tensor | None = None,
        mask_offset: int = 0,
    ) -> None:
        """Compute and hand over the probabilities of the selected query rows of one layer.

        ``mask`` is the boolean mask the forward used for rows ``mask_offset`` onwards,
        shape ``(q - mask_offset, k)`` (None: bottom-right causal); the captured rows must
        lie in it.
        """
        q_len, k_len = query.shape[-2], key.shape[-2]
        picked = self.rows(layer, q_len)
        if len(picked) == 0:
            return
        if mask is None:
            mask, mask_offset = bottom_right_causal_mask(q_len, k_len, query.device), 0
        if picked.start < mask_offset:
            raise ValueError(f"captured rows {picked} start before the mask's first row {mask_offset}")
        # slices, not index tensors: no host-to-device copy inside the forward
        in_mask = slice(picked.start - mask_offset, picked.stop - mask_offset, picked.step)
        probs = attention_probabilities(
            query[:, :, picked.start : picked.stop : picked.step], key, scaling, mask[in_mask]
        )
        weights = self.weights_of(layer, probs.device)
        if weights is not None:
            probs = weighted_head_and_row_mean(probs, weights)
        elif self.head_mean:
            probs = probs.mean(dim=1, keepdim=True)
        self.hand_over(layer, probs)

    def weights_of(self, layer: int, device: torch.device | None = None) -> torch.Tensor | None:
        """The row weights of ``layer`` (None: the rows are handed over one by one), on
        ``device`` when given (a model split over GPUs)."""
        weights = None if self.row_weights is None else self.row_weights.get(layer)
        if weights is not None and device is not None and weights.device != device:
            weights = weights.to(device, non_blocking=True)
        return weights

    def hand_over(self, layer: int, probs: torch.Tensor) -> None:
        """Pass on probabilities ``(batch, heads, rows, keys)`` of this layer's selected rows
        (``(batch, 1, rows, keys)``, the mean over heads, with :attr:`head_mean`;
        ``(batch, 1, 1, keys)`` with :attr:`row_weights`), computed by :meth:`record` or by
        the attention itself; counted in ``calls``."""
        self.calls += 1
        if self.callback is not None:
            self.callback(layer, probs)
        else:
            self.patterns[self.hook_name(layer)] = probs


def ragged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``hermes_ragged``.

    Parameters
    ----------
    query : ``(batch, heads, q, head_dim)``
    key, value : ``(batch, kv_heads, k, head_dim)``: this layer's whole cache plus the new tokens

    Returns
    -------
    (output ``(batch, q, heads, head_dim)``, None)
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("hermes_ragged attention does not support softcapping or attention sinks")
    q_len, k_len = query.shape[-2], key.shape[-2]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    limits = getattr(module, "hermes_static_limits", None)
    if limits is not None:
        limits = limits if limits.device == query.device else limits.to(query.device)
        if query.shape[0] == 1 and split_kv_attention.available(query.device, query.shape[-1]):
            # one split-key pass with the mask computed from the limits (the answer graphs'
            # fewer-kernel forward runs the same kernel)
            out = split_kv_attention.attend(query[0].transpose(0, 1), key, value, limits, scaling)
            if out is not None:
                return out[None], None
        blocked = getattr(module, "hermes_static_blocked", None)
        if blocked is None or blocked.shape[-1] != k_len:
            blocked = slots_blocked(limits, k_len)
        elif blocked.device != query.device:
            blocked = blocked.to(query.device)
        out = grouped_masked_attention(query, key, value, blocked, scaling)
        return out.transpose(1, 2).contiguous(), None
    blocks = getattr(module, "hermes_query_blocks", None)
    capture = getattr(module, "hermes_capture", None)
    gqa = query.shape[1] != key.shape[1]
    if blocks is not None:
        lead, sizes = blocks
        picked = capture.rows(module.layer_idx, q_len) if capture is not None else range(0)
        # rows within one block: their probabilities come with the attention (no second pass)
        within = captured_block(picked, lead, sizes) is not None
        keep = (picked.start - lead, picked.stop - lead) if within else None
        head_mean = capture is not None and capture.head_mean
        weights = capture.weights_of(module.layer_idx, query.device) if capture is not None else None
        lead_read = not getattr(module, "hermes_lead_unread", False)
        out, probs = lead_and_blocks_attention(
            query, key, value, lead, sizes, scaling, keep, head_mean, lead_read, weights
        )
        if probs is not None:
            capture.hand_over(module.layer_idx, probs)
        elif len(picked):  # rows in the lead or across blocks: over all keys, under the block mask
            capture.record(module.layer_idx, query, key, scaling, block_query_mask(sizes, k_len, query.device, lead))
        return out.transpose(1, 2).contiguous(), None
    if q_len == 1:
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
    else:
        out = causal_attention(query, key, value, scaling)
    if capture is not None:  # bottom-right causal, as the forward
        capture.record(module.layer_idx, query, key, scaling)
    return out.transpose(1, 2).contiguous(), None


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
    blocked : BoolTensor ``(q, k)``, True where attention is NOT allowed

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
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            out = F.scaled_dot_product_attention(
                stacked, key, value, attn_mask=~blocked.repeat(groups, 1), scale=scaling
            )
        return out.reshape(batch, heads, q_len, dim)
    # Matmul-softmax-matmul, where cuBLAS splits the key axis across the GPU; the fused
    # kernels run few rows on a handful of blocks, slower for a question's rows over a cache
    # of thousands of keys (docs/performance.md).
    scores = grouped_scores(query, key, scaling)
    scores = scores.view(batch, kv_heads, groups, q_len, k_len).masked_fill_(blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(value.dtype).view(batch, kv_heads, groups * q_len, k_len), value)
    return out.reshape(batch, heads, q_len, dim)


def slots_blocked(limits: torch.Tensor, window: int) -> torch.Tensor:
    """Static mode's mask: ``(..., window)`` True where a token may not look, i.e. at the
    slots past its limit, from ``limits`` ``(...)`` (each token's highest visible slot)."""
    return torch.arange(window, device=limits.device) > limits[..., None]


class StaticMasks:
    """Within this context, attention runs in static mode (see the module docstring).

    Parameters
    ----------
    attention_modules : the text model's attention modules
    limits : LongTensor ``(layers, q)``: the highest slot each new token of each layer sees
    window : the number of slots attention sees (the key length); when given, every
        layer's mask is built here at once instead of in each layer
    """

    def __init__(self, attention_modules: list[nn.Module], limits: torch.Tensor, window: int | None = None):
        self._modules = attention_modules
        self._limits = limits
        self._blocked = None
        # (layers, q, window): True where a new token may not look (the split-key kernel
        # computes it from the limits itself)
        head_dim = getattr(attention_modules[0], "head_dim", 0) if attention_modules else 0
        if window is not None and not split_kv_attention.available(limits.device, head_dim):
            self._blocked = slots_blocked(limits, window)

    def __enter__(self) -> StaticMasks:
        for layer, module in enumerate(self._modules):
            module.hermes_static_limits = self._limits[layer]
            module.hermes_static_blocked = None if self._blocked is None else self._blocked[layer]
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self._modules:
            module.hermes_static_limits = None
            module.hermes_static_blocked = None


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


class ShapeCounter:
    """How often each attention shape has run; a fused kernel whose first call at a shape
    is expensive (cuDNN builds an execution plan) is used for a shape
    only once it has recurred ``after`` times, so a cache that grows every chunk never pays
    for plans it would use once, and a bounded cache pays once for its steady state."""

    def __init__(self, after: int, limit: int = 4096):
        self.after = after
        self.limit = limit
        self.counts: dict[tuple, int] = {}

    def recurring(self, key: tuple) -> bool:
        """Count one call of shape ``key``; True when it has been seen ``after`` times before."""
        seen = self.counts.get(key, 0)
        if seen < self.after:
            if len(self.counts) >= self.limit:  # a stream of ever-new shapes: forget them
                self.counts.clear()
            self.counts[key] = seen + 1
        return seen >= self.after


# three forwards of a 28-layer model at one shape before cuDNN plans are built for it
SPLIT_SHAPES = ShapeCounter(after=96)
_STEADY = [0]  # depth of active steady_shapes() contexts


@contextmanager
def steady_shapes() -> Iterator[None]:
    """Within this context every chunk-attention shape counts as recurring.

    For forwards known to repeat (those captured as CUDA graphs, which are replayed at one
    shape): they take the kernels of a stream's steady state from the first run on.
    """
    _STEADY[0] += 1
    try:
        yield
    finally:
        _STEADY[0] -= 1


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


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA of the newest ``q`` tokens over ``k`` keys, bottom-right causal.

    ``out``: where to write the result ``(batch, heads, q, head_dim)`` (any strides; the
    merge of the split path writes there directly); returned.

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
        if SPLIT_SHAPES.recurring(shape) or _STEADY[0]:
            out_cache, lse_cache = attention_with_lse(query, parts[0], parts[1], scaling, causal=False)
            out_new, lse_new = attention_with_lse(query, parts[2], parts[3], scaling, causal=True)
            if out is None:
                return merge_attention(out_cache, lse_cache, out_new, lse_new)
            merge_attention_into(out_cache, lse_cache, out_new, lse_new, out)
            return out
    mask = causal_lower_right(q_len, k_len) if q_len > 1 else None
    result = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)
    return result if out is None else out.copy_(result)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention under :func:`block_query_mask`, without a mask over the whole cache.

    The lead rows attend causally to the keys before the blocks (:func:`causal_attention`).
    The blocks' rows attend to those keys (the cache and the lead) and, causally, to their
    own block's keys. Where the block attention kernel runs
    (:mod:`~hermes_policy.kernels.block_attention_kernel`) that is one pass over every key (with
    ``HERMES_BLOCKS_WITH_CHUNK=1``, after one cuDNN call of all rows over the cache:
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
    lse = _blocks_by_kernel(query, key, value, lead, blocks, scaling, joined, lead_read) if seen else None
    lse_seen = lse_own = None
    if lse is None:
        if lead and lead_read:
            causal_attention(query[:, :, :lead], key[:, :, :seen], value[:, :, :seen], scaling, out=joined[:, :, :lead])
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
) -> torch.Tensor | None:
    """:func:`lead_and_blocks_attention`'s attention through the block attention kernel
    (:mod:`~hermes_policy.kernels.block_attention_kernel`), written into ``joined``; the blocks'
    log-sum-exp over every key they saw, or None where the kernel does not run (nothing
    written then).

    By default the lead as :func:`causal_attention` runs it, and the kernel takes the
    blocks over every key, in ranges walked at once (merged after). With
    ``HERMES_BLOCKS_WITH_CHUNK=1``, for a lead that is read, over a cache, where cuDNN runs
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
    joins_chunk = os.environ.get(BLOCKS_WITH_CHUNK, "0") == "1"
    if joins_chunk and lead and lead_read and cache > 0 and _cached_part_by_one_call(query, key, cache):
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
        causal_attention(query[:, :, :lead], key[:, :, :seen], value[:, :, :seen], scaling, out=joined[:, :, :lead])
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


def _cached_part_by_one_call(query: torch.Tensor, key: torch.Tensor, cache: int) -> bool:
    """Whether the lead's and the blocks' rows take the cached keys in one cuDNN call: on
    CUDA where :func:`causal_attention` would split the lead's attention (a recurring
    shape in half precision), and on the CPU (explicit products: the tests)."""
    if query.device.type != "cuda":
        return True
    if not HAS_CUDNN_SDPA or query.dtype not in HALF_DTYPES:
        return False
    shape = ("blocks", tuple(query.shape), tuple(key.shape), cache, query.dtype)
    return bool(SPLIT_SHAPES.recurring(shape) or _STEADY[0])


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


@functools.lru_cache(maxsize=64)
def own_blocks_blocked(blocks: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``~block_rows_mask(blocks, sum(blocks))``: what each block's row may not see among
    the blocks' own keys, built once per block layout (every layer of every compressing
    chunk asks for the same one). Read only."""
    return ~block_rows_mask(list(blocks), sum(blocks), device)


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


def weighted_head_and_row_mean(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, rows, keys)`` -> ``(batch, 1, 1, keys)``: the mean over heads, then
    the sum over the rows weighed by ``weights`` ``(rows,)``."""
    return (probs.mean(dim=1, keepdim=True) * weights[:, None]).sum(dim=-2, keepdim=True)


def _weighted_probabilities_from_lse(
    scores: torch.Tensor, lse: torch.Tensor, scaling: float, weights: torch.Tensor
) -> torch.Tensor:
    return weighted_head_and_row_mean(torch.exp(scores * scaling - lse.unsqueeze(-1)), weights)


weighted_probabilities_from_lse = FusedOp(_weighted_probabilities_from_lse)
""":func:`probabilities_from_lse` averaged over heads and summed over the rows with
``weights`` ``(q,)``: ``(batch, 1, 1, k)``. One kernel on CUDA, which writes one row
where the per-row probabilities would be ``q`` rows (and a mean over them another pass)."""


class QueryBlocks:
    """Within this context, the new tokens of a forward are independent query blocks.

    Parameters
    ----------
    attention_modules : the text model's attention modules
    blocks : lengths of the consecutive blocks (see :func:`block_query_mask`)
    lead : ordinary (causal) tokens before the blocks, which the blocks see
    """

    def __init__(self, attention_modules: list[nn.Module], blocks: list[int], lead: int = 0):
        self._modules = attention_modules
        self._blocks = list(blocks)
        self._lead = lead

    def __enter__(self) -> QueryBlocks:
        for module in self._modules:
            module.hermes_query_blocks = (self._lead, self._blocks)
        return self

    def __exit__(self, *exc: object) -> None:
        for module in self._modules:
            module.hermes_query_blocks = None


def _no_mask(*args: object, **kwargs: object) -> None:
    """Mask function for ``hermes_ragged``: the attention function builds its own."""
    return None


def register_attention() -> str:
    """Register the ragged attention function and its no-op mask; returns its name."""
    AttentionInterface.register(ATTENTION_NAME, ragged_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    return ATTENTION_NAME


def use_ragged_attention(model: torch.nn.Module) -> None:
    """Switch the text model to the ``hermes_ragged`` attention; vision towers keep sdpa."""
    name = register_attention()
    config = model.config
    sub_configs = getattr(config, "sub_configs", {}) or {}
    if "text_config" in sub_configs:
        setting = {key: ("sdpa" if key != "text_config" else name) for key in sub_configs}
        model.set_attn_implementation(setting)
    else:
        model.set_attn_implementation(name)


class PerLayerRotary:
    """Give each decoder layer its own rotary cos/sin for one forward.

    The model computes ``position_embeddings`` once from ``position_ids`` and shares them
    across layers; layers whose caches were compacted differently need the new tokens at
    different positions. A forward pre-hook swaps in each layer's own ``(cos, sin)``.

    Parameters
    ----------
    decoder_layers : the text model's decoder layers
    embeddings : per layer ``(cos, sin)`` as returned by the model's rotary module
    """

    def __init__(self, decoder_layers: list[nn.Module], embeddings: list[tuple[torch.Tensor, torch.Tensor]]):
        self._handles = []
        self._layers = decoder_layers
        self._embeddings = embeddings

    def __enter__(self) -> PerLayerRotary:
        for layer, emb in zip(self._layers, self._embeddings, strict=True):

            def hook(module: nn.Module, args: tuple, kwargs: dict, emb=emb) -> tuple[tuple, dict]:
                kwargs["position_embeddings"] = emb
                return args, kwargs

            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
