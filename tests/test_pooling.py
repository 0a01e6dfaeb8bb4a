"""Bilinear 2x pooling as a matmul equals the interpolation LLaVA-OneVision uses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hermes_policy.models.pooling import bilinear_pool, bilinear_weights
from hermes_policy.models.random_shapes import build_random_adapter


def interpolated(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The model's own pooling: grid -> NCHW -> F.interpolate(bilinear) -> tokens."""
    frames, _, channels = features.shape
    grid = features.view(frames, height, width, channels).permute(0, 3, 1, 2).contiguous()
    out = F.interpolate(grid, size=[math.ceil(height / 2), math.ceil(width / 2)], mode="bilinear")
    return out.permute(0, 2, 3, 1).reshape(frames, -1, channels)


@pytest.mark.parametrize(("in_size", "out_size"), [(27, 14), (5, 3), (8, 4), (1, 1), (6, 11)])
def test_axis_weights_resample_like_interpolate(in_size, out_size):
    weights = bilinear_weights(in_size, out_size)
    eye = torch.eye(in_size)[None]  # (1, in, in): column j is the unit signal at j
    expected = F.interpolate(eye, size=out_size, mode="linear").squeeze(0)  # (in, out)
    torch.testing.assert_close(weights, expected.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(weights.sum(1), torch.ones(out_size))


@pytest.mark.parametrize(("height", "width"), [(27, 27), (5, 5), (4, 6), (7, 3)])
def test_pool_equals_interpolate_float32(height, width):
    features = torch.randn(3, height * width, 16, generator=torch.Generator().manual_seed(height * width))
    # PyTorch computes the source coordinates in float32 (an error of ~2e-6 near index 26),
    # the matmul's weights come from float64
    torch.testing.assert_close(bilinear_pool(features, height, width), interpolated(features, height, width), rtol=0, atol=1e-5)


def test_pool_bfloat16_rounds_like_interpolate():
    features = torch.randn(2, 27 * 27, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    ours = bilinear_pool(features, 27, 27)
    assert ours.dtype == torch.bfloat16
    reference = interpolated(features.float(), 27, 27)  # the exact value both round
    # one rounding of the exact value: within half a bf16 ulp (2^-9 relative)
    torch.testing.assert_close(ours.float(), reference, rtol=2**-8, atol=1e-6)


def test_pool_rejects_a_grid_that_does_not_fit():
    with pytest.raises(ValueError, match="do not form a 4x4 grid"):
        bilinear_pool(torch.zeros(1, 15, 2), 4, 4)


def test_llava_adapter_pools_by_matmul_with_the_models_result():
    adapter = build_random_adapter("tiny-llava-ov", device="cpu", dtype=torch.float32)
    base = adapter.base_model
    side = base.config.vision_config.image_size // base.config.vision_config.patch_size
    features = torch.randn(2, side * side, base.config.vision_config.hidden_size)
    original = type(base).apply_pooling(base, features)  # the class's own method
    assert base.apply_pooling is not type(base).apply_pooling
    torch.testing.assert_close(base.apply_pooling(features), original, rtol=0, atol=1e-5)
