"""Several layers' summary tokens in one Triton kernel (``hermes_policy/kernels/summary_kernel.py``):
on the CPU under Triton's interpreter (in a subprocess, as the other kernels' tests),
against each layer's :data:`~hermes_policy.retention.scoring.evicted_summary` eager code;
the checks that leave layers it cannot take to the per-layer path; where it does not run.
On CUDA: test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from test_split_kv_attention import run_interpreted

from hermes_policy import options
from hermes_policy.kernels import summary_kernel
from hermes_policy.options import RuntimeOptions

pytest.importorskip("triton", reason="the summary kernel is written in Triton (shipped with torch on Linux)")


def summary_case(
    device: str | torch.device,
    dtype: torch.dtype,
    lengths: tuple[int, ...] = (90, 70, 110),
    n: int = 45,
    batch: int = 2,
    kv_heads: int = 2,
    dim: int = 32,
    capacity: int = 128,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One group of layers as the retention policy hands it over: each layer's keys and
    values as views ``[:, :, :length]`` of its own ``(2, batch, kv_heads, capacity, dim)``
    buffer, ``n`` evicted tokens a layer (unsorted), and the float32 rotations ``(layers, n,
    dim)`` of random angles."""
    g = torch.Generator(device=device).manual_seed(seed)
    keys, values, evicted = [], [], []
    for length in lengths:
        buffer = torch.randn(2, batch, kv_heads, capacity, dim, device=device, generator=g).to(dtype)
        keys.append(buffer[0][:, :, :length])
        values.append(buffer[1][:, :, :length])
        evicted.append(torch.randperm(length, device=device, generator=g)[:n])
    angles = torch.rand(len(lengths), n, dim // 2, device=device, generator=g) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return keys, values, torch.stack(evicted), cos, sin


def assert_summaries_equal_eager(
    key: torch.Tensor,
    value: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    evicted: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Each layer's row of ``key, value (layers, batch, kv_heads, 1, dim)`` against
    ``evicted_summary.eager`` of its cache: float32 to 1e-5; bfloat16 within one step of
    bfloat16 (its unit in the last place). The kernel adds the float32 terms of the mean in
    another order than torch's reduction (tiles, then ranges, then the ranges in turn), so
    the float32 means differ in their last bits, and where one lies next to a rounding
    boundary of bfloat16 the two round to neighbours."""
    from hermes_policy.retention.scoring import evicted_summary

    batch, kv_heads, _, dim = keys[0].shape
    assert key.shape == value.shape == (len(keys), batch, kv_heads, 1, dim)
    assert key.dtype == value.dtype == keys[0].dtype
    for i in range(len(keys)):
        want_key, want_value = evicted_summary.eager(keys[i], values[i], evicted[i], cos[i], sin[i])
        for got, want in ((key[i], want_key), (value[i], want_value)):
            if want.dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                continue
            want = want.float()
            # the spacing of bfloat16 at |want|: frexp's mantissa is in [0.5, 1), 8 bits
            _, exponent = torch.frexp(want)
            step = torch.where(want == 0, torch.finfo(torch.bfloat16).tiny, torch.exp2(exponent.float() - 8))
            off = (got.float() - want).abs()
            assert bool((off <= step).all()), f"layer {i}: {int((off > step).sum())} entries more than one step off"


# Triton's interpreter (3.x) converts float32 to bfloat16 by dropping the low bits (the GPU
# rounds to nearest even): each rotated key would round towards zero, and the mean lie many
# bfloat16 steps from the reference's. Its conversion is swapped for torch's, as on the GPU.
ROUND_LIKE_THE_GPU = """
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter._convert_float

    def rounding(data, src, dst, mode):
        if src == tl.float32 and dst == tl.bfloat16:
            as_float = torch.from_numpy(np.ascontiguousarray(data).view(np.float32))
            return as_float.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return truncating(data, src, dst, mode)

    interpreter._convert_float = rounding
"""


def test_kernel_equals_each_layer_on_its_own():
    """bf16 and float32; three layers of different lengths with batch 2 and 2 KV heads,
    45 unsorted evicted tokens each: tiles of 8 (the last one partly filled) in 3 ranges,
    and in 7 (one of them empty). Then two smaller layers through :func:`evicted_summaries`
    (the default tile and ranges), which leaves the kernel switched on."""
    out = run_interpreted(
        ROUND_LIKE_THE_GPU
        + """
    from hermes_policy.kernels import summary_kernel
    from test_summary_kernel import assert_summaries_equal_eager, summary_case

    for dtype, splits in ((torch.bfloat16, 3), (torch.bfloat16, 7), (torch.float32, 3)):
        case = summary_case("cpu", dtype)
        key, value = summary_kernel.evicted_summaries_kernel(*case, splits=splits, block_n=8)
        assert_summaries_equal_eager(key, value, *case)
    case = summary_case("cpu", torch.bfloat16, lengths=(40, 33), n=21, batch=1, dim=16, seed=1)
    key, value = summary_kernel.evicted_summaries(*case)
    assert_summaries_equal_eager(key, value, *case)
    assert not summary_kernel.SWITCH.failed
    print("ok")
    """
    )
    assert out.split() == ["ok"]


def test_address_table_refuses_layers_the_kernel_cannot_take():
    """Mixed dtypes, head counts, head sizes or devices, rows of another stride, evicted
    indices of the wrong dtype or shape, rotations of the wrong shape or dtype: ValueError,
    so :func:`evicted_summaries` leaves them to the per-layer path."""
    keys, values, evicted, cos, sin = summary_case("cpu", torch.bfloat16)
    table = summary_kernel.address_table(keys, values, evicted, cos, sin)
    assert table.shape == (3, summary_kernel.TABLE_COLUMNS)
    assert list(table[:, 0]) == [k.data_ptr() for k in keys] and list(table[:, 3]) == [v.data_ptr() for v in values]
    assert list(table[0, 1:3]) == [keys[0].stride(0), keys[0].stride(1)]

    def swap(tensors: list[torch.Tensor], tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensors[0], tensor, *tensors[2:]]

    bad = {
        "dtype": (swap(keys, keys[1].float()), values, evicted, cos, sin),
        "value dtype": (keys, swap(values, values[1].half()), evicted, cos, sin),
        "heads": (swap(keys, keys[1][:, :1]), values, evicted, cos, sin),
        "head size": (swap(keys, keys[1][..., :16]), swap(values, values[1][..., :16]), evicted, cos, sin),
        "device": (swap(keys, keys[1].to("meta")), values, evicted, cos, sin),
        "row stride": (swap(keys, torch.zeros(2, 2, 90, 64, dtype=torch.bfloat16)[..., :32]), values, evicted, cos, sin),
        "unit stride": (swap(keys, keys[1].transpose(-1, -2).contiguous().transpose(-1, -2)), values, evicted, cos, sin),
        "values' length": (keys, swap(values, values[1][:, :, :-1]), evicted, cos, sin),
        "layers": (keys[:2], values, evicted, cos, sin),
        "evicted dtype": (keys, values, evicted.int(), cos, sin),
        "evicted shape": (keys, values, evicted[:2], cos, sin),
        "evicted rank": (keys, values, evicted.flatten(), cos, sin),
        "evicted contiguous": (keys, values, evicted.t().contiguous().t(), cos, sin),
        "no evicted": (keys, values, evicted[:, :0], cos[:, :0], sin[:, :0]),
        "cos shape": (keys, values, evicted, cos[:, :-1], sin),
        "sin head size": (keys, values, evicted, cos, sin[..., :16]),
        "cos dtype": (keys, values, evicted, cos.double(), sin),
        "no layers": ([], [], evicted[:0], cos[:0], sin[:0]),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError):
            summary_kernel.address_table(*args)
            pytest.fail(f"accepted: {name}")
    odd = summary_case("cpu", torch.float32, dim=24)
    with pytest.raises(ValueError, match="power of two"):
        summary_kernel.address_table(*odd)


def test_evicted_summaries_does_not_run_where_it_cannot(monkeypatch):
    """None (the caller's per-layer path) when switched off, on a CPU without the
    interpreter, and for layers the kernel cannot take; no launch then."""
    case = summary_case("cpu", torch.float32)
    launches = []

    def fake_launch(table, first, evicted, cos, sin):
        launches.append(table.shape[0])
        return "launched"

    monkeypatch.setattr(summary_kernel, "launch_with_table", fake_launch)
    monkeypatch.setattr(summary_kernel.SWITCH, "failed", False)
    options.apply(RuntimeOptions())
    monkeypatch.setattr(summary_kernel, "INTERPRETED", False)
    assert not summary_kernel.available(torch.device("cpu"))
    assert summary_kernel.evicted_summaries(*case) is None
    monkeypatch.setattr(summary_kernel, "INTERPRETED", True)  # as if it could run here
    assert summary_kernel.available(torch.device("cpu"))
    assert summary_kernel.evicted_summaries(*case) == "launched"
    keys, values, evicted, cos, sin = case
    assert summary_kernel.evicted_summaries(keys, values, evicted.int(), cos, sin) is None
    options.apply(RuntimeOptions(summary_kernel=False))
    assert not summary_kernel.available(torch.device("cpu"))
    assert summary_kernel.evicted_summaries(*case) is None
    assert launches == [3], "one launch, for the layers it could take while switched on"


def test_a_failing_launch_turns_the_kernel_off(monkeypatch):
    """A launch that fails warns once and returns None; the kernel is not tried again."""
    case = summary_case("cpu", torch.float32)
    calls = []

    def failing(table, first, evicted, cos, sin):
        calls.append(1)
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(summary_kernel, "INTERPRETED", True)
    monkeypatch.setattr(summary_kernel.SWITCH, "failed", False)
    monkeypatch.setattr(summary_kernel, "launch_with_table", failing)
    options.apply(RuntimeOptions())
    with pytest.warns(UserWarning, match="summary kernel failed"):
        assert summary_kernel.evicted_summaries(*case) is None
    assert summary_kernel.evicted_summaries(*case) is None
    assert calls == [1] and not summary_kernel.available(torch.device("cpu"))
