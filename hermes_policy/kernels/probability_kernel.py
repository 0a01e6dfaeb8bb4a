"""A pseudo-query's attention over the cache, reduced to one score per key in one pass.

Where HERMES scores a layer by a guidance prompt's attention, the ingest forward needs,
for each key before the prompt, the prompt's softmax probability averaged over the query
heads and over the prompt's tokens (weighed: a padded prompt's padding rows weigh 0).
The plain path writes the rows' float32 scores over the whole cache (64 rows x 28 heads x
5,600 keys: 40 MB a layer), then reads them back for the exponential and the mean. Here
one program per (range of keys, KV head) computes the products for every (query head,
row) in registers, exponentiates them against each row's log-sum-exp and sums them, so
the scores never reach memory (``benchmarks/block_attention_alternatives.py`` times both
paths; results in docs/performance.md).

The log-sum-exp comes in two parts (the keys before the prompt, the prompt's own keys)
and is combined in the kernel. Triton (installed with torch on Linux); :func:`available`
says whether it runs on a device for a head size. ``RuntimeOptions.probability_kernel=False``
(or ``HERMES_PROBABILITY_KERNEL=0``) turns it off, and so does a first launch that fails (:func:`weighted_probabilities` warns once
and returns None: the caller's plain path runs from then on). On the CPU it runs only
under Triton's interpreter (``TRITON_INTERPRET=1``, set before import).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch ships Triton on Linux
    triton = None

from hermes_policy.kernels.switch import KernelSwitch

SWITCH = KernelSwitch("probability_kernel", "attention probability kernel", "using score products")


def available(device: torch.device, head_dim: int) -> bool:
    """Whether :func:`weighted_probabilities` runs here (:meth:`KernelSwitch.available`)."""
    return SWITCH.available(device, head_dim)


if triton is not None:

    # the row and key counts change with the prompts and the cache: specialised on each
    # value's divisibility they would compile a new kernel (~1 s, inside a stream) for new ones
    @triton.jit(do_not_specialize=["stride_ah", "stride_bh", "n_rows", "keys"])
    def _weighted_probabilities_kernel(
        q_ptr,
        k_ptr,
        lse_a_ptr,
        lse_b_ptr,
        w_ptr,
        out_ptr,
        stride_qh,
        stride_qt,
        stride_kh,
        stride_kn,
        stride_ah,
        stride_at,
        stride_bh,
        stride_bt,
        n_rows,
        keys,
        scale,
        inv_heads,
        GROUPS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr,
        TWO_PARTS: tl.constexpr,
    ):
        # one program: a range of keys of one KV head, every (query head, row) of it over them
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_head = tl.program_id(1)
        in_range = n < keys
        d = tl.arange(0, HEAD_DIM)
        acc = tl.zeros([BLOCK_N], tl.float32)
        per_kv_head = GROUPS * n_rows
        k = tl.load(k_ptr + kv_head * stride_kh + n[:, None] * stride_kn + d[None, :], mask=in_range[:, None], other=0.0)
        for first in range(0, per_kv_head, BLOCK_R):
            r = first + tl.arange(0, BLOCK_R)
            valid = r < per_kv_head
            token = r % n_rows
            head = kv_head * GROUPS + r // n_rows
            q = tl.load(
                q_ptr + head[:, None] * stride_qh + token[:, None] * stride_qt + d[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            lse = tl.load(lse_a_ptr + head * stride_ah + token * stride_at, mask=valid, other=0.0)
            if TWO_PARTS:
                b = tl.load(lse_b_ptr + head * stride_bh + token * stride_bt, mask=valid, other=0.0)
                top = tl.maximum(lse, b)
                lse = top + tl.log(tl.exp(lse - top) + tl.exp(b - top))
            weight = tl.load(w_ptr + token, mask=valid, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            # rows past the end weigh 0 (and read zeros: a finite exponential)
            acc += tl.sum(tl.exp(s - lse[:, None]) * weight[:, None], axis=0)
        tl.store(out_ptr + kv_head * keys + n, acc * inv_heads, mask=in_range)


def weighted_probabilities_kernel(
    rows: torch.Tensor,
    keys: torch.Tensor,
    lse_seen: torch.Tensor,
    lse_own: torch.Tensor | None,
    weights: torch.Tensor,
    scaling: float,
    block_n: int = 64,
    block_r: int = 64,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Each key's softmax probability, averaged over heads and summed over rows by ``weights``.

    ``out[n] = sum_r weights[r] * mean_h exp(scaling * q[h, r] . k[n] - lse[h, r])`` with
    ``lse = logaddexp(lse_seen, lse_own)``: the probabilities of rows that also see keys
    other than these (their own prompt's), normalised over everything they see
    (``lse_own`` None: ``lse_seen`` is already over everything).

    Parameters
    ----------
    rows : ``(1, heads, n, head_dim)``, unit stride along ``head_dim``
    keys : ``(1, kv_heads, k, head_dim)``, unit stride along ``head_dim``
    lse_seen, lse_own : float32 ``(1, heads, n)``: each row's log-sum-exp over these keys
        and over the rest it sees (or None)
    weights : float32 ``(n,)``
    block_n, block_r, num_warps, num_stages : the launch: keys per program, rows per step,
        warps, Triton's pipelining depth (default: Triton's)

    Returns
    -------
    float32 ``(1, 1, 1, k)``. Two kernels (the products, one program per range of keys and
    KV head; the sum over KV heads), no host sync: capturable in a CUDA graph.
    """
    _, heads, n_rows, dim = rows.shape
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    rows, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (rows, keys))
    weights = weights.contiguous()
    # one row of sums per KV head, added after (in a fixed order: the same scores every run)
    parts = torch.empty(kv_heads, n_keys, dtype=torch.float32, device=rows.device)
    two_parts = lse_own is not None
    lse_own = lse_own if two_parts else lse_seen  # unread
    _weighted_probabilities_kernel[(triton.cdiv(n_keys, block_n), kv_heads)](
        rows, keys, lse_seen, lse_own, weights, parts,
        rows.stride(1), rows.stride(2), keys.stride(1), keys.stride(2),
        lse_seen.stride(1), lse_seen.stride(2), lse_own.stride(1), lse_own.stride(2),
        n_rows, n_keys, scaling, 1.0 / heads,
        GROUPS=heads // kv_heads, BLOCK_R=block_r, BLOCK_N=block_n, HEAD_DIM=dim,
        PRECISION="ieee" if rows.dtype == torch.float32 else None,  # float32 stays float32 (no TF32)
        TWO_PARTS=two_parts, num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )  # fmt: skip
    return parts.sum(dim=0).view(1, 1, 1, n_keys)


def weighted_probabilities(
    rows: torch.Tensor,
    keys: torch.Tensor,
    lse_seen: torch.Tensor,
    lse_own: torch.Tensor | None,
    weights: torch.Tensor,
    scaling: float,
) -> torch.Tensor | None:
    """:func:`weighted_probabilities_kernel`, or None when it cannot run here: the first
    failure turns it off for the process (with a warning), so the caller's plain path runs
    instead. Inside a CUDA graph capture a failure is raised (the capture fails and its
    caller falls back)."""
    return SWITCH.launch(weighted_probabilities_kernel, rows, keys, lse_seen, lse_own, weights, scaling)
