"""Every layer's eviction gather in one Triton kernel, in place.

After a compression step each layer keeps some of its tokens (sorted indices, the prefix
included) at the front of its key/value buffer, and a layer with a summary token gets it
right after them. Per layer that is a gather into a temporary, a copy back and, with a
summary token, two more copies: on the LLaVA-OV-7B shape ~70 small kernels a step, each
with its launch gap. Here one program per (layer, key or value plane, range of columns)
walks its plane's kept rows in tiles, front to back, in place: kept indices are sorted and
distinct, so ``indices[j] >= j``, and a tile reads only rows at or after its own
destination rows, which no earlier tile wrote; inside a tile a barrier separates the reads
from the writes. Each layer's buffer, indices and summary token are found through a table
of addresses (the layers' buffers are separate allocations), rows are moved as 8-byte
words.

Triton (installed with torch on Linux); ``RuntimeOptions.compaction_kernel=False`` (or ``HERMES_COMPACTION_KERNEL=0``) turns it off, and
so does a first launch that fails (:func:`compact_layers` warns once and returns False:
the caller gathers layer by layer). On the CPU it runs only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before import).
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch ships Triton on Linux
    triton = None

from hermes_policy.cache.transfer import upload
from hermes_policy.kernels.switch import INTERPRETED, KernelSwitch

SWITCH = KernelSwitch("compaction_kernel", "compaction kernel", "gathering layer by layer")
TABLE_COLUMNS = 6  # buffer address, capacity, indices address, kept count, summary key and value addresses
# the launch: 128 rows a tile, 32 words of each row a program (a bf16 row of 128 whole), 8
# warps, the launch that benchmarks/compression_step_alternatives.py found fastest (its
# timings: docs/performance.md, "Measurements behind the runtime's code")
BLOCK_ROWS, COLS, NUM_WARPS = 128, 32, 8

if triton is not None:

    @triton.jit
    def _compact_kernel(
        table_ptr,
        planes,
        COLUMNS: tl.constexpr,
        WORDS: tl.constexpr,
        COLS: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
    ):
        # one program: one layer's key or value plane of one (batch, head), COLS words of
        # each row; its kept rows tile by tile, front to back
        layer = tl.program_id(0)
        plane = tl.program_id(1)  # (key or value) * planes + batch * heads + head
        cols = tl.program_id(2) * COLS + tl.arange(0, COLS)
        in_row = cols < WORDS
        entry = table_ptr + layer * COLUMNS
        capacity = tl.load(entry + 1)
        count = tl.load(entry + 3)
        base = tl.load(entry).to(tl.pointer_type(tl.int64)) + plane * capacity * WORDS
        indices = tl.load(entry + 2).to(tl.pointer_type(tl.int64))
        for first in range(0, count, BLOCK_ROWS):
            rows = first + tl.arange(0, BLOCK_ROWS)
            inside = rows < count
            source = tl.load(indices + rows, mask=inside, other=0)
            words = tl.load(base + source[:, None] * WORDS + cols[None, :], mask=inside[:, None] & in_row[None, :])
            # every read of the tile before any write: a row read here may be written here
            tl.debug_barrier()
            tl.store(base + rows[:, None] * WORDS + cols[None, :], words, mask=inside[:, None] & in_row[None, :])
            tl.debug_barrier()
        summary = tl.load(entry + 4 + plane // planes)  # the key's or the value's token, 0: none
        if summary != 0:
            token = summary.to(tl.pointer_type(tl.int64)) + (plane % planes) * WORDS
            tl.store(base + count * WORDS + cols, tl.load(token + cols, mask=in_row), mask=in_row)


def words_per_row(buffer: torch.Tensor) -> int | None:
    """8-byte words in one token's row ``(..., head_dim)`` of ``buffer``, or None when the
    row's bytes are not a whole number of words."""
    row_bytes = buffer.shape[-1] * buffer.element_size()
    return row_bytes // 8 if row_bytes % 8 == 0 else None


def address_table(
    buffers: list[torch.Tensor],
    indices: list[torch.Tensor],
    summaries: list[tuple[torch.Tensor, torch.Tensor] | None],
) -> np.ndarray:
    """The kernel's table, int64 ``(layers, TABLE_COLUMNS)``: per layer its buffer's
    address and capacity, its indices' address and count, its summary token's key and
    value addresses (0: none). Raises ValueError where the layers do not fit the kernel
    (see :func:`compact_layers_kernel`)."""
    if not (len(buffers) == len(indices) == len(summaries)) or not buffers:
        raise ValueError("one list entry per layer, at least one layer: buffers, indices and summaries")
    first = buffers[0]
    if words_per_row(first) is None:
        raise ValueError("the compaction kernel moves rows as 8-byte words")
    token_shape = (*first.shape[1:3], 1, first.shape[-1])
    table = np.zeros((len(buffers), TABLE_COLUMNS), dtype=np.int64)
    for row, (buffer, kept, summary) in enumerate(zip(buffers, indices, summaries, strict=True)):
        if buffer.dim() != 5 or buffer.shape[0] != 2:
            raise ValueError("a layer's buffer holds keys and values: (2, batch, kv_heads, capacity, head_dim)")
        if buffer.shape[:3] != first.shape[:3] or buffer.shape[-1] != first.shape[-1] or buffer.dtype != first.dtype:
            raise ValueError("every layer's buffer needs the same dtype, heads and head size")
        if not buffer.is_contiguous() or buffer.device != first.device:
            raise ValueError("the buffers must be contiguous and on one device")
        if kept.dtype != torch.int64 or kept.dim() != 1 or not kept.is_contiguous() or kept.device != first.device:
            raise ValueError("indices must be contiguous int64 vectors on the buffers' device")
        capacity = buffer.shape[3]
        if kept.shape[0] + (summary is not None) > capacity:
            raise ValueError(f"layer {row}: {kept.shape[0]} kept tokens and a summary exceed the capacity {capacity}")
        table[row, :4] = (buffer.data_ptr(), capacity, kept.data_ptr(), kept.shape[0])
        if summary is not None:
            for column, token in zip((4, 5), summary, strict=True):
                if tuple(token.shape) != token_shape or not token.is_contiguous():
                    raise ValueError(f"layer {row}: a summary token is a contiguous (batch, kv_heads, 1, head_dim)")
                if token.dtype != first.dtype or token.device != first.device:
                    raise ValueError(f"layer {row}: the summary token's dtype or device differs from the buffer's")
                table[row, column] = token.data_ptr()
    return table


def compact_layers_kernel(
    buffers: list[torch.Tensor],
    indices: list[torch.Tensor],
    summaries: list[tuple[torch.Tensor, torch.Tensor] | None],
    block_rows: int = BLOCK_ROWS,
    cols: int = COLS,
) -> bool:
    """Keep the rows ``indices[l]`` of each buffer at its front, then the summary token.

    Parameters
    ----------
    buffers : per layer, keys and values ``(2, batch, kv_heads, capacity, head_dim)``,
        contiguous, one dtype and head size for all, rows of whole 8-byte words
    indices : per layer, int64 ``(n_l,)`` on the buffers' device, contiguous: sorted,
        distinct, below the layer's length (the kernel relies on ``indices[j] >= j``)
    summaries : per layer, the summary token's key and value ``(batch, kv_heads, 1,
        head_dim)``, contiguous, written at row ``n_l``; or None

    Returns
    -------
    True. One table upload and one kernel, no host sync; the caller updates the layers'
    lengths.
    """
    return _launch(address_table(buffers, indices, summaries), buffers[0], block_rows, cols)


def _launch(table: np.ndarray, first: torch.Tensor, block_rows: int = BLOCK_ROWS, cols: int = COLS, num_warps: int = NUM_WARPS) -> bool:
    launch_with_table(upload(torch.from_numpy(table), first.device), first, block_rows, cols, num_warps)
    return True


def launch_with_table(
    device_table: torch.Tensor, first: torch.Tensor, block_rows: int = BLOCK_ROWS, cols: int = COLS, num_warps: int = NUM_WARPS
) -> None:
    """The kernel over an :func:`address_table` already on ``first``'s device (``first``:
    any layer's buffer, for the row layout), at a launch shape: ``block_rows`` rows a tile,
    ``cols`` words of each row a program, ``num_warps`` warps."""
    words = words_per_row(first)
    planes = first.shape[1] * first.shape[2]
    grid = (device_table.shape[0], 2 * planes, triton.cdiv(words, cols))
    # one stage: a tile's reads are not hoisted across the barrier before its writes
    _compact_kernel[grid](device_table, planes, COLUMNS=TABLE_COLUMNS, WORDS=words, COLS=cols, BLOCK_ROWS=block_rows, num_warps=num_warps, num_stages=1)


def available(device: torch.device) -> bool:
    """Whether :func:`compact_layers` runs here: enabled, on CUDA (or under the interpreter)."""
    return SWITCH.enabled() and (device.type == "cuda" or INTERPRETED)


def compact_layers(
    buffers: list[torch.Tensor],
    indices: list[torch.Tensor],
    summaries: list[tuple[torch.Tensor, torch.Tensor] | None],
) -> bool:
    """:func:`compact_layers_kernel`; False when it cannot run here or the layers do not
    fit it (nothing written then: the caller gathers layer by layer). The first failed
    launch turns it off for the process, with a warning."""
    if not buffers or not available(buffers[0].device):
        return False
    try:
        table = address_table(buffers, indices, summaries)
    except ValueError:
        return False
    return SWITCH.launch(_launch, table, buffers[0]) is not None
