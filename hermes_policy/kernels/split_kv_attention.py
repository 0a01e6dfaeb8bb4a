"""The answer's attention over a layer's buffer as one split-key pass (flash decoding).

A question's prefill and each decode step attend from a few rows (16 question tokens, or
one new token, times the query heads of each KV head) to the ~4K keys a layer keeps. The
explicit path (:func:`~hermes_policy.graphs.static_forward.biased_slot_attention`: a score
product writing float32 scores, a softmax, a value product) writes and reads the scores
as often as it reads the keys, and its products run on a few thread blocks: it takes many
times as long as reading the keys and values once (docs/performance.md). Here the keys are split into ranges, one program per
(KV head, block of rows, range) computes its partial softmax in registers (online, as
flash attention does), and a second kernel merges the ranges by their log-sum-exp.

Each row sees the slots ``0 .. limit`` of its token (the cache, then the question's own
tokens causally): the mask is computed from ``limits`` inside the kernel, and ranges past
the largest limit are not read, so the window's spare slots cost nothing.

The kernels are Triton (installed with torch on Linux); :func:`available` says whether
they can run on a device for a head size. ``RuntimeOptions.split_kv_kernel=False`` (or ``HERMES_SPLIT_KV=0``)
turns them off, and so
does a first launch that fails (a GPU or Triton build without them: :func:`attend`
warns once and the callers' explicit path runs from then on). On the CPU they run only
under Triton's interpreter (``TRITON_INTERPRET=1``, set before import; the tests do that
in a subprocess).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch ships Triton on Linux
    triton = None

from hermes_policy.kernels.switch import KernelSwitch

SWITCH = KernelSwitch("split_kv_kernel", "split-key attention kernel", "using explicit attention")


def available(device: torch.device, head_dim: int) -> bool:
    """Whether :func:`split_kv_slot_attention` runs here (:meth:`KernelSwitch.available`)."""
    return SWITCH.available(device, head_dim)


if triton is not None:

    @triton.jit
    def _partial_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        limit_ptr,
        part_out_ptr,
        part_lse_ptr,
        stride_qt,
        stride_qh,
        stride_kh,
        stride_kn,
        stride_vh,
        stride_vn,
        q_len,
        rows,
        rows_padded,
        kv_heads,
        window,
        scale,
        GROUPS: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # one program: a KV head, a block of its rows (query head within the group, then
        # token), one range of keys
        row_blocks = tl.cdiv(rows, BLOCK_R)
        kv_head = tl.program_id(0) // row_blocks
        r = (tl.program_id(0) % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        split = tl.program_id(1)
        valid = r < rows
        token = r % q_len
        head = kv_head * GROUPS + r // q_len
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=valid[:, None], other=0.0
        )
        limit = tl.load(limit_ptr + token, mask=valid, other=-1)
        top = tl.minimum(tl.max(limit, axis=0) + 1, window)  # no row sees a key from here on
        per_split = tl.cdiv(tl.cdiv(top, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * per_split
        hi = tl.minimum(lo + per_split, top)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            in_range = n < hi
            k = tl.load(k_ptr + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :], mask=in_range[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where((n[None, :] <= limit[:, None]) & in_range[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            # a row that has seen nothing yet keeps -inf: shift by 0 there (exp(-inf) = 0)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - shift[:, None])
            rescale = tl.exp(m - shift)
            total = total * rescale + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_head * stride_vh + n[:, None] * stride_vn + d[None, :], mask=in_range[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        seen = total > 0
        out = acc / tl.where(seen, total, 1.0)[:, None]
        lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        slot = (split * kv_heads + kv_head) * rows_padded + r
        tl.store(part_lse_ptr + slot, lse)
        tl.store(part_out_ptr + slot[:, None] * HEAD_DIM + d[None, :], out)

    @triton.jit
    def _combine_kernel(
        part_out_ptr,
        part_lse_ptr,
        o_ptr,
        stride_ot,
        stride_oh,
        q_len,
        rows,
        rows_padded,
        kv_heads,
        GROUPS: tl.constexpr,
        SPLITS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        # one program per (KV head, row): the ranges weighed by their share of the mass
        kv_head = tl.program_id(0) // rows
        r = tl.program_id(0) % rows
        s = tl.arange(0, SPLITS)
        slot = (s * kv_heads + kv_head) * rows_padded + r
        lse = tl.load(part_lse_ptr + slot)
        weight = tl.exp(lse - tl.max(lse, axis=0))  # every row sees slot 0: some range is finite
        d = tl.arange(0, HEAD_DIM)
        parts = tl.load(part_out_ptr + slot[:, None] * HEAD_DIM + d[None, :])
        out = tl.sum(parts * weight[:, None], axis=0) / tl.sum(weight, axis=0)
        head = kv_head * GROUPS + r // q_len
        token = r % q_len
        tl.store(o_ptr + token * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_shape(rows: int, kv_heads: int, device: torch.device) -> tuple[int, int]:
    """``(rows per program, key ranges)``: rows padded to a power of two from 16 to 128
    (the matrix units' tile), and enough ranges for about one program per multiprocessor
    (at most 64)."""
    block_r = min(128, max(16, triton.next_power_of_2(rows)))
    programs = kv_heads * -(-rows // block_r)
    splits = 1
    while splits < 64 and programs * splits * 2 <= _multiprocessors(device):
        splits *= 2
    return block_r, splits


def split_kv_slot_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    limits: torch.Tensor,
    scaling: float,
    splits: int | None = None,
    block_n: int = 64,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Attention of ``q`` new tokens over a window of a layer's buffer, token ``i`` seeing
    the slots ``0 .. limits[i]``; the same result as
    :func:`~hermes_policy.graphs.static_forward.slot_attention` with
    ``blocked = arange(window) > limits[:, None]``.

    Parameters
    ----------
    query : ``(q, heads, head_dim)``, unit stride along ``head_dim``
    keys, values : ``(1, kv_heads, window, head_dim)`` (views into a larger buffer are fine)
    limits : LongTensor ``(q,)`` on the same device, each in ``[0, window)``
    splits : key ranges (a power of two); default from :func:`launch_shape`
    block_n : keys per step of a program
    num_warps : warps per program of the first kernel (default 8 for 64 rows or more, else 4)

    Returns
    -------
    ``(q, heads, head_dim)`` in the query's dtype. Two kernel launches, no host sync:
    capturable in a CUDA graph.
    """
    q_len, heads, dim = query.shape
    kv_heads, window = keys.shape[1], keys.shape[2]
    query, keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys, values))
    groups = heads // kv_heads
    rows = groups * q_len
    block_r, default_splits = launch_shape(rows, kv_heads, query.device)
    splits = splits or default_splits
    rows_padded = -(-rows // block_r) * block_r
    part_out = torch.empty(splits, kv_heads, rows_padded, dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(splits, kv_heads, rows_padded, dtype=torch.float32, device=query.device)
    out = torch.empty(q_len, heads, dim, dtype=query.dtype, device=query.device)
    k, v = keys[0], values[0]
    _partial_kernel[(kv_heads * (rows_padded // block_r), splits)](
        query, k, v, limits, part_out, part_lse,
        query.stride(0), query.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_len, rows, rows_padded, kv_heads, window, scaling,
        GROUPS=groups, SPLITS=splits, BLOCK_R=block_r, BLOCK_N=block_n, HEAD_DIM=dim,
        PRECISION="ieee" if query.dtype == torch.float32 else None,  # float32 stays float32 (no TF32)
        num_warps=num_warps or (8 if block_r >= 64 else 4),
    )  # fmt: skip
    _combine_kernel[(kv_heads * rows,)](
        part_out, part_lse, out, out.stride(0), out.stride(1), q_len, rows, rows_padded, kv_heads,
        GROUPS=groups, SPLITS=splits, HEAD_DIM=dim,
    )  # fmt: skip
    return out


def attend(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, limits: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """:func:`split_kv_slot_attention`, or None when the kernels cannot run here: the first
    failure turns them off for the process (with a warning), so the caller's explicit path
    runs instead. Inside a CUDA graph capture a failure is raised (the capture fails and
    its caller falls back)."""
    return SWITCH.launch(split_kv_slot_attention, query, keys, values, limits, scaling)
