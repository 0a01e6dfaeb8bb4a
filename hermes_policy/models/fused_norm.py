"""RMSNorm in two kernels instead of eight, with the model's own rounding.

The transformers RMSNorm modules of Qwen2, Qwen2.5-VL, Qwen3(-VL) and Llama run as
separate kernels: cast to float32, square, mean, add epsilon, reciprocal square root,
multiply, cast back, multiply by the weight. Twice per decoder layer, that is ~16 of the
~45 kernels of a decode step (measured with ``benchmarks/profile_efficiency.py``), each a
few microseconds even inside a CUDA graph. ``F.rms_norm`` without a weight is one fused
kernel that computes the normalisation in float32 and rounds once to the input dtype,
exactly where the original casts back; the weight multiply stays a separate product in
the input dtype. The result equals the original up to float32 summation order.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

# classes whose forward is ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``
# (Gemma-style norms scale by ``1 + weight`` and are left alone)
STANDARD_RMS_NORMS = frozenset(
    {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3VLTextRMSNorm", "Qwen2_5_VLRMSNorm", "MistralRMSNorm"}
)


def fused_rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(hidden_states)`` with the normalisation as one kernel.

    Parameters
    ----------
    hidden_states : Tensor ``(..., hidden)``
    weight : Tensor ``(hidden,)``

    Returns
    -------
    Tensor like ``weight * hidden_states``: the normalised states rounded to their
    dtype, then multiplied by the weight (the transformers modules' order).
    """
    normed = F.rms_norm(hidden_states, (hidden_states.shape[-1],), None, eps)
    return weight * normed


# the norm modules whose forward was replaced (weakly held: they go with their model)
FUSED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def use_fused_rms_norm(model: nn.Module) -> int:
    """Make every standard RMSNorm module of ``model`` use :func:`fused_rms_norm`.

    Set per instance (the class is untouched). Returns how many modules were changed.
    """
    changed = 0
    for module in model.modules():
        if type(module).__name__ not in STANDARD_RMS_NORMS or module in FUSED:
            continue
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            continue

        def forward(hidden_states: torch.Tensor, module: nn.Module = module, eps: float = float(eps)) -> torch.Tensor:
            return fused_rms_norm(hidden_states, module.weight, eps)

        module.forward = forward
        FUSED.add(module)
        changed += 1
    return changed
