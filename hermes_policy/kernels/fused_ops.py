"""Element-wise steps of a decoder layer fused into single kernels on CUDA.

Inside the answer graphs, a decoder layer's element-wise steps (residual add, RMSNorm and
its weight, rotary embedding, SiLU times the up projection) each
cost a kernel of a few microseconds that reads and writes a few kilobytes: on the
LLaVA-OV-7B shape ~16 such kernels a layer. Each function here is written once in plain torch (the reference, and what runs on
the CPU); on CUDA it is compiled by ``torch.compile`` (Inductor generates one Triton
kernel per function), with rounding to the input dtype where the eager code rounds
(``emulate_precision_casts``). If compiling fails (no Triton, no compiler), the eager
code runs from then on, with a warning.

``RuntimeOptions.fused_ops=False`` (or ``HERMES_FUSED_OPS=0``) runs the eager code everywhere
(:mod:`hermes_policy.kernels.fusion`, :mod:`hermes_policy.options`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hermes_policy.kernels.fusion import FusedOp
from hermes_policy.models.fused_norm import fused_rms_norm


def _add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = hidden + delta
    return summed, fused_rms_norm(summed, weight, eps)


def _rotate_half_pairs(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # eagerly three kernels (a product, a swap of the halves, a fused multiply-add), not
    # the five of the transformers form; in float32 equal to it up to rounding of the sum
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin_signed)


def _rotary_and_pack(
    qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    kv_heads = (qkv.shape[1] - heads) // 2
    rotated = _rotate_half_pairs(qkv[:, : heads + kv_heads], cos, sin_signed)
    packed = torch.stack([rotated[:, heads:], qkv[:, heads + kv_heads :]]).transpose(1, 2)
    return rotated[:, :heads], packed


def _silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


add_rms_norm = FusedOp(_add_rms_norm)
"""``(hidden + delta, weight * rmsnorm(hidden + delta))``: the residual add and the next
RMSNorm (normalised in float32, rounded to the input dtype, then weighted: the
transformers modules' order). Shapes ``(..., hidden)``, ``weight (hidden,)``."""

rms_norm = FusedOp(fused_rms_norm)
"""``weight * rmsnorm(hidden)``, as :data:`add_rms_norm` without the add."""

rotate_half_pairs = FusedOp(_rotate_half_pairs)
"""Rotary embedding in the rotate-half layout: ``x * cos + rotate_half(x) * sin`` with
``sin_signed`` from :func:`hermes_policy.graphs.static_forward.signed_sin`. ``x (..., head_dim)``."""

silu_and_mul = FusedOp(_silu_and_mul)
"""``silu(gate) * up`` of ``gate_up (..., 2 * intermediate)`` (gate first)."""

rotary_and_pack = FusedOp(_rotary_and_pack)
"""Rotary embedding of the query and key heads of ``qkv (q, heads + 2 * kv_heads, head_dim)``
(queries, keys, values in that order); returns the rotated queries ``(q, heads, head_dim)``
and the keys and values packed as ``(2, kv_heads, q, head_dim)``, ready for one write into
a layer's combined buffer."""
