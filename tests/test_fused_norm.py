"""The fused RMSNorm gives what the transformers modules give."""

from __future__ import annotations

import pytest
import torch

from hermes_policy.models.fused_norm import FUSED, STANDARD_RMS_NORMS, use_fused_rms_norm
from hermes_policy.models.random_shapes import build_random_adapter


@pytest.mark.parametrize("shape", ["tiny-llava-ov", "tiny-qwen2.5-vl"])
def test_every_norm_of_the_adapters_is_fused_and_equal_to_the_original(shape):
    adapter = build_random_adapter(shape, device="cpu", dtype=torch.float32)
    norms = [m for m in adapter.model.modules() if type(m).__name__ in STANDARD_RMS_NORMS]
    assert norms and all(m in FUSED for m in norms)
    assert use_fused_rms_norm(adapter.model) == 0  # idempotent
    g = torch.Generator().manual_seed(0)
    for module in norms:
        torch.nn.init.normal_(module.weight, generator=g)  # not all ones: the weight must count
        x = torch.randn(3, 5, module.weight.shape[0], generator=g) * 4
        original = type(module).forward(module, x)
        torch.testing.assert_close(module(x), original, rtol=1e-6, atol=1e-6)


def test_bfloat16_rounds_where_the_original_rounds():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, generator=torch.Generator().manual_seed(1))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)).bfloat16() * 3
    original = norm(x)
    assert use_fused_rms_norm(norm) == 1
    fused = norm(x)
    assert fused.dtype == torch.bfloat16
    # the same two roundings (normalised value, then the product): equal but for the rare
    # one-ulp case where float32 summation order moves a value across a rounding boundary
    assert (fused != original).float().mean() < 0.01
    torch.testing.assert_close(fused, original, rtol=2**-7, atol=0)
