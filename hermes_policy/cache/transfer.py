"""Copies between host and GPU that do not stall the GPU queue.

A plain ``tensor.to("cuda")`` from ordinary (pageable) host memory blocks the host until
the copy is done, and torch performs it in stream order, so the host first waits for every
kernel already queued: on the streaming hot path each such copy drained the pipeline (a
chunk's positions, a layer's kept indices). :func:`upload` stages the tensor in pinned
memory and copies asynchronously, so the host goes on queueing work.

Staging reuses a ring of pinned buffers (:class:`PinnedRing`): ``tensor.pin_memory()``
allocates pinned memory per call, far slower than copying into a buffer that is already
pinned (measured with ``benchmarks/profile_efficiency.py``; docs/performance.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class PinnedRing:
    """Pinned staging buffers reused in turn; a buffer is reused once its last copy ran.

    Parameters
    ----------
    slots : number of buffers
    slot_bytes : size of each (larger tensors are pinned on their own)
    """

    def __init__(self, slots: int, slot_bytes: int):
        self.slot_bytes = slot_bytes
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._next = 0

    def upload(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Copy a contiguous host ``tensor`` of at most ``slot_bytes`` to ``device`` without blocking."""
        nbytes = tensor.numel() * tensor.element_size()
        slot = self._next
        self._next = (slot + 1) % len(self._buffers)
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # the copy that last used this buffer (long done, normally)
        buffer = self._buffers[slot]
        if buffer is None:
            with torch.inference_mode(False):
                buffer = self._buffers[slot] = torch.empty(self.slot_bytes, dtype=torch.uint8, pin_memory=True)
        staged = buffer[:nbytes]
        # bytes through numpy: any dtype (bfloat16 included), no torch CPU dispatch
        np.copyto(staged.numpy(), tensor.reshape(-1).view(torch.uint8).numpy())
        out = staged.view(tensor.dtype).view(tensor.shape).to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        self._events[slot] = done
        return out


# small tensors (indices, positions) and chunks of frames
_RINGS = (PinnedRing(slots=32, slot_bytes=256 << 10), PinnedRing(slots=4, slot_bytes=8 << 20))


def upload(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``, without waiting for the GPU when it comes from the host.

    Same values as ``tensor.to(device)``; on a CUDA target, a host tensor is copied through
    pinned memory without blocking. Anything else is a plain ``.to``.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    tensor = tensor.contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    for ring in _RINGS:
        if 0 < nbytes <= ring.slot_bytes:
            return ring.upload(tensor, device)
    return tensor.pin_memory().to(device, non_blocking=True)


class StagingBuffers:
    """Pinned host buffers that downloads land in, taken in turn.

    A :meth:`Download.wait`'s arrays view the buffer its download took, so they stay valid
    until that buffer's turn comes round again: each consumer owns its set (the KV store's
    deferred bookkeeping reads them a while later), so that nobody else's downloads can
    overwrite them (a process may stream several sessions).

    Parameters
    ----------
    slots : number of buffers
    """

    def __init__(self, slots: int = 2):
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self.taken = 0  # buffers handed out so far

    @property
    def slots(self) -> int:
        return len(self._buffers)

    def take(self, nbytes: int) -> torch.Tensor:
        """The next buffer in turn, of at least ``nbytes`` bytes (grown when short)."""
        turn = self.taken % len(self._buffers)
        self.taken += 1
        buffer = self._buffers[turn]
        if buffer is None or buffer.numel() < nbytes:
            with torch.inference_mode(False):
                buffer = self._buffers[turn] = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)
        return buffer


class Download:
    """Device tensors on their way to the host: the copies are queued, :meth:`wait` waits for them.

    Tensors on GPUs are joined per device (one kernel each) and copied into one pinned
    staging buffer without blocking, so the host can queue more GPU work (the gathers that
    follow the copies in stream order) before it waits, and then work on the host while the
    GPU runs it. Host tensors pass through. The arrays :meth:`wait` returns view the staging
    buffer, which ``staging``'s next download but one reuses: read them before then.

    Parameters
    ----------
    tensors : what to copy back
    staging : where it lands (the caller's own buffers)
    """

    def __init__(self, tensors: list[torch.Tensor], staging: StagingBuffers):
        self._shapes = [tuple(t.shape) for t in tensors]
        self._host: list[np.ndarray | None] = [t.numpy() if t.device.type == "cpu" else None for t in tensors]
        remote: dict[torch.device, list[int]] = {}
        for i, tensor in enumerate(tensors):
            if tensor.device.type != "cpu":
                remote.setdefault(tensor.device, []).append(i)
        # per device: its members, its joined tensor (kept alive until its copy ran), and the
        # event after its copy (None: copied synchronously)
        self._pending: list[tuple[list[int], torch.Tensor, torch.cuda.Event | None]] = []
        self._staged: list[torch.Tensor] = []  # per device, where its values land on the host
        flats = {device: torch.cat([tensors[i].reshape(-1) for i in members]) for device, members in remote.items()}
        if not flats:
            return
        # one region of the staging buffer per device, each 16-byte aligned
        spans = [-(-(f.numel() * f.element_size()) // 16) * 16 for f in flats.values()]
        on_cuda = all(d.type == "cuda" for d in flats)
        staging_buffer = staging.take(sum(spans)) if on_cuda else None
        offset = 0
        for (device, flat), span in zip(flats.items(), spans, strict=True):
            if staging_buffer is None:
                self._staged.append(flat.cpu())
                self._pending.append((remote[device], flat, None))
                continue
            target = staging_buffer[offset : offset + flat.numel() * flat.element_size()].view(flat.dtype)
            offset += span
            target.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(device))
            self._staged.append(target)
            self._pending.append((remote[device], flat, done))

    def wait(self) -> list[np.ndarray]:
        """The tensors as numpy arrays, once their copies are done."""
        out = list(self._host)
        for (members, _, done), staged in zip(self._pending, self._staged, strict=True):
            if done is not None:
                done.synchronize()
            # numpy views of one numpy array, not a torch split and view per member: ~14x
            # less host time for a compression step's 36 arrays, right where the GPU waits
            # for the host's bookkeeping (benchmarks/eviction_bookkeeping.py)
            flat, start = staged.numpy(), 0
            for i in members:
                size = math.prod(self._shapes[i])
                out[i] = flat[start : start + size].reshape(self._shapes[i])
                start += size
        self._pending, self._staged = [], []
        return out  # type: ignore[return-value]
