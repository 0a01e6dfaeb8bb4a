"""Several layers' summary tokens in one Triton kernel and one small reduction.

A layer's summary token is the mean of its evicted keys, each rotated to the summary's
position (rounded to the keys' dtype after the rotation), and the mean of their values
(:data:`~hermes_policy.retention.scoring.evicted_summary`, the fallback where this kernel
does not run, and what the tests compare it with). That fallback is one compiled
reduction per layer, latency-bound, since one layer makes few programs. Here one program per (layer, batch and KV head, range of
the evicted tokens) gathers its tokens' keys and values from the layer's cache in tiles,
rotates the keys in float32 (each row's two halves loaded apart, products and sums
rounded one by one as in the reference: no fused multiply-add), rounds them to the keys'
dtype, and writes float32 sums of its range; a second kernel, one program per (layer,
batch and KV head), adds the ranges' sums in a fixed order (no atomics: the same inputs
give the same bits), divides by the count and rounds to the keys' dtype. The ranges are
as many as keep about :data:`PROGRAMS_PER_SM` programs on each multiprocessor
(:func:`default_splits`). Each layer's key and value caches are found through a table of
addresses and strides (the layers' buffers are separate allocations, and their views
change length from call to call); the evicted indices and rotations of all the layers
come as one tensor each. Nothing that changes from call to call (the layers, the evicted
count, the cache lengths and addresses) is compiled into the kernels.

Triton (installed with torch on Linux); ``RuntimeOptions.summary_kernel=False`` (or ``HERMES_SUMMARY_KERNEL=0``) turns it off, and so
does a first launch that fails (:func:`evicted_summaries` warns once and returns None:
the caller computes each layer's summary on its own). On the CPU it runs only under
Triton's interpreter (``TRITON_INTERPRET=1``, set before import), whose float32 to
bfloat16 conversion truncates where the GPU rounds to nearest (the tests give it torch's).
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
from hermes_policy.kernels.block_attention_kernel import multiprocessors
from hermes_policy.kernels.switch import INTERPRETED, KernelSwitch

SWITCH = KernelSwitch("summary_kernel", "summary kernel", "computing each layer's summary on its own")
TABLE_COLUMNS = 6  # keys' address, batch and head strides; values' address, batch and head strides
# the gather's programs: about eight on each multiprocessor, of one warp each, 32 evicted
# tokens a tile, the launch that benchmarks/compression_step_alternatives.py found fastest
# (its timings: docs/performance.md, "Measurements behind the runtime's code")
PROGRAMS_PER_SM = 8
NUM_WARPS = 1

if triton is not None:
    _TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

    # the evicted count and the ranges change from call to call (the layers' lengths and
    # addresses come through the table): specialised on each value's divisibility they
    # would compile a new kernel (~1 s, inside a stream) for new ones
    @triton.jit(do_not_specialize=["n", "splits"])
    def _summary_sums_kernel(
        table_ptr,
        evicted_ptr,
        cos_ptr,
        sin_ptr,
        key_sums_ptr,
        value_sums_ptr,
        stride_t,
        kv_heads,
        n,
        splits,
        COLUMNS: tl.constexpr,
        DTYPE: tl.constexpr,
        ALIGN: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # one program: one layer's (batch, KV head), its range of the evicted tokens tile by
        # tile; sums (layers, planes, splits, HEAD_DIM) float32
        member = tl.program_id(0).to(tl.int64)
        plane = tl.program_id(1)
        split = tl.program_id(2)
        planes = tl.num_programs(1)
        entry = table_ptr + member * COLUMNS
        batch = plane // kv_heads
        head = plane % kv_heads
        # addresses and strides checked in address_table to be whole multiples of 16 bytes:
        # said here, the rows load in 16-byte vectors
        key_base = tl.multiple_of(tl.load(entry), 16).to(tl.pointer_type(DTYPE))
        key_base += tl.multiple_of(batch * tl.load(entry + 1) + head * tl.load(entry + 2), ALIGN)
        value_base = tl.multiple_of(tl.load(entry + 3), 16).to(tl.pointer_type(DTYPE))
        value_base += tl.multiple_of(batch * tl.load(entry + 4) + head * tl.load(entry + 5), ALIGN)
        # the range: tiles [split * tiles // splits, (split + 1) * tiles // splits), none empty
        # while splits <= tiles
        tiles = tl.cdiv(n, BLOCK_N)
        first = (split * tiles // splits) * BLOCK_N
        last = tl.minimum(((split + 1) * tiles // splits) * BLOCK_N, n)
        # a row's two halves apart: rotate_half maps (x1, x2) to (-x2, x1)
        d = tl.arange(0, HALF)
        low_sum = tl.zeros([HALF], tl.float32)
        high_sum = tl.zeros([HALF], tl.float32)
        value_low = tl.zeros([HALF], tl.float32)
        value_high = tl.zeros([HALF], tl.float32)
        for start in range(first, last, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            inside = rows < last
            token = tl.load(evicted_ptr + member * n + rows, mask=inside, other=0)
            at = token[:, None] * stride_t + d[None, :]
            low = tl.load(key_base + at, mask=inside[:, None], other=0.0).to(tl.float32)
            high = tl.load(key_base + at + HALF, mask=inside[:, None], other=0.0).to(tl.float32)
            angle = (member * n + rows)[:, None] * HEAD_DIM + d[None, :]
            cos_low = tl.load(cos_ptr + angle, mask=inside[:, None], other=0.0)
            cos_high = tl.load(cos_ptr + angle + HALF, mask=inside[:, None], other=0.0)
            sin_low = tl.load(sin_ptr + angle, mask=inside[:, None], other=0.0)
            sin_high = tl.load(sin_ptr + angle + HALF, mask=inside[:, None], other=0.0)
            # in float32 as the reference (x * cos + rotate_half(x) * sin; a - b is a + (-b)
            # exactly), rounded to the keys' dtype after the rotation
            low_sum += tl.sum((low * cos_low - high * sin_low).to(DTYPE).to(tl.float32), axis=0)
            high_sum += tl.sum((high * cos_high + low * sin_high).to(DTYPE).to(tl.float32), axis=0)
            value_low += tl.sum(tl.load(value_base + at, mask=inside[:, None], other=0.0).to(tl.float32), axis=0)
            value_high += tl.sum(tl.load(value_base + at + HALF, mask=inside[:, None], other=0.0).to(tl.float32), axis=0)
        out = ((member * planes + plane) * splits + split) * HEAD_DIM + d
        tl.store(key_sums_ptr + out, low_sum)
        tl.store(key_sums_ptr + out + HALF, high_sum)
        tl.store(value_sums_ptr + out, value_low)
        tl.store(value_sums_ptr + out + HALF, value_high)

    @triton.jit(do_not_specialize=["n", "splits"])
    def _summary_mean_kernel(
        key_sums_ptr,
        value_sums_ptr,
        key_ptr,
        value_ptr,
        n,
        splits,
        HEAD_DIM: tl.constexpr,
    ):
        # one program: one layer's (batch, KV head); its ranges' sums in order, over n
        member = tl.program_id(0).to(tl.int64)
        plane = tl.program_id(1)
        row = member * tl.num_programs(1) + plane
        d = tl.arange(0, HEAD_DIM)
        key_sum = tl.zeros([HEAD_DIM], tl.float32)
        value_sum = tl.zeros([HEAD_DIM], tl.float32)
        for split in range(splits):
            at = (row * splits + split) * HEAD_DIM + d
            key_sum += tl.load(key_sums_ptr + at)
            value_sum += tl.load(value_sums_ptr + at)
        count = n.to(tl.float32)
        tl.store(key_ptr + row * HEAD_DIM + d, (key_sum / count).to(key_ptr.dtype.element_ty))
        tl.store(value_ptr + row * HEAD_DIM + d, (value_sum / count).to(value_ptr.dtype.element_ty))


def address_table(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    evicted: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> np.ndarray:
    """The kernel's table, int64 ``(layers, TABLE_COLUMNS)``: per layer its keys' address,
    batch and head strides, then its values'. Raises ValueError where the layers do not fit
    the kernel (see :func:`evicted_summaries_kernel`)."""
    if len(keys) != len(values) or not keys:
        raise ValueError("one keys and one values tensor per layer, at least one layer")
    first = keys[0]
    if first.dim() != 4:
        raise ValueError("a layer's keys and values are (batch, kv_heads, seq, head_dim)")
    if first.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"the summary kernel reads bfloat16, float16 or float32 caches, not {first.dtype}")
    dim = first.shape[-1]
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"the head size must be a power of two of at least 16, not {dim}")
    token_stride = first.stride(-2)
    table = np.zeros((len(keys), TABLE_COLUMNS), dtype=np.int64)
    for row, (key, value) in enumerate(zip(keys, values, strict=True)):
        for cache in (key, value):
            if cache.dim() != 4 or cache.shape[:2] != first.shape[:2] or cache.shape[-1] != dim:
                raise ValueError("every layer's keys and values need the same batch, heads and head size")
            if cache.dtype != first.dtype or cache.device != first.device:
                raise ValueError("every layer's keys and values need one dtype and one device")
            if cache.stride(-1) != 1 or cache.stride(-2) != token_stride:
                raise ValueError("every layer's tokens must be rows of unit stride, one token stride for all")
            if cache.data_ptr() % 16 or any(stride * cache.element_size() % 16 for stride in cache.stride()[:3]):
                raise ValueError("every layer's keys and values must start and step in whole 16-byte units")
        if value.shape != key.shape:
            raise ValueError(f"layer {row}: its keys and values differ in shape")
        table[row] = (key.data_ptr(), key.stride(0), key.stride(1), value.data_ptr(), value.stride(0), value.stride(1))
    m = len(keys)
    if evicted.dtype != torch.int64 or evicted.dim() != 2 or evicted.shape[0] != m or evicted.shape[1] == 0:
        raise ValueError("evicted must be int64 (layers, n), n >= 1")
    if not evicted.is_contiguous() or evicted.device != first.device:
        raise ValueError("evicted must be contiguous, on the caches' device")
    for angle in (cos, sin):
        if angle.dtype != torch.float32 or tuple(angle.shape) != (m, evicted.shape[1], dim):
            raise ValueError("cos and sin must be float32 (layers, n, head_dim)")
        if not angle.is_contiguous() or angle.device != first.device:
            raise ValueError("cos and sin must be contiguous, on the caches' device")
    return table


def default_splits(layers: int, planes: int, n: int, block_n: int, device: torch.device) -> int:
    """Ranges of the evicted tokens for ``layers * planes`` programs of each: about
    :data:`PROGRAMS_PER_SM` programs for each of the device's multiprocessors, at least one
    range, at most one tile of ``block_n`` tokens a range."""
    return max(1, min(triton.cdiv(n, block_n), PROGRAMS_PER_SM * multiprocessors(device) // (layers * planes)))


def evicted_summaries_kernel(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    evicted: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    splits: int | None = None,
    block_n: int = 32,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's summary token straight from its cache, all layers in one launch.

    Parameters
    ----------
    keys, values : per layer ``i``, its cache ``(batch, kv_heads, seq_i, head_dim)`` (views
        of a longer buffer, as the stream cache's are): one dtype (bfloat16, float16 or
        float32), batch, head count and head size (a power of two of at least 16) and
        device for all, rows of unit stride and one token stride
    evicted : int64 ``(layers, n)``, contiguous, on the caches' device: row ``i`` indexes
        layer ``i``'s tokens (any order; below ``seq_i``, which is not checked)
    cos, sin : float32 ``(layers, n, head_dim)``, contiguous: the rotation that moves each
        evicted key to its layer's summary position
    splits : ranges of the evicted tokens, each summed by its own programs (default
        :func:`default_splits`)
    block_n : evicted tokens a program gathers at a time
    num_warps : warps of each program of the gather

    Returns
    -------
    key, value : ``(layers, batch, kv_heads, 1, head_dim)`` in the caches' dtype: per layer
        :data:`~hermes_policy.retention.scoring.evicted_summary` of its cache (up to the
        order in which the float32 sums add up). One table upload and two kernels, no host
        sync.
    """
    table = upload(torch.from_numpy(address_table(keys, values, evicted, cos, sin)), keys[0].device)
    return launch_with_table(table, keys[0], evicted, cos, sin, splits, block_n, num_warps)


def launch_with_table(
    device_table: torch.Tensor,
    first: torch.Tensor,
    evicted: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    splits: int | None = None,
    block_n: int = 32,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kernels over an :func:`address_table` already on ``first``'s device
    (``first``: any layer's keys, for the shapes); arguments as
    :func:`evicted_summaries_kernel`'s."""
    batch, kv_heads, _, dim = first.shape
    layers, n = evicted.shape
    planes = batch * kv_heads
    splits = splits or default_splits(layers, planes, n, block_n, first.device)
    sums = torch.empty(2, layers, planes, splits, dim, dtype=torch.float32, device=first.device)
    out = torch.empty(2, layers, batch, kv_heads, 1, dim, dtype=first.dtype, device=first.device)
    _summary_sums_kernel[(layers, planes, splits)](
        device_table,
        evicted,
        cos,
        sin,
        sums[0],
        sums[1],
        first.stride(-2),
        kv_heads,
        n,
        splits,
        COLUMNS=TABLE_COLUMNS,
        DTYPE=_TRITON_DTYPES[first.dtype],
        ALIGN=16 // first.element_size(),
        HEAD_DIM=dim,
        HALF=dim // 2,
        BLOCK_N=block_n,
        num_warps=num_warps,
        enable_fp_fusion=False,  # the products and their sum rounded one by one, as the reference
    )
    _summary_mean_kernel[(layers, planes)](sums[0], sums[1], out[0], out[1], n, splits, HEAD_DIM=dim, num_warps=1)
    return out[0], out[1]


def available(device: torch.device) -> bool:
    """Whether :func:`evicted_summaries` runs here: enabled, on CUDA (or under the interpreter)."""
    return SWITCH.enabled() and (device.type == "cuda" or INTERPRETED)


def evicted_summaries(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    evicted: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`evicted_summaries_kernel`; None when it cannot run here or the layers do not
    fit it (the caller computes each layer's summary on its own). The first failed launch
    turns it off for the process, with a warning."""
    if not keys or not available(keys[0].device):
        return None
    try:
        table = address_table(keys, values, evicted, cos, sin)
    except ValueError:
        return None
    return SWITCH.launch(launch_with_table, upload(torch.from_numpy(table), keys[0].device), keys[0], evicted, cos, sin)
