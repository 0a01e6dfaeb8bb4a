"""Frames as a session receives them, and as a chunk is encoded."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hermes_policy.errors import StreamError


def stack_frames(frames: list[Any]) -> Any:
    """One chunk's frames as one array, tensor or list of text frames (one shape, or a
    StreamError)."""
    first = frames[0]
    if isinstance(first, str):
        return list(frames)
    shapes = {tuple(np.shape(f)) for f in frames}
    if len(shapes) > 1:
        raise StreamError(f"frames of one chunk must share one shape, got {sorted(shapes)}")
    if isinstance(first, torch.Tensor):
        return torch.stack(frames)
    return np.stack(frames)


def split_frames(frames: Any) -> list[Any]:
    """Frames handed to ``add_frames`` (one text frame, an array or tensor with frames on
    its first axis, or an iterable) as a list of frames."""
    if isinstance(frames, str):
        return [frames]
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        return list(frames)
    return list(frames)
