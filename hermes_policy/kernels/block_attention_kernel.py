"""The pseudo-query blocks' attention in one Triton pass.

In a compressing chunk's forward the guidance prompts ride as query blocks behind the
chunk (:func:`~hermes_policy.attention.masks.block_query_mask`): each block's rows see the
cache, the chunk, and causally their own block. The plain path runs that as flash over
the cache and chunk (with the query heads stacked, a copy first), two small products and
a softmax over the blocks' own keys, and a log-sum-exp merge: nine kernels a layer, each
with its launch gap inside the ingest graph. Here one program per (block of stacked rows,
KV head, part of the keys) walks its part with the softmax online (as flash attention
does): the shared keys split into ranges (:func:`key_ranges`: as many as keep about one
wave of programs on the multiprocessors, since a few hundred rows make few
programs, each walking thousands of keys otherwise), and the rows' own block is one more
part, which resumes from a prior part when one is given (the blocks' rows over the cache,
computed with the chunk's rows by cuDNN in one call: ``RuntimeOptions.blocks_with_chunk``, see
:func:`~hermes_policy.attention.blocks._blocks_by_kernel`). :func:`merge_parts_kernel` then
merges the parts by log-sum-exp and writes the output and the log-sum-exp over everything
the rows saw (which the captured probabilities need).
``benchmarks/block_attention_alternatives.py --layer`` and ``--sweep`` time it against
the plain path and over the number of ranges (results: docs/performance.md).

Triton (installed with torch on Linux); :func:`available` says whether it runs on a
device for a head size. ``RuntimeOptions.block_attention_kernel=False`` (or ``HERMES_BLOCK_KERNEL=0``)
turns it off, and so does a first
launch that fails (:func:`block_rows_attention` warns once and returns None: the caller's
plain path runs from then on). On the CPU it runs only under Triton's interpreter
(``TRITON_INTERPRET=1``, set before import).
"""

from __future__ import annotations

import functools
import itertools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch ships Triton on Linux
    triton = None

from hermes_policy.kernels.switch import KernelSwitch

SWITCH = KernelSwitch("block_attention_kernel", "block attention kernel", "using flash and explicit products")
MAX_BLOCKS = 4  # block boundaries travel as scalar arguments (no tensor to build per layout)
LOG2E = 1.4426950408889634
# the shared keys split into as many ranges as keep the programs over them within this many
# per multiprocessor (with the rows' own part, about one wave of two programs on each), in
# ranges of at least MIN_KEYS_PER_RANGE keys: in the sweep of
# benchmarks/block_attention_alternatives.py --sweep, more programs than one wave were
# slower and shorter ranges gained nothing (docs/performance.md)
PROGRAMS_PER_SM = 1.85
MIN_KEYS_PER_RANGE = 1024
# parts the merge adds up in unrolled loops (more take a loop of their own); the part count
# is a run-time value, not compiled in, so a new count never compiles a kernel inside a
# stream (the three variants' timings: docs/performance.md)
MERGE_UNROLLED = 8


def available(device: torch.device, head_dim: int) -> bool:
    """Whether :func:`block_rows_attention` runs here (:meth:`KernelSwitch.available`)."""
    return SWITCH.available(device, head_dim)


if triton is not None:

    # the lengths change with the prompts and the cache: specialised on each value's
    # divisibility they would compile a new kernel (~1 s, inside a stream) for new ones
    @triton.jit(
        do_not_specialize=[
            "stride_plh", "stride_os", "stride_ls", "n_rows", "key_start", "per_range", "ranges", "seen",
            "bound_1", "bound_2", "bound_3",
        ]
    )  # fmt: skip
    def _block_rows_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        prior_o_ptr,
        prior_lse_ptr,
        o_ptr,
        lse_ptr,
        stride_qh,
        stride_qt,
        stride_kh,
        stride_kn,
        stride_vh,
        stride_vn,
        stride_ph,
        stride_pt,
        stride_plh,
        stride_plt,
        stride_oh,
        stride_ot,
        stride_os,
        stride_ls,
        n_rows,
        key_start,
        per_range,
        ranges,
        seen,
        bound_1,
        bound_2,
        bound_3,
        scale_log2,
        GROUPS: tl.constexpr,
        HAS_PRIOR: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # one program: BLOCK_M stacked rows (query head within the group, then token) of one
        # KV head, over one part of the keys: part p < ranges walks range p of the shared
        # keys, part ``ranges`` the rows' own block (resuming from the prior part, if any)
        kv_head = tl.program_id(1)
        part = tl.program_id(2)
        own = part == ranges
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = m < GROUPS * n_rows
        token = m % n_rows
        head = kv_head * GROUPS + m // n_rows
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + head[:, None] * stride_qh + token[:, None] * stride_qt + d[None, :], mask=valid[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: the first rescale is exp2(-huge) = 0
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if HAS_PRIOR:  # the own part resumes from the prior one: its output weighs 1 at its lse
            resume = valid & own
            m_i = tl.where(resume, tl.load(prior_lse_ptr + head * stride_plh + token * stride_plt, mask=resume, other=0.0) * 1.4426950408889634, m_i)
            l_i = tl.where(resume, 1.0, l_i)
            acc = tl.load(
                prior_o_ptr + head[:, None] * stride_ph + token[:, None] * stride_pt + d[None, :],
                mask=resume[:, None],
                other=0.0,
            ).to(tl.float32)
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        # this part's range of the keys every row sees (none for the own part)
        lo = key_start + part * per_range
        hi = tl.minimum(lo + per_range, seen)
        hi = tl.where(own, lo, hi)
        for first in range(lo, hi, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            inside = n < hi
            k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            s = tl.where(inside[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        # the rows' own block, causally: own key j is seen by row t when start(t) <= j <= t
        start = tl.where(token >= bound_1, bound_1, 0)
        start = tl.where(token >= bound_2, bound_2, start)
        start = tl.where(token >= bound_3, bound_3, start)
        lowest = tl.min(tl.where(valid, start, n_rows))
        highest = tl.max(tl.where(valid, token, 0))
        highest = tl.where(own, highest, -1)
        for first in range((lowest // BLOCK_N) * BLOCK_N, highest + 1, BLOCK_N):
            j = first + tl.arange(0, BLOCK_N)
            inside = j < n_rows
            k = tl.load(k_base + (seen + j)[:, None] * stride_kn + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            sees = (j[None, :] >= start[:, None]) & (j[None, :] <= token[:, None]) & inside[None, :]
            s = tl.where(sees, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            v = tl.load(v_base + (seen + j)[:, None] * stride_vn + d[None, :], mask=inside[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        # a range with no key (a short cache split finely): output 0 at weight 0 (lse -inf)
        seen_any = l_i > 0
        out = acc / tl.where(seen_any, l_i, 1.0)[:, None]
        tl.store(
            o_ptr + part * stride_os + head[:, None] * stride_oh + token[:, None] * stride_ot + d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=valid[:, None],
        )
        lse = tl.where(seen_any, (m_i + tl.log2(tl.where(seen_any, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
        tl.store(lse_ptr + part * stride_ls + head * n_rows + token, lse, mask=valid)

    @triton.jit
    def _part_lse(lse_ptr, p, stride_lp, head, n_rows, t, here):
        # part p's log-sum-exps of rows t of one head; -inf (weight 0) where ``here`` is off
        return tl.load(lse_ptr + p * stride_lp + head * n_rows + t, mask=here, other=float("-inf"))

    @triton.jit
    def _part_rows(parts_ptr, p, stride_pp, stride_ph, stride_pt, head, t, d, here):
        # part p's outputs of rows t of one head; zeros where ``here`` is off
        return tl.load(parts_ptr + p * stride_pp + head * stride_ph + t[:, None] * stride_pt + d[None, :], mask=here[:, None], other=0.0)

    # the first MERGE_UNROLLED parts in unrolled loops, so that their loads issue at once
    # (the rest, if any, one after the other): the part count itself stays a run-time value,
    # which would otherwise compile a new kernel (~1 s, inside a stream) for each count the
    # key ranges give
    @triton.jit(do_not_specialize=["stride_pp", "stride_ph", "stride_pt", "stride_lp", "n_rows", "parts"])
    def _merge_parts_kernel(
        parts_ptr,
        lse_ptr,
        o_ptr,
        lse_out_ptr,
        stride_pp,
        stride_ph,
        stride_pt,
        stride_lp,
        stride_oh,
        stride_ot,
        n_rows,
        parts,
        UNROLLED: tl.constexpr,
        BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        # one program: BLOCK_M rows of one head; each part weighs its share of the exponent
        # mass (lse contiguous (parts, heads, n) after the part's stride)
        head = tl.program_id(1)
        t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = t < n_rows
        d = tl.arange(0, HEAD_DIM)
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for p in tl.static_range(UNROLLED):
            top = tl.maximum(top, _part_lse(lse_ptr, p, stride_lp, head, n_rows, t, valid & (p < parts)))
        for p in range(UNROLLED, parts):
            top = tl.maximum(top, _part_lse(lse_ptr, p, stride_lp, head, n_rows, t, valid))
        top = tl.where(valid, top, 0.0)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for p in tl.static_range(UNROLLED):
            here = valid & (p < parts)  # a part past the count weighs exp(-inf) = 0
            weight = tl.exp(_part_lse(lse_ptr, p, stride_lp, head, n_rows, t, here) - top)
            acc += weight[:, None] * _part_rows(parts_ptr, p, stride_pp, stride_ph, stride_pt, head, t, d, here)
            total += weight
        for p in range(UNROLLED, parts):
            weight = tl.exp(_part_lse(lse_ptr, p, stride_lp, head, n_rows, t, valid) - top)
            acc += weight[:, None] * _part_rows(parts_ptr, p, stride_pp, stride_ph, stride_pt, head, t, d, valid)
            total += weight
        out = acc / total[:, None]
        tl.store(o_ptr + head * stride_oh + t[:, None] * stride_ot + d[None, :], out.to(o_ptr.dtype.element_ty), mask=valid[:, None])
        tl.store(lse_out_ptr + head * n_rows + t, top + tl.log(total), mask=valid)

    @triton.jit(do_not_specialize=["stride_alh", "stride_blh", "n_rows"])
    def _merge_kernel(
        a_ptr,
        a_lse_ptr,
        b_ptr,
        b_lse_ptr,
        o_ptr,
        stride_ah,
        stride_at,
        stride_alh,
        stride_alt,
        stride_bh,
        stride_bt,
        stride_blh,
        stride_blt,
        stride_oh,
        stride_ot,
        n_rows,
        BLOCK_M: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        # one program: BLOCK_M rows of one head; each part weighs its share of the exponent mass
        head = tl.program_id(1)
        t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = t < n_rows
        d = tl.arange(0, HEAD_DIM)
        lse_a = tl.load(a_lse_ptr + head * stride_alh + t * stride_alt, mask=valid, other=0.0)
        lse_b = tl.load(b_lse_ptr + head * stride_blh + t * stride_blt, mask=valid, other=0.0)
        share = tl.sigmoid(lse_a - lse_b)
        a = tl.load(a_ptr + head * stride_ah + t[:, None] * stride_at + d[None, :], mask=valid[:, None], other=0.0)
        b = tl.load(b_ptr + head * stride_bh + t[:, None] * stride_bt + d[None, :], mask=valid[:, None], other=0.0)
        out = b.to(tl.float32) + share[:, None] * (a.to(tl.float32) - b.to(tl.float32))
        tl.store(o_ptr + head * stride_oh + t[:, None] * stride_ot + d[None, :], out.to(o_ptr.dtype.element_ty), mask=valid[:, None])


def merge_into_kernel(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    dest: torch.Tensor,
    block_m: int = 64,
) -> torch.Tensor:
    """:func:`~hermes_policy.attention.lse.merge_attention_into` as one Triton kernel that
    takes every stride as it comes: the chunk's part of a cuDNN call over more rows has
    log-sum-exp strides that change with the prompts' lengths, which a compiled op would
    recompile for (a second or so, inside a stream).

    Parameters
    ----------
    out_a, out_b, dest : ``(1, heads, n, head_dim)``, unit stride along ``head_dim``
    lse_a, lse_b : float32 ``(1, heads, n)``

    Returns
    -------
    ``dest``
    """
    _, heads, n_rows, dim = dest.shape
    if any(t.stride(-1) != 1 for t in (out_a, out_b, dest)):
        raise ValueError("the merge kernel needs a unit stride along the head dimension")
    _merge_kernel[(triton.cdiv(n_rows, block_m), heads)](
        out_a, lse_a, out_b, lse_b, dest,
        out_a.stride(1), out_a.stride(2), lse_a.stride(1), lse_a.stride(2),
        out_b.stride(1), out_b.stride(2), lse_b.stride(1), lse_b.stride(2),
        dest.stride(1), dest.stride(2), n_rows,
        BLOCK_M=block_m, HEAD_DIM=dim, num_warps=4,
    )  # fmt: skip
    return dest


def merge_into(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, dest: torch.Tensor
) -> torch.Tensor | None:
    """:func:`merge_into_kernel`, or None when it cannot run here (see :func:`block_rows_attention`)."""
    return SWITCH.launch(merge_into_kernel, out_a, lse_a, out_b, lse_b, dest)


def block_bounds(blocks: list[int]) -> tuple[int, int, int]:
    """Where the blocks after the first start, counted from the first block's first row
    (unused bounds lie past the last row)."""
    if not 1 <= len(blocks) <= MAX_BLOCKS:
        raise ValueError(f"the block attention kernel takes 1 to {MAX_BLOCKS} blocks, not {len(blocks)}")
    starts = list(itertools.accumulate(blocks))[:-1]
    past = sum(blocks) + 1
    return tuple(starts + [past] * (MAX_BLOCKS - 1 - len(starts)))  # type: ignore[return-value]


def block_rows_attention_kernel(
    rows: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocks: list[int],
    key_start: int,
    scaling: float,
    out: torch.Tensor,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    ranges: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """The blocks' rows over keys ``key_start .. seen`` and causally over their own block,
    resuming from a prior part over keys before ``key_start``.

    The shared keys split into ``ranges`` ranges walked by separate programs at once, the
    own block into one more (which resumes from the prior part); :func:`merge_parts_kernel`
    then merges them. A few hundred prompt rows make few programs, each walking thousands
    of keys one tile after the other: split, they fill the GPU.

    Parameters
    ----------
    rows : ``(1, heads, n, head_dim)``, ``n = sum(blocks)``, unit stride along ``head_dim``
    key, value : ``(1, kv_heads, seen + n, head_dim)``: the keys all rows see, then the
        blocks' own keys in the rows' order
    blocks : the blocks' lengths (1 to :data:`MAX_BLOCKS`)
    key_start : the first of the keys all rows see that this pass reads
    out : ``(1, heads, n, head_dim)``, any strides with a unit one along ``head_dim``:
        where the output goes
    prior : the rows' attention output ``(1, heads, n, head_dim)`` and log-sum-exp
        ``(1, heads, n)`` over keys ``0 .. key_start`` (needed when ``key_start > 0``)
    ranges : how many ranges the shared keys split into (default: :func:`key_ranges` for
        this device); fewer when the keys run out first
    num_stages : Triton's software pipelining depth of the key loop (default: Triton's)

    Returns
    -------
    float32 ``(1, heads, n)``: each row's log-sum-exp over every key it saw (the prior's
    too). Two kernels (one without shared keys), no host sync: capturable in a CUDA graph.
    """
    _, heads, n_rows, dim = rows.shape
    kv_heads = key.shape[1]
    seen = key.shape[2] - n_rows
    if key_start > 0 and prior is None:
        raise ValueError("keys before key_start need the prior part's output and log-sum-exp")
    if not 0 <= key_start <= seen:
        raise ValueError(f"key_start {key_start} lies outside the {seen} shared keys")
    if any(t.stride(-1) != 1 for t in (rows, key, value, out)):
        raise ValueError("the block attention kernel needs a unit stride along the head dimension")
    row_blocks = triton.cdiv(heads // kv_heads * n_rows, block_m)
    shared = seen - key_start
    if ranges is None:
        ranges = key_ranges(shared, row_blocks * kv_heads, rows.device)
    elif ranges < 1:
        raise ValueError(f"ranges must be at least 1, not {ranges}")
    per_range = triton.cdiv(triton.cdiv(shared, ranges), block_n) * block_n if shared else block_n
    ranges = triton.cdiv(shared, per_range)  # no empty range (0 without shared keys)
    parts = ranges + 1
    lse = torch.empty(parts, 1, heads, n_rows, dtype=torch.float32, device=rows.device)
    # several parts: each its own float32 output, merged into ``out`` afterwards
    target = out[None] if parts == 1 else torch.empty(parts, 1, heads, n_rows, dim, dtype=torch.float32, device=rows.device)
    prior_out, prior_lse = prior if prior is not None else (out, lse[0])  # unread without a prior
    if prior_out.stride(-1) != 1:
        prior_out = prior_out.contiguous()
    _block_rows_kernel[(row_blocks, kv_heads, parts)](
        rows, key, value, prior_out, prior_lse, target, lse,
        rows.stride(1), rows.stride(2), key.stride(1), key.stride(2), value.stride(1), value.stride(2),
        prior_out.stride(1), prior_out.stride(2), prior_lse.stride(1), prior_lse.stride(2),
        target.stride(2), target.stride(3), target.stride(0), lse.stride(0),
        n_rows, key_start, per_range, ranges, seen, *block_bounds(blocks), scaling * LOG2E,
        GROUPS=heads // kv_heads, HAS_PRIOR=prior is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=dim,
        PRECISION="ieee" if rows.dtype == torch.float32 else None,  # float32 stays float32 (no TF32)
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )  # fmt: skip
    if parts == 1:
        return lse[0]
    total = torch.empty(1, heads, n_rows, dtype=torch.float32, device=rows.device)
    merge_parts_kernel(target, lse, out, total)
    return total


def merge_parts_kernel(
    parts: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, lse_out: torch.Tensor, block_m: int = 32
) -> torch.Tensor:
    """Attention outputs over disjoint sets of keys, merged by log-sum-exp into ``out``.

    Parameters
    ----------
    parts : float32 ``(parts, 1, heads, n, head_dim)``, unit stride along ``head_dim``
    lse : float32 ``(parts, 1, heads, n)``, contiguous: each part's log-sum-exp (``-inf``
        for a part that saw no key: it weighs nothing)
    out : ``(1, heads, n, head_dim)``, any strides with a unit one along ``head_dim``
    lse_out : float32 ``(1, heads, n)``, contiguous: the merged log-sum-exp

    Returns
    -------
    ``out``
    """
    count, _, heads, n_rows, dim = parts.shape
    if not lse.is_contiguous() or not lse_out.is_contiguous() or parts.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the parts' merge needs contiguous log-sum-exps and a unit stride along the head dimension")
    _merge_parts_kernel[(triton.cdiv(n_rows, block_m), heads)](
        parts, lse, out, lse_out,
        parts.stride(0), parts.stride(2), parts.stride(3), lse.stride(0), out.stride(1), out.stride(2),
        n_rows, count, UNROLLED=MERGE_UNROLLED, BLOCK_M=block_m, HEAD_DIM=dim, num_warps=4,
    )  # fmt: skip
    return out


def block_rows_attention(
    rows: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    blocks: list[int],
    key_start: int,
    scaling: float,
    out: torch.Tensor,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """:func:`block_rows_attention_kernel`, or None when it cannot run here: the first
    failure turns it off for the process (with a warning), so the caller's plain path runs
    instead. Inside a CUDA graph capture a failure is raised (the capture fails and its
    caller falls back)."""
    return SWITCH.launch(block_rows_attention_kernel, rows, key, value, blocks, key_start, scaling, out, prior)


def key_ranges(shared: int, row_programs: int, device: torch.device, min_keys: int = MIN_KEYS_PER_RANGE) -> int:
    """How many ranges ``shared`` keys split into for ``row_programs`` programs of rows:
    at most :data:`PROGRAMS_PER_SM` programs for each of the device's multiprocessors, each
    range at least ``min_keys`` long (at least one range; 0 without shared keys)."""
    if shared <= 0:
        return 0
    slots = int(PROGRAMS_PER_SM * multiprocessors(device))
    return max(1, min(slots // max(row_programs, 1), -(-shared // min_keys)))


@functools.cache
def _multiprocessors(device_type: str, index: int | None) -> int:
    if device_type != "cuda":
        return 4  # Triton's interpreter: any count works
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).multi_processor_count


def multiprocessors(device: torch.device) -> int:
    """The device's streaming multiprocessors (4 off CUDA, where only the interpreter runs)."""
    return _multiprocessors(device.type, device.index)
