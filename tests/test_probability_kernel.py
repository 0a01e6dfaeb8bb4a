"""The captured rows' weighted attention probabilities in one Triton pass, on the CPU
under Triton's interpreter (in a subprocess, as the split-key kernel's tests), against the
score products and exponentials the kernel replaces."""

from __future__ import annotations

import pytest
import torch
from test_split_kv_attention import run_interpreted

from hermes_policy import options
from hermes_policy.attention import blocks as attention
from hermes_policy.kernels import probability_kernel
from hermes_policy.kernels import switch as kernel_switch
from hermes_policy.kernels.probability_kernel import available
from hermes_policy.options import RuntimeOptions

pytest.importorskip("triton", reason="the probability kernel is written in Triton (shipped with torch on Linux)")


def test_kernel_equals_the_score_products():
    """Grouped heads, padded rows weighing 0, a key count that ends inside a range of keys,
    rows over several row blocks, strided rows and keys, a lead before the blocks; the
    whole block attention with the kernel against it without (``probability_kernel=False``),
    its log-sum-exp in two parts (flash and the own blocks) and whole (the block kernel)."""
    out = run_interpreted(
        """
        import itertools

        import torch
        from hermes_policy import options
        from hermes_policy.kernels import probability_kernel
        from hermes_policy.attention.blocks import lead_and_blocks_attention

        g = torch.Generator().manual_seed(3)
        cases = [  # (heads, kv heads, cached keys, lead, blocks, captured block)
            (8, 2, 70, 5, [6, 9], 1),
            (4, 4, 33, 0, [12], 0),
            (12, 1, 129, 3, [4, 7, 3], 0),  # 12 x 4 rows over one KV head: one row block of 64
        ]
        calls = []
        kernel = probability_kernel.weighted_probabilities_kernel

        def counted(*args, **kwargs):
            calls.append(args[0].shape)
            return kernel(*args, **kwargs)

        probability_kernel.weighted_probabilities_kernel = counted
        # the block attention kernel off (the log-sum-exp in two parts) and on (one, whole)
        for (heads, kv_heads, cached, lead, blocks, picked), block_kernel in itertools.product(cases, "01"):
            options.apply(options.RuntimeOptions(block_attention_kernel=block_kernel == "1"))
            q_len = lead + sum(blocks)
            k_len = cached + q_len
            query = torch.randn(1, q_len, heads + 2, 16, generator=g)[:, :, :heads].transpose(1, 2)  # strided
            kv = torch.randn(2, 1, kv_heads, k_len + 10, 16, generator=g)
            key, value = kv[0][:, :, :k_len], kv[1][:, :, :k_len]
            start = sum(blocks[:picked])
            stop = start + blocks[picked]
            weights = torch.rand(blocks[picked], generator=g)
            weights[-2:] = 0  # padding rows
            keep = (start, stop)
            with options.applied(probability_kernel=False):
                out_plain, plain = lead_and_blocks_attention(query, key, value, lead, blocks, 0.25, keep, True, True, weights)
            before = len(calls)
            out_kernel, probs = lead_and_blocks_attention(query, key, value, lead, blocks, 0.25, keep, True, True, weights)
            assert len(calls) == before + 1, "the kernel did not run"
            assert probs.shape == plain.shape == (1, 1, 1, k_len - sum(blocks)) and probs.dtype == torch.float32
            torch.testing.assert_close(probs, plain, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out_kernel, out_plain, atol=0, rtol=0)
        # small ranges of keys and rows: many programs, several row blocks per KV head
        query = torch.randn(1, 8, 11, 32, generator=g)
        keys = torch.randn(1, 2, 45, 32, generator=g)
        lse_a, lse_b = torch.randn(2, 1, 8, 11, generator=g) + 5
        weights = torch.rand(11, generator=g)
        got = kernel(query, keys, lse_a, lse_b, weights, 0.2, block_n=16, block_r=16)
        scores = query @ keys.repeat_interleave(4, 1).transpose(-1, -2) * 0.2
        want = (torch.exp(scores - torch.logaddexp(lse_a, lse_b)[..., None]).mean(1) * weights[:, None]).sum(1)
        torch.testing.assert_close(got.view(-1), want.view(-1), atol=1e-6, rtol=1e-5)
        print("ok", len(calls))
        """
    )
    assert out.split() == ["ok", "6"]


def test_where_the_kernel_runs(monkeypatch):
    """On CUDA (or under the interpreter) for power-of-two head sizes; never when switched off."""
    monkeypatch.setattr(kernel_switch, "INTERPRETED", False)
    options.apply(RuntimeOptions())
    assert not available(torch.device("cpu"), 128)
    assert available(torch.device("cuda"), 128)
    assert not available(torch.device("cuda"), 96)
    monkeypatch.setattr(kernel_switch, "INTERPRETED", True)
    assert available(torch.device("cpu"), 16)
    options.apply(RuntimeOptions(probability_kernel=False))
    assert not available(torch.device("cuda"), 128)


def test_a_failing_kernel_falls_back_to_the_score_products(monkeypatch):
    """A launch that fails warns once, turns the kernel off for the process, and the block
    attention gives the plain path's probabilities."""
    g = torch.Generator().manual_seed(1)
    query = torch.randn(1, 6, 3 + 9, 16, generator=g)
    key, value = torch.randn(2, 1, 2, 20 + 12, 16, generator=g)
    weights = torch.full((5,), 0.2)
    args = (query, key, value, 3, [4, 5], 0.3, (4, 9), True, True, weights)
    _, plain = attention.lead_and_blocks_attention(*args)  # the kernel does not run on the CPU
    launches = []

    def failing(*args, **kwargs):
        launches.append(args[0].shape)
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(kernel_switch, "INTERPRETED", True)  # as if it could run here
    monkeypatch.setattr(probability_kernel.SWITCH, "failed", False)
    monkeypatch.setattr(probability_kernel, "weighted_probabilities_kernel", failing)
    options.apply(RuntimeOptions(block_attention_kernel=False))  # not this test's kernel
    with pytest.warns(UserWarning, match="probability kernel failed"):
        _, fell_back = attention.lead_and_blocks_attention(*args)
    _, again = attention.lead_and_blocks_attention(*args)
    assert len(launches) == 1, "after the first failure the kernel is not tried again"
    torch.testing.assert_close(fell_back, plain, atol=0, rtol=0)
    torch.testing.assert_close(again, plain, atol=0, rtol=0)
