"""Position arithmetic: compaction, dense ranks, and rotary deltas against direct RoPE."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from hermes_policy.cache.positions import (
    compact_positions,
    dense_rank,
    next_free_position,
    rerotate_keys,
    rotate_half,
)


def test_rotate_half_is_a_quarter_turn():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(rotate_half(x), torch.tensor([-3.0, -4.0, 1.0, 2.0]))
    assert torch.equal(rotate_half(rotate_half(x)), -x)


def test_dense_rank():
    assert dense_rank(torch.tensor([7, 3, 7, 9])).tolist() == [1, 0, 1, 2]


def test_compact_1d_keeps_prefix_and_ranks_stream():
    positions = torch.tensor([[0, 1, 2, 10, 14, 15, 40]])
    out = compact_positions(positions, prefix_len=3)
    assert out.tolist() == [[0, 1, 2, 3, 4, 5, 6]]


def test_compact_3d_ranks_each_axis_independently():
    # prefix of 2 text tokens, then video tokens with t spaced by 50 and h/w grids
    positions = torch.tensor(
        [
            [0, 1, 52, 52, 102, 102, 130],
            [0, 1, 2, 3, 2, 3, 130],
            [0, 1, 2, 2, 3, 3, 130],
        ]
    )
    out = compact_positions(positions, prefix_len=2)
    assert out[:, :2].tolist() == [[0, 1], [0, 1], [0, 1]]
    assert out[0, 2:].tolist() == [2, 2, 3, 3, 4]
    assert out[1, 2:].tolist() == [2, 3, 2, 3, 4]
    assert out[2, 2:].tolist() == [2, 2, 3, 3, 4]


def test_next_free_position_uses_the_largest_axis():
    assert next_free_position(torch.tensor([[0, 5], [0, 9], [0, 2]])) == 10
    assert next_free_position(torch.zeros(1, 0, dtype=torch.long)) == 0


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
         "original_max_position_embeddings": 256},
    ],
)
def test_rerotated_key_equals_key_at_new_position(rope_parameters):
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rope_parameters=rope_parameters,
    )
    rotary = LlamaRotaryEmbedding(config)
    torch.manual_seed(0)
    raw = torch.randn(1, 2, 6, 16)  # un-rotated keys (batch, kv_heads, seq, head_dim)
    old = torch.tensor([[5, 17, 18, 200, 201, 400]])
    new = torch.tensor([[3, 4, 5, 6, 7, 8]])

    def at(pos):
        cos, sin = rotary(raw, pos)
        _, k = apply_rotary_pos_emb(raw, raw, cos, sin)
        return k

    moved = rerotate_keys(at(old), old, new, rotary)
    torch.testing.assert_close(moved, at(new), atol=1e-5, rtol=1e-5)
    # and a move is not a no-op: the keys really changed
    assert not torch.allclose(moved, at(old), atol=1e-3)


def test_rerotation_at_large_positions_is_as_accurate_as_direct_rope():
    """Far along a stream, fp32 RoPE itself is inexact; the delta must not be worse.

    Ground truth is RoPE evaluated in float64.
    """
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32768)
    rotary = LlamaRotaryEmbedding(config)
    torch.manual_seed(1)
    raw = torch.randn(1, 2, 4, 16, dtype=torch.float64)
    old = torch.tensor([[9000, 15000, 20000, 30000]])
    new = torch.tensor([[100, 101, 102, 103]])

    def exact(pos):
        angles = pos[0, :, None].double() * rotary.inv_freq.double()[None]
        emb = torch.cat([angles, angles], dim=-1)
        return raw * emb.cos() + rotate_half(raw) * emb.sin()

    def fp32(pos):
        cos, sin = rotary(raw.float(), pos)
        return apply_rotary_pos_emb(raw.float(), raw.float(), cos, sin)[1]

    moved = rerotate_keys(fp32(old), old, new, rotary).double()
    direct_error = (fp32(new).double() - exact(new)).abs().max() + (fp32(old).double() - exact(old)).abs().max()
    assert (moved - exact(new)).abs().max() <= 2 * direct_error + 1e-5
