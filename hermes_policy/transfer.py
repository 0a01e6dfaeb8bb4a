"""Host-to-device copies that do not stall the GPU queue.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory blocks the host until
the copy is done, and torch performs it in stream order, so the host first waits for every
kernel already queued: on the streaming hot path each such copy drained the pipeline (a
chunk's positions, a layer's kept indices). :func:`upload` stages the tensor in pinned
memory (torch's caching host allocator keeps the block until the copy has run) and copies
asynchronously, so the host goes on queueing work.
"""

from __future__ import annotations

import torch


def upload(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``, without waiting for the GPU when it comes from the host.

    Same values as ``tensor.to(device)``; on a CUDA target, a host tensor is copied through
    pinned memory without blocking. Anything else is a plain ``.to``.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
