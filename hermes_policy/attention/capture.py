"""Attention probabilities, recorded from inside the forward: the probe's and the rules' one
mechanism.

An :class:`AttentionCapture` handed to a forward (in its
:class:`~hermes_policy.attention.context.AttentionContext`) receives, per layer, the softmax
probabilities of chosen query rows computed from that layer's own query states, under
TransformerLens-style names ``blocks.{layer}.attn.hook_pattern``. The probe, HERMES's
pseudo-queries and the calibration all read attention this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)
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
        bottom-right causal mask, i.e. the queries are the newest keys); or ``(kv_heads,
        q, k)``, one per KV head, shared by its query heads

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
    elif mask.dim() == 3:  # per KV head (query heads grouped as grouped_scores stacks them)
        kv_heads = key.shape[1]
        scores.view(batch, kv_heads, heads // kv_heads, rows, k_len).masked_fill_(~mask[:, None], float("-inf"))
    else:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


@dataclass
class AttentionCapture:
    """Record attention probabilities of chosen query rows, per layer and head.

    Hand it to a forward in an :class:`~hermes_policy.attention.context.AttentionContext`::

        cap = AttentionCapture(adapter.attention_modules, query_rows=slice(-8, None))
        adapter.forward(piece, positions, cache, attention=AttentionContext(capture=cap))
        cap.patterns["blocks.3.attn.hook_pattern"]   # (batch, heads, 8, keys)

    Parameters
    ----------
    attention_modules : the text model's attention modules, in layer order (their number is
        the default set of layers)
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

    In a forward with query blocks (:attr:`AttentionContext.blocks`), rows inside one block get probabilities over the keys that
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
        # None: every layer (a query_rows mapping still leaves out the layers it lacks)
        self._layers = None if self.layers is None else frozenset(self.layers)

    @staticmethod
    def hook_name(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_pattern"

    def rows(self, layer: int, q_len: int) -> range:
        """The query rows of a forward of ``q_len`` new tokens captured at ``layer``."""
        if self._layers is not None and layer not in self._layers:
            return range(0)
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
        shape ``(q - mask_offset, k)`` or per KV head ``(kv_heads, q - mask_offset, k)``
        (None: bottom-right causal); the captured rows must lie in it.
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
            query[:, :, picked.start : picked.stop : picked.step], key, scaling, mask[..., in_mask, :]
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


def weighted_head_and_row_mean(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(batch, heads, rows, keys)`` -> ``(batch, 1, 1, keys)``: the mean over heads, then
    the sum over the rows weighed by ``weights`` ``(rows,)``."""
    return (probs.mean(dim=1, keepdim=True) * weights[:, None]).sum(dim=-2, keepdim=True)
