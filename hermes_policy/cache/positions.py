"""Positions and rotary deltas: the one home of position arithmetic.

Positions are stored per layer as integer tensors of shape ``(axes, seq)``: ``axes == 1``
for ordinary 1D RoPE (Llama, Qwen2, LLaVA-OneVision) and ``axes == 3`` for multimodal
RoPE (t, h, w) as used by Qwen2.5-VL and Qwen3-VL. Rotations are computed with the
model's own rotary module, so channel layouts (Qwen2.5-VL's sectioned M-RoPE, Qwen3-VL's
interleaved M-RoPE, Llama-3 frequency scaling) come from transformers and are not
re-implemented here.

Why a rotary delta works: RoPE rotates every channel pair ``i`` of a key at position ``p``
by the angle ``p * theta_i``. Rotating an already-rotated key by ``(p_new - p_old) *
theta_i`` therefore gives exactly the key that would have been computed at ``p_new``,
without the hidden state that produced it.
"""

from __future__ import annotations

import torch
from torch import nn

from hermes_policy.cache.transfer import upload


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension: ``(x1, x2) -> (-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def to_model_position_ids(positions: torch.Tensor) -> torch.Tensor:
    """Convert stored positions to the layout a model's forward expects.

    Parameters
    ----------
    positions : LongTensor, shape ``(axes, seq)``

    Returns
    -------
    LongTensor
        ``(1, seq)`` for 1D RoPE, ``(3, 1, seq)`` for multimodal RoPE.
    """
    if positions.shape[0] == 1:
        return positions
    return positions.unsqueeze(1)


def rotary_cos_sin(
    rotary_emb: nn.Module, positions: torch.Tensor, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled rotary cos/sin for arbitrary (possibly negative) positions, in float32.

    Parameters
    ----------
    rotary_emb : the model's rotary embedding module (``model.rotary_emb``)
    positions : LongTensor, shape ``(axes, seq)``

    Returns
    -------
    cos, sin : FloatTensor, shape ``(1, seq, head_dim)``
        Without the module's ``attention_scaling`` (YaRN-style magnitude scaling), so that
        they describe a pure rotation.
    """
    device = device if device is not None else positions.device
    # computed where the module's frequencies live (a model split over GPUs keeps one
    # rotary module), then moved to where the keys are
    home = next(iter(rotary_emb.buffers()), None)
    home_device = home.device if home is not None and home.device.type != "meta" else device
    probe = torch.zeros(1, dtype=torch.float32, device=home_device)
    cos, sin = rotary_emb(probe, to_model_position_ids(upload(positions, home_device)))
    scale = float(getattr(rotary_emb, "attention_scaling", 1.0))
    if scale != 1.0:
        cos, sin = cos / scale, sin / scale
    return cos.float().to(device), sin.float().to(device)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (shape ``(batch, heads, seq, head_dim)``) by ``cos``/``sin`` ``(1, seq, head_dim)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def rerotate_keys(
    keys: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor, rotary_emb: nn.Module
) -> torch.Tensor:
    """Move cached keys from ``old_positions`` to ``new_positions`` by a rotary delta.

    Parameters
    ----------
    keys : Tensor, shape ``(batch, kv_heads, seq, head_dim)``, RoPE already applied
    old_positions, new_positions : LongTensor, shape ``(axes, seq)``
    rotary_emb : the model's rotary embedding module

    Returns
    -------
    Tensor, same shape and dtype as ``keys``: ``RoPE(new - old) @ keys``, computed in float32.
    """
    # the difference where the positions live; on the host, a zero shift is skipped (on a
    # GPU the check would wait for it, and a rotation by zero leaves the keys as they are,
    # up to rounding where the module scales its cos/sin)
    delta = new_positions - old_positions.to(new_positions.device)
    if delta.device.type == "cpu" and not bool(delta.any()):
        return keys
    cos, sin = rotary_cos_sin(rotary_emb, delta, keys.device)
    return apply_rotation(keys, cos, sin)


def dense_rank(values: torch.Tensor) -> torch.Tensor:
    """Rank of each value among the distinct values, 0-based: ``[7, 3, 7, 9] -> [1, 0, 1, 2]``."""
    _, inverse = torch.unique(values, sorted=True, return_inverse=True)
    return inverse


def compact_positions(positions: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Left-compact stream positions after a fixed prefix (METHOD.md section 7).

    The first ``prefix_len`` tokens (the system prefix) keep their positions. Each axis of
    the remaining tokens is replaced by ``offset + dense_rank(axis)``, where ``offset`` is
    one past the prefix's largest position. For 1D positions this is ``offset + rank``; for
    3D M-RoPE each of t, h and w is compacted independently, as the paper does.

    Parameters
    ----------
    positions : LongTensor, shape ``(axes, seq)``
    prefix_len : number of leading tokens that never move

    Returns
    -------
    LongTensor, shape ``(axes, seq)``
    """
    if positions.shape[1] <= prefix_len:
        return positions.clone()
    offset = int(positions[:, :prefix_len].max()) + 1 if prefix_len > 0 else 0
    stream = torch.stack([dense_rank(axis) for axis in positions[:, prefix_len:]]) + offset
    return torch.cat([positions[:, :prefix_len], stream], dim=1)


def next_free_position(positions: torch.Tensor) -> int:
    """First position after every stored token: ``max over axes and tokens + 1`` (0 if empty).

    Text that follows a video restarts all three M-RoPE axes here, the convention of
    Qwen2-VL's original position scheme (see README: "Positions").
    """
    if not positions.numel():
        return 0
    # numpy on the host: a torch reduction on the CPU costs far more (thread pool start-up)
    highest = positions.numpy().max() if positions.device.type == "cpu" else positions.max()
    return int(highest) + 1
