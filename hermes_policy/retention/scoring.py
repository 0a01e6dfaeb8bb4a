"""The math of score-based retention (METHOD.md sections 3-6), as small pure functions.

All scores are 1D tensors over a layer's stream tokens, oldest first (index 0) to newest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hermes_policy.cache.positions import rotate_half
from hermes_policy.cache.transfer import upload
from hermes_policy.kernels.fusion import FusedOp


def recency_scores(length: int, forgetting_rate: float, device: torch.device | None = None) -> torch.Tensor:
    """``R_i = exp(-k * dt_i / (T - 1))`` with ``dt_i = T - 1 - i`` (official normalisation).

    Returns FloatTensor ``(length,)`` on ``device``; the newest token scores 1.
    """
    if length == 1:
        return torch.ones(1, device=device)
    dt = torch.arange(length - 1, -1, -1, dtype=torch.float32, device=device)
    return torch.exp(-forgetting_rate * dt / (length - 1))


def min_max(scores: torch.Tensor) -> torch.Tensor:
    """Scale each row (the last axis) to [0, 1]; a constant row becomes all zeros.

    No host sync on a GPU.
    """
    lo, hi = torch.aminmax(scores, dim=-1, keepdim=True)  # one reduction for both
    span = hi - lo
    scaled = (scores - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.zeros_like(scores))


def mix_scores(attention: torch.Tensor | None, recency: torch.Tensor, recency_weight: float) -> torch.Tensor:
    """``S = (1 - w) * minmax(A) + w * minmax(R)``; ``A`` may be None when ``w == 1``."""
    if attention is None:
        if recency_weight < 1.0:
            raise ValueError("attention scores are needed when recency_weight < 1")
        return min_max(recency)
    return (1.0 - recency_weight) * min_max(attention.float()) + recency_weight * min_max(recency)


def interpolate_scores(scores: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample scores to ``length`` points (end points aligned)."""
    if scores.shape[0] == length:
        return scores
    if scores.shape[0] == 1:
        return scores.expand(length).clone()
    return F.interpolate(scores[None, None].float(), size=length, mode="linear", align_corners=True)[0, 0]


def smooth_across_layers(scores: list[torch.Tensor], smoothing: list[float]) -> list[torch.Tensor]:
    """Cross-layer smoothing from deep to shallow (METHOD.md section 4).

    ``S~_{L-1} = S_{L-1}``; ``S~_l = (1 - lambda_l) S_l + lambda_l * interp(S~_{l+1})``, using
    the already-smoothed deeper layer (as the official code does) resampled to layer
    ``l``'s length.
    """
    out = [s.float() for s in scores]
    for layer in range(len(out) - 2, -1, -1):
        lam = smoothing[layer]
        deeper = interpolate_scores(out[layer + 1], out[layer].shape[0])
        out[layer] = (1.0 - lam) * out[layer] + lam * deeper
    return out


def smooth_rows(scores: torch.Tensor, smoothing: tuple[float, ...]) -> torch.Tensor:
    """:func:`smooth_across_layers` of layers of one length, ``scores (layers, n)`` ->
    ``(layers, n)`` float32, with ``smoothing`` a tuple of the layers' lambdas: the same
    arithmetic, compiled as part of :data:`mixed_smoothed_rows` on CUDA."""
    return torch.stack(smooth_across_layers(list(scores.unbind(0)), list(smoothing)))


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in temporal (ascending) order.

    Ties go to the newer token, so that equal scores behave like FIFO.
    """
    n = scores.shape[0]
    if keep >= n:
        return torch.arange(n, device=scores.device)
    # a stable sort of the reversed scores: among equal scores the newer token ranks first
    ranked = torch.sort(scores.flip(0), descending=True, stable=True).indices[:keep]
    return ((n - 1) - ranked).sort().values


def batched_mixed_scores(
    attention: torch.Tensor, forgetting_rates: torch.Tensor, recency_weights: torch.Tensor
) -> torch.Tensor:
    """:func:`mix_scores` of ``recency_scores`` for many layers of one length at once.

    Parameters
    ----------
    attention : FloatTensor ``(layers, n)`` (rows of layers with weight 1 are ignored)
    forgetting_rates, recency_weights : FloatTensor ``(layers,)``

    Returns
    -------
    FloatTensor ``(layers, n)``, row ``l`` equal to
    ``mix_scores(attention[l], recency_scores(n, k_l), w_l)``.
    """
    n = attention.shape[1]
    if n == 1:
        recency = torch.ones_like(attention)
    else:
        dt = torch.arange(n - 1, -1, -1, dtype=torch.float32, device=attention.device)
        recency = torch.exp(-forgetting_rates[:, None].float() * dt / (n - 1))

    w = recency_weights[:, None].float()
    scaled_recency = min_max(recency)
    mixed = (1.0 - w) * min_max(attention.float()) + w * scaled_recency
    return torch.where(w >= 1.0, scaled_recency, mixed)


def _partition_by_rank(ranked: torch.Tensor, counts: torch.Tensor, lead: int) -> torch.Tensor:
    n = ranked.shape[-1]
    rows = ranked.shape[0]
    index = torch.arange(n, device=ranked.device).expand(rows, n)
    chosen = index < counts[:, None]  # by rank: the first counts[r] of row r
    kept = torch.zeros_like(chosen).scatter(-1, (n - 1) - ranked, chosen)  # by token
    kept_through = torch.cumsum(kept.to(torch.int64), dim=-1)  # kept tokens up to each one
    # kept tokens to the front in order, then the others in order: a permutation
    slot = torch.where(kept, kept_through - 1, counts[:, None] + index - kept_through)
    order = torch.empty_like(slot).scatter(-1, slot, index)
    head = torch.arange(lead, device=ranked.device).expand(rows, lead)
    return torch.cat([head, order + lead], dim=-1)


partition_by_rank = FusedOp(_partition_by_rank)
""":func:`batched_partition`'s step after its sort: ``ranked (rows, n)``, each row's
token indices into its *reversed* scores by descending score, and ``counts (rows,)``
int64 -> int64 ``(rows, lead + n)``: ``0 .. lead - 1``, then ``lead +`` the row's
``counts[r]`` highest-ranked tokens in temporal order, then ``lead +`` the others in
temporal order. On CUDA compiled (a scatter, a scan, a scatter), where it was a dozen small
kernels."""


def batched_partition(scores: torch.Tensor, keep: list[int], lead: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`top_indices` of every row ``(layers, n)`` and their complements, with one
    sort and one compiled op.

    Returns, per row, the ``keep[l]`` indices of its highest scores (ties go to the newer
    token) and the indices of the others, each in temporal order, where ``scores`` live
    (no host copy, so no wait for the GPU). With ``lead``, every index is shifted by
    ``lead`` and the kept ones are preceded by ``0 .. lead - 1`` (a fixed prefix ahead of
    the scored tokens). The two lists are views of one ``(layers, lead + n)`` tensor.
    """
    n = scores.shape[1]
    counts = [min(k, n) for k in keep]
    # a stable sort of the reversed rows: among equal scores the newer token ranks first
    # (one sort where a top-k, which sorts what it picks, and an ordering sort took two)
    ranked = torch.sort(scores.flip(-1), dim=1, descending=True, stable=True).indices
    # the counts travel without a blocking copy, which would wait for the queued forward
    table = partition_by_rank(ranked, upload(torch.tensor(counts), ranked.device), lead)
    kept = [table[row, : lead + k] for row, k in enumerate(counts)]
    rest = [table[row, lead + k :] for row, k in enumerate(counts)]
    return kept, rest


def _mixed_smoothed_rows(
    attention: torch.Tensor, forgetting_rates: torch.Tensor, recency_weights: torch.Tensor, smoothing: tuple[float, ...]
) -> torch.Tensor:
    return smooth_rows(batched_mixed_scores(attention, forgetting_rates, recency_weights), smoothing)


mixed_smoothed_rows = FusedOp(_mixed_smoothed_rows)
""":func:`batched_mixed_scores` then :func:`smooth_rows`: ``attention (layers, n)``,
``forgetting_rates, recency_weights (layers,)`` and the layers' lambdas -> float32
``(layers, n)``. On CUDA compiled as one op (the recency rows, both min-max scalings, the
mix and the smoothing), where the scores alone were about fifteen small kernels."""


def _evicted_summary(
    keys: torch.Tensor, values: torch.Tensor, evicted: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    evicted_keys = keys.index_select(-2, evicted).float()
    # rounded to the keys' dtype after the rotation, as rerotate_keys does
    moved = (evicted_keys * cos + rotate_half(evicted_keys) * sin).to(keys.dtype).float()
    key = moved.mean(dim=-2, keepdim=True).to(keys.dtype)
    value = values.index_select(-2, evicted).float().mean(dim=-2, keepdim=True).to(values.dtype)
    return key, value


evicted_summary = FusedOp(_evicted_summary)
"""One layer's summary token (METHOD.md section 5) straight from its cache: the mean of
its evicted keys, each re-rotated to the summary's position (so RoPE phases do not
cancel) and rounded to the keys' dtype, and the mean of their values. ``keys, values
(batch, kv_heads, seq, head_dim)``, the evicted tokens' indices ``evicted (n,)`` into them,
and the rotation that moves each to the summary's position, ``cos, sin (n, head_dim)``
(float32, from :func:`~hermes_policy.cache.positions.rotary_cos_sin` of target minus
position). Returns key and value ``(batch, kv_heads, 1, head_dim)``. On CUDA compiled into
one reduction kernel (the gather, rotation and mean).

The fallback of :mod:`~hermes_policy.kernels.summary_kernel` (all of a group's layers in
one launch), which runs where that kernel cannot (the CPU, layers it does not take, a
failed launch). The formula as METHOD.md writes it (gather, ``rerotate_keys``, mean) is
the tests' reference (``tests/summary_reference.py``)."""
