"""Summary tokens as METHOD.md section 5 writes them: the reference the runtime's summary
paths are tested against (:data:`hermes_policy.retention.scoring.evicted_summary` and the
summary kernel).

The evicted tokens are gathered first, their keys re-rotated to the summary's position with
:func:`~hermes_policy.cache.positions.rerotate_keys` (so RoPE phases do not cancel), then
keys and values averaged.
"""

from __future__ import annotations

import torch
from torch import nn

from hermes_policy.cache.positions import rerotate_keys


def summary_token(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    target: torch.Tensor,
    rotary_emb: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold evicted tokens into one (METHOD.md section 5).

    Parameters
    ----------
    keys, values : ``(batch, kv_heads, n, head_dim)`` of the evicted tokens (keys rotated)
    positions : ``(axes, n)`` their positions
    target : ``(axes, 1)`` the summary token's position

    Returns
    -------
    key, value : ``(batch, kv_heads, 1, head_dim)``: the mean of the keys after each was
        re-rotated to ``target`` (so RoPE phases do not cancel), and the mean value.
    """
    key, value = summary_tokens(keys[None], values[None], positions[None], target[None], rotary_emb)
    return key[0], value[0]


def summary_tokens(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    rotary_emb: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`summary_token` of several layers at once (one rotation, one mean), from their
    evicted tokens gathered.

    Parameters
    ----------
    keys, values : ``(layers, batch, kv_heads, n, head_dim)``: each layer's ``n`` evicted tokens
    positions : ``(layers, axes, n)`` their positions
    targets : ``(layers, axes, 1)`` each layer's summary position

    Returns
    -------
    key, value : ``(layers, batch, kv_heads, 1, head_dim)``
    """
    layers, batch, kv_heads, n, dim = keys.shape
    # the layers side by side along the sequence axis: one rotary call for all of them
    flat = keys.permute(1, 2, 0, 3, 4).reshape(batch, kv_heads, layers * n, dim)
    old = positions.permute(1, 0, 2).reshape(positions.shape[1], layers * n)
    new = targets.expand(-1, -1, n).permute(1, 0, 2).reshape(old.shape)
    moved = rerotate_keys(flat, old, new, rotary_emb).view(batch, kv_heads, layers, n, dim)
    key = moved.float().mean(dim=-2, keepdim=True).permute(2, 0, 1, 3, 4).to(keys.dtype)
    value = values.float().mean(dim=-2, keepdim=True).to(values.dtype)
    return key, value
