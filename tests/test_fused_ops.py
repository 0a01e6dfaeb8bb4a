"""The fused element-wise steps against the transformers modules they stand for.

On the CPU the eager code runs (these tests); on CUDA the same functions are compiled
(tests/test_gpu.py compares the two there).
"""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from hermes_policy import options
from hermes_policy.kernels import fusion
from hermes_policy.kernels.fused_ops import (
    FusedOp,
    add_rms_norm,
    rms_norm,
    rotary_and_pack,
    silu_and_mul,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_rounds_like_a_residual_add_and_the_module(dtype):
    g = torch.Generator().manual_seed(0)
    norm = Qwen2RMSNorm(64, eps=1e-6)
    torch.nn.init.normal_(norm.weight, generator=g)
    norm = norm.to(dtype)
    hidden, delta = (torch.randn(2, 3, 64, generator=g) * 3).to(dtype), torch.randn(2, 3, 64, generator=g).to(dtype)
    summed, normed = add_rms_norm(hidden, delta, norm.weight, norm.variance_epsilon)
    expected_sum = hidden + delta
    assert torch.equal(summed, expected_sum)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(normed, type(norm).forward(norm, expected_sum), rtol=tol, atol=tol)
    torch.testing.assert_close(rms_norm(expected_sum, norm.weight, 1e-6), normed, rtol=0, atol=0)


def test_silu_and_mul():
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(4, 10, generator=g)
    torch.testing.assert_close(silu_and_mul(gate_up), ACT2FN["silu"](gate_up[:, :5]) * gate_up[:, 5:])


def test_rotary_and_pack():
    from hermes_policy.kernels.fused_ops import rotate_half_pairs

    g = torch.Generator().manual_seed(2)
    heads, kv_heads = 6, 2
    qkv = torch.randn(5, heads + 2 * kv_heads, 8, generator=g)
    cos, sin = torch.randn(2, 5, 1, 8, generator=g)
    query, packed = rotary_and_pack(qkv, cos, sin, heads)
    rotated = rotate_half_pairs(qkv[:, : heads + kv_heads], cos, sin)
    assert torch.equal(query, rotated[:, :heads])
    assert packed.shape == (2, kv_heads, 5, 8)
    assert torch.equal(packed[0], rotated[:, heads:].transpose(0, 1))
    assert torch.equal(packed[1], qkv[:, heads + kv_heads :].transpose(0, 1))


def test_fused_ops_run_eagerly_off_cuda_and_when_disabled(monkeypatch):
    calls = []

    def double(x):
        calls.append(x)
        return 2 * x

    op = FusedOp(double)
    assert torch.equal(op(torch.ones(2)), torch.full((2,), 2.0)) and len(calls) == 1  # CPU: the eager code
    assert op.compiled_signatures == ()
    with options.applied(fused_ops=False):
        assert torch.equal(op(torch.ones(2)), torch.full((2,), 2.0)) and op.compiled_signatures == ()


def test_own_code_copy_is_the_same_function_with_its_own_code_object():
    from hermes_policy.kernels.fusion import own_code_copy, tensor_signature

    def scaled(x, factor=2.0, *, shift=1.0):
        return factor * x + shift

    copy = own_code_copy(scaled)
    assert copy.__code__ is not scaled.__code__ and copy.__name__ == "scaled"
    x = torch.arange(3.0)
    assert torch.equal(copy(x), scaled(x)) and torch.equal(copy(x, 3.0, shift=0.0), scaled(x, 3.0, shift=0.0))
    assert tensor_signature((x, 2, x.to(torch.bfloat16)[None])) == ((torch.float32, 1), (torch.bfloat16, 2))


def test_a_signature_at_the_recompile_limit_starts_a_fresh_copy_then_stays_eager(monkeypatch):
    """torch.compile stops compiling a code object after a fixed number of variants: the
    variant over the limit runs in a fresh compiled copy (the op stays compiled), and only
    after MAX_COPIES copies do that signature's calls run eagerly; other signatures and
    the variants already compiled are unaffected."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    copies: list[set] = []

    def fake_compile(function, **kwargs):  # each copy takes two shapes, as if the limit were 2
        seen: set = set()
        copies.append(seen)

        def run(*args):
            shape = tuple(args[0].shape)
            if shape not in seen and len(seen) == 2:
                raise FailOnRecompileLimitHit("recompile limit")
            seen.add(shape)
            return ("compiled", function(*args))

        return run

    monkeypatch.setattr(fusion.torch, "compile", fake_compile)
    monkeypatch.setattr(fusion, "MAX_COPIES", 2)
    op = FusedOp(lambda x: 2 * x)
    monkeypatch.setattr(op, "compiles", lambda first: True)
    for n in (1, 2, 3, 4):  # 1, 2 in the first copy; 3, 4 in a second one
        assert op(torch.ones(n))[0] == "compiled"
    assert [sorted(s) for s in copies] == [[(1,), (2,)], [(3,), (4,)]]
    with pytest.warns(UserWarning, match="recompile limit"):
        eager = op(torch.ones(5))  # the second copy is full too, and MAX_COPIES is 2
    assert torch.equal(eager, torch.full((5,), 2.0)) and len(copies) == 2
    assert torch.equal(op(torch.ones(3)), torch.full((3,), 2.0))  # that signature stays eager
    assert op(torch.ones(2, 2))[0] == "compiled"  # another rank: its own copy
    assert not op.failed and op.compiled_signatures == (((torch.float32, 2),),)


def test_a_fresh_copy_at_the_recompile_limit_runs_the_call_eagerly(monkeypatch):
    """Should even a fresh copy refuse (a limit of zero variants), the call still runs,
    eagerly, and the op stays usable."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    def refusing_compile(function, **kwargs):
        def run(*args):
            raise FailOnRecompileLimitHit("recompile limit")

        return run

    monkeypatch.setattr(fusion.torch, "compile", refusing_compile)
    op = FusedOp(lambda x: 2 * x)
    monkeypatch.setattr(op, "compiles", lambda first: True)
    with pytest.warns(UserWarning, match="recompile limit 2 times"):
        assert torch.equal(op(torch.ones(3)), torch.full((3,), 2.0))
    assert not op.failed and op.compiled_signatures == ()
