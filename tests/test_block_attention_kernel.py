"""The pseudo-query blocks' attention in one Triton pass (resumed from the cuDNN part over
the cache, or over every key), on the CPU under Triton's interpreter (in a subprocess, as
the other kernels' tests), against attention under the whole block mask and against the
plain path the kernel replaces."""

from __future__ import annotations

import pytest
import torch
from test_split_kv_attention import run_interpreted

from hermes_policy import options
from hermes_policy.attention import blocks as attention
from hermes_policy.kernels import block_attention_kernel
from hermes_policy.kernels import switch as kernel_switch
from hermes_policy.kernels.block_attention_kernel import available, block_bounds
from hermes_policy.options import RuntimeOptions

pytest.importorskip("triton", reason="the block attention kernel is written in Triton (shipped with torch on Linux)")


def test_kernel_equals_attention_under_the_block_mask():
    """Grouped heads, one to three blocks, a lead read and unread (the kernel resumes from
    the cached part, or takes every key), no cache at all, strided queries, several tiles
    of rows and keys; outputs against float32 attention under the whole mask, captured
    probabilities against the plain path (``block_attention_kernel=False``)."""
    out = run_interpreted(
        """
        import itertools
        import os

        import torch
        import torch.nn.functional as F
        from hermes_policy import options
        from hermes_policy.kernels import block_attention_kernel
        from hermes_policy.attention.blocks import lead_and_blocks_attention
        from hermes_policy.attention.masks import block_query_mask

        g = torch.Generator().manual_seed(5)
        calls = []
        kernel = block_attention_kernel.block_rows_attention_kernel

        def counted(*args, **kwargs):
            calls.append(args[4])  # key_start > 0: resumed from the cached part
            return kernel(*args, **kwargs)

        block_attention_kernel.block_rows_attention_kernel = counted
        cases = [  # (heads, kv heads, cached keys, lead, blocks, captured block, lead read)
            (8, 2, 70, 5, [6, 9], 1, True),
            (8, 2, 70, 5, [6, 9], 0, False),
            (4, 4, 33, 0, [12], 0, True),
            (12, 1, 129, 3, [4, 7, 3], 2, True),  # 12 x 14 stacked rows: several row tiles
            (8, 2, 0, 7, [5, 4], 0, True),  # no cache: the lead's keys only
            (4, 2, 100, 9, [70, 3], 0, True),  # a block over two key tiles of its own
        ]
        for (heads, kv_heads, cached, lead, blocks, picked, lead_read), with_chunk in itertools.product(cases, "01"):
            q_len = lead + sum(blocks)
            k_len = cached + q_len
            query = torch.randn(1, q_len, heads + 2, 16, generator=g)[:, :, :heads].transpose(1, 2)
            kv = torch.randn(2, 1, kv_heads, k_len + 10, 16, generator=g)
            key, value = kv[0][:, :, :k_len], kv[1][:, :, :k_len]
            start = sum(blocks[:picked])
            keep = (start, start + blocks[picked])
            weights = torch.rand(blocks[picked], generator=g)
            args = (query, key, value, lead, blocks, 0.25, keep, True, lead_read)
            before = len(calls)
            with options.applied(block_attention_kernel=False):
                out_plain, probs_plain = lead_and_blocks_attention(*args)
                _, weighed_plain = lead_and_blocks_attention(*args, weights)
            assert len(calls) == before
            joined = with_chunk == "1"
            out, probs = lead_and_blocks_attention(*args, blocks_with_chunk=joined)
            _, weighed = lead_and_blocks_attention(*args, weights, blocks_with_chunk=joined)
            assert len(calls) == before + 2, "the kernel did not run"
            resumed = with_chunk == "1" and lead_read and lead > 0 and cached > 0
            assert (calls[-1] > 0) == resumed, calls[-1]
            mask = block_query_mask(blocks, k_len, query.device, lead)
            groups = heads // kv_heads
            reference = F.scaled_dot_product_attention(
                query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=mask, scale=0.25
            )
            rows = slice(0 if lead_read else lead, q_len)
            torch.testing.assert_close(out[:, :, rows], reference[:, :, rows], atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(out[:, :, rows], out_plain[:, :, rows], atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(probs, probs_plain, atol=1e-7, rtol=1e-5)
            torch.testing.assert_close(weighed, weighed_plain, atol=1e-7, rtol=1e-5)
        # the kernel alone, small tiles: many row tiles, key tiles and own-key tiles
        heads, kv_heads, seen, blocks = 6, 2, 90, [13, 21, 4]
        n = sum(blocks)
        rows = torch.randn(1, heads, n, 32, generator=g)
        key, value = torch.randn(2, 1, kv_heads, seen + n, 32, generator=g)
        out = torch.empty_like(rows)
        lse = kernel(rows, key, value, blocks, 0, 0.2, out, None, 16, 16)
        mask = block_query_mask(blocks, seen + n, rows.device)
        scores = rows @ key.repeat_interleave(3, 1).transpose(-1, -2) * 0.2
        scores = scores.masked_fill(~mask, float("-inf"))
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, torch.softmax(scores, -1) @ value.repeat_interleave(3, 1), atol=2e-6, rtol=1e-5)
        # the shared keys in ranges walked at once, merged: one range, ranges ending inside a
        # tile, one tile each, more ranges asked than tiles; resumed from a prior part too
        for ranges in (1, 2, 3, 6, 40):
            out = torch.empty(1, n, heads, 32).transpose(1, 2)  # strided
            lse = kernel(rows, key, value, blocks, 0, 0.2, out, None, 16, 16, 4, ranges)
            torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out, torch.softmax(scores, -1) @ value.repeat_interleave(3, 1), atol=2e-6, rtol=1e-5)
            split = 37
            head_scores = scores[..., :split]
            prior_lse = torch.logsumexp(head_scores, -1)
            prior_out = torch.softmax(head_scores, -1) @ value.repeat_interleave(3, 1)[:, :, :split]
            out = torch.empty_like(rows)
            lse = kernel(rows, key, value, blocks, split, 0.2, out, (prior_out, prior_lse), 16, 16, 4, ranges)
            torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out, torch.softmax(scores, -1) @ value.repeat_interleave(3, 1), atol=2e-6, rtol=1e-5)
        # every shared key in the prior part: the own block alone resumes from it
        prior_lse = torch.logsumexp(scores[..., :seen], -1)
        prior_out = torch.softmax(scores[..., :seen], -1) @ value.repeat_interleave(3, 1)[:, :, :seen]
        out = torch.empty_like(rows)
        lse = kernel(rows, key, value, blocks, seen, 0.2, out, (prior_out, prior_lse), 16, 16)
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, torch.softmax(scores, -1) @ value.repeat_interleave(3, 1), atol=2e-6, rtol=1e-5)
        print("ok", len(calls))
        """
    )
    assert out.split() == ["ok", "24"]


def test_merge_of_parts_equals_a_log_sum_exp_merge():
    """The parts' merge against a softmax over their log-sum-exps: fewer parts than the
    unrolled loops take, as many, and more (the rest in a loop of their own), with a part
    that saw no key (log-sum-exp -inf, weight 0) and a strided output."""
    out = run_interpreted(
        """
        import torch
        from hermes_policy.kernels.block_attention_kernel import MERGE_UNROLLED, merge_parts_kernel

        g = torch.Generator().manual_seed(0)
        for count in (3, MERGE_UNROLLED, MERGE_UNROLLED + 3):
            parts = torch.randn(count, 1, 3, 20, 32, generator=g)
            lse = torch.randn(count, 1, 3, 20, generator=g) * 3
            lse[1] = float("-inf")
            out = torch.empty(1, 20, 3, 32).transpose(1, 2)
            lse_out = torch.empty(1, 3, 20)
            merge_parts_kernel(parts, lse, out, lse_out, block_m=8)
            weights = torch.softmax(lse, dim=0)[..., None]
            torch.testing.assert_close(out, (weights * parts).sum(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse_out, torch.logsumexp(lse, dim=0), atol=1e-5, rtol=1e-5)
        print("ok")
        """
    )
    assert out.split() == ["ok"]


def test_key_ranges(monkeypatch):
    """As many ranges as keep the programs within one wave, none shorter than the minimum,
    at least one while there are shared keys, none without. On 132 multiprocessors: the
    fastest counts of the H200 sweep (block-attention-alternatives-...-sweep.txt) for the
    LLaVA-OV-7B prompts, 56 / 80 programs of rows (40 + 80 / 64 + 112 rows) and 20 / 28
    (a deep layer's 40 / 64 rows), over 5,569 keys."""
    from hermes_policy.kernels.block_attention_kernel import key_ranges

    monkeypatch.setattr(block_attention_kernel, "multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    assert [key_ranges(5569, programs, cuda) for programs in (56, 80, 20, 28)] == [4, 3, 6, 6]
    assert key_ranges(5569, 20, cuda, min_keys=256) == 12  # the wave, not the keys, bounds it
    assert key_ranges(300, 20, cuda, min_keys=256) == 2
    assert key_ranges(100, 10_000, cuda) == 1
    assert key_ranges(0, 56, cuda) == 0


def test_block_bounds():
    """Where the blocks after the first start; unused bounds past the last row."""
    assert block_bounds([6, 9]) == (6, 16, 16)
    assert block_bounds([4, 7, 3, 2]) == (4, 11, 14)
    assert block_bounds([12]) == (13, 13, 13)
    with pytest.raises(ValueError, match="1 to 4 blocks"):
        block_bounds([1, 1, 1, 1, 1])


def test_where_the_kernel_runs(monkeypatch):
    """On CUDA (or under the interpreter) for power-of-two head sizes; never when switched off."""
    monkeypatch.setattr(kernel_switch, "INTERPRETED", False)
    options.apply(RuntimeOptions())
    assert not available(torch.device("cpu"), 128)
    assert available(torch.device("cuda"), 128)
    assert not available(torch.device("cuda"), 80)
    options.apply(RuntimeOptions(block_attention_kernel=False))
    assert not available(torch.device("cuda"), 128)


@pytest.mark.parametrize("cached", [20, 0])  # resumed from the cached part (lead written first), or alone
def test_a_failing_kernel_falls_back_to_the_plain_path(monkeypatch, cached):
    """A launch that fails warns once, turns the kernel off for the process, and the block
    attention gives the plain path's output and probabilities; more than four blocks take
    the plain path without trying the kernel."""
    g = torch.Generator().manual_seed(2)
    lead, blocks = 3, [4, 5]
    query = torch.randn(1, 6, lead + 9, 16, generator=g)
    key, value = torch.randn(2, 1, 2, cached + lead + 9, 16, generator=g)
    args = (query, key, value, lead, blocks, 0.3, (4, 9), True, True)
    out_plain, plain = attention.lead_and_blocks_attention(*args)  # the kernel does not run on the CPU
    launches = []

    def failing(*args, **kwargs):
        launches.append(args[0].shape)
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(kernel_switch, "INTERPRETED", True)  # as if it could run here
    monkeypatch.setattr(block_attention_kernel.SWITCH, "failed", False)
    monkeypatch.setattr(block_attention_kernel, "block_rows_attention_kernel", failing)
    options.apply(RuntimeOptions(probability_kernel=False))
    five = (query, key, value, lead, [2, 2, 2, 2, 1], 0.3, (0, 2), True, True)
    out_five, _ = attention.lead_and_blocks_attention(*five)
    assert not launches, "five blocks never reach the kernel"
    monkeypatch.setattr(kernel_switch, "INTERPRETED", False)
    reference_five, _ = attention.lead_and_blocks_attention(*five)
    monkeypatch.setattr(kernel_switch, "INTERPRETED", True)
    torch.testing.assert_close(out_five, reference_five, atol=0, rtol=0)
    with pytest.warns(UserWarning, match="block attention kernel failed"):
        out, fell_back = attention.lead_and_blocks_attention(*args)
    out_again, again = attention.lead_and_blocks_attention(*args)
    assert len(launches) == 1, "after the first failure the kernel is not tried again"
    for got, want in ((out, out_plain), (out_again, out_plain), (fell_back, plain), (again, plain)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
