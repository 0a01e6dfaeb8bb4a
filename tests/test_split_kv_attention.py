"""The answer's split-key attention kernel (Triton), on the CPU under Triton's interpreter.

The interpreter must be switched on before Triton compiles anything in the process, so
the kernel runs in a subprocess with ``TRITON_INTERPRET=1``; the reference is the explicit
masked attention the answer graphs use where the kernel does not run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hermes_policy import options
from hermes_policy.attention import static as attention
from hermes_policy.kernels import split_kv_attention
from hermes_policy.kernels import switch as kernel_switch
from hermes_policy.kernels.split_kv_attention import available, launch_shape
from hermes_policy.options import RuntimeOptions

pytest.importorskip("triton", reason="the split-key kernel is written in Triton (shipped with torch on Linux)")

TESTS = Path(__file__).parent


def run_interpreted(script: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "HERMES_SPLIT_KV": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_kernel_equals_masked_attention():
    """Grouped heads, ragged limits (some rows see a few keys only), a window with spare
    slots, more ranges than the keys need (empty ranges), several blocks of rows, a
    strided query, and ranges that end inside a step of keys."""
    out = run_interpreted(
        """
        import torch
        from hermes_policy.kernels.split_kv_attention import split_kv_slot_attention
        from hermes_policy.graphs.static_forward import slot_attention

        g = torch.Generator().manual_seed(0)
        cases = [  # (tokens, heads, kv heads, window, splits, keys per step)
            (1, 8, 2, 300, None, 32),
            (3, 8, 2, 200, 16, 16),  # 16 ranges over at most 190 keys: some are empty
            (20, 8, 1, 130, None, 32),  # 160 rows: two blocks of 128
            (5, 4, 4, 96, 2, 64),  # no grouping
        ]
        for q_len, heads, kv_heads, window, splits, block_n in cases:
            query = torch.randn(q_len, heads + 3, 32, generator=g)[:, :heads]  # strided, as from qkv
            buffer = torch.randn(2, 1, kv_heads, window + 40, 32, generator=g)
            keys, values = buffer[0][:, :, :window], buffer[1][:, :, :window]
            limits = torch.randint(0, window - 20, (q_len,), generator=g)
            limits[0] = 0  # one row sees a single key
            limits[-1] = window - 11
            got = split_kv_slot_attention(query, keys, values, limits, 32**-0.5, splits=splits, block_n=block_n)
            blocked = torch.arange(window)[None, :] > limits[:, None]
            want = slot_attention(query, keys, values, blocked, 32**-0.5)
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        print("ok", len(cases))
        """
    )
    assert out.split() == ["ok", "4"]


def test_answer_forwards_with_the_kernel_equal_them_without():
    """Both answer forwards (the fewer-kernel one and the transformers one in static mode)
    with their attention by the kernel (the CUDA default) against both with the explicit
    masked attention: hidden states and the keys and values written, on ragged layers."""
    out = run_interpreted(
        """
        import torch
        from test_static_forward import assert_forwards_close, both_forwards

        from hermes_policy import options
        from hermes_policy.kernels import split_kv_attention
        from hermes_policy.models.random_shapes import build_random_adapter

        calls = []
        kernel = split_kv_attention.split_kv_slot_attention

        def counted(*args, **kwargs):
            calls.append(args[0].shape)
            return kernel(*args, **kwargs)

        split_kv_attention.split_kv_slot_attention = counted
        for shape in ("tiny-llava-ov", "tiny-qwen2.5-vl"):
            adapter = build_random_adapter(shape, device="cpu", dtype=torch.float32)
            for q_len in (1, 5):
                with options.applied(split_kv_kernel=False):
                    explicit = both_forwards(adapter, q_len)
                before = len(calls)
                with options.applied(split_kv_kernel=True):
                    with_kernel = both_forwards(adapter, q_len)
                assert len(calls) - before == 2 * adapter.num_layers, "the kernel did not run for every layer"
                for name in ("static", "transformers"):
                    assert_forwards_close({"static": with_kernel[name], "transformers": explicit[name]}, 1e-5)
                assert_forwards_close(with_kernel, 1e-5)
        print("ok", len(calls))
        """
    )
    assert out.split()[0] == "ok" and int(out.split()[1]) > 0


def test_where_the_kernel_runs(monkeypatch):
    """On CUDA (or under the interpreter) for power-of-two head sizes; never when switched off."""
    monkeypatch.setattr(kernel_switch, "INTERPRETED", False)
    options.apply(RuntimeOptions())
    assert not available(torch.device("cpu"), 128)
    assert available(torch.device("cuda"), 128)
    assert not available(torch.device("cuda"), 80)  # not a power of two
    assert not available(torch.device("cuda"), 8)
    monkeypatch.setattr(kernel_switch, "INTERPRETED", True)
    assert available(torch.device("cpu"), 64)
    options.apply(RuntimeOptions(split_kv_kernel=False))
    assert not available(torch.device("cuda"), 128)
    assert not split_kv_attention.SWITCH.enabled()


@pytest.mark.parametrize("rows,kv_heads", [(7, 4), (112, 4), (224, 4), (16, 8), (1, 1)])
def test_launch_shape(rows, kv_heads, monkeypatch):
    """Rows padded to a power of two in [16, 128]; ranges a power of two, at most 64,
    about one program per multiprocessor."""
    monkeypatch.setattr(split_kv_attention, "_multiprocessors", lambda device: 132)
    block_r, splits = launch_shape(rows, kv_heads, torch.device("cuda"))
    assert block_r in (16, 32, 64, 128) and (block_r >= rows or block_r == 128)
    assert block_r == 16 or block_r // 2 < rows
    assert splits & (splits - 1) == 0 and 1 <= splits <= 64
    programs = kv_heads * -(-rows // block_r)
    assert programs * splits <= 132 or splits == 1
    assert splits == 64 or programs * splits * 2 > 132


def test_a_failing_kernel_falls_back_to_explicit_attention(monkeypatch):
    """A launch that fails (a GPU or Triton build without the kernel) warns once, turns the
    kernel off for the process, and both answer forwards give the explicit path's results."""
    from test_static_forward import assert_forwards_close, both_forwards

    from hermes_policy.models.random_shapes import build_random_adapter

    adapter = build_random_adapter("tiny-llava-ov", device="cpu", dtype=torch.float32)
    explicit = both_forwards(adapter, 3)  # the kernel does not run on the CPU
    launches = []

    def failing(*args, **kwargs):
        launches.append(args[0].shape)
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(kernel_switch, "INTERPRETED", True)  # as if it could run here
    monkeypatch.setattr(split_kv_attention.SWITCH, "failed", False)
    monkeypatch.setattr(split_kv_attention, "split_kv_slot_attention", failing)
    options.apply(RuntimeOptions())
    assert available(torch.device("cpu"), 16)
    with pytest.warns(UserWarning, match="split-key attention kernel failed"):
        fell_back = both_forwards(adapter, 3)
    assert len(launches) == 1, "after the first failure the kernel is not tried again"
    assert not available(torch.device("cpu"), 16)
    for name in ("static", "transformers"):
        assert_forwards_close({"static": fell_back[name], "transformers": explicit[name]}, 1e-6)
    # the fewer-kernel forward failing at its first layer, with the mask not built yet
    monkeypatch.setattr(split_kv_attention.SWITCH, "failed", False)
    monkeypatch.setattr(attention, "split_kv_attention", SimpleNamespace(available=lambda *args: False))
    with pytest.warns(UserWarning, match="split-key attention kernel failed"):
        fell_back = both_forwards(adapter, 3)
    assert len(launches) == 2
    assert_forwards_close({"static": fell_back["static"], "transformers": explicit["static"]}, 1e-6)
