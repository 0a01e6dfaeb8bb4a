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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "hermes_ragged"

PatternCallback = Callable[[int, torch.Tensor], None]


def bottom_right_causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask ``(q_len, k_len)``; True where query ``i`` may attend key ``j``.

    The ``q_len`` queries are the last ``q_len`` keys: ``j <= k_len - q_len + i``.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


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
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    if mask is None:
        mask = bottom_right_causal_mask(query.shape[-2], key.shape[-2], query.device)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


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
    """

    attention_modules: list[nn.Module]
    layers: Iterable[int] | None = None
    query_rows: slice | dict[int, slice] = field(default_factory=lambda: slice(None))
    callback: PatternCallback | None = None
    patterns: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: int = 0

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

    def record(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Compute and hand over the probabilities of the selected query rows of one layer.

        ``mask`` is the boolean ``(q, k)`` mask the forward used (None: bottom-right causal).
        """
        self.calls += 1
        q_len, k_len = query.shape[-2], key.shape[-2]
        selection = self.query_rows.get(layer) if isinstance(self.query_rows, dict) else self.query_rows
        if selection is None:
            return
        rows = torch.arange(q_len, device=query.device)[selection]
        if rows.numel() == 0:
            return
        if mask is None:
            mask = bottom_right_causal_mask(q_len, k_len, query.device)
        probs = attention_probabilities(query[:, :, rows], key, scaling, mask[rows])
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
    blocks = getattr(module, "hermes_query_blocks", None)
    if blocks is not None:
        mask = block_query_mask(blocks, k_len, query.device)
    else:
        mask = None if q_len == 1 else bottom_right_causal_mask(q_len, k_len, query.device)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    capture = getattr(module, "hermes_capture", None)
    if capture is not None:
        capture.record(module.layer_idx, query, key, scaling, mask)
    return out.transpose(1, 2).contiguous(), None


def block_query_mask(blocks: list[int], k_len: int, device: torch.device) -> torch.Tensor:
    """Mask ``(q, k)`` for several independent queries prefilled together on one cache.

    The new tokens are ``sum(blocks)`` queries made of consecutive blocks; each block sees
    the whole cache (the first ``k_len - q`` keys) and, causally, its own tokens only, so
    one forward computes what separate forwards of each block would.
    """
    q_len = sum(blocks)
    cache = k_len - q_len
    mask = torch.zeros(q_len, k_len, dtype=torch.bool, device=device)
    mask[:, :cache] = True
    start = 0
    for size in blocks:
        block = torch.ones(size, size, dtype=torch.bool, device=device).tril()
        mask[start : start + size, cache + start : cache + start + size] = block
        start += size
    return mask


class QueryBlocks:
    """Within this context, the new tokens of a forward are independent query blocks.

    Parameters
    ----------
    attention_modules : the text model's attention modules
    blocks : lengths of the consecutive blocks (see :func:`block_query_mask`)
    """

    def __init__(self, attention_modules: list[nn.Module], blocks: list[int]):
        self._modules = attention_modules
        self._blocks = list(blocks)

    def __enter__(self) -> QueryBlocks:
        for module in self._modules:
            module.hermes_query_blocks = self._blocks
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
