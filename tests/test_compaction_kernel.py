"""Every layer's eviction gather in one Triton kernel (``hermes_policy/kernels/compaction_kernel.py``):
on the CPU under Triton's interpreter (in a subprocess, as the other kernels' tests), bit
for bit against each layer gathered on its own; the checks that keep layers it cannot
take away from it; the session's compression with and without it. On CUDA: test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from compaction_cases import decisions, layer_with
from test_split_kv_attention import run_interpreted

from hermes_policy import options
from hermes_policy.cache.stream_cache import StreamCache
from hermes_policy.kernels import compaction_kernel
from hermes_policy.kernels import switch as kernel_switch
from hermes_policy.options import RuntimeOptions

pytest.importorskip("triton", reason="the compaction kernel is written in Triton (shipped with torch on Linux)")


def test_kernel_equals_gathering_layer_by_layer():
    """bf16 and float32 rows (16 and 32 words a row of 16), a tile of 8 rows and 2 words,
    so that each plane's rows span many tiles and column ranges."""
    out = run_interpreted(
        """
        import torch
        from compaction_cases import check_compaction

        for dtype in (torch.bfloat16, torch.float32):
            check_compaction("cpu", dtype)
        check_compaction("cpu", torch.bfloat16, block_rows=8, cols=2)  # many tiles, columns in several programs
        print("ok")
        """
    )
    assert out.split() == ["ok"]


def test_address_table_refuses_layers_the_kernel_cannot_take():
    """Mixed dtypes or head counts, separate key and value buffers, non-contiguous or
    wrongly typed indices, a summary past the capacity, a summary of the wrong shape:
    ValueError, so :func:`compact_layers` leaves them to the per-layer gather."""
    cases = decisions("cpu", torch.bfloat16)
    buffers = [layer_with(tokens).kv_buffer for tokens, _, _ in cases]
    indices = [kept for _, kept, _ in cases]
    summaries = [extra for _, _, extra in cases]
    table = compaction_kernel.address_table(buffers, indices, summaries)
    assert table.shape == (len(cases), compaction_kernel.TABLE_COLUMNS)
    assert list(table[:, 3]) == [len(k) for k in indices]
    assert [bool(row[4]) for row in table] == [s is not None for s in summaries]
    bad = {
        "dtype": (buffers[:1] + [buffers[1].float()] + buffers[2:], indices, summaries),
        "heads": (buffers[:1] + [buffers[1][:, :, :2].contiguous()] + buffers[2:], indices, summaries),
        "keys and values": (buffers[:1] + [buffers[1][0]] + buffers[2:], indices, summaries),
        "contiguous": (buffers[:1] + [buffers[1].transpose(-1, -2)] + buffers[2:], indices, summaries),
        "int64": (buffers, indices[:1] + [indices[1].int()] + indices[2:], summaries),
        "strided indices": (buffers, indices[:1] + [torch.arange(40)[::2]] + indices[2:], summaries),
        "capacity": (buffers, indices[:1] + [torch.arange(buffers[1].shape[3] + 1)] + indices[2:], summaries),
        "summary shape": (buffers, indices, summaries[:3] + [(summaries[3][0][..., :8], summaries[3][1])] + summaries[4:]),
        "count": (buffers[:-1], indices, summaries),
    }
    for name, args in bad.items():
        with pytest.raises(ValueError):
            compaction_kernel.address_table(*args)
        assert not compaction_kernel.compact_layers(*args), name


def test_gather_layers_takes_the_kernel_or_gathers_layer_by_layer(monkeypatch):
    """``StreamCache.gather_layers``: where the kernel runs, one launch for every layer
    and the layers' lengths set; where it does not (off, or the CPU), the same contents
    layer by layer."""
    cases = decisions("cpu", torch.float32)
    launches = []

    def fake_launch(table, first):  # the per-layer gather's result, as the kernel would write it
        launches.append(table.shape[0])
        return True

    def build() -> StreamCache:
        cache = StreamCache(len(cases))
        for layer, (tokens, _, _) in zip(cache.layers, cases, strict=True):
            layer.set_contents(tokens[0], tokens[1])
        return cache

    wanted = {i: (kept, extra) for i, (_, kept, extra) in enumerate(cases)}
    reference = build()
    reference.gather_layers(wanted)  # on the CPU: layer by layer
    for i, (_, kept, extra) in enumerate(cases):
        assert reference.layers[i].length == kept.shape[0] + (extra is not None)
    monkeypatch.setattr(kernel_switch, "INTERPRETED", True)
    monkeypatch.setattr(compaction_kernel, "INTERPRETED", True)
    monkeypatch.setattr(compaction_kernel, "_launch", fake_launch)
    cache = build()
    cache.gather_layers(wanted)
    assert launches == [len(cases)], "one launch for all layers"
    assert [layer.length for layer in cache.layers] == [layer.length for layer in reference.layers]
    options.apply(RuntimeOptions(compaction_kernel=False))
    cache = build()
    cache.gather_layers(wanted)
    assert launches == [len(cases)], "switched off: no launch"
    for got, want in zip(cache.layers, reference.layers, strict=True):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


def test_a_failing_kernel_falls_back_to_gathering_layer_by_layer(monkeypatch):
    """A launch that fails warns once, turns the kernel off for the process, and the
    layers are gathered one by one with the same result."""
    cases = decisions("cpu", torch.float32)
    wanted = {i: (kept, extra) for i, (_, kept, extra) in enumerate(cases)}

    def build() -> StreamCache:
        cache = StreamCache(len(cases))
        for layer, (tokens, _, _) in zip(cache.layers, cases, strict=True):
            layer.set_contents(tokens[0], tokens[1])
        return cache

    reference = build()
    reference.gather_layers(wanted)
    calls = []

    def failing(table, first):
        calls.append(1)
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(compaction_kernel, "INTERPRETED", True)
    monkeypatch.setattr(compaction_kernel.SWITCH, "failed", False)
    monkeypatch.setattr(compaction_kernel, "_launch", failing)
    options.apply(RuntimeOptions())
    with pytest.warns(UserWarning, match="compaction kernel failed"):
        first = build()
        first.gather_layers(wanted)
    again = build()
    again.gather_layers(wanted)
    assert calls == [1], "after the first failure the kernel is not tried again"
    for cache in (first, again):
        for got, want in zip(cache.layers, reference.layers, strict=True):
            assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
