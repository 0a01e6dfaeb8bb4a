"""Bilinear 2x pooling of patch grids as one matrix product.

LLaVA-OneVision pools each video frame's patch grid (27x27 -> 14x14 for the 384px/14
checkpoints) with ``F.interpolate(mode="bilinear")``, whose bf16 CUDA kernel is slow at
these shapes (measured with ``benchmarks/profile_efficiency.py``; docs/performance.md).
Bilinear resampling is linear and separable, so the same result is one small matrix
``(out_h * out_w, in_h * in_w)`` applied to every frame and channel: one float32 matmul.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def bilinear_weights(in_size: int, out_size: int) -> torch.Tensor:
    """FloatTensor ``(out_size, in_size)``: PyTorch's bilinear resampling along one axis.

    Same rule as ``F.interpolate(mode="bilinear", align_corners=False)`` given an output
    size: source coordinate ``(dst + 0.5) * in / out - 0.5`` clamped at 0, split between
    its two neighbours (the upper one clamped to the last index).
    """
    scale = in_size / out_size
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for dst in range(out_size):
        src = max((dst + 0.5) * scale - 0.5, 0.0)
        low = int(src)
        high = min(low + 1, in_size - 1)
        frac = src - low
        weights[dst, low] += 1.0 - frac
        weights[dst, high] += frac
    return weights.float()


@lru_cache(maxsize=8)
def _grid_weights(height: int, width: int, out_h: int, out_w: int, device: torch.device) -> torch.Tensor:
    rows, cols = bilinear_weights(height, out_h), bilinear_weights(width, out_w)
    return torch.kron(rows, cols).to(device)  # (out_h * out_w, height * width)


def bilinear_pool(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Halve a row-major patch grid with bilinear resampling (output size rounded up).

    Parameters
    ----------
    features : Tensor ``(frames, height * width, channels)``

    Returns
    -------
    Tensor ``(frames, ceil(height / 2) * ceil(width / 2), channels)``, same dtype: what
    LLaVA-OneVision's ``apply_pooling`` returns, computed in float32 and rounded once.
    """
    frames, tokens, channels = features.shape
    if tokens != height * width:
        raise ValueError(f"{tokens} tokens do not form a {height}x{width} grid")
    weights = _grid_weights(height, width, math.ceil(height / 2), math.ceil(width / 2), features.device)
    return torch.matmul(weights, features.float()).to(features.dtype)
