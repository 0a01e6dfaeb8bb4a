"""The attention function the text model runs: ``hermes_ragged``, and its dispatch.

transformers builds one attention mask per forward from layer 0's cache length, which is
wrong once layers keep different numbers of tokens (TRAPS.md). We register our own
attention function with ``AttentionInterface`` (and a mask function that builds nothing)
and set it on the text model only. Each layer derives its mask from its own key length.

Which path a layer runs is decided by the forward's
:class:`~hermes_policy.attention.context.AttentionContext`, handed down by transformers
with the forward's keyword arguments:

- none, or no blocks: :mod:`~hermes_policy.attention.causal` (one token: plain SDPA);
- ``blocks``: :mod:`~hermes_policy.attention.blocks` (a lead, then independent queries);
- ``static_limits``: :mod:`~hermes_policy.attention.static` (fixed-shape answers);
- a ``head_masks`` entry for the layer (per-head retention): whatever the rest of the
  context asks, the explicit masked products of :mod:`~hermes_policy.attention.head_masks`.

A ``capture`` receives the probabilities of its rows, from the path's own log-sum-exp
where the path has it, else recomputed under the path's mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from hermes_policy import options
from hermes_policy.attention.blocks import lead_and_blocks_attention
from hermes_policy.attention.capture import AttentionCapture
from hermes_policy.attention.causal import causal_attention
from hermes_policy.attention.context import AttentionContext
from hermes_policy.attention.head_masks import head_masked_attention
from hermes_policy.attention.masks import block_query_mask, captured_block
from hermes_policy.attention.static import static_attention

ATTENTION_NAME = "hermes_ragged"
NO_CONTEXT = AttentionContext()


def ragged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attention_context: AttentionContext | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``hermes_ragged``.

    Parameters
    ----------
    module : the layer's attention module (its ``layer_idx`` picks the layer's context)
    query : ``(batch, heads, q, head_dim)``
    key, value : ``(batch, kv_heads, k, head_dim)``: this layer's whole cache plus the new tokens
    attention_mask : ignored (each path builds its own from the layer's key length)
    attention_context : this forward's context (None: plain causal attention)

    Returns
    -------
    (output ``(batch, q, heads, head_dim)``, None)
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("hermes_ragged attention does not support softcapping or attention sinks")
    context = attention_context or NO_CONTEXT
    layer = module.layer_idx
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    head_mask = context.head_mask(layer)
    if head_mask is not None:  # per-head retention: no fast path takes a per-head mask
        limits = None if context.static_limits is None else context.static_limits[layer]
        out = head_masked_attention(
            query, key, value, head_mask, scaling, context.blocks, limits, context.capture, layer
        )
        return out, None
    if context.static_limits is not None:
        blocked = None if context.static_blocked is None else context.static_blocked[layer]
        return static_attention(query, key, value, context.static_limits[layer], blocked, scaling), None
    capture = context.capture
    if context.blocks is not None:
        return _blocks(layer, query, key, value, context, scaling), None
    if query.shape[-2] == 1:
        gqa = query.shape[1] != key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
    else:
        out = causal_attention(query, key, value, scaling, steady=context.steady)
    if capture is not None:  # bottom-right causal, as the forward
        capture.record(layer, query, key, scaling)
    return out.transpose(1, 2).contiguous(), None


def _blocks(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    context: AttentionContext,
    scaling: float,
) -> torch.Tensor:
    """A lead and query blocks (:func:`lead_and_blocks_attention`), the capture's rows
    handed over from the same pass where they lie within one block."""
    lead, sizes = context.blocks
    capture: AttentionCapture | None = context.capture
    q_len, k_len = query.shape[-2], key.shape[-2]
    picked = capture.rows(layer, q_len) if capture is not None else range(0)
    # rows within one block: their probabilities come with the attention (no second pass)
    within = captured_block(picked, lead, list(sizes)) is not None
    out, probs = lead_and_blocks_attention(
        query,
        key,
        value,
        lead,
        list(sizes),
        scaling,
        keep_rows=(picked.start - lead, picked.stop - lead) if within else None,
        head_mean=capture is not None and capture.head_mean,
        lead_read=context.lead_read,
        row_weights=capture.weights_of(layer, query.device) if capture is not None else None,
        steady=context.steady,
        blocks_with_chunk=options.current().blocks_with_chunk,
    )
    if probs is not None:
        capture.hand_over(layer, probs)
    elif len(picked):  # rows in the lead or across blocks: over all keys, under the block mask
        capture.record(layer, query, key, scaling, block_query_mask(list(sizes), k_len, query.device, lead))
    return out.transpose(1, 2).contiguous()


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
